"""RealEdit DDIM Invert and RealEdit Reference Features (SpecRef stage 1, shared by every method)."""

from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io, ui

from ..hosts.comfy_sampling import (
    batch_obstacle,
    ddim_invert,
    invert_source_and_reference,
    reference_features,
    schedule_steps,
)
from ..inversion.bank import BankSettings, LayerWindow, StepWindow
from .common import (
    Inversion,
    RefFeatures,
    convention_input,
    latent_output,
    latent_samples,
    progress,
    scheduler_input,
    single_image,
)

CATEGORY = "RealEdit/inversion"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _steps_input() -> io.Int.Input:
    return io.Int.Input("steps", default=50, min=2, max=1000, tooltip="DDIM steps; the edit sampler uses the same.")


class DDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditDDIMInvert",
            display_name="RealEdit DDIM Invert",
            category=CATEGORY,
            description=(
                "Deterministic DDIM (eta 0) inversion of a photo's latent on your model (SD1.x/2.x/XL, eps or "
                "v-prediction). Outputs the noisy latent z_T (sample it with noise disabled to reconstruct) "
                "and the whole trajectory for the RealEdit edit samplers."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Latent.Input("latent", tooltip="The VAE-encoded photo (one image)."),
                io.Conditioning.Input("positive", tooltip="The prompt to invert with (the source caption)."),
                _steps_input(),
                io.Float.Input("guidance", default=1.0, min=1.0, max=30.0, step=0.1,
                               tooltip="CFG during inversion; 1 (no CFG) is the standard and the default."),
                scheduler_input(),
                convention_input(),
                io.Conditioning.Input("negative", optional=True, tooltip="Only needed with guidance above 1."),
            ],
            outputs=[
                io.Latent.Output(display_name="z_T", tooltip="The inverted noise latent."),
                Inversion.Output(display_name="inversion"),
            ],
        )

    @classmethod
    def execute(cls, model, latent, positive, steps, guidance, scheduler, convention, negative=None) -> io.NodeOutput:
        samples = single_image(latent_samples(latent), "latent")
        total = schedule_steps(model, scheduler, steps)
        inversion = ddim_invert(model, samples, positive, steps=steps, scheduler=scheduler, guidance=guidance,
                                negative=negative, convention=convention, callback=progress(total))
        return io.NodeOutput(latent_output(model, inversion.z_T, samples), inversion)


def _bank_inputs() -> list:
    """The reference-bank settings shared by RealEdit Reference Features and Invert Source + Reference."""
    return [
        io.Combo.Input("layers", options=["decoder", "encoder", "all"], default="decoder",
                       tooltip="Which half of the UNet (default: the decoder, SpecRef's choice)."),
        io.Int.Input("finest_resolutions", default=2, min=1, max=4,
                     tooltip="How many of the finest attention resolutions to keep: 2 = 64x64 and "
                             "32x32 on SD1.x at 512 px (layers 10-15), the same on SD2.x/SDXL."),
        io.Float.Input("step_start", default=0.08, min=0.0, max=1.0, step=0.01,
                       tooltip="First edit step kept, as a fraction (0.08 = step 4 of 50, SpecRef)."),
        io.Float.Input("step_end", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="End of the kept steps, as a fraction (exclusive)."),
        io.Combo.Input("mode", options=["stored", "live"], default="stored",
                       tooltip="stored: keep the reference's K/V (about 1 GiB in fp16 at 512 px with the "
                               "default windows, SD1.5); no extra edit compute. live: keep only its latent "
                               "trajectory (about 3 MiB); the edit sampler recomputes K/V by running the "
                               "reference as an extra batch row every step (measured about +40% edit time "
                               "on an SD1.5-shaped UNet)."),
        io.Combo.Input("dtype", options=list(DTYPES), default="fp16", tooltip="Storage precision."),
        io.Combo.Input("device", options=["offload", "compute"], default="offload",
                       tooltip="Where the bank lives: the model's offload device (CPU RAM when the "
                               "model is offloaded) or the compute device (faster, uses VRAM)."),
    ]


def _bank_settings(model, layers: str, finest_resolutions: int, step_start: float, step_end: float, mode: str,
                   dtype: str, device: str) -> BankSettings:
    if step_end < step_start:
        raise ValueError("RealEdit: step_end must not be below step_start.")
    stage = {"decoder": "up", "encoder": "down", "all": "any"}[layers]
    return BankSettings(
        layers=LayerWindow(stage=stage, finest=finest_resolutions),
        steps=StepWindow(step_start, step_end),
        dtype=DTYPES[dtype],
        device=model.offload_device if device == "offload" else model.load_device,
        mode=mode,
    )


class ReferenceFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditReferenceFeatures",
            display_name="RealEdit Reference Features",
            category=CATEGORY,
            description=(
                "Inverts the reference photo and keeps its self-attention K/V in the layers and steps the "
                "SpecRef edit reads (SpecRef stage 1). 'stored' keeps them (fast edit, memory); 'live' keeps "
                "only the reference's trajectory and recomputes them as one extra row of each edit step. "
                "To invert the source photo in the same batch, use RealEdit Invert Source + Reference."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Latent.Input("reference", tooltip="The VAE-encoded reference photo (one image)."),
                io.Conditioning.Input("conditioning", tooltip="The reference's prompt; SpecRef uses an empty "
                                      "prompt: connect CLIP Text Encode with an empty text."),
                _steps_input(),
                scheduler_input(),
                convention_input(),
                *_bank_inputs(),
            ],
            outputs=[RefFeatures.Output(display_name="ref_features")],
        )

    @classmethod
    def execute(cls, model, reference, conditioning, steps, scheduler, convention, layers, finest_resolutions,
                step_start, step_end, mode, dtype, device) -> io.NodeOutput:
        samples = single_image(latent_samples(reference, "reference"), "reference")
        settings = _bank_settings(model, layers, finest_resolutions, step_start, step_end, mode, dtype, device)
        total = schedule_steps(model, scheduler, steps)
        features = reference_features(model, samples, conditioning, settings, steps=steps, scheduler=scheduler,
                                      convention=convention, callback=progress(total))
        text = features.describe()
        return io.NodeOutput(features, ui=ui.PreviewText(text))


class InvertSourceAndReference(io.ComfyNode):
    """Both SpecRef stage-1 inversions in one node, batched when the photos share a size."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditInvertSourceAndReference",
            display_name="RealEdit Invert Source + Reference",
            category=CATEGORY,
            description=(
                "RealEdit DDIM Invert (source photo) and RealEdit Reference Features (reference photo) in one "
                "node: when both latents have the same size they are inverted as one batch of two (each with "
                "its own prompt), which gives the same results in fewer model calls. Guidance is 1 (no CFG), "
                "SpecRef's setting; for another guidance use the two separate nodes."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Latent.Input("source", tooltip="The VAE-encoded photo to edit (one image)."),
                io.Conditioning.Input("source_conditioning", tooltip="The source caption (as on DDIM Invert)."),
                io.Latent.Input("reference", tooltip="The VAE-encoded reference photo (one image)."),
                io.Conditioning.Input("reference_conditioning", tooltip="The reference's prompt; SpecRef uses an "
                                      "empty prompt: connect CLIP Text Encode with an empty text."),
                _steps_input(),
                scheduler_input(),
                convention_input(),
                *_bank_inputs(),
                io.Boolean.Input("batch", default=True,
                                 tooltip="Invert both in one batch when they share a size (fewer model calls; "
                                         "peak activation memory of two images). Off, or sizes or prompt options "
                                         "that differ: one after the other. The node's text says which ran."),
            ],
            outputs=[
                io.Latent.Output(display_name="z_T", tooltip="The source's inverted noise latent."),
                Inversion.Output(display_name="inversion", tooltip="The source INVERSION (as from DDIM Invert)."),
                RefFeatures.Output(display_name="ref_features"),
            ],
        )

    @classmethod
    def execute(cls, model, source, source_conditioning, reference, reference_conditioning, steps, scheduler,
                convention, layers, finest_resolutions, step_start, step_end, mode, dtype, device,
                batch=True) -> io.NodeOutput:
        src = single_image(latent_samples(source, "source"), "source")
        ref = single_image(latent_samples(reference, "reference"), "reference")
        settings = _bank_settings(model, layers, finest_resolutions, step_start, step_end, mode, dtype, device)
        total = schedule_steps(model, scheduler, steps)
        one_batch = batch and batch_obstacle(src, ref, source_conditioning, reference_conditioning) is None
        result = invert_source_and_reference(
            model, src, source_conditioning, ref, reference_conditioning, settings, steps=steps,
            scheduler=scheduler, convention=convention, batched=batch,
            callback=progress(total if one_batch else 2 * total))
        how = "source and reference inverted in one batch" if result.batched else result.note
        text = f"{result.reference.describe()}\n{how}"
        return io.NodeOutput(latent_output(model, result.source.z_T, src), result.source, result.reference,
                             ui=ui.PreviewText(text))

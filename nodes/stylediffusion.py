"""StyleDiffusion nodes: RealEdit Value-Embedding Inversion and the RealEdit StyleDiffusion Edit Sampler (P2Plus).

Every default and the tooltip naming its origin come from :mod:`realedit.settings.stylediffusion`.

The edit is a node of its own rather than more inputs on the SpecRef Edit Sampler: P2Plus has its own knobs
(tau_v for the learned values, tau_u for the unconditional branch, a free-running source row) and its own
defaults (the official README's tau_c .6 against SpecRef's .8), and no reference inputs; both samplers share
the two-path loop, the P2P controls and the word helpers underneath, and each refuses the other's INVERSION.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from ..attention.local_blend import LocalBlend
from ..attention.stylediffusion import P2PlusControls, StyleDiffusionError
from ..hosts.comfy_sampling import schedule_steps
from ..hosts.comfy_stylediffusion import image_features, stylediffusion_edit, value_invert
from ..inversion.value_inversion import check_value_inversion, value_settings
from ..settings.stylediffusion import SD_DEFAULTS, origin
from .common import (
    EDIT_MODES,
    Inversion,
    blend_positions,
    check_map_downscale,
    convention_input,
    encode,
    image_mask,
    latent_output,
    latent_samples,
    map_downscale_input,
    progress,
    prompt_edit,
    scheduler_input,
    single_image,
    split_words,
)

CATEGORY = "RealEdit/stylediffusion"
SOURCE_ROW = ("free", "pinned")

DEVIATIONS = (
    " Deviations from the official code: without CLIP_VISION, A_s and B_s are learned directly from A = 1, "
    "B = 0 ('direct', ours); the early stop is measured before the update (the kept value met it); the last "
    "iteration's step is the advance; the CLIP features are encoded once."
)


INVERSION_MAPS_TOOLTIP = (
    "The attention term keeps the cross-attention maps of the layers whose token grid is the latent divided by "
    "this. Default 4, " + origin("map_downscale") + ". Smaller images need a smaller value (the shapes world's 128 px "
    "images: 1, its 16x16 layers); keep it equal to the Edit Sampler's map_downscale.")


def _fraction(name: str, tooltip: str = "") -> io.Float.Input:
    return io.Float.Input(name, default=getattr(SD_DEFAULTS, name), min=0.0, max=1.0, step=0.01,
                          tooltip=tooltip + origin(name))


class ValueEmbeddingInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditValueEmbeddingInversion",
            display_name="RealEdit Value-Embedding Inversion",
            category=CATEGORY,
            description=(
                "StyleDiffusion (Li et al. 2023): DDIM-inverts the photo with its caption (guidance 1), recording "
                "the 16x16 cross-attention maps, then per step learns the VALUE input of every cross-attention "
                "layer in the conditional rows (keys keep the caption; the unconditional branch is untouched), "
                "v_s = c * A_s + B_s, so the CFG step lands on the inverted latent while the attention maps stay "
                "those of the inversion. fp32 on a clone; the model you connect is never modified. With a "
                "CLIP_VISION and the IMAGE, A_s and B_s come from the official per-step mapping network of the "
                "image's CLIP features; without, they are learned directly (our deviation). Feed the INVERSION to "
                "the RealEdit StyleDiffusion Edit Sampler." + DEVIATIONS
            ),
            inputs=[
                io.Model.Input("model"),
                io.Latent.Input("latent", tooltip="The VAE-encoded photo (one image)."),
                io.Conditioning.Input("source", tooltip="The photo's caption (one prompt of at most 77 tokens)."),
                io.Conditioning.Input("negative", tooltip="The unconditional prompt: an empty CLIP Text Encode "
                                      "(the official code's plain '' embedding)."),
                io.Int.Input("steps", default=SD_DEFAULTS.steps, min=2, max=1000, tooltip=origin("steps")),
                io.Float.Input("cfg", default=SD_DEFAULTS.cfg, min=1.0, max=30.0, step=0.1, tooltip=origin("cfg")),
                io.Int.Input("max_iterations", default=int(SD_DEFAULTS.iteration_base), min=1, max=1000,
                             tooltip="Iteration budget per step: the cap is min(this, ceil(100 e^(-0.1 s))); 100 "
                             "keeps the official caps (1015 iterations over 30 steps at most). "
                             + origin("iteration_base")),
                io.Float.Input("learning_rate", default=SD_DEFAULTS.lr, min=1e-6, max=1.0, step=1e-4, round=False,
                               tooltip="Adam learning rate at the first step; it decays as lr * (1 - s / 100). "
                               + origin("lr")),
                io.Float.Input("early_stop_eps", default=SD_DEFAULTS.early_stop_eps, min=0.0, max=1.0, step=1e-6,
                               round=False, tooltip=origin("early_stop_eps")),
                io.Float.Input("early_stop_delta", default=SD_DEFAULTS.early_stop_delta, min=0.0, max=1.0,
                               step=1e-6, round=False, tooltip=origin("early_stop_delta")),
                io.Float.Input("attention_weight", default=SD_DEFAULTS.attention_weight, min=0.0, max=100.0,
                               step=0.1, tooltip=origin("attention_weight")),
                io.Int.Input("seed", default=SD_DEFAULTS.seed, min=0, max=2**31 - 1,
                             tooltip=origin("seed") + " Used by the clip parameterisation only."),
                scheduler_input(),
                convention_input(),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional: CLIP vision model for the official 'clip' parameterisation. "
                                    "Its width (or its projection's) must equal the text width (SD1.x: ViT-L/14). "
                                    + origin("parameterisation")),
                io.Image.Input("image", optional=True, tooltip="The photo itself, encoded by clip_vision (needed "
                               "with clip_vision)."),
                map_downscale_input(INVERSION_MAPS_TOOLTIP, SD_DEFAULTS.map_downscale),
            ],
            outputs=[
                io.Latent.Output(display_name="z_T", tooltip="The inverted noise latent."),
                Inversion.Output(display_name="inversion", tooltip="The trajectory and the learned A_s, B_s."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, source, negative, steps: int, cfg: float, max_iterations: int,
                learning_rate: float, early_stop_eps: float, early_stop_delta: float, attention_weight: float,
                seed: int, scheduler: str, convention: str, clip_vision=None, image=None,
                map_downscale: int = SD_DEFAULTS.map_downscale) -> io.NodeOutput:
        samples = single_image(latent_samples(latent), "latent")
        check_map_downscale(model, map_downscale)
        features = None
        if clip_vision is not None:
            if image is None:
                raise StyleDiffusionError("RealEdit: clip_vision is connected but image is not; connect the photo "
                                          "(or disconnect clip_vision for the direct parameterisation).")
            features = image_features(clip_vision, image, source[0][0].shape[-1])
        total = schedule_steps(model, scheduler, steps)
        settings = value_settings(cfg, learning_rate, max_iterations=max_iterations)
        caps = [settings.cap_at(s) for s in range(total)]
        offsets = [total + sum(caps[:s]) for s in range(total)]
        # One bar over the inversion steps, then every iteration up to each step's cap; an early-stopped step
        # jumps to the next. Every call checks ComfyUI's Cancel button.
        step = progress(total + sum(caps))
        inversion = value_invert(model, samples, source, negative, steps=steps, cfg=cfg, features=features,
                                 max_iterations=max_iterations, lr=learning_rate, eps=early_stop_eps,
                                 delta=early_stop_delta, attention_weight=attention_weight,
                                 map_downscale=map_downscale, seed=seed, scheduler=scheduler, convention=convention,
                                 callback=lambda s, i, _loss: step(offsets[s] + i), inversion_callback=step)
        return io.NodeOutput(latent_output(model, inversion.z_T, samples), inversion,
                             ui=ui.PreviewText(inversion.report()))


class StyleDiffusionEditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditStyleDiffusionEditSampler",
            display_name="RealEdit StyleDiffusion Edit Sampler",
            category=CATEGORY,
            description=(
                "StyleDiffusion's P2Plus edit: a source row (caption, learned value inputs c_src * A_s + B_s) and "
                "a target row (edited caption, value c_tgt * A_s + B_s for the first tau_v of the steps) from "
                "z_T, tied by Prompt-to-Prompt (Replace / Refine / Reweight for tau_c, self-attention maps for "
                "tau_s) and, with tau_u > 0, the unconditional branch's self-attention maps. LocalBlend on the "
                "blend words. Style and attribute edits ('a cat' -> 'a watercolor cat') keep the photo's layout."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the INVERSION was made with."),
                io.Clip.Input("clip", tooltip="Encodes both prompts and looks their words up."),
                Inversion.Input("inversion", tooltip="From RealEdit Value-Embedding Inversion (same model and steps)."),
                io.String.Input("source_text", multiline=True, default="a photo of a cat",
                                tooltip="The source caption (what the inversion used)."),
                io.String.Input("target_text", multiline=True, default="a watercolor painting of a cat",
                                tooltip="The edited caption."),
                io.Conditioning.Input("negative", tooltip="The unconditional prompt the inversion used (empty)."),
                io.Int.Input("steps", default=SD_DEFAULTS.steps, min=2, max=1000,
                             tooltip="Must equal the inversion's steps. " + origin("steps")),
                io.Float.Input("cfg", default=SD_DEFAULTS.cfg, min=1.0, max=30.0, step=0.1,
                               tooltip="Keep the inversion's value (the values were learned for it). " + origin("cfg")),
                io.Combo.Input("edit_mode", options=list(EDIT_MODES), default="auto",
                               tooltip="auto: replace when both prompts have the same number of words, else refine. "
                                       "reweight: scale the reweight words' attention (on top of auto; every "
                                       "official example reweights)."),
                _fraction("tau_v", "Fraction of steps in which the target row uses the learned values. "),
                _fraction("tau_c", "Fraction of steps with cross-attention replacement. "),
                _fraction("tau_s", "Fraction of steps with self-attention map replacement (0 = off). "),
                _fraction("tau_u", "Fraction of steps in which the unconditional target row takes the source's "
                          "self-attention maps (P2Plus; 0 = plain P2P). "),
                io.Combo.Input("source_row", options=list(SOURCE_ROW), default="pinned" if SD_DEFAULTS.pin_source
                               else "free", tooltip="free: the source row samples from z_T with its learned values; "
                               "pinned: it follows the DDIM trajectory. " + origin("pin_source")),
                io.String.Input("blend_words", default="", optional=True,
                                tooltip="LocalBlend words, comma separated (e.g. 'cat'); empty = off. Every official "
                                "example uses LocalBlend."),
                _fraction("blend_threshold"),
                io.String.Input("reweight_words", default="", optional=True,
                                tooltip="Words of the target prompt to reweight (edit_mode reweight)."),
                io.Float.Input("reweight_factor", default=SD_DEFAULTS.reweight_factor, min=-10.0, max=10.0,
                               step=0.1, optional=True, tooltip=origin("reweight_factor")),
                map_downscale_input(default=SD_DEFAULTS.map_downscale),
            ],
            outputs=[
                io.Latent.Output(display_name="edited"),
                io.Latent.Output(display_name="source", tooltip="The source row (the reconstruction with the learned "
                                 "values when free-running)."),
                io.Mask.Output(display_name="local_blend", tooltip="Last LocalBlend mask at image size."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, inversion, source_text: str, target_text: str, negative, steps: int, cfg: float,
                edit_mode: str, tau_v: float, tau_c: float, tau_s: float, tau_u: float, source_row: str,
                blend_words: str = "", blend_threshold: float = SD_DEFAULTS.blend_threshold, reweight_words: str = "",
                reweight_factor: float = SD_DEFAULTS.reweight_factor,
                map_downscale: int = SD_DEFAULTS.map_downscale) -> io.NodeOutput:
        inversion = check_value_inversion(inversion)
        check_map_downscale(model, map_downscale)
        inversion.check_node_steps(steps, error=StyleDiffusionError)
        edit = prompt_edit(clip, source_text, target_text, edit_mode, reweight_words, reweight_factor)
        tokenize, mode = edit.tokenize, edit.mode
        blend = split_words(blend_words)
        local_blend = (LocalBlend(blend_positions(source_text, target_text, blend, tokenize),
                                  threshold=blend_threshold, start=SD_DEFAULTS.blend_start) if blend else None)
        controls = P2PlusControls(tau_v=tau_v, tau_c=tau_c, tau_s=tau_s, tau_u=tau_u,
                                  pin_source=source_row == "pinned",
                                  cross_edit=edit.cross_edit, local_blend=local_blend,
                                  blend_threshold=blend_threshold, map_downscale=map_downscale)
        step = progress(inversion.steps)
        result = stylediffusion_edit(model, inversion, encode(clip, source_text), encode(clip, target_text), negative,
                                     cfg=cfg, controls=controls, callback=lambda info: step(info.step))
        hw = tuple(result.latent.shape[-2:])
        text = (f"RealEdit StyleDiffusion: edit mode {mode}; tau_v {tau_v}, tau_c {tau_c}, tau_s {tau_s}, "
                f"tau_u {tau_u}; source row {source_row}")
        return io.NodeOutput({"samples": result.latent}, {"samples": result.reconstruction},
                             image_mask(result.blend_mask, hw), ui=ui.PreviewText(text))

"""BARET nodes: Target-Text Inversion (TTIS), Null-Text Inversion and the BARET Edit Sampler.

Every default and the tooltip saying where it comes from are read from
:mod:`realedit.inversion.baret_settings`, so a default changes in one line.
"""

from __future__ import annotations

from typing import Any, Callable

from comfy_api.v0_0_2 import io, ui

from ..attention.baret import BaretControls
from ..hosts.comfy_autograd import null_text_invert, ttis_invert
from ..hosts.comfy_baret import baret_edit
from ..hosts.comfy_sampling import schedule_steps
from ..inversion.baret_settings import BARET_DEFAULTS, origin
from ..inversion.embedding_opt import OptimisedInversion, null_text_lr
from .common import Inversion, convention_input, latent_output, latent_samples, progress, scheduler_input, single_image

CATEGORY = "RealEdit/baret"


def _float(name: str, default: float, *, minimum: float = 0.0, maximum: float = 1.0, step: float = 0.01,
           tooltip: str | None = None) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=minimum, max=maximum, step=step,
                          tooltip=tooltip or origin(name))


def _optimisation_inputs(iterations: int, iterations_origin: str, lr: float, lr_tooltip: str) -> list:
    return [
        io.Int.Input("steps", default=BARET_DEFAULTS.steps, min=2, max=1000, tooltip=origin("steps")),
        _float("cfg", BARET_DEFAULTS.cfg, minimum=0.0, maximum=30.0, step=0.1),
        io.Int.Input("iterations", default=iterations, min=1, max=100,
                     tooltip=f"Optimisation iterations per step (at most). {origin(iterations_origin)}"),
        io.Float.Input("learning_rate", default=lr, min=1e-6, max=1.0, step=1e-4, round=False, tooltip=lr_tooltip),
        io.Float.Input("early_stop_eps", default=BARET_DEFAULTS.early_stop_eps, min=0.0, max=1.0, step=1e-6,
                       round=False, tooltip="A step stops once its loss < eps + s * delta (s: the denoising step). "
                       + origin("early_stop_eps")),
        io.Float.Input("early_stop_delta", default=BARET_DEFAULTS.early_stop_delta, min=0.0, max=1.0, step=1e-6,
                       round=False, tooltip=origin("early_stop_delta")),
        scheduler_input(),
        convention_input(),
    ]


def _optimise(invert: Callable[..., OptimisedInversion], model, latent, positive, negative, steps: int,
              iterations: int, **kwargs: Any) -> io.NodeOutput:
    """Run TTIS or null-text inversion with a progress bar; outputs z_T, the INVERSION and the report."""
    samples = single_image(latent_samples(latent), "latent")
    total = schedule_steps(model, kwargs["scheduler"], steps)
    # One bar over the inversion steps, then every optimisation iteration (at the cap); an early-stopped
    # step jumps the bar to the next step. Each call checks ComfyUI's Cancel button.
    step = progress(total + total * iterations)
    inversion = invert(model, samples, positive, negative, steps=steps, iterations=iterations,
                       callback=lambda s, i, _loss: step(total + s * iterations + i), inversion_callback=step,
                       **kwargs)
    report = inversion.optimisation.report()
    return io.NodeOutput(latent_output(model, inversion.z_T, samples), inversion, ui=ui.PreviewText(report))


_OUTPUTS = [
    io.Latent.Output(display_name="z_T", tooltip="The inverted noise latent."),
    Inversion.Output(display_name="inversion", tooltip="The trajectory and the per-step optimised embeddings."),
]


class TargetTextInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditTargetTextInversion",
            display_name="RealEdit Target-Text Inversion (TTIS)",
            category=CATEGORY,
            description=(
                "BARET's target-text inversion schedule (Sec. 3.1): DDIM-inverts the photo with the TARGET "
                "prompt, then per step tunes the target embedding so the CFG denoising step lands on the "
                "inverted latent (no caption of the photo needed). Runs in fp32 on a clone of the model; the "
                "model you connect is never modified. Feed the INVERSION to the RealEdit BARET Edit Sampler."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Latent.Input("latent", tooltip="The VAE-encoded photo (one image)."),
                io.Conditioning.Input("target", tooltip="The target sentence, e.g. 'a dog lying down on a stone'."),
                io.Conditioning.Input("negative", tooltip="The unconditional prompt: an empty CLIP Text Encode."),
                *_optimisation_inputs(BARET_DEFAULTS.ttis_iterations, "ttis_iterations", BARET_DEFAULTS.ttis_lr,
                                      origin("ttis_lr")),
            ],
            outputs=list(_OUTPUTS),
        )

    @classmethod
    def execute(cls, model, latent, target, negative, steps, cfg, iterations, learning_rate, early_stop_eps,
                early_stop_delta, scheduler, convention) -> io.NodeOutput:
        return _optimise(ttis_invert, model, latent, target, negative, steps, iterations, cfg=cfg,
                         lr=learning_rate, eps=early_stop_eps, delta=early_stop_delta, scheduler=scheduler,
                         convention=convention)


class NullTextInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditNullTextInversion",
            display_name="RealEdit Null-Text Inversion",
            category=CATEGORY,
            description=(
                "Null-text inversion (Mokady et al. 2023): DDIM-inverts the photo with its caption, then per "
                "step tunes the unconditional (empty-prompt) embedding so CFG sampling reconstructs the photo. "
                "The classic pipeline for Prompt-to-Prompt editing of real images: feed the INVERSION to the "
                "RealEdit SpecRef Edit Sampler. Same loop as TTIS; the model you connect is never modified."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Latent.Input("latent", tooltip="The VAE-encoded photo (one image)."),
                io.Conditioning.Input("positive", tooltip="The photo's caption (the source prompt)."),
                io.Conditioning.Input("negative", tooltip="The unconditional prompt to start from: an empty "
                                      "CLIP Text Encode."),
                *_optimisation_inputs(BARET_DEFAULTS.null_text_iterations, "null_text_iterations",
                                      BARET_DEFAULTS.null_text_lr,
                                      "Learning rate at the first step; it decays as lr * (1 - s / 100). If the "
                                      "reconstruction is faithful but edits come out broken (shapes melting, "
                                      "colours spilling), try a lower rate: on the shapes world 3e-3 keeps more "
                                      "of the photo than 1e-2 (README). " + origin("null_text_lr")),
            ],
            outputs=list(_OUTPUTS),
        )

    @classmethod
    def execute(cls, model, latent, positive, negative, steps, cfg, iterations, learning_rate, early_stop_eps,
                early_stop_delta, scheduler, convention) -> io.NodeOutput:
        lr = null_text_lr(learning_rate, BARET_DEFAULTS.null_text_lr_horizon)
        return _optimise(null_text_invert, model, latent, positive, negative, steps, iterations, cfg=cfg, lr=lr,
                         eps=early_stop_eps, delta=early_stop_delta, scheduler=scheduler, convention=convention)


class BaretEditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditBaretEditSampler",
            display_name="RealEdit BARET Edit Sampler",
            category=CATEGORY,
            description=(
                "BARET's edit (Sec. 3.2-3.3): reconstruction (the tuned embeddings), transition (Eq. 3: "
                "lambda * tuned + (1 - lambda) * target) and edit (the target prompt) run together from z_T; "
                "the edit takes the reconstruction's self-attention maps and the transition's cross-attention "
                "maps early on (BAM). Non-rigid edits (pose, action) work from one target sentence."
            ),
            inputs=[
                io.Model.Input("model"),
                Inversion.Input("inversion", tooltip="From RealEdit Target-Text Inversion (same model and steps)."),
                io.Conditioning.Input("target", tooltip="The target prompt you inverted with (e_target of Eq. 3)."),
                io.Conditioning.Input("negative", tooltip="The unconditional prompt TTIS used (empty prompt)."),
                _float("cfg", BARET_DEFAULTS.cfg, minimum=1.0, maximum=30.0, step=0.1,
                       tooltip="Guidance; keep the TTIS value (the embeddings were tuned for it). "
                       + origin("cfg")),
                _float("lambda_start", BARET_DEFAULTS.lambda_start),
                _float("lambda_end", BARET_DEFAULTS.lambda_end),
                io.Boolean.Input("rigid", default=False,
                                 tooltip="Rigid edits (style, colour, background): lambda = 1, the transition is "
                                 "the reconstruction (BARET Sec. 3.3)."),
                _float("self_attention_fraction", BARET_DEFAULTS.self_attention_fraction),
                _float("cross_attention_fraction", BARET_DEFAULTS.cross_attention_fraction),
            ],
            outputs=[
                io.Latent.Output(display_name="edit", tooltip="The edited latent."),
                io.Latent.Output(display_name="transition", tooltip="The transition process (preview)."),
                io.Latent.Output(display_name="reconstruction", tooltip="The reconstruction process: how well "
                                 "TTIS recovered the photo."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, target, negative, cfg, lambda_start, lambda_end, rigid,
                self_attention_fraction, cross_attention_fraction) -> io.NodeOutput:
        controls = BaretControls(lambda_start=lambda_start, lambda_end=lambda_end, rigid=rigid,
                                 self_attention_fraction=self_attention_fraction,
                                 cross_attention_fraction=cross_attention_fraction)
        step = progress(inversion.steps)
        result = baret_edit(model, inversion, target, negative, cfg=cfg, controls=controls,
                            callback=lambda s, total: step(s))
        return io.NodeOutput({"samples": result.edit}, {"samples": result.transition},
                             {"samples": result.reconstruction})

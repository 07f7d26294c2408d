"""StyleDiffusion on the diffusers host, the Python API: value-embedding inversion and P2Plus editing.

The twin of :mod:`.comfy_stylediffusion` on a ``UNet2DConditionModel`` with the same core
(:mod:`realedit.inversion.value_inversion`, :mod:`realedit.attention.stylediffusion`) and settings objects.
The learned value input reaches the UNet through ``DiffusersHost(value_input=...)`` (the cross-attention
value is projected from it in the rows it names; keys keep the text embedding). Latents are the VAE's
scaled latents; prompts are (1, 77, width) text embeddings::

    inversion = value_invert(pipe.unet, pipe.scheduler, latent, source_embeds, empty_embeds)          # direct
    inversion = value_invert(pipe.unet, pipe.scheduler, latent, source_embeds, empty_embeds,
                             features=clip_image_tokens)                                              # clip
    result = stylediffusion_edit(pipe.unet, pipe.scheduler, inversion, source_embeds, target_embeds,
                                 empty_embeds, controls=P2PlusControls(cross_edit=..., local_blend=...))
    image = pipe.vae.decode(result.latent / pipe.vae.config.scaling_factor).sample

``features`` are CLIP image tokens (1, tokens, width) as wide as the text embedding, e.g. a
``CLIPVisionModelWithProjection``'s ``visual_projection(post_layernorm(last_hidden_state))``.
The UNet's weights never receive gradients and its processors are restored afterwards.
"""

from __future__ import annotations

import torch

from ..attention.edit_loop import EditCallback, EditResult, TwoPathLoop, edit_result
from ..attention.stylediffusion import (
    CrossMapRecorder,
    LayerMaps,
    LiveValue,
    P2PlusControls,
    P2PlusHook,
    P2PlusValues,
    StyleDiffusionError,
    check_edit_prompts,
    check_one_chunk,
    edit_warnings,
)
from ..inversion.ddim import DEFAULT_CONVENTION, Convention
from ..inversion.embedding_opt import IterationCallback
from ..inversion.value_inversion import (
    ValueInversion,
    check_value_inversion,
    optimise_values,
    parameterisation_for,
    value_settings,
)
from ..settings.stylediffusion import SD_DEFAULTS
from .diffusers import DiffusersHost
from .diffusers_baret import branch_denoiser, frozen_weights
from .diffusers_edit import _common_length
from .diffusers_sampling import (
    StepCallback,
    ddim_invert,
    guided_denoiser,
    prediction_type,
    unet_fingerprint,
    use_schedule,
)


def value_invert(unet: torch.nn.Module, scheduler, latent: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 *, steps: int = SD_DEFAULTS.steps, cfg: float = SD_DEFAULTS.cfg, features: torch.Tensor | None = None,
                 max_iterations: int | None = None, lr: float = SD_DEFAULTS.lr,
                 iteration_base: float = SD_DEFAULTS.iteration_base, eps: float = SD_DEFAULTS.early_stop_eps,
                 delta: float = SD_DEFAULTS.early_stop_delta, attention_weight: float = SD_DEFAULTS.attention_weight,
                 map_downscale: int = SD_DEFAULTS.map_downscale, seed: int = SD_DEFAULTS.seed,
                 convention: Convention = DEFAULT_CONVENTION,
                 callback: IterationCallback | None = None, inversion_callback: StepCallback | None = None,
                 **added_cond: torch.Tensor) -> ValueInversion:
    """StyleDiffusion's value-embedding inversion on a diffusers UNet (as ``comfy_stylediffusion.value_invert``).

    ``cond``: the source prompt embedding; ``uncond``: the empty prompt's. ``features``: CLIP image tokens for
    the official ``clip`` parameterisation (None: ``direct``). ``map_downscale``: the layers whose maps the
    attention term keeps (4: the official 16x16 ones at 512 px).
    """
    check_one_chunk("source prompt embedding", cond)
    settings = value_settings(cfg, lr, iteration_base, eps, delta, max_iterations)
    settings.validate(steps, "cond")
    recorder, live = CrossMapRecorder(map_downscale), LiveValue()
    targets: list[LayerMaps] = []

    def record(i: int, x: torch.Tensor) -> None:
        targets.append({layer: m.detach().cpu() for layer, m in recorder.take().items()})
        if inversion_callback is not None:
            inversion_callback(i, x)

    param = next(unet.parameters())
    with DiffusersHost(unet, recorder, self_attention=False, value_input=live) as host:
        try:
            recorder.active = attention_weight > 0
            with torch.no_grad():
                inversion = ddim_invert(host, scheduler, latent, cond, steps=steps, convention=convention,
                                        callback=record, **added_cond)
            recorder.active = False
            denoise = branch_denoiser(host, scheduler, steps, **added_cond)
            use_schedule(host, inversion.sampling_sigmas, scheduler.alphas_cumprod)
            parameterisation = parameterisation_for(features, cond, param.device, seed)
            with frozen_weights(unet):
                found = optimise_values(denoise, recorder, live, inversion.trajectory, inversion.sigmas, cond, uncond,
                                        targets, parameterisation, settings, attention_weight, callback)
        finally:
            recorder.active, live.value = False, None
            recorder.take()
    return ValueInversion.from_result(inversion, found, cond, parameterisation.name, cfg, unet_fingerprint(unet))


@torch.no_grad()
def stylediffusion_edit(unet: torch.nn.Module, scheduler, inversion: ValueInversion, source_cond: torch.Tensor,
                        target_cond: torch.Tensor, negative: torch.Tensor | None, *, cfg: float | None = None,
                        controls: P2PlusControls | None = None, callback: EditCallback | None = None,
                        **added_cond: torch.Tensor) -> EditResult:
    """P2Plus edit of a StyleDiffusion ``inversion`` on a diffusers UNet (as ``comfy_stylediffusion``'s).

    Returns the edited latent (the UNet's scaled latents), the source row (``reconstruction``) and the last
    LocalBlend mask. ``cfg`` defaults to the inversion's.
    """
    controls = controls or P2PlusControls()
    inversion = check_value_inversion(inversion)
    inversion.check_compatible(unet_fingerprint(unet), inversion.steps)
    check_edit_prompts(inversion, [("source prompt embedding", source_cond), ("target prompt embedding", target_cond)])
    cfg = inversion.cfg if cfg is None else cfg
    edit_warnings(inversion, source_cond, cfg, inversion.cfg)
    if negative is None and cfg != 1.0:
        raise StyleDiffusionError("RealEdit: guidance above 1 needs a negative prompt embedding; give one or use "
                                  "cfg 1.")
    hook = P2PlusHook(controls)
    values = P2PlusValues(inversion, target_cond, controls.tau_v) if controls.use_values else None
    contexts = _common_length([source_cond, target_cond, *([negative] if negative is not None else [])])
    slots, uncond = torch.cat(contexts[:2]), (contexts[2] if negative is not None else None)
    sigmas = inversion.sampling_sigmas
    param = next(unet.parameters())
    x = torch.zeros(2, *inversion.z_T.shape[1:], device=param.device, dtype=param.dtype)
    with DiffusersHost(unet, hook, value_input=values) as host:
        use_schedule(host, sigmas, scheduler.alphas_cumprod)
        denoise = guided_denoiser(host, scheduler.alphas_cumprod, lambda sigma: (slots, uncond), cfg,
                                  total_steps=inversion.steps, prediction=prediction_type(scheduler), **added_cond)
        out = TwoPathLoop(hook, inversion, None, callback, pin_source=controls.pin_source)(denoise, x,
                                                                                            sigmas.to(x.device))
    return edit_result(out, hook, tuple(inversion.z_T.shape[-2:]), sigmas)

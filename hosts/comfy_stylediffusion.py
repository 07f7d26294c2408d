"""StyleDiffusion on a ComfyUI MODEL: value-embedding inversion and P2Plus editing.

Inversion (:func:`value_invert`): the caller's MODEL is cloned with two patches, a cross-attention hook
that records the 16x16-class maps (:class:`~..attention.stylediffusion.CrossMapRecorder`, declining every
call) and a ``ScheduledValue`` ``attn2_patch`` holding the live value input of the conditional rows
(:class:`~..attention.stylediffusion.LiveValue`); then :func:`.comfy_autograd.autograd_clone` makes it
trainable, as for TTIS. On that clone: DDIM inversion with the source prompt (guidance 1) recording the
target maps, then the core loop (:func:`~..inversion.value_inversion.optimise_values`) in fp32 outside
inference mode. The caller's MODEL is handed back (:func:`.comfy_autograd.hand_back`) whatever happens.

Editing (:func:`stylediffusion_edit`): the two-path sampler (``attention.edit_loop.TwoPathLoop``; slot 0
source, slot 1 target, both from z_T; the source row free-running by default as in the official code) on a
clone with :class:`~..attention.stylediffusion.P2PlusHook` and the edit's value schedule as a
``ScheduledValue`` patch, which stacks with other packs' ``attn2_patch``es.
"""

from __future__ import annotations

from typing import Any

import comfy.samplers
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
from .comfy import install_hook, install_value_schedule
from .comfy_autograd import (
    autograd_clone,
    check_text_conditioning,
    hand_back,
    inference_tensor_errors,
    interruptible,
    load_for_backward,
    prompt_denoiser,
)
from .comfy_edit import per_slot_conditioning
from .comfy_sampling import StepCallback, cfg_guider, check_sd_model, ddim_invert, model_fingerprint, schedule_steps


# -- image features (the official parameterisation) -------------------------------------------------------
def image_features(clip_vision: Any, image: torch.Tensor, text_width: int) -> torch.Tensor:
    """F for the mapping network: the CLIP_VISION's last hidden state after its post-layernorm (ComfyUI's
    ``last_hidden_state`` is taken before it; the official code uses ``ln_post`` over all tokens, cu:45-50),
    projected by ``visual_projection`` when only the projection matches the text width (ViT-L/14 on SD1.x).
    Any other width is refused, naming both. (1, tokens, text_width), fp32, detached."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise StyleDiffusionError("RealEdit: the image input must be an IMAGE (batch, height, width, channels).")
    output = clip_vision.encode_image(image[:1])
    model = getattr(clip_vision, "model", None)
    vision = getattr(model, "vision_model", None)
    x = output["last_hidden_state"]
    with torch.no_grad():
        if vision is not None and not getattr(vision, "output_layernorm", False):
            x = vision.post_layernorm(x)
        width = x.shape[-1]
        if width != text_width:
            projection = getattr(model, "visual_projection", None)
            out_width = getattr(projection, "out_features", None)
            if out_width != text_width:
                raise StyleDiffusionError(
                    f"RealEdit: the CLIP_VISION is {width} wide (projection: {out_width or 'none'}) but the text "
                    f"embedding is {text_width} wide; the mapping network needs features as wide as the text (SD1.x: "
                    "CLIP ViT-L/14, projected to 768). Connect a matching CLIP_VISION or none (direct mode).")
            x = projection(x)
    return x.detach().float().cpu()


# -- inversion --------------------------------------------------------------------------------------------
def value_invert(
    model: Any,
    latent: torch.Tensor,
    positive: list,
    negative: list,
    *,
    steps: int = SD_DEFAULTS.steps,
    cfg: float = SD_DEFAULTS.cfg,
    features: torch.Tensor | None = None,
    max_iterations: int | None = None,
    lr: float = SD_DEFAULTS.lr,
    iteration_base: float = SD_DEFAULTS.iteration_base,
    eps: float = SD_DEFAULTS.early_stop_eps,
    delta: float = SD_DEFAULTS.early_stop_delta,
    attention_weight: float = SD_DEFAULTS.attention_weight,
    map_downscale: int = SD_DEFAULTS.map_downscale,
    seed: int = SD_DEFAULTS.seed,
    scheduler: str = "ddim_uniform",
    convention: Convention = DEFAULT_CONVENTION,
    dtype: torch.dtype | None = torch.float32,
    callback: IterationCallback | None = None,
    inversion_callback: StepCallback | None = None,
) -> ValueInversion:
    """StyleDiffusion's value-embedding inversion of a user-space ``latent`` (one image) on a ComfyUI MODEL.

    ``positive``: the source prompt; ``negative``: the unconditional prompt (empty). ``features``: CLIP image
    tokens (:func:`image_features`) for the official ``clip`` parameterisation; None: ``direct``.
    ``max_iterations`` caps the official per-step iteration count (None: the official caps). ``map_downscale``:
    the layers whose maps the attention term keeps (the official 16x16 ones at 512 px: 4; a 128 px image's: 1).
    ``callback(step, iteration, loss)`` after every iteration and ``inversion_callback(i, x)`` after every
    inversion step, each after a check of ComfyUI's Cancel button. The MODEL is never modified.
    """
    check_sd_model(model, latent)
    check_text_conditioning(positive, "source")
    check_text_conditioning(negative, "negative")
    check_one_chunk("source CONDITIONING", positive[0][0])
    settings = value_settings(cfg, lr, iteration_base, eps, delta, max_iterations)
    settings.validate(schedule_steps(model, scheduler, steps), "cond")
    recorder, live = CrossMapRecorder(map_downscale), LiveValue()
    clone = autograd_clone(install_value_schedule(install_hook(model, recorder, self_attention=False), live), dtype)
    targets: list[LayerMaps] = []
    on_step = interruptible(inversion_callback)

    def record(i: int, x: torch.Tensor) -> None:
        targets.append({layer: m.detach().to(clone.offload_device) for layer, m in recorder.take().items()})
        on_step(i, x)

    try:
        recorder.active = attention_weight > 0
        inversion = ddim_invert(clone, latent, positive, steps=steps, scheduler=scheduler, guidance=1.0,
                                convention=convention, callback=record)
        recorder.active = False
        device = load_for_backward(clone, latent.shape)
        denoise, cond, uncond = prompt_denoiser(clone, positive, negative, latent.shape, device,
                                                inversion.sampling_sigmas)
        parameterisation = parameterisation_for(features, cond, device, seed)
        with inference_tensor_errors():
            found = optimise_values(denoise, recorder, live, [t.to(device) for t in inversion.trajectory],
                                    inversion.sigmas, cond, uncond, targets, parameterisation, settings,
                                    attention_weight, interruptible(callback))
    finally:  # cancelled, failed or done: nothing stays patched or loaded
        recorder.active, live.value = False, None
        recorder.take()
        hand_back(model, clone)
    return ValueInversion.from_result(inversion, found, cond, parameterisation.name, cfg, model_fingerprint(model))


# -- P2Plus editing ---------------------------------------------------------------------------------------
def stylediffusion_edit(
    model: Any,
    inversion: ValueInversion,
    source_cond: list,
    target_cond: list,
    negative: list | None,
    *,
    cfg: float | None = None,
    controls: P2PlusControls | None = None,
    callback: EditCallback | None = None,
    preview: Any = None,
) -> EditResult:
    """P2Plus edit of a StyleDiffusion ``inversion`` on a ComfyUI MODEL (the one it was made with).

    Slot 0 is the source prompt with its learned value inputs, slot 1 the target prompt (``c_tgt * A_s + B_s``
    while s < int(tau_v N)); ``cfg`` defaults to the inversion's. ``callback(EditStep)`` after every step
    (raise to cancel); ``preview`` is ComfyUI's latent-preview callback, fed the edit row.
    """
    controls = controls or P2PlusControls()
    inversion = check_value_inversion(inversion)
    check_sd_model(model, inversion.z_T)
    inversion.check_compatible(model_fingerprint(model), inversion.steps)
    check_edit_prompts(inversion, [("source CONDITIONING", source_cond[0][0]),
                                   ("target CONDITIONING", target_cond[0][0])])
    cfg = inversion.cfg if cfg is None else cfg
    edit_warnings(inversion, source_cond[0][0], cfg, inversion.cfg)
    hook = P2PlusHook(controls)
    patched = install_hook(model, hook)
    if controls.use_values:
        patched = install_value_schedule(patched, P2PlusValues(inversion, target_cond[0][0], controls.tau_v))
    guider = cfg_guider(patched, per_slot_conditioning([source_cond, target_cond], ["source", "target"]), negative,
                        cfg)
    sigmas = inversion.sampling_sigmas
    latent = patched.model.process_latent_out(inversion.z_T.repeat(2, 1, 1, 1))  # shape only: the loop uses z_T
    loop = TwoPathLoop(hook, inversion, None, callback, pin_source=controls.pin_source)
    out = guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(loop), sigmas, callback=preview,
                        disable_pbar=True, seed=0)
    return edit_result(out, hook, tuple(inversion.z_T.shape[-2:]), sigmas)

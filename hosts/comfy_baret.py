"""BARET's edit sampler on ComfyUI: reconstruction, transition and edit in one batch (Sec. 3.2-3.3).

One latent batch of three rows runs through ``comfy.samplers.CFGGuider`` with a ``KSAMPLER`` wrapping
our loop, on a clone of the MODEL carrying

* a :class:`~..attention.baret.BaretHook` (BAM, Eq. 4-5) on every attention layer, and
* a :class:`~.comfy.ScheduledContext` giving the reconstruction row e_opt,s and the transition row
  e_trans,s (Eq. 3) at each step s; the edit row keeps the target CONDITIONING.

All three start from the TTIS inversion's z_T and are sampled by ComfyUI's own ``euler`` sampler with
noise off (Euler in sigma space = DDIM, eta 0) with CFG against the negative prompt. The schedule is the
inversion's own, so step s uses the embedding TTIS optimised for step s.
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.samplers
import torch

from ..attention.baret import (
    BaretControls,
    BaretHook,
    BaretResult,
    check_edit_matches_inversion,
    check_ttis_inversion,
    transition_embeddings,
)
from ..inversion.embedding_opt import OptimisedInversion
from .comfy import install_context_schedule, install_hook
from .comfy_edit import per_slot_conditioning
from .comfy_sampling import cfg_guider, check_sd_model, model_fingerprint

# callback(step, total) after every edit step; it may raise to cancel.
StepCallback = Callable[[int, int], None]


def _first_tensor(conditioning: list | None) -> torch.Tensor | None:
    """The text embedding of a CONDITIONING's first entry (what TTIS optimised against), None if absent."""
    if not conditioning:
        return None
    return conditioning[0][0]


def baret_edit(
    model: object,
    inversion: OptimisedInversion,
    target_cond: list,
    negative: list,
    *,
    cfg: float | None = None,
    controls: BaretControls | None = None,
    callback: StepCallback | None = None,
) -> BaretResult:
    """Edit the TTIS-inverted photo towards the target prompt with BARET on a ComfyUI MODEL.

    The result's latents are in user space (what VAE Decode takes).

    ``target_cond`` is the target prompt TTIS started from (e_target of Eq. 3); ``negative`` the empty
    prompt TTIS used as uncond. ``cfg`` defaults to the inversion's (TTIS optimised for that CFG). Another
    target, negative or CFG than TTIS used is refused by name (:func:`check_edit_matches_inversion`).
    ``callback(step, total)`` runs after every step (progress; raise to cancel).
    """
    controls = controls or BaretControls()
    inversion = check_ttis_inversion(inversion)
    inversion.check_compatible(model_fingerprint(model), inversion.steps)
    check_sd_model(model, inversion.z_T)
    cfg = inversion.cfg if cfg is None else cfg
    positive = per_slot_conditioning([target_cond] * 3, ["target"] * 3)
    embeddings = transition_embeddings(inversion.embeddings, positive[0][0][:1], controls)
    check_edit_matches_inversion(inversion, target_cond[0][0], _first_tensor(negative), cfg)
    patched = install_context_schedule(install_hook(model, BaretHook(controls)), embeddings.for_row)
    guider = cfg_guider(patched, positive, negative, cfg)
    sigmas = inversion.sampling_sigmas
    latent = patched.model.process_latent_out(inversion.z_T.repeat(3, 1, 1, 1))  # user space, like DDIM Invert's z_T
    step = None if callback is None else lambda i, _denoised, _x, total: callback(i, total)
    out = guider.sample(torch.zeros_like(latent), latent, comfy.samplers.sampler_object("euler"), sigmas,
                        callback=step, disable_pbar=True, seed=0)
    return BaretResult.from_batch(out.cpu(), embeddings.lambdas)

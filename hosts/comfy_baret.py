"""BARET's edit sampler on ComfyUI: reconstruction, transition and edit in one batch (Sec. 3.2-3.3).

One latent batch of three rows runs through ``comfy.samplers.CFGGuider`` with a ``KSAMPLER`` wrapping
our loop, on a clone of the MODEL carrying

* a :class:`~..attention.baret.BaretHook` (BAM, Eq. 4-5) on every attention layer, and
* a :class:`~.comfy.ScheduledContext` giving the reconstruction row e_opt,s and the transition row
  e_trans,s (Eq. 3) at each step s; the edit row keeps the target CONDITIONING.

All three start from the TTIS inversion's z_T and take one Euler (= DDIM, eta 0) step per schedule
entry with CFG against the negative prompt. The schedule is the inversion's own, so step s uses the
embedding TTIS optimised for step s.
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.samplers
import torch
from comfy.k_diffusion.sampling import to_d

from ..attention.baret import (
    BaretControls,
    BaretEmbeddings,
    BaretHook,
    BaretResult,
    check_ttis_inversion,
    transition_embeddings,
)
from ..inversion.embedding_opt import OptimisedInversion
from .comfy import install_context_schedule, install_hook
from .comfy_edit import per_slot_conditioning
from .comfy_sampling import check_sd_model, model_fingerprint

# callback(step, total) after every edit step; it may raise to cancel.
StepCallback = Callable[[int, int], None]


class _ThreeProcessLoop:
    """The KSAMPLER function: three rows from z_T, one Euler step each per schedule entry."""

    def __init__(self, z_T: torch.Tensor, callback: StepCallback | None) -> None:
        self.z_T, self.callback = z_T, callback

    @torch.no_grad()
    def __call__(self, model_k: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
        extra_args = extra_args or {}
        total = len(sigmas) - 1
        x = self.z_T.to(x).expand_as(x).clone()  # z_T in model space, never re-scaled
        s_in = x.new_ones([x.shape[0]])
        for s in range(total):
            denoised = model_k(x, sigmas[s] * s_in, **extra_args)
            if callback is not None:  # ComfyUI's latent preview shows the edit row
                callback({"x": x[2:3], "i": s, "sigma": sigmas[s], "sigma_hat": sigmas[s], "denoised": denoised[2:3]})
            x = x + to_d(x, sigmas[s], denoised) * (sigmas[s + 1] - sigmas[s])  # Euler = DDIM(eta 0)
            if self.callback is not None:
                self.callback(s, total)
        return x


def baret_edit(
    model: object,
    inversion: OptimisedInversion,
    target_cond: list,
    negative: list,
    *,
    cfg: float | None = None,
    controls: BaretControls | None = None,
    callback: StepCallback | None = None,
    preview: Callable | None = None,
) -> BaretResult:
    """Edit the TTIS-inverted photo towards the target prompt with BARET on a ComfyUI MODEL.

    The result's latents are in user space (what VAE Decode takes).

    ``target_cond`` is the target prompt TTIS started from (e_target of Eq. 3); ``negative`` the empty
    prompt TTIS used as uncond. ``cfg`` defaults to the inversion's (TTIS optimised for that CFG).
    ``callback(step, total)`` runs after every step (progress; raise to cancel); ``preview`` is ComfyUI's
    latent-preview callback, fed the edit row.
    """
    controls = controls or BaretControls()
    inversion = check_ttis_inversion(inversion)
    inversion.check_compatible(model_fingerprint(model), inversion.steps)
    check_sd_model(model, inversion.z_T)
    cfg = inversion.cfg if cfg is None else cfg
    target = per_slot_conditioning([target_cond], ["target"])[0][0]
    embeddings = transition_embeddings(inversion.embeddings, target, controls)
    patched = install_context_schedule(install_hook(model, BaretHook(controls)), embeddings.for_row)

    positive = per_slot_conditioning([target_cond] * 3, ["target"] * 3)
    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    sigmas = inversion.sampling_sigmas
    latent = patched.model.process_latent_out(inversion.z_T.repeat(3, 1, 1, 1))  # shape only: the loop uses z_T
    loop = _ThreeProcessLoop(inversion.z_T, callback)
    out = guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(loop), sigmas,
                        callback=preview, disable_pbar=True, seed=0)
    return _result(out.cpu(), embeddings)


def _result(out: torch.Tensor, embeddings: BaretEmbeddings) -> BaretResult:
    return BaretResult(edit=out[2:3], transition=out[1:2], reconstruction=out[0:1], lambdas=embeddings.lambdas)

"""BARET on the diffusers host, the Python API: TTIS, null-text inversion and the three-process edit.

Mirrors :mod:`.comfy_autograd` and :mod:`.comfy_baret` on a diffusers ``UNet2DConditionModel`` with
the same core (:mod:`realedit.inversion.embedding_opt`, :mod:`realedit.attention.baret`) and the same
sigma-space formulation (:mod:`.diffusers_sampling`). Latents are the VAE's scaled latents.

    inversion = ttis_invert(pipe.unet, pipe.scheduler, latent, target_embeds, empty_embeds, steps=50)
    result = baret_edit(pipe.unet, pipe.scheduler, inversion, target_embeds, empty_embeds)
    image = pipe.vae.decode(result.edit / pipe.vae.config.scaling_factor).sample

The weights never receive gradients: their ``requires_grad`` flags are switched off while the
embedding is optimised and restored afterwards, whatever happens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..attention.baret import (
    BaretControls,
    BaretHook,
    BaretResult,
    check_edit_matches_inversion,
    check_ttis_inversion,
    transition_embeddings,
)
from ..attention.hooks import ChainHook, RowInfo
from ..inversion.baret_settings import BARET_DEFAULTS
from ..inversion.ddim import DEFAULT_CONVENTION, Convention
from ..inversion.embedding_opt import (
    Branch,
    BranchDenoiser,
    IterationCallback,
    LearningRate,
    OptimisationSettings,
    OptimisedInversion,
    null_text_lr,
    optimise_embeddings,
)
from .diffusers import DiffusersHost
from .diffusers_sampling import (
    StepCallback,
    ddim_invert,
    guided_denoiser,
    noise_from_output,
    prediction_type,
    sample,
    timestep_for_sigma,
    use_schedule,
)


@contextmanager
def frozen_weights(module: torch.nn.Module) -> Iterator[None]:
    """No gradient reaches ``module``'s parameters inside the block; their flags come back after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        module.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def branch_denoiser(host: DiffusersHost, scheduler, total_steps: int, **added_cond: torch.Tensor) -> BranchDenoiser:
    """``denoised = f(x, sigma, embedding, branch)``: one CFG branch, differentiable in the embedding
    (epsilon or v-prediction, as ``scheduler.config.prediction_type`` says)."""
    prediction = prediction_type(scheduler)

    def denoise(x: torch.Tensor, sigma: float, embedding: torch.Tensor, branch: Branch) -> torch.Tensor:
        t = torch.tensor(timestep_for_sigma(sigma, scheduler.alphas_cumprod), dtype=x.dtype)
        rows = RowInfo.from_chunks([branch], x.shape[0])
        x_ddpm = x / math.sqrt(1 + sigma**2)
        out = host.predict_noise(x_ddpm, t, embedding.to(x), rows=rows, total_steps=total_steps, **added_cond)
        return x - sigma * noise_from_output(out, x_ddpm, sigma, prediction)

    return denoise


def optimise_inversion(unet: torch.nn.Module, scheduler, latent: torch.Tensor, cond: torch.Tensor,
                       uncond: torch.Tensor, branch: Branch, settings: OptimisationSettings, *, steps: int,
                       convention: Convention = DEFAULT_CONVENTION, callback: IterationCallback | None = None,
                       **added_cond: torch.Tensor) -> OptimisedInversion:
    """DDIM-invert ``latent`` with ``cond`` (guidance 1), then optimise the ``branch`` embedding per step."""
    settings.validate(steps, branch)
    with DiffusersHost(unet, ChainHook()) as host:
        with torch.no_grad():
            inversion = ddim_invert(host, scheduler, latent, cond, steps=steps, convention=convention, **added_cond)
        denoise = branch_denoiser(host, scheduler, steps, **added_cond)
        use_schedule(host, inversion.sampling_sigmas, scheduler.alphas_cumprod)
        with frozen_weights(unet):
            result = optimise_embeddings(denoise, inversion.trajectory, inversion.sigmas, cond, uncond, branch,
                                         settings, callback)
    return OptimisedInversion.from_result(inversion, result, cond.detach().float(), uncond.detach().float(),
                                          settings.cfg)


def ttis_invert(unet: torch.nn.Module, scheduler, latent: torch.Tensor, target: torch.Tensor, uncond: torch.Tensor,
                *, steps: int = BARET_DEFAULTS.steps, cfg: float = BARET_DEFAULTS.cfg,
                iterations: int = BARET_DEFAULTS.ttis_iterations, lr: LearningRate = BARET_DEFAULTS.ttis_lr,
                eps: float = BARET_DEFAULTS.early_stop_eps, delta: float = BARET_DEFAULTS.early_stop_delta,
                convention: Convention = DEFAULT_CONVENTION, callback: IterationCallback | None = None,
                **added_cond: torch.Tensor) -> OptimisedInversion:
    """BARET's target-text inversion schedule (Sec. 3.1) on a diffusers UNet (as ``comfy_autograd.ttis_invert``)."""
    settings = OptimisationSettings(iterations=iterations, lr=lr, eps=eps, delta=delta, cfg=cfg)
    return optimise_inversion(unet, scheduler, latent, target, uncond, "cond", settings, steps=steps,
                              convention=convention, callback=callback, **added_cond)


def null_text_invert(unet: torch.nn.Module, scheduler, latent: torch.Tensor, cond: torch.Tensor,
                     uncond: torch.Tensor, *, steps: int = BARET_DEFAULTS.steps, cfg: float = BARET_DEFAULTS.cfg,
                     iterations: int = BARET_DEFAULTS.null_text_iterations, lr: LearningRate | None = None,
                     eps: float = BARET_DEFAULTS.early_stop_eps, delta: float = BARET_DEFAULTS.early_stop_delta,
                     convention: Convention = DEFAULT_CONVENTION, callback: IterationCallback | None = None,
                     **added_cond: torch.Tensor) -> OptimisedInversion:
    """Null-text inversion on a diffusers UNet (lr 1e-2 * (1 - s / 100) unless given)."""
    settings = OptimisationSettings(iterations=iterations, lr=null_text_lr() if lr is None else lr, eps=eps,
                                    delta=delta, cfg=cfg)
    return optimise_inversion(unet, scheduler, latent, cond, uncond, "uncond", settings, steps=steps,
                              convention=convention, callback=callback, **added_cond)


@torch.no_grad()
def baret_edit(unet: torch.nn.Module, scheduler, inversion: OptimisedInversion, target: torch.Tensor,
               uncond: torch.Tensor, *, cfg: float | None = None, controls: BaretControls | None = None,
               callback: StepCallback | None = None, **added_cond: torch.Tensor) -> BaretResult:
    """BARET's edit (Sec. 3.2-3.3) on a diffusers UNet: reconstruction, transition and edit batched.

    The batch is [uncond x 3, cond x 3] (diffusers' CFG order); the cond rows carry e_opt,s, e_trans,s
    and e_target. ``cfg`` defaults to the inversion's; another target, uncond or CFG than TTIS used is
    refused by name. ``callback(step, edit_latent)`` after each step.
    """
    controls = controls or BaretControls()
    inversion = check_ttis_inversion(inversion)
    cfg = inversion.cfg if cfg is None else cfg
    plan = transition_embeddings(inversion.embeddings, target, controls)
    check_edit_matches_inversion(inversion, target, uncond, cfg)
    sigmas = inversion.sampling_sigmas
    step_of = {float(s): i for i, s in enumerate(sigmas)}

    def contexts(sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Cond rows e_opt,s / e_trans,s / e_target; uncond for all three."""
        s = step_of[float(sigma)]
        return torch.cat([plan.reconstruction[s], plan.transition[s], plan.target]), uncond

    with DiffusersHost(unet, BaretHook(controls)) as host:
        use_schedule(host, sigmas, scheduler.alphas_cumprod)
        denoise = guided_denoiser(host, scheduler.alphas_cumprod, contexts, cfg, total_steps=len(sigmas) - 1,
                                  prediction=prediction_type(scheduler), **added_cond)
        x = sample(denoise, inversion.z_T.repeat(3, 1, 1, 1), sigmas,
                   callback=None if callback is None else lambda i, x: callback(i, x[2:3]))
    return BaretResult.from_batch(x, plan.lambdas)

"""The core's samplers on the diffusers host: the Python API for scripts, and CI's second UNet.

Same sigma-space formulation as the ComfyUI host (``inversion.ddim``): a latent at level sigma is
``x0 + sigma * eps`` and the UNet sees the DDPM latent ``x / sqrt(1 + sigma^2)`` with the timestep
whose alpha-bar gives that sigma. Latents here are the VAE's scaled latents (what diffusers' UNet
takes), so there is no ``process_latent_in`` step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from ..attention.hooks import RowInfo
from ..inversion.ddim import (
    DEFAULT_CONVENTION,
    Convention,
    Denoiser,
    Inversion,
    check_finite,
    inversion_sigmas,
    invert,
)
from .diffusers import DiffusersHost

StepCallback = Callable[[int, torch.Tensor], None]


def sampling_sigmas(scheduler, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) of the scheduler's sampling schedule; sigmas descend and end with 0."""
    if steps < 2:
        raise ValueError("RealEdit: steps must be at least 2.")
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.clone()
    alphas = scheduler.alphas_cumprod.double()[timesteps]
    sigmas = ((1 - alphas) / alphas).sqrt()
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)]).float()


@functools.lru_cache(maxsize=4)
def _log_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule's log-sigmas, float64 on the CPU: built once per schedule tensor (every UNet call
    and every TTIS iteration asks for a timestep)."""
    return (((1 - alphas_cumprod) / alphas_cumprod).sqrt()).double().log().cpu()


def timestep_for_sigma(sigma: float, alphas_cumprod: torch.Tensor) -> float:
    """The (fractional) training timestep of a noise level, interpolating log-sigma like ComfyUI."""
    log_sigmas = _log_sigmas(alphas_cumprod)
    log_sigma = math.log(max(sigma, 1e-10))
    if log_sigma <= log_sigmas[0]:
        return 0.0
    if log_sigma >= log_sigmas[-1]:
        return float(len(log_sigmas) - 1)
    high = int(torch.searchsorted(log_sigmas, torch.tensor(log_sigma, dtype=torch.float64)))
    low = high - 1
    w = (log_sigma - float(log_sigmas[low])) / float(log_sigmas[high] - log_sigmas[low])
    return low + w


def use_schedule(host: DiffusersHost, sigmas: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
    """Tell the host the schedule so hooks see step indices as on ComfyUI (index of the sigma)."""
    host.schedule = [timestep_for_sigma(float(s), alphas_cumprod) for s in sigmas]


PREDICTIONS = ("epsilon", "v_prediction")


def prediction_type(scheduler) -> str:
    """What the UNet predicts, as the scheduler's config says (diffusers' ``prediction_type``)."""
    return getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"RealEdit: prediction_type '{prediction}' is not supported; DDIM inversion needs an "
                         f"epsilon- or v-prediction UNet ({', '.join(PREDICTIONS)}).")


def noise_from_output(output: torch.Tensor, x_ddpm: torch.Tensor, sigma: float, prediction: str) -> torch.Tensor:
    """eps from the UNet's output at DDPM latent ``x_ddpm`` of level sigma.

    v-prediction: v = sqrt(a) eps - sqrt(1 - a) x0 with a = 1 / (1 + sigma^2), so
    eps = sqrt(1 - a) x_t + sqrt(a) v = (sigma x_t + v) / sqrt(1 + sigma^2). Affine in the output, so
    it commutes with the CFG combination.
    """
    if prediction == "v_prediction":
        return (output + sigma * x_ddpm) / math.sqrt(1 + sigma**2)
    return output


RowContexts = Callable[[float], tuple[torch.Tensor, torch.Tensor | None]]


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """A batch-1 tensor broadcast to ``n`` rows (per-row tensors pass unchanged)."""
    return t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t


def _level(sigma: float | torch.Tensor) -> float:
    """The noise level as a float (k-diffusion-style loops pass one sigma per row, all equal)."""
    return float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)


def guided_denoiser(host: DiffusersHost, alphas_cumprod: torch.Tensor, contexts: RowContexts, cfg: float = 1.0, *,
                    total_steps: int | None = None, prediction: str = "epsilon",
                    **added_cond: torch.Tensor) -> Denoiser:
    """k-diffusion-style ``denoised = f(x, sigma)`` with classifier-free guidance, one UNet call a step.

    ``contexts(sigma)`` gives the text embeddings of the cond rows and of the uncond rows (batch 1 or one
    per latent row; uncond None: no guidance) at that level, so callers can change them per step. The
    batch is [uncond rows, cond rows] (diffusers' order) when cfg != 1, cond rows only otherwise; the host
    is told which is which. Step indices come from the host's schedule (``use_schedule``); ``total_steps``
    is the number of steps (the schedule has one more entry, as ComfyUI's does). ``prediction``: the
    UNet's ``prediction_type`` ("epsilon" or "v_prediction"; see ``prediction_type``).
    """
    _check_prediction(prediction)

    def denoise(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        b, sigma = x.shape[0], _level(sigma)
        t = torch.tensor(timestep_for_sigma(sigma, alphas_cumprod), dtype=x.dtype)
        x_ddpm = x / math.sqrt(1 + sigma**2)
        cond, uncond = contexts(sigma)
        cond = _rows(cond.to(x), b)
        if cfg == 1.0 or uncond is None:
            out = host.predict_noise(x_ddpm, t, cond, total_steps=total_steps, rows=RowInfo.from_chunks(["cond"], b),
                                     **{k: _rows(v, b) for k, v in added_cond.items()})
        else:
            extra = {k: torch.cat([_rows(v, b), _rows(v, b)]) for k, v in added_cond.items()}
            out_uncond, out_cond = host.predict_noise(
                torch.cat([x_ddpm, x_ddpm]), t, torch.cat([_rows(uncond.to(x), b), cond]),
                rows=RowInfo.from_chunks(["uncond", "cond"], b), total_steps=total_steps, **extra).chunk(2)
            out = out_uncond + cfg * (out_cond - out_uncond)  # noise_from_output is affine: commutes with CFG
        return x - sigma * noise_from_output(out, x_ddpm, sigma, prediction)

    return denoise


def cfg_denoiser(host: DiffusersHost, alphas_cumprod: torch.Tensor, cond: torch.Tensor,
                 uncond: torch.Tensor | None = None, cfg: float = 1.0, *, total_steps: int | None = None,
                 prediction: str = "epsilon", **added_cond: torch.Tensor) -> Denoiser:
    """:func:`guided_denoiser` with the same prompts at every step."""
    return guided_denoiser(host, alphas_cumprod, lambda sigma: (cond, uncond), cfg, total_steps=total_steps,
                           prediction=prediction, **added_cond)


def sample(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
           callback: StepCallback | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta 0) = Euler in sigma space, along descending ``sigmas``."""
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        eps = (x - denoise(x, sigma)) / sigma
        x = x + (sigmas[i + 1] - sigmas[i]) * eps
        if callback is not None:
            callback(i, x)
    return x


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """Identifies the UNet an inversion or a reference bank was made with."""
    return f"{type(unet).__name__}@{id(unet):x}"


def check_latent(unet: torch.nn.Module, latent: torch.Tensor, name: str = "latent") -> None:
    """Refuse a latent the UNet cannot take (shape, channels) or one with NaN/inf, naming the fix."""
    if latent.ndim != 4:
        raise ValueError(f"RealEdit: the {name} has shape {tuple(latent.shape)}; a VAE latent (batch, channels, "
                         "height, width) is expected.")
    config = getattr(unet, "config", None)
    in_channels = getattr(config, "in_channels", latent.shape[1])
    if in_channels != latent.shape[1]:
        hint = (" This is an InstructPix2Pix-style UNet (8 input channels): it needs the photo as image "
                "conditioning; use a plain SD UNet here.") if in_channels == 8 else (
                " Encode the image with this pipeline's VAE.")
        raise ValueError(f"RealEdit: the {name} has {latent.shape[1]} channels but the UNet expects {in_channels}."
                         + hint)
    check_finite(latent, name)


def ddim_invert(host: DiffusersHost, scheduler, latent: torch.Tensor, cond: torch.Tensor, *, steps: int = 50,
                convention: Convention = DEFAULT_CONVENTION, callback: StepCallback | None = None,
                **added_cond: torch.Tensor) -> Inversion:
    """DDIM-invert a (scaled) latent on a diffusers UNet; mirrors ``hosts.comfy_sampling.ddim_invert``.

    epsilon or v-prediction, as ``scheduler.config.prediction_type`` says.
    """
    check_latent(host.unet, latent)
    _, sigmas = sampling_sigmas(scheduler, steps)
    ascending = inversion_sigmas(sigmas, convention)
    use_schedule(host, ascending, scheduler.alphas_cumprod)
    host.begin_run()
    denoise = cfg_denoiser(host, scheduler.alphas_cumprod, cond, total_steps=steps,
                           prediction=prediction_type(scheduler), **added_cond)
    with torch.no_grad():  # the trajectory never needs a graph (an optimiser starts from it afterwards)
        trajectory = invert(denoise, latent, ascending, convention, callback=callback)
    return Inversion(tuple(t.detach() for t in trajectory), ascending, convention,
                     fingerprint=unet_fingerprint(host.unet))

"""InstructPix2Pix three-way guidance on the diffusers host, with an attention hook (ZONE's M_b capture).

IP2P (Brooks et al. Eq. 2; ZONE Eq. 3-4) predicts noise in three branches of one batch, in diffusers'
``StableDiffusionInstructPix2PixPipeline`` order [instruction + photo, empty text + photo, empty text]:

    e = e(z, {}, {}) + s_I (e(z, c_I, {}) - e(z, {}, {})) + s_T (e(z, c_I, c_T) - e(z, c_I, {}))

c_I is the photo's VAE latent (the posterior mode, unscaled, as that pipeline takes it) concatenated to the
8-channel UNet input, zeros in the last branch. The host labels the instruction row ``cond`` and both
empty-text rows ``uncond`` (as ``hosts.comfy_ip2p`` does), so :class:`~..masks.IP2PMaskRecorder` reads the
empty-text branches. Sampling is the core's deterministic Euler = DDIM in sigma space (``diffusers_sampling``)
from seeded noise at the first sigma, as ComfyUI's ``euler`` sampler does it.
"""

from __future__ import annotations

import math

import torch

from ..attention.hooks import AttentionHook, ChainHook, RowInfo
from ..inversion.ddim import Denoiser
from .diffusers import DiffusersHost
from .diffusers_sampling import (
    StepCallback,
    noise_from_output,
    prediction_type,
    sample,
    sampling_sigmas,
    timestep_for_sigma,
    use_schedule,
)

IP2P_ROWS = RowInfo(("cond", "uncond", "uncond"), (0, 0, 0))


def check_ip2p_unet(unet: torch.nn.Module) -> None:
    channels = getattr(getattr(unet, "config", None), "in_channels", None)
    if channels != 8:
        raise ValueError(f"RealEdit: the IP2P model's UNet takes {channels} input channels; an InstructPix2Pix "
                         "UNet takes 8 (noise latent + photo latent). Pass an InstructPix2Pix diffusers folder.")


def ip2p_denoiser(host: DiffusersHost, scheduler, photo: torch.Tensor, instruction: torch.Tensor,
                  empty: torch.Tensor, *, text_cfg: float, image_cfg: float, total_steps: int) -> Denoiser:
    """``denoised = f(x, sigma)`` with IP2P's three-way guidance (Eq. 2), one UNet call of batch 3 a step.

    ``photo``: c_I, (1, 4, h, w); ``instruction`` / ``empty``: (1, tokens, width) text embeddings.
    """
    prediction = prediction_type(scheduler)
    image_rows = torch.cat([photo, photo, torch.zeros_like(photo)])  # (3, 4, h, w): c_I, c_I, none
    context = torch.cat([instruction, empty, empty])  # (3, tokens, width): c_T, {}, {}

    def denoise(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        sigma = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        t = torch.tensor(timestep_for_sigma(sigma, scheduler.alphas_cumprod), dtype=x.dtype)
        x_ddpm = x / math.sqrt(1 + sigma**2)
        inputs = torch.cat([x_ddpm.expand(3, -1, -1, -1), image_rows.to(x)], dim=1)  # (3, 8, h, w)
        out = host.predict_noise(inputs, t, context.to(x), rows=IP2P_ROWS, total_steps=total_steps)
        text, image, uncond = out.chunk(3)
        guided = uncond + image_cfg * (image - uncond) + text_cfg * (text - image)  # Eq. 2; affine, so before v->eps
        return x - sigma * noise_from_output(guided, x_ddpm, sigma, prediction)

    return denoise


@torch.no_grad()
def ip2p_edit(unet: torch.nn.Module, scheduler, photo: torch.Tensor, instruction: torch.Tensor, empty: torch.Tensor,
              *, steps: int = 20, text_cfg: float = 7.5, image_cfg: float = 1.5, seed: int = 0,
              hook: AttentionHook | None = None, callback: StepCallback | None = None) -> torch.Tensor:
    """Sample the IP2P edit of ``photo`` (the photo's unscaled VAE latent mode, (1, 4, h, w)); returns the
    edited latent in the UNet's scaled space. ``hook`` sees every cross-attention call (self-attention is
    left alone), e.g. an :class:`~..masks.IP2PMaskRecorder` for ZONE's M_b."""
    check_ip2p_unet(unet)
    if photo.ndim != 4 or photo.shape[:2] != (1, 4):
        raise ValueError(f"RealEdit: the photo latent has shape {tuple(photo.shape)}; expected (1, 4, h, w).")
    _, sigmas = sampling_sigmas(scheduler, steps)
    param = next(unet.parameters())
    noise = torch.randn(photo.shape, generator=torch.Generator().manual_seed(seed))
    x = (noise * sigmas[0]).to(param.device, param.dtype)
    with DiffusersHost(unet, hook or ChainHook(), self_attention=False) as host:
        use_schedule(host, sigmas, scheduler.alphas_cumprod)
        denoise = ip2p_denoiser(host, scheduler, photo.to(param.device, param.dtype), instruction, empty,
                                text_cfg=text_cfg, image_cfg=image_cfg, total_steps=steps)
        return sample(denoise, x, sigmas.to(param.device), callback=callback)

"""Fused IP2P + MagicBrush (ZONE Sec. 4.2, Eq. 5): z_{t-1} = (z*_{t-1} + beta * z'_{t-1}) / (1 + beta).

z* is IP2P's denoised latent, z' the second model's (MagicBrush, or any InstructPix2Pix finetune),
both stepped from the same z_t; beta is 0.2 when the action is "remove" and 0.01 otherwise (the paper's
values; the official code uses the same two numbers). Plain tensors, no host: the host
(``hosts/comfy_ip2p.py``) decides *what* it fuses; see there why fusing the two models' denoised
predictions x0 is Eq. 5 exactly for first-order samplers.
"""

from __future__ import annotations

import math

import torch

from .actions import parse_action
from .settings import ZONE_DEFAULTS, ZoneSettings

AUTO_BETA = -1.0  # any negative beta: take it from the action


def fusion_beta(action: str, beta: float | None = None, settings: ZoneSettings = ZONE_DEFAULTS) -> float:
    """Eq. 5's beta: ``beta`` when it is >= 0, else the paper's value for ``action`` (0.2 remove, 0.01 others).

    Raises a ValueError naming the input when ``action`` is not add / remove / change or ``beta`` is not finite.
    """
    name = parse_action(str(action))  # str(): None is refused here, not read as 'change'
    if beta is None or (math.isfinite(beta) and beta < 0):
        return settings.beta(name)
    if not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number >= 0 (or negative for the paper's value), got {beta}")
    return float(beta)


def fuse_latents(z_first: torch.Tensor, z_second: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 5: (z_first + beta * z_second) / (1 + beta), in ``z_first``'s dtype and device.

    ``beta == 0`` returns ``z_first`` itself (bit for bit the single-model result).
    """
    if beta < 0 or not math.isfinite(beta):
        raise ValueError(f"fuse_latents: beta must be finite and >= 0, got {beta}")
    if z_first.shape != z_second.shape:
        raise ValueError(
            f"fuse_latents: the two models' latents differ in shape, {tuple(z_first.shape)} vs "
            f"{tuple(z_second.shape)}; both models must share a latent space (e.g. two SD1.5 IP2P finetunes)"
        )
    if beta == 0:
        return z_first
    z_second = z_second.to(device=z_first.device, dtype=z_first.dtype)
    return (z_first + beta * z_second) / (1.0 + beta)

"""Seeded random weights for the tiny models of both hosts (plain PyTorch)."""

from __future__ import annotations

import torch


def randomise(module: torch.nn.Module, scale: float = 1.0) -> None:
    """Fill every parameter with noise from the current RNG: biases small, norm weights 1, others
    ~ scale / sqrt(fan_in); scalars (CLIP's logit_scale) keep their value. ComfyUI's ops leave weights
    uninitialised, so its tiny models need this as much as diffusers' do."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 0:
                continue
            if name.endswith("bias"):
                param.normal_(0.0, 0.02 * scale)
            elif param.ndim == 1:  # norm weights
                param.fill_(1.0)
            else:
                param.normal_(0.0, scale / param[0].numel() ** 0.5)


def scale_output(unet: torch.nn.Module, factor: float) -> None:
    """Multiply the UNet's output layer (``out[-1]``, weight and bias) by ``factor``; 0 zeroes it."""
    with torch.no_grad():
        for param in unet.out[-1].parameters():
            if factor == 0:
                param.zero_()  # +0.0 everywhere (mul_(0) would leave -0.0 where the weight was negative)
            else:
                param.mul_(factor)

"""Deterministic synthetic test images in ComfyUI's layouts (no ComfyUI import).

``IMAGE`` tensors are ``(B, H, W, 3)`` float32 in ``[0, 1]``; ``MASK`` tensors are ``(B, H, W)``
float32 in ``{0, 1}`` (1 = object). Scenes are a smooth textured background with one shaded,
coloured object, so there is something for segmentation, inversion and editing to find: a red disc
in the *source* image, a blue square on a different background in the *reference* image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Shape = Literal["disc", "square"]


@dataclass(frozen=True)
class Scene:
    """A synthetic image with one object: ``image`` ``(1, H, W, 3)`` and its ``mask`` ``(1, H, W)``."""

    image: torch.Tensor
    mask: torch.Tensor


def _grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in ``[0, 1]``: ``(y, x)``, each ``(H, W)``."""
    y = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    x = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    return torch.meshgrid(y, x, indexing="ij")


def textured_background(height: int = 128, width: int = 128, seed: int = 0) -> torch.Tensor:
    """A smooth colour gradient plus a few seeded sinusoidal textures: ``(H, W, 3)`` in ``[0, 1]``."""
    generator = torch.Generator().manual_seed(seed)
    y, x = _grid(height, width)
    base = torch.rand(2, 3, generator=generator) * 0.5 + 0.25  # colours at the top-left / bottom-right
    t = ((x + y) / 2).unsqueeze(-1)
    image = base[0] * (1 - t) + base[1] * t
    for _ in range(3):
        freq = 4.0 + 10.0 * torch.rand(2, generator=generator)
        phase = 2 * math.pi * torch.rand(1, generator=generator)
        amplitude = 0.03 + 0.05 * torch.rand(3, generator=generator)
        wave = torch.sin(2 * math.pi * (freq[0] * x + freq[1] * y) + phase)
        image = image + wave.unsqueeze(-1) * amplitude
    return image.clamp(0.0, 1.0)


def shape_mask(height: int = 128, width: int = 128, shape: Shape = "disc",
               center: tuple[float, float] = (0.5, 0.5), size: float = 0.25) -> torch.Tensor:
    """A binary ``MASK`` ``(1, H, W)`` of a disc (radius ``size``) or an axis-aligned square
    (half-side ``size``), centred at ``center = (y, x)``; all lengths relative to the image side."""
    y, x = _grid(height, width)
    dy, dx = y - center[0], x - center[1]
    if shape == "disc":
        inside = dy.square() + dx.square() <= size**2
    elif shape == "square":
        inside = (dy.abs() <= size) & (dx.abs() <= size)
    else:
        raise ValueError(f"unknown shape {shape!r}: use 'disc' or 'square'")
    return inside.to(torch.float32).unsqueeze(0)


def make_scene(height: int = 128, width: int = 128, *, shape: Shape = "disc",
               color: tuple[float, float, float] = (0.85, 0.15, 0.1), center: tuple[float, float] = (0.5, 0.5),
               size: float = 0.25, seed: int = 0) -> Scene:
    """A textured background (seeded) with one shaded object of the given colour, and its mask.

    The object is lit from the top-left (a linear shading ramp) so it is not a flat colour patch.
    """
    background = textured_background(height, width, seed)
    mask = shape_mask(height, width, shape, center, size)[0]
    y, x = _grid(height, width)
    shading = 1.0 - 0.35 * ((y - center[0]) + (x - center[1])) / (2 * size)
    obj = (torch.tensor(color, dtype=torch.float32) * shading.clamp(0.5, 1.3).unsqueeze(-1)).clamp(0.0, 1.0)
    image = torch.where(mask.bool().unsqueeze(-1), obj, background)
    return Scene(image=image.unsqueeze(0).contiguous(), mask=mask.unsqueeze(0).contiguous())


def source_scene(height: int = 128, width: int = 128) -> Scene:
    """The image to edit: a red disc (radius 1/4) in the middle of a textured background."""
    return make_scene(height, width, shape="disc", color=(0.85, 0.15, 0.1), center=(0.5, 0.5), size=0.25, seed=0)


def reference_scene(height: int = 128, width: int = 128) -> Scene:
    """The reference: a blue square (side 1/2), slightly off-centre, on a different background."""
    return make_scene(height, width, shape="square", color=(0.1, 0.3, 0.9), center=(0.45, 0.55), size=0.22,
                      seed=1)


def batch(*images: torch.Tensor) -> torch.Tensor:
    """Concatenate ``IMAGE`` or ``MASK`` tensors of equal size along the batch dimension."""
    return torch.cat(images, dim=0)

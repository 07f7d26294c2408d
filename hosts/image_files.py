"""Image and mask files <-> the tensors every host and script passes around (PIL, numpy and torch only).

Images are (H, W, 3) float in [0, 1], masks (H, W) float in [0, 1], both on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as (H, W, 3) float in [0, 1] (alpha dropped, greyscale expanded)."""
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)


def load_mask(path: str | Path) -> torch.Tensor:
    """A mask file as (H, W) float in [0, 1] (its luminance; alpha ignored)."""
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)


def quantise(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8, rounded as the PNG writer does."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)

"""Layer compositing (ZONE Sec. 4.4) and the tensor layouts the mask pipeline accepts.

Layouts (ComfyUI's): an image is (H, W, C) float in [0, 1], or a batch of one (1, H, W, C); a mask
is (H, W), or (1, H, W), bool or float (float masks are binarised at > 0.5).

The composite I_C: edited pixels inside the refined mask M_f, ``alpha * edited + (1 - alpha) *
original`` (0.6 / 0.4, official code) on the band M_f* minus M_f, and the original pixels everywhere
else, selected with ``torch.where`` so they are bit-identical to the input. The official code blends
the symmetric difference of M_f and M_f* (an unsigned subtraction); :func:`~.fft_smooth.fft_edge_smooth`
returns an M_f* that contains M_f, so here M_f stays fully edited.
"""

from __future__ import annotations

import numpy as np
import torch

from .settings import ZONE_DEFAULTS

TensorLike = torch.Tensor | np.ndarray


def as_image_hwc(image: TensorLike, name: str, channels: int | None = 3) -> torch.Tensor:
    """(H, W, C) or (1, H, W, C) -> (H, W, C) floating tensor; clear errors otherwise."""
    x = torch.as_tensor(image)
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(
                f"{name}: a batch of {x.shape[0]} images; ZONE's mask pipeline takes one image at a time "
                "(split the batch, e.g. with an image-from-batch node)"
            )
        x = x[0]
    if x.ndim != 3 or (channels is not None and x.shape[-1] != channels):
        want = f"(H, W, {channels})" if channels is not None else "(H, W, C)"
        raise ValueError(f"{name}: expected an image {want} or (1, H, W, C), got shape {tuple(x.shape)}")
    return x if x.is_floating_point() else x.float()


def image_pair(original: TensorLike, edited: TensorLike, channels: int | None = 3,
               node: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The original and edited images as (H, W, C) floating tensors (see :func:`as_image_hwc`), refused
    unless they have one shape. ``node`` (a node's display name) words the error for its two IMAGE inputs."""
    orig = as_image_hwc(original, "original", channels=channels)
    edit = as_image_hwc(edited, "edited", channels=channels)
    if edit.shape != orig.shape:
        if node is not None:
            raise ValueError(f"RealEdit {node}: 'original' is {tuple(orig.shape)} but 'edited' is "
                             f"{tuple(edit.shape)} (H, W, C); decode the edit at the photo's size.")
        raise ValueError(
            f"size mismatch: original is {tuple(orig.shape)} (H, W, C) but edited is {tuple(edit.shape)}; "
            "decode the edit at the original's size (same width/height as the input photo)"
        )
    return orig, edit


def as_mask_hw(mask: TensorLike, name: str) -> torch.Tensor:
    """(H, W) or (1, H, W), bool or float -> (H, W) bool (float masks: > 0.5)."""
    x = torch.as_tensor(mask)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a mask (H, W) or (1, H, W), got shape {tuple(x.shape)}")
    return x if x.dtype == torch.bool else x > 0.5


def check_same_size(size: tuple[int, int], **masks: torch.Tensor) -> None:
    """Raise a ValueError naming every (H, W) mask whose size differs from ``size``."""
    bad = {n: tuple(m.shape) for n, m in masks.items() if tuple(m.shape) != tuple(size)}
    if bad:
        listed = ", ".join(f"{n} is {s[0]}x{s[1]}" for n, s in bad.items())
        raise ValueError(
            f"size mismatch: the images are {size[0]}x{size[1]} but {listed}; "
            "resize the masks to the image size first"
        )


def any_true(mask: torch.Tensor) -> bool:
    """Whether a bool mask has a true pixel: the max of its bytes (torch's bool ``any`` reduction is about
    25x slower than a byte max on the CPU)."""
    return mask.numel() > 0 and bool(mask.view(torch.uint8).amax())


def all_true(mask: torch.Tensor) -> bool:
    """Whether every pixel of a bool mask is true (the min of its bytes; see :func:`any_true`)."""
    return mask.numel() == 0 or bool(mask.view(torch.uint8).amin())


def bounding_box(mask: torch.Tensor, margin: int) -> tuple[slice, slice] | None:
    """The rows and columns of an (H, W) mask's true pixels, widened by ``margin`` (clipped to the image); None
    if empty. Byte maxima (see :func:`any_true`); the columns are read on the rows that hold the mask only."""
    rows = torch.nonzero(_bytes(mask).amax(dim=1)).flatten()
    if rows.numel() == 0:
        return None
    first_row, last_row = int(rows[0]), int(rows[-1])
    cols = torch.nonzero(_bytes(mask[first_row:last_row + 1]).amax(dim=0)).flatten()
    height, width = mask.shape
    return (slice(max(first_row - margin, 0), min(last_row + 1 + margin, height)),
            slice(max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, width)))


def _bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask's bytes (a view); any other mask is compared with zero first."""
    return (mask if mask.dtype == torch.bool else mask != 0).view(torch.uint8)


def blend_band(m_f: torch.Tensor, m_f_star: torch.Tensor) -> torch.Tensor:
    """The blend band M_f* minus M_f, (H, W) bool."""
    return m_f_star & ~m_f


def composite(
    original: TensorLike,
    edited: TensorLike,
    m_f: TensorLike,
    m_f_star: TensorLike,
    *,
    alpha: float = ZONE_DEFAULTS.blend_alpha,
) -> torch.Tensor:
    """Composite the edited layer over the original (Sec. 4.4, after Eq. 7-8).

    Args:
        original: I_G, (H, W, C) or (1, H, W, C).
        edited: I_sty (the globally edited image), same size as ``original``.
        m_f: refined mask M_f (Eq. 6), (H, W) or (1, H, W).
        m_f_star: final mask M_f* (Eq. 7), same size.
        alpha: weight of the edited image in the band M_f* minus M_f (0.6; the original gets 1 - alpha).

    Returns:
        The composite, in ``original``'s layout, dtype and device: edited inside M_f, the blend on the
        band, ``original``'s own values (bit-identical) everywhere else.
    """
    orig, edit = image_pair(original, edited, channels=None)
    inner = as_mask_hw(m_f, "m_f").to(orig.device)
    final = as_mask_hw(m_f_star, "m_f_star").to(orig.device)
    check_same_size(tuple(orig.shape[:2]), m_f=inner, m_f_star=final)
    edit = edit.to(device=orig.device, dtype=orig.dtype)
    out = orig.clone()
    box = bounding_box(inner | final, margin=0)  # outside it every pixel is the original's: work on the box
    if box is not None:
        o, e, i, f = orig[box], edit[box], inner[box], final[box]
        blended = alpha * e + (1.0 - alpha) * o
        # (h, w) -> (h, w, 1) to broadcast over channels; torch.where copies, never recomputes, orig.
        out[box] = torch.where(i[..., None], e, torch.where(blend_band(i, f)[..., None], blended, o))
    return out[None] if torch.as_tensor(original).ndim == 4 else out

"""FFT edge smoother (ZONE Sec. 4.4, Eq. 7-8): the final mask M_f* around the refined mask M_f.

Order of operations (paper Sec. 4.4 and the official ``subtract_fft_images``):

1. M_d = M_f dilated by a 3x3 square, 4 iterations (kornia; the geodesic border, like OpenCV's).
2. I_L,d = gray(I_sty) * M_d and I_G,d = gray(I_G) * M_d, gray = ITU-R BT.601 luma.
3. M_dm = f^-1( H(f(I_L,d)) - H(f(I_G,d)) ), f = ``torch.fft.fft2``, H the ideal low-pass of Eq. 8.
   f and H are linear, so this is computed as f^-1(H(f(I_L,d - I_G,d))): one transform pair, the same
   result up to rounding.
4. g (Eq. 7): |M_dm| > 30/255 (the official threshold 30 on 0-255 values, here on [0, 1] images),
   union with M_f, closing with a 21x21 square (kornia), hole filling (scipy), then the result is
   clipped to M_d (``clip_to_dilation``, default on).

Two choices the paper leaves open, taken here:

* Union with M_f before the closing: the official code leaves M_f minus M_f* to its blend band via
  an unsigned subtraction. Here M_f is always inside M_f* (an edit that keeps the luma, e.g. a red
  tie turned green, stays fully edited), and the blend band is M_f* minus M_f.
* Clipping to M_d: the closing and the hole filling can reach concave or enclosed background beyond
  the dilation band, where I_sty is over-edited; clipping keeps every pixel beyond the band original.

D0 scaling: Eq. 8's D0 = 200 is for 512x512, i.e. a cut-off of 200/512 cycles per pixel. The filter
keeps that cut-off on each axis: a frequency index (ky, kx) passes when
(ky/H)^2 + (kx/W)^2 <= (D0/512)^2. For a square image of side N this is exactly the circle of radius
D0 * N / 512 in index units; for other shapes it is the ellipse that treats both axes alike (neither
the longer side nor sqrt(H*W) does that), so a crop or a pad does not change what counts as detail.

Morphology with flat square kernels is computed exactly on bool masks: a k x k square is a 1 x k then a
k x 1 window OR, each by doubling shifts (about log2 k passes; n iterations of 3x3 are one 9x9; erosion is
the complement's dilation), with the geodesic border of kornia's morphology and OpenCV's default
(pixels outside the image never count). At 1024 px a 9x9 dilation takes about 1 ms, where kornia's
shift-and-reduce or max-pooling takes tens. The closing and the hole filling run on the bounding box of
what they close (:func:`close_and_fill`, exact as well).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes

from .composite import TensorLike, as_image_hwc, as_mask_hw, bounding_box, check_same_size, image_pair
from .settings import ZONE_DEFAULTS

LUMA_BT601: tuple[float, float, float] = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class EdgeSmoothResult:
    """Eq. 7's output and its intermediates, all (H, W)."""

    final_mask: torch.Tensor  # M_f*, bool
    dilated_mask: torch.Tensor  # M_d, bool
    difference: torch.Tensor  # |M_dm|, float, before the threshold (for preview)


def luma(image: TensorLike) -> torch.Tensor:
    """ITU-R BT.601 luma of an (H, W, 3) or (1, H, W, 3) image -> (H, W)."""
    x = as_image_hwc(image, "image")
    weights = torch.tensor(LUMA_BT601, dtype=x.dtype, device=x.device)
    return x @ weights  # (H, W, 3) @ (3,) -> (H, W)


def _check_kernel(size: int, name: str) -> None:
    """Flat kernels must have an odd side (the anchor is the centre pixel, as in OpenCV)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"{name} must be an odd positive kernel size, got {size}")


def _dilate_axis(mask: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """An (H, W) bool mask dilated along ``dim`` by the segment [-radius, radius], geodesic border.

    Dilation by {-s, 0, s} after dilation by [-c, c] is dilation by [-(c + s), c + s] when s <= c + 1, so
    shifts of 1, 2, 4, ... (the last one cut to what is left) cover the segment in about log2(radius)
    steps of two shifted ORs each; a shift never wraps, so pixels outside the image never count."""
    out, covered, length = mask, 0, mask.shape[dim]
    while covered < radius:
        shift = min(covered + 1, radius - covered)
        if shift >= length:
            break
        previous, out = out, out.clone()
        out.narrow(dim, shift, length - shift).logical_or_(previous.narrow(dim, 0, length - shift))
        out.narrow(dim, 0, length - shift).logical_or_(previous.narrow(dim, shift, length - shift))
        covered += shift
    return out


def square_dilation(mask: torch.Tensor, size: int) -> torch.Tensor:
    """An (H, W) bool mask dilated by a ``size`` x ``size`` square (odd ``size``), geodesic border (pixels
    outside the image never count, as in kornia and OpenCV). Exact: separable, and each axis is a
    window OR computed by doubling shifts (:func:`_dilate_axis`), a few passes over bytes."""
    if size == 1:
        return mask
    return _dilate_axis(_dilate_axis(mask.bool(), size // 2, 0), size // 2, 1)


def square_erosion(mask: torch.Tensor, size: int) -> torch.Tensor:
    """An (H, W) bool mask eroded by a ``size`` x ``size`` square, geodesic border (outside pixels never
    count): the complement of the complement's dilation."""
    return mask if size == 1 else ~square_dilation(~mask, size)


def dilate(mask: torch.Tensor, kernel: int = 3, iterations: int = 4) -> torch.Tensor:
    """M_f -> M_d: ``iterations`` dilations by a ``kernel`` x ``kernel`` square, (H, W) bool."""
    _check_kernel(kernel, "dilation kernel")
    if iterations < 0:
        raise ValueError(f"dilation iterations must be >= 0, got {iterations}")
    return square_dilation(mask, iterations * (kernel - 1) + 1)


def closing(mask: torch.Tensor, kernel: int = 21) -> torch.Tensor:
    """Morphological closing by a ``kernel`` x ``kernel`` square (part of g in Eq. 7), (H, W) bool."""
    _check_kernel(kernel, "closing kernel")
    return square_erosion(square_dilation(mask, kernel), kernel)


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """Fill enclosed background (scipy.ndimage.binary_fill_holes), (H, W) bool on mask's device."""
    filled = binary_fill_holes(mask.detach().cpu().numpy())
    return torch.from_numpy(np.ascontiguousarray(filled)).to(mask.device)


def close_and_fill(mask: torch.Tensor, kernel: int = 21) -> torch.Tensor:
    """``fill_holes(closing(mask, kernel))``, computed on the mask's bounding box plus ``kernel`` pixels.

    Exact, not an approximation: the closing's dilation reaches k//2 past the box and its erosion reads
    k//2 further (2 * (k//2) < kernel, so the crop's edge, treated like the image's, is never read where
    it matters), and the one background ring left around the closed mask connects every crop-edge
    background region to the image border, as the outside does in the full image. Saves most of the
    cost at 512 px when the edit is a small part of the image.
    """
    _check_kernel(kernel, "closing kernel")
    out = torch.zeros_like(mask, dtype=torch.bool)
    box = bounding_box(mask, margin=kernel)
    if box is not None:
        out[box] = fill_holes(closing(mask[box], kernel))
    return out


def lowpass_mask(
    height: int,
    width: int,
    d0: float = ZONE_DEFAULTS.fft_d0,
    reference_size: int = ZONE_DEFAULTS.fft_d0_reference_size,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Eq. 8's ideal low-pass H in unshifted FFT order, (H, W) bool; see the module doc for scaling.

    Integer frequency indices and float64 keep the boundary exact: at 512x512 with D0 = 200 the kept
    set is exactly ky^2 + kx^2 <= 200^2.
    """
    ky = torch.fft.fftfreq(height, d=1.0 / height, dtype=torch.float64, device=device)  # integers
    kx = torch.fft.fftfreq(width, d=1.0 / width, dtype=torch.float64, device=device)
    # (ky/H)^2 + (kx/W)^2 <= (D0/ref)^2, multiplied through by (H*W)^2
    lhs = (ky[:, None] * width) ** 2 + (kx[None, :] * height) ** 2  # (H, W)
    return lhs <= (d0 * height * width / reference_size) ** 2


def difference_magnitude(
    original: TensorLike,
    edited: TensorLike,
    dilated_mask: torch.Tensor,
    d0: float = ZONE_DEFAULTS.fft_d0,
    reference_size: int = ZONE_DEFAULTS.fft_d0_reference_size,
) -> torch.Tensor:
    """|M_dm| = |f^-1(H(f(I_L,d)) - H(f(I_G,d)))| (Eq. 7 inside g), (H, W) real.

    The input is real and H is symmetric (H(k) = H(-k)), so M_dm is real: it is computed with the real
    transform pair (``rfft2``/``irfft2``, half the spectrum, about half the time of ``fft2``/``ifft2``).
    The official code takes the modulus of the complex ``ifft2``; the two differ by rounding only."""
    diff = _masked_luma_difference(original, edited, dilated_mask)  # I_L,d - I_G,d, (H, W)
    keep = _half_lowpass(*diff.shape, float(d0), int(reference_size), str(diff.device))  # (H, W // 2 + 1)
    spectrum = torch.fft.rfft2(diff) * keep
    return torch.fft.irfft2(spectrum, s=diff.shape).abs()


def _masked_luma_difference(original: TensorLike, edited: TensorLike, dilated_mask: torch.Tensor) -> torch.Tensor:
    """(luma(edited) - luma(original)) * M_d, (H, W): zero outside M_d, so only M_d's bounding box is computed."""
    orig, edit = as_image_hwc(original, "original"), as_image_hwc(edited, "edited")
    diff = torch.zeros(orig.shape[:2], dtype=torch.promote_types(orig.dtype, edit.dtype), device=orig.device)
    box = bounding_box(dilated_mask, margin=0)
    if box is not None:
        diff[box] = (luma(edit[box]) - luma(orig[box])) * dilated_mask[box]
    return diff


@lru_cache(maxsize=8)
def _half_lowpass(height: int, width: int, d0: float, reference_size: int, device: str) -> torch.Tensor:
    """The columns of :func:`lowpass_mask` that ``rfft2`` keeps (kx = 0 .. W // 2), cached per size."""
    return lowpass_mask(height, width, d0, reference_size, device)[:, : width // 2 + 1].contiguous()


def fft_edge_smooth(
    original: TensorLike,
    edited: TensorLike,
    refined_mask: TensorLike,
    *,
    d0: float = ZONE_DEFAULTS.fft_d0,
    reference_size: int = ZONE_DEFAULTS.fft_d0_reference_size,
    threshold: float = ZONE_DEFAULTS.fft_threshold,
    dilation_kernel: int = ZONE_DEFAULTS.dilation_kernel,
    dilation_iterations: int = ZONE_DEFAULTS.dilation_iterations,
    closing_kernel: int = ZONE_DEFAULTS.closing_kernel,
    clip_to_dilation: bool = True,
) -> EdgeSmoothResult:
    """The edge smoother e of Eq. 7: M_f* from I_G (original), I_sty (edited) and M_f.

    Args:
        original: I_G, (H, W, 3) or (1, H, W, 3) float in [0, 1].
        edited: I_sty, same size.
        refined_mask: M_f (Eq. 6), (H, W) or (1, H, W), bool or float (> 0.5).
        d0: Eq. 8's radius at ``reference_size`` pixels (scaled with the image, see module doc).
        threshold: binarisation of |M_dm| (30/255).
        dilation_kernel, dilation_iterations: M_f -> M_d (3, 4).
        closing_kernel: side of g's closing square (21).
        clip_to_dilation: keep M_f* inside M_d (default; see module doc).

    An empty M_f gives an empty M_f* (the composite is then the original image).
    """
    orig, edit = image_pair(original, edited)
    if orig.dtype != torch.float64:
        orig, edit = orig.float(), edit.float()
    edit = edit.to(device=orig.device, dtype=orig.dtype)
    m_f = as_mask_hw(refined_mask, "refined_mask").to(orig.device)
    check_same_size(tuple(orig.shape[:2]), refined_mask=m_f)
    m_d = dilate(m_f, dilation_kernel, dilation_iterations)
    magnitude = difference_magnitude(orig, edit, m_d, d0, reference_size)
    final = close_and_fill((magnitude > threshold) | m_f, closing_kernel)
    if clip_to_dilation:
        final = final & m_d
    return EdgeSmoothResult(final_mask=final, dilated_mask=m_d, difference=magnitude)

"""ZONE's mask pipeline end to end on plain tensors (papers/zone.txt Sec. 4.3-4.4): M_b -> M_f -> M_f* -> I_C.

    from realedit.masks import local_edit
    result = local_edit(original, edited, rough_mask, segments)   # (H, W, 3) images, (N, H, W) segments
    result.image          # the composite: original pixels (bit for bit) outside result.final_mask

Each stage is its own function too (:func:`~.region_iou.region_iou`, :func:`~.fft_smooth.fft_edge_smooth`,
:func:`~.composite.composite`); the nodes call the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .composite import TensorLike, composite
from .fft_smooth import EdgeSmoothResult, fft_edge_smooth
from .region_iou import Fallback, region_iou
from .settings import ZONE_DEFAULTS


@dataclass(frozen=True)
class LocalEditResult:
    """What :func:`local_edit` produced; masks are (H, W) bool, ``image`` is in ``original``'s layout."""

    refined_mask: torch.Tensor  # M_f (Eq. 6)
    final_mask: torch.Tensor  # M_f* (Eq. 7)
    image: torch.Tensor  # the composite I_C
    iou: float  # R(k) of the chosen segment (0.0 when the fallback returned M_b)
    index: int  # k (-1 when the fallback returned M_b)


def smooth_and_composite(
    original: TensorLike,
    edited: TensorLike,
    refined_mask: TensorLike,
    *,
    d0: float = ZONE_DEFAULTS.fft_d0,
    threshold: float = ZONE_DEFAULTS.fft_threshold,
    blend: float = ZONE_DEFAULTS.blend_alpha,
) -> tuple[EdgeSmoothResult, torch.Tensor]:
    """Eq. 7-8 then the composite: (the smoother's result with M_f*, the composite image)."""
    smoothed = fft_edge_smooth(original, edited, refined_mask, d0=d0, threshold=threshold)
    image = composite(original, edited, refined_mask, smoothed.final_mask, alpha=blend)
    return smoothed, image


def local_edit(
    original: TensorLike,
    edited: TensorLike,
    rough_mask: TensorLike,
    segments: TensorLike | list[TensorLike],
    *,
    fallback: Fallback = "error",
    d0: float = ZONE_DEFAULTS.fft_d0,
    threshold: float = ZONE_DEFAULTS.fft_threshold,
    blend: float = ZONE_DEFAULTS.blend_alpha,
) -> LocalEditResult:
    """Region-IoU (Eq. 6), the FFT edge smoother (Eq. 7-8) and the composite, in one call.

    Args:
        original: I_G, (H, W, 3) or (1, H, W, 3) float in [0, 1].
        edited: I_sty, the globally edited image, same size.
        rough_mask: M_b, (H, W) or (1, H, W), any size (resized to the segments').
        segments: candidate segments at the image size, (N, H, W) bool/float or a list of (H, W) masks
            (SAM's automatic masks: ``[r["segmentation"] for r in records]``).
        fallback: "error" (default) or "rough" (use M_b itself) when M_b is empty or no segment overlaps it.
        d0, threshold, blend: the smoother's radius at 512 px, its threshold, the band's edited weight.
    """
    refined = region_iou(rough_mask, segments, fallback=fallback)
    smoothed, image = smooth_and_composite(original, edited, refined.mask, d0=d0, threshold=threshold, blend=blend)
    return LocalEditResult(refined_mask=refined.mask, final_mask=smoothed.final_mask, image=image, iou=refined.iou,
                           index=refined.index)

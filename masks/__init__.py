"""ZONE's mask pipeline on plain tensors (no ComfyUI imports): papers/zone.txt Sec. 4.2-4.4.

* :func:`classify_action` - instruction -> "add" / "remove" / "change" (verb rules, Eq. 5's beta).
* :func:`region_iou` - Eq. 6: the segment with the highest IoU against the rough mask M_b -> M_f.
* :func:`fft_edge_smooth` - Eq. 7-8: M_f -> the final mask M_f*.
* :func:`composite` - edited inside M_f, 0.6/0.4 blend on M_f* minus M_f, original elsewhere.
* :data:`ZONE_DEFAULTS` - every default, with its origin (:func:`origin`).
"""

from .actions import (
    ACTION_WORDS,
    ACTIONS,
    ADD_WORDS,
    CHANGE_WORDS,
    OVERRIDE_CHOICES,
    REMOVE_WORDS,
    Action,
    action_tooltip,
    classify_action,
)
from .composite import as_image_hwc, as_mask_hw, blend_band, composite
from .fft_smooth import (
    EdgeSmoothResult,
    closing,
    difference_magnitude,
    dilate,
    fft_edge_smooth,
    fill_holes,
    lowpass_mask,
    luma,
)
from .region_iou import FALLBACKS, RegionIoUResult, as_segments, region_iou, segment_ious
from .settings import ZONE_DEFAULTS, ZoneSettings, origin

__all__ = [
    "ACTIONS",
    "ACTION_WORDS",
    "ADD_WORDS",
    "CHANGE_WORDS",
    "FALLBACKS",
    "OVERRIDE_CHOICES",
    "REMOVE_WORDS",
    "ZONE_DEFAULTS",
    "Action",
    "EdgeSmoothResult",
    "RegionIoUResult",
    "ZoneSettings",
    "action_tooltip",
    "as_image_hwc",
    "as_mask_hw",
    "as_segments",
    "blend_band",
    "classify_action",
    "closing",
    "composite",
    "difference_magnitude",
    "dilate",
    "fft_edge_smooth",
    "fill_holes",
    "lowpass_mask",
    "luma",
    "origin",
    "region_iou",
    "segment_ious",
]

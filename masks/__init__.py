"""ZONE's mask pipeline on plain tensors (no ComfyUI imports): papers/zone.txt Sec. 4.2-4.4.

* :func:`classify_action` - instruction -> "add" / "remove" / "change" (verb rules, Eq. 5's beta).
* :func:`fusion_beta`, :func:`fuse_latents` - Eq. 5: IP2P + MagicBrush, (z* + beta z') / (1 + beta).
* :func:`rough_mask` - Eq. 4: M_b = (A^1 - A^L) < T from the averaged first/last-token maps.
* :func:`region_iou` - Eq. 6: the segment with the highest IoU against the rough mask M_b -> M_f.
* :func:`region_iou_union` - ours: Eq. 6 on the edited image and on the original, M_f = the union.
* :func:`fft_edge_smooth` - Eq. 7-8: M_f -> the final mask M_f*.
* :func:`composite` - edited inside M_f, 0.6/0.4 blend on M_f* minus M_f, original elsewhere.
* :func:`local_edit` - the last three in one call; :func:`smooth_and_composite` - the last two.
* :data:`ZONE_DEFAULTS` - every default, with its origin (:func:`origin`).
* :func:`keep_unedited` - any editor's output: alignment (:func:`estimate_alignment`), a change map
  (:func:`change_mask`) or a given M_b, Region-IoU, smoother and composite (:data:`KEEP_DEFAULTS`).

Example (plain tensors: images (H, W, 3) in [0, 1], masks (H, W), segments (N, H, W))::

    from realedit.masks import local_edit
    result = local_edit(original, edited, rough_mask, segments, fallback="rough")
    result.image  # original's pixels, bit for bit, outside result.final_mask
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
from .align import Alignment, AlignmentError, AlignSettings, estimate_alignment, warp_to_original
from .change_map import ChangeMap, ChangeSettings, change_mask
from .composite import as_image_hwc, as_mask_hw, blend_band, composite
from .fft_smooth import (
    EdgeSmoothResult,
    close_and_fill,
    closing,
    difference_magnitude,
    dilate,
    fft_edge_smooth,
    fill_holes,
    lowpass_mask,
    luma,
)
from .fusion import AUTO_BETA, fuse_latents, fusion_beta
from .ip2p_mask import IP2PMaskRecorder, RoughMask, rough_mask
from .keep import KEEP_DEFAULTS, KeepResult, KeepSettings, KeptImage, keep_unedited
from .pipeline import LocalEditResult, local_edit, smooth_and_composite
from .region_iou import (
    FALLBACKS,
    RegionIoUResult,
    as_segments,
    binarize,
    region_iou,
    region_iou_union,
    segment_ious,
)
from .settings import ZONE_DEFAULTS, ZoneSettings, origin

__all__ = [
    "ACTIONS",
    "ACTION_WORDS",
    "ADD_WORDS",
    "AUTO_BETA",
    "CHANGE_WORDS",
    "FALLBACKS",
    "KEEP_DEFAULTS",
    "OVERRIDE_CHOICES",
    "REMOVE_WORDS",
    "ZONE_DEFAULTS",
    "Action",
    "AlignSettings",
    "Alignment",
    "AlignmentError",
    "ChangeMap",
    "ChangeSettings",
    "EdgeSmoothResult",
    "IP2PMaskRecorder",
    "KeepResult",
    "KeepSettings",
    "KeptImage",
    "LocalEditResult",
    "RegionIoUResult",
    "RoughMask",
    "ZoneSettings",
    "action_tooltip",
    "as_image_hwc",
    "as_mask_hw",
    "as_segments",
    "binarize",
    "blend_band",
    "change_mask",
    "classify_action",
    "close_and_fill",
    "closing",
    "composite",
    "difference_magnitude",
    "dilate",
    "estimate_alignment",
    "fft_edge_smooth",
    "fill_holes",
    "fuse_latents",
    "fusion_beta",
    "keep_unedited",
    "local_edit",
    "lowpass_mask",
    "luma",
    "origin",
    "region_iou",
    "region_iou_union",
    "rough_mask",
    "segment_ious",
    "smooth_and_composite",
    "warp_to_original",
]

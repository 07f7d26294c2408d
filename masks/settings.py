"""ZONE defaults in one place (papers/zone.txt; corrections in shared METHODS.md, section ZONE).

Nodes read their default values *and* the tooltip text saying where each value comes from from here,
so a default changes in exactly one line. ``origin("fft_d0")`` returns that text.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..attention.hooks import COND, UNCOND, RowKind
from ..attention.settings import field_origin
from ..attention.settings import with_origin as _d


@dataclass(frozen=True)
class ZoneSettings:
    """Every ZONE default, with its origin in the field metadata."""

    # Sec. 4.2, Eq. 4: rough mask M_b = (A^1 - A^L) < T, maps scaled to [0, 1].
    mask_threshold: float = _d(
        0.21, "official code's behaviour: after its own scaling of the maps it effectively thresholds at "
        "~54/255; T = 0.21 on our max-scaled maps reproduces its mask (IoU 0.97-0.99 on synthetic maps). The "
        "paper's T = 128/255 (0.502) covers far more of the image (68-98% against 13-63% there) and stays "
        "reachable. To be re-chosen by measuring M_b against true edit regions (Shapes world)"
    )
    mask_rows: RowKind = _d(
        UNCOND, "official code: its attention store (Prompt-to-Prompt's) keeps the second half of every attention "
        "batch, which in IP2P's [instruction, empty text + photo, empty text] batch falls on the empty-text "
        "branches (half the first's heads, all the second's); we average both over every head. The paper's text "
        "does not say which branch"
    )
    mask_downscales: tuple[int, ...] = _d(
        (4,), "official code: A^1 and A^L averaged over the layers at 1/32 of the image size only "
        "(16x16 at 512 px; a downscale of 4 from the latent). The paper's text does not say"
    )
    # Sec. 4.4, Eq. 7-8: the FFT edge smoother.
    dilation_kernel: int = _d(3, "official code: 3x3 rectangular kernel for M_f -> M_d")
    dilation_iterations: int = _d(4, "official code: --dilate_strength 4")
    fft_d0: float = _d(200.0, "paper Eq. 8: ideal low-pass radius D0 = 200 for a 512x512 image")
    fft_d0_reference_size: int = _d(512, "paper Sec. 4.4: D0 is given for 512x512; scaled with size")
    fft_threshold: float = _d(30 / 255, "official code: --threshold 30 (of 255) on |iFFT| of the difference")
    closing_kernel: int = _d(21, "official code: 21x21 morphological closing (part of g in Eq. 7)")
    blend_alpha: float = _d(
        0.6, "official code: --alpha 0.6; band = 0.6 * edited + 0.4 * original"
    )
    # Sec. 4.2, Eq. 5: fused IP2P + MagicBrush.
    beta_remove: float = _d(0.2, "paper Eq. 5: beta = 0.2 when the action is 'remove'")
    beta_other: float = _d(0.01, "paper Eq. 5: beta = 0.01 for 'add' and 'change'")
    # Sec. 4.3: SAM automatic mask generator (segment-anything's own defaults).
    sam_points_per_side: int = _d(32, "segment-anything SamAutomaticMaskGenerator default")
    sam_pred_iou_thresh: float = _d(0.88, "segment-anything SamAutomaticMaskGenerator default")
    sam_stability_score_thresh: float = _d(0.95, "segment-anything SamAutomaticMaskGenerator default")
    sam_box_nms_thresh: float = _d(0.7, "segment-anything SamAutomaticMaskGenerator default")
    segment_original_too: bool = _d(
        False, "paper Sec. 4.3: Region-IoU segments the edited image (the original for 'remove'). Ours, off by "
        "default: for a 'change', also segment the original and take the union of each image's segment that best "
        "matches M_b, so a reshaped object's old outline outside the new one's segment is not restored"
    )  # the Region-IoU node's default; local_edit and the batch runner take the segments they are given
    # Appendix B and IP2P: sampling.
    steps: int = _d(20, "paper appendix B: 20 sampling steps")
    text_cfg: float = _d(7.5, "InstructPix2Pix default text guidance s_T (Eq. 2)")
    image_cfg: float = _d(1.5, "InstructPix2Pix default image guidance s_I (Eq. 2)")

    @property
    def blend_original_weight(self) -> float:
        """Weight of the original image in the blend band (1 - alpha = 0.4 by default)."""
        return 1.0 - self.blend_alpha

    def beta(self, action: str) -> float:
        """Eq. 5's beta for an action ("add" / "remove" / "change")."""
        return self.beta_remove if action == "remove" else self.beta_other


ZONE_DEFAULTS = ZoneSettings()
PAPER_MASK_THRESHOLD = 128 / 255  # ZONE Eq. 4 as printed: T = 128 (of 255)
MASK_ROW_CHOICES: dict[str, RowKind] = {  # node option -> the IP2P rows A^1 and A^L are read from
    "empty text (official code)": UNCOND,
    "instruction": COND,
}
MASK_LAYER_CHOICES: dict[str, tuple[int, ...]] = {  # node option -> downscales of the averaged layers
    "1/32 (official code)": (4,),
    "1/16 and 1/32": (2, 4),
}
SEGMENT_CHOICES: dict[str, bool] = {  # node option -> segment_original_too
    "edited image (paper)": False,
    "edited and original (ours)": True,
}

# The node options that name the defaults.
DEFAULT_MASK_ROWS = next(name for name, kind in MASK_ROW_CHOICES.items() if kind == ZONE_DEFAULTS.mask_rows)
DEFAULT_MASK_LAYERS = next(name for name, downscales in MASK_LAYER_CHOICES.items()
                           if downscales == ZONE_DEFAULTS.mask_downscales)
DEFAULT_SEGMENT = next(name for name, both in SEGMENT_CHOICES.items() if both == ZONE_DEFAULTS.segment_original_too)


def origin(name: str) -> str:
    """Where the default of ``ZoneSettings.<name>`` comes from (tooltip text)."""
    return field_origin(ZoneSettings, name)

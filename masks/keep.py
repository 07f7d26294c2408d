"""Keep the unedited pixels of any editor's output: ZONE's mask pipeline as a post-process (no ComfyUI imports).

Any edit model (Qwen-Image-Edit, Flux Kontext, InstructPix2Pix, inpainting, SDEdit) redraws more than it
should: the picture shifts or zooms, colours drift, textures away from the edit change. For each image:

1. Alignment (:mod:`.align`): the similarity edited -> original is estimated and undone (optional), where
   the pipeline reads the edit (:class:`~.align.AlignedEdit`): a reduced copy for M_b, the box of M_f plus
   the smoother's reach for step 4; the whole aligned edit (``KeptImage.aligned``) on first use.
2. Rough mask M_b: the mask given, or the change map of the aligned pair (:mod:`.change_map`).
3. Region-IoU (ZONE Eq. 6, :func:`~.region_iou.region_iou`) over a segments batch, when one is given.
4. The FFT edge smoother (ZONE Eq. 7-8, :func:`~.fft_smooth.fft_edge_smooth`) and the exact composite
   (:func:`~.composite.composite`): the aligned edit inside M_f, a blend on M_f* minus M_f, and the
   original's own values, bit for bit, everywhere else.

Special cases, each with a line in the report: an empty M_b (no edit found) returns the original itself
and an empty mask; an M_b covering more than ``max_coverage`` of the image (a restyle, not a local edit)
returns the aligned edit everywhere with a full mask, since no pixel of the original is meant to stay.

    from realedit.masks import keep_unedited
    result = keep_unedited(original, edited)            # (H, W, 3) or (B, H, W, 3) in [0, 1]
    result.image, result.final_mask, result.report
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from ..attention.settings import field_origin
from ..attention.settings import with_origin as _d
from .align import NOT_ALIGNED, AlignedEdit, Alignment, AlignSettings, estimate_alignment
from .change_map import (
    IDENTITY_COLOUR,
    ChangeSettings,
    aligned_working_planes,
    apply_colour_transform,
    change_map_of_planes,
    colour_drift,
    reduced_pair,
)
from .composite import TensorLike, bounding_box, composite
from .fft_smooth import fft_edge_smooth
from .region_iou import as_segments, region_iou
from .settings import ZONE_DEFAULTS
from .settings import origin as zone_origin

Status = Literal["local", "no_edit", "global"]
# pixels around M_f where the kept edit is colour-matched: the smoother's dilation (4 px with ZONE's 3x3 x 4) and more
COLOUR_MARGIN = 2 * (ZONE_DEFAULTS.dilation_kernel // 2) * ZONE_DEFAULTS.dilation_iterations + 2


@dataclass(frozen=True)
class KeepSettings:
    """Every default of :func:`keep_unedited` and of the node, with its origin (tooltips read it)."""

    align: bool = _d(True, "ours: edit models (Qwen-Image-Edit, Kontext) often shift or zoom the picture by a few "
                           "pixels; aligning first keeps an edge from being taken for an edit")
    align_scale: bool = _d(True, "ours: estimate scale and a small rotation as well as the shift")
    max_shift: float = _d(0.15, "ours: shifts beyond 15% of the shorter side mean another framing, refused")
    min_alignment_score: float = _d(0.3, "ours: robust correlation of the aligned lumas below which no transform "
                                         "is trusted and the edit is used on its own grid; in our synthetic tests "
                                         "unrelated images score about 0.1, local edits 0.8-0.9")
    threshold: float = _d(10.0, "ours, not tuned on real edit-model outputs (none here): CIE76 Delta E after "
                                "colour matching; 2.3 is just noticeable, recoloured objects reach 20-80; raise it "
                                "if redrawn texture is picked up")
    colour_drift: bool = _d(True, "ours: a global affine colour change is drift: ignored by the change map and "
                                  "undone on the kept edit so it meets the original without a seam; one that "
                                  "moves the typical colour more than the threshold is an edit and is kept")
    working_size: int = _d(256, "ours: M_b is rough (ZONE's comes from a 64x64 grid): computed at <= 256 px on "
                                "the long side (4x ZONE's grid; 384 cost 25 ms more at 1024 px), then refined by "
                                "Region-IoU and the smoother at full size")
    blur_sigma: float = _d(1.0, "ours: Gaussian blur of Delta E at the working size, against pixel noise")
    open_kernel: int = _d(3, "ours: opening that removes specks of redrawn texture")
    close_kernel: int = _d(7, "ours: closing + hole filling that joins the parts of one edit")
    min_region: float = _d(0.0005, "ours: regions under 0.05% of the image are dropped")
    max_coverage: float = _d(0.6, "ours: above this M_b coverage the edit is a restyle; the edit is kept whole")
    resize_edited: bool = _d(False, "ours: off refuses an edit of another size; on resizes it (bicubic)")
    d0: float = _d(ZONE_DEFAULTS.fft_d0, zone_origin("fft_d0"))
    smooth_threshold: float = _d(ZONE_DEFAULTS.fft_threshold, zone_origin("fft_threshold"))
    blend: float = _d(ZONE_DEFAULTS.blend_alpha, zone_origin("blend_alpha"))

    def align_settings(self) -> AlignSettings:
        return AlignSettings(estimate_scale=self.align_scale, max_shift=self.max_shift,
                             min_score=self.min_alignment_score)

    def change_settings(self) -> ChangeSettings:
        return ChangeSettings(threshold=self.threshold, working_size=self.working_size, blur_sigma=self.blur_sigma,
                              open_kernel=self.open_kernel, close_kernel=self.close_kernel,
                              min_region=self.min_region)


KEEP_DEFAULTS = KeepSettings()


def keep_origin(name: str) -> str:
    """Where the default of ``KeepSettings.<name>`` comes from (tooltip text)."""
    return field_origin(KeepSettings, name)


@dataclass(frozen=True)
class KeptImage:
    """One image's result; masks (H, W) bool, images (H, W, 3)."""

    image: torch.Tensor  # the composite
    final_mask: torch.Tensor  # M_f*: outside it, image == original bit for bit
    refined_mask: torch.Tensor  # M_f (Region-IoU's segment, or M_b)
    rough_mask: torch.Tensor  # M_b
    warped: AlignedEdit  # the edit and the transform that undoes the alignment
    colour_transform: torch.Tensor  # (3, 4)
    status: Status
    segment: int  # Region-IoU's k; -1 without segments or when none overlapped M_b
    segment_iou: float
    report: str

    @property
    def alignment(self) -> Alignment:
        return self.warped.alignment

    @property
    def aligned(self) -> torch.Tensor:
        """The edit on the original's grid (before colour matching): the whole warp, computed on first use (the
        pipeline itself reads only the boxes it needs; the node returns it)."""
        return self.warped.full()[0]


@dataclass(frozen=True)
class KeepResult:
    """All images of a call; tensors in the input's layout ((B, ...) for a batch, else one image)."""

    items: tuple[KeptImage, ...]
    batched: bool

    def _stack(self, name: str) -> torch.Tensor:
        values = [getattr(item, name) for item in self.items]
        return torch.stack(values) if self.batched else values[0]

    @property
    def image(self) -> torch.Tensor:
        return self._stack("image")

    @property
    def final_mask(self) -> torch.Tensor:
        return self._stack("final_mask")

    @property
    def rough_mask(self) -> torch.Tensor:
        return self._stack("rough_mask")

    @property
    def aligned(self) -> torch.Tensor:
        return self._stack("aligned")

    @property
    def report(self) -> str:
        if len(self.items) == 1:
            return self.items[0].report
        return "\n".join(f"image {i}: {item.report}" for i, item in enumerate(self.items))


# ---------------------------------------------------------------- input checks


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every value is finite: the sum is (NaN and inf propagate) unless finite values overflow it,
    which the exact test then settles; a tenth of ``isfinite(x).all()``'s cost on a valid image."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _image_batch(image: TensorLike, name: str) -> torch.Tensor:
    """(H, W, C) or (B, H, W, C), C >= 3, finite -> (B, H, W, 3) floating."""
    x = torch.as_tensor(image)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] < 3 or x.shape[0] == 0:
        raise ValueError(f"RealEdit: '{name}' must be an image (H, W, 3) or a batch (B, H, W, 3); got shape "
                         f"{tuple(x.shape)}.")
    x = x[..., :3] if x.is_floating_point() else x[..., :3].float()
    if not _all_finite(x):
        raise ValueError(f"RealEdit: '{name}' has NaN or infinite pixels; fix the node that produced it (e.g. "
                         "decode in float32, or a VAE that does not overflow in half precision).")
    return x


def _mask_batch(mask: TensorLike, name: str, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) or (B, H, W) bool/float at ``size``, finite -> (B, H, W) bool (float: > 0.5)."""
    x = torch.as_tensor(mask)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"RealEdit: '{name}' must be a mask (H, W) or a batch (B, H, W); got shape "
                         f"{tuple(x.shape)}.")
    if tuple(x.shape[1:]) != tuple(size):
        raise ValueError(f"RealEdit: '{name}' is {x.shape[2]}x{x.shape[1]} but the images are {size[1]}x{size[0]} "
                         "(width x height); make it at the image size (e.g. resize it with a mask resize node, "
                         "or segment the image you pass as 'original').")
    if x.dtype != torch.bool and not _all_finite(x):
        raise ValueError(f"RealEdit: '{name}' has NaN or infinite values; fix the node that produced it.")
    return x if x.dtype == torch.bool else x > 0.5


def _match_edit_size(edited: torch.Tensor, size: tuple[int, int], resize: bool) -> torch.Tensor:
    if tuple(edited.shape[1:3]) == tuple(size):
        return edited
    if not resize:
        raise ValueError(f"RealEdit: 'edited' is {edited.shape[2]}x{edited.shape[1]} but 'original' is "
                         f"{size[1]}x{size[0]} (width x height); decode the edit at the original's size, give "
                         "the edit model the original at its working size (e.g. the scaled image it was fed), or "
                         "turn on resize_edited.")
    planes = edited.permute(0, 3, 1, 2)  # (B, 3, h, w)
    out = F.interpolate(planes.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0, 1).permute(0, 2, 3, 1).to(edited.dtype)


def _broadcast(batch: torch.Tensor, count: int, name: str, other: str) -> torch.Tensor:
    if batch.shape[0] == count:
        return batch
    if batch.shape[0] == 1:
        return batch.expand(count, *batch.shape[1:])
    raise ValueError(f"RealEdit: '{name}' holds {batch.shape[0]} but '{other}' holds {count}; give one for all, "
                     "or as many as there are edited images.")


# ---------------------------------------------------------------- one image


def _kept_edit(original: torch.Tensor, edit: AlignedEdit, colour: torch.Tensor | None,
               refined: torch.Tensor) -> torch.Tensor:
    """The layer the smoother and the composite read: the aligned (and colour-matched) edit on the bounding
    box of M_f plus a margin that holds the smoother's dilation M_d, the original elsewhere. Only pixels
    inside M_d reach the smoother or the composite (M_f* lies inside M_d), so this equals using the whole
    aligned edit, at the cost of the box (the whole warp is left to ``KeptImage.aligned``)."""
    out = original.clone()
    box = bounding_box(refined, COLOUR_MARGIN)
    if box is not None:
        crop = edit.crop(box)
        out[box] = crop if colour is None else apply_colour_transform(crop, colour)
    return out


def _describe_colour(colour: torch.Tensor) -> str:
    if torch.equal(colour, IDENTITY_COLOUR):
        return "colour drift: none matched"
    gains = "/".join(f"{float(v):.2f}" for v in torch.diagonal(colour[:, :3]))
    offsets = "/".join(f"{float(v):+.2f}" for v in colour[:, 3])
    return f"colour drift undone: RGB gains {gains}, offsets {offsets}"


def keep_one(original: torch.Tensor, edited: torch.Tensor, rough_mask: torch.Tensor | None = None,
             segments: torch.Tensor | None = None, settings: KeepSettings = KEEP_DEFAULTS) -> KeptImage:
    """The pipeline of the module docstring on one (H, W, 3) pair of one size (checked by the caller)."""
    alignment = estimate_alignment(original, edited, settings.align_settings()) if settings.align else NOT_ALIGNED
    edit = AlignedEdit(edited, alignment)
    colour, colour_note = IDENTITY_COLOUR, ""
    full_size = tuple(original.shape[:2])
    if rough_mask is None or settings.colour_drift:  # (original, aligned edit, valid) at the working size
        planes = aligned_working_planes(reduced_pair(original, edited, settings.working_size), alignment, full_size)
    if rough_mask is None:
        change = change_map_of_planes(planes, full_size, settings.change_settings(),
                                      match_colours=settings.colour_drift)
        rough, colour, colour_note = (edit.restrict(change.mask.to(original.device)), change.colour_transform,
                                      change.colour_note)
    else:
        rough = edit.restrict(rough_mask.to(original.device))
        if settings.colour_drift:
            colour, colour_note = colour_drift(planes[1], planes[0], planes[2], max_delta_e=settings.threshold)
    lines = [edit.alignment.describe()] + ([f"colour drift: {colour_note}"] if colour_note else [])
    coverage = int(rough.count_nonzero()) / rough.numel()
    source = "the given rough_mask" if rough_mask is not None else f"Delta E > {settings.threshold:g}"
    lines.append(f"M_b ({source}) covers {coverage:.1%}")
    empty = torch.zeros_like(rough)
    if coverage == 0.0:
        lines.append("no edit found: the output is the original, bit for bit (lower the threshold if the edit "
                     "is subtler)")
        return KeptImage(original.clone(), empty, empty, rough, edit, colour, "no_edit", -1, 0.0, "; ".join(lines))
    if coverage > settings.max_coverage:
        lines.append(f"the edit changes {coverage:.0%} of the image (> {settings.max_coverage:.0%}): a restyle, not a "
                     "local edit; the output is the aligned edit everywhere (raise max_coverage to force a mask)")
        full = torch.ones_like(rough)
        return KeptImage(edit.full()[0].clone(), full, full, rough, edit, colour, "global", -1, 0.0,
                         "; ".join(lines))
    refined, index, iou = rough, -1, 0.0
    if segments is not None:
        choice = region_iou(rough, segments, fallback="rough")
        refined, index, iou = edit.restrict(choice.mask.to(original.device)), choice.index, choice.iou
        lines.append(f"Region-IoU: segment {index} of {segments.shape[0]}, IoU {iou:.3f}" if index >= 0
                     else f"Region-IoU: none of {segments.shape[0]} segments overlaps M_b; M_b kept")
    kept_edit = _kept_edit(original, edit, colour if settings.colour_drift else None, refined)
    if settings.colour_drift and not colour_note:  # the drift undone on the kept edit (a dropped fit is said above)
        lines.insert(1, _describe_colour(colour))
    smoothed = fft_edge_smooth(original, kept_edit, refined, d0=settings.d0, threshold=settings.smooth_threshold)
    final = edit.restrict(smoothed.final_mask)
    image = composite(original, kept_edit, refined & final, final, alpha=settings.blend)  # works on M_f*'s box
    lines.append(f"final mask covers {int(final.count_nonzero()) / final.numel():.1%}; the rest is the original, "
                 "bit for bit")
    return KeptImage(image, final, refined, rough, edit, colour, "local", index, iou, "; ".join(lines))


# ---------------------------------------------------------------- the API


def keep_unedited(original: TensorLike, edited: TensorLike, rough_mask: TensorLike | None = None,
                  segments: TensorLike | list[TensorLike] | None = None, *,
                  settings: KeepSettings | None = None, **overrides: object) -> KeepResult:
    """Keep the original's pixels wherever the edit did not mean to change them (module docstring).

    Args:
        original: (H, W, 3) or (B, H, W, 3) float in [0, 1] (a batch of 1 is used for every edit).
        edited: the edit(s), (H, W, 3) or (B, H, W, 3), the original's size (or any size with
            ``resize_edited=True``).
        rough_mask: optional M_b, (H, W) or (B, H, W) at the image size; default: the change map.
        segments: optional candidate segments (N, H, W) at the image size (bool or a float MASK batch, or a
            list of (H, W)), shared by every image: Region-IoU picks the one that best matches M_b.
        settings: :class:`KeepSettings` (default :data:`KEEP_DEFAULTS`); ``overrides`` replace single
            fields, e.g. ``threshold=15, align=False``.

    Returns:
        :class:`KeepResult`; outside ``final_mask`` every pixel of ``image`` equals ``original``'s.

    Raises:
        ValueError: a bad input (message starting ``RealEdit:`` that names it), or
        :class:`~.align.AlignmentError` when the pair aligns only beyond the range edit models drift in.
    """
    settings = replace(settings or KEEP_DEFAULTS, **overrides) if overrides else (settings or KEEP_DEFAULTS)
    batched = torch.as_tensor(edited).ndim == 4 or torch.as_tensor(original).ndim == 4
    orig = _image_batch(original, "original")
    edit = _image_batch(edited, "edited")
    size = tuple(orig.shape[1:3])
    edit = _match_edit_size(edit, size, settings.resize_edited).to(device=orig.device, dtype=orig.dtype)
    count = max(orig.shape[0], edit.shape[0])
    orig = _broadcast(orig, count, "original", "edited")
    edit = _broadcast(edit, count, "edited", "original")
    rough = None
    if rough_mask is not None:
        rough = _broadcast(_mask_batch(rough_mask, "rough_mask", size), count, "rough_mask", "edited")
    segs = None
    if segments is not None:
        segs = as_segments(segments) if not isinstance(segments, (list, tuple)) or segments else None
        if segs is not None and segs.shape[0]:
            segs = _mask_batch(segs, "segments", size)
        else:
            segs = None
    items = tuple(keep_one(orig[i], edit[i], None if rough is None else rough[i], segs, settings)
                  for i in range(count))
    return KeepResult(items=items, batched=batched)

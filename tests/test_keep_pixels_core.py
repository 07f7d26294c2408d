"""keep_unedited on plain tensors: alignment, the change map, Region-IoU on float MASK batches, the composite."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from realedit.masks import (
    AlignmentError,
    change_mask,
    composite,
    estimate_alignment,
    fft_edge_smooth,
    keep_unedited,
    region_iou,
    segment_ious,
    warp_to_original,
)
from realedit.masks.align import UNVERIFIED, AlignedEdit
from realedit.masks.change_map import IDENTITY_COLOUR, apply_colour_transform, drift_reach

RED = torch.tensor([0.9, 0.15, 0.1])


def texture(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth multi-scale colour texture, (H, W, 3) in [0, 1] (photo-like: most energy at low frequencies)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(height // 12, 2), max(width // 12, 2), generator=g)
    fine = torch.rand(1, 3, max(height // 3, 2), max(width // 3, 2), generator=g)
    up = lambda x: F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)  # noqa: E731
    return (0.75 * up(coarse) + 0.25 * up(fine))[0].permute(1, 2, 0).clamp(0, 1)


def moved(image: torch.Tensor, shift: tuple[float, float], scale: float = 1.0, rotation: float = 0.0) -> torch.Tensor:
    """The picture as an edit model that moved it returns it: content at p goes to c + s R (p - c) + t.

    Written out independently of masks/align.py: each output pixel q reads the image at
    c + R(-theta) (q - c - t) / s, through grid_sample's pixel-centre convention (align_corners=True).
    """
    height, width = image.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    cx, cy = (width - 1) / 2, (height - 1) / 2
    dx, dy = xs - cx - shift[0], ys - cy - shift[1]
    cos, sin = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    sx, sy = (cos * dx + sin * dy) / scale + cx, (-sin * dx + cos * dy) / scale + cy
    grid = torch.stack([2 * sx / (width - 1) - 1, 2 * sy / (height - 1) - 1], -1)[None].float()
    out = F.grid_sample(image.permute(2, 0, 1)[None], grid, mode="bicubic", padding_mode="border", align_corners=True)
    return out[0].permute(1, 2, 0).clamp(0, 1)


def drift(image: torch.Tensor, noise: float = 0.01, seed: int = 3) -> torch.Tensor:
    """An edit model's global colour drift (gain, cross-talk, offset) and its re-rendering noise."""
    matrix = torch.tensor([[0.92, 0.05, 0.0], [0.0, 0.95, 0.03], [0.02, 0.0, 0.9]])
    noisy = image @ matrix.T + torch.tensor([0.04, 0.02, 0.05])
    g = torch.Generator().manual_seed(seed)
    return (noisy + noise * torch.randn(image.shape, generator=g)).clamp(0, 1)


def scene(height: int = 120, width: int = 200, shift=(2.4, -1.7), scale: float = 1.0, rotation: float = 0.0,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(original, edited, true edit region): a red rectangle painted on the photo, then the whole edit moved
    and colour-drifted as edit models do."""
    original = texture(height, width, seed)
    region = torch.zeros(height, width, dtype=torch.bool)
    region[height // 4: height // 2, width // 5: width // 2] = True
    painted = torch.where(region[..., None], RED, original)
    return original, drift(moved(painted, shift, scale, rotation)), region


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize("shift", [(3.0, -2.0), (2.4, -1.7), (-0.35, 0.6), (-6.25, 4.5)],
                         ids=["whole-pixel", "sub-pixel", "small", "larger"])
def test_shift_is_recovered_within_a_quarter_pixel(shift):
    original, edited, _ = scene(shift=shift)
    found = estimate_alignment(original, edited)
    assert abs(found.shift[0] - shift[0]) < 0.25 and abs(found.shift[1] - shift[1]) < 0.25, found
    assert abs(found.scale - 1) < 2e-3 and abs(found.rotation) < 0.2 and not found.identity


def test_scale_and_small_rotation_are_recovered_and_undone():
    original, edited, region = scene(height=160, width=144, shift=(1.5, -2.25), scale=1.03, rotation=1.0)
    found = estimate_alignment(original, edited)
    assert abs(found.scale - 1.03) < 2e-3 and abs(found.rotation - 1.0) < 0.15, found
    assert abs(found.shift[0] - 1.5) < 0.25 and abs(found.shift[1] + 2.25) < 0.25, found
    aligned, inside = warp_to_original(edited, found)
    before = (drift(original, noise=0) - edited).abs().mean(-1)
    after = (drift(original, noise=0) - aligned).abs().mean(-1)
    keep = inside & ~F.max_pool2d(region[None, None].float(), 9, 1, 4)[0, 0].bool()  # away from the edit
    keep[:4], keep[-4:], keep[:, :4], keep[:, -4:] = False, False, False, False
    assert float(after[keep].mean()) < 0.25 * float(before[keep].mean())


def test_identical_images_align_to_the_identity_without_resampling():
    original = texture(96, 128)
    found = estimate_alignment(original, original.clone())
    assert found.identity and max(abs(v) for v in found.shift) < 1e-3
    aligned, inside = warp_to_original(original, found)
    assert aligned is original and bool(inside.all())


def test_unrelated_images_keep_the_identity_and_the_edit_whole_and_say_so():
    """No transform correlates: nothing says how to align, and nothing of the original can be kept (the
    change covers the picture); the edit comes back as it is, with the reason, instead of an error."""
    original, unrelated = texture(96, 128, seed=1), texture(96, 128, seed=7)
    found = estimate_alignment(original, unrelated)
    assert found.identity and found.note.startswith(UNVERIFIED)
    item = keep_unedited(original, unrelated).items[0]
    assert item.status == "global" and torch.equal(item.image, unrelated) and bool(item.final_mask.all())
    assert "not an edit of 'original'" in item.report


def test_a_picture_moved_beyond_the_range_edit_models_drift_in_is_refused():
    """A registration that correlates but moves the picture by a quarter of its height: another framing."""
    original = texture(96, 128)
    with pytest.raises(AlignmentError, match="^RealEdit: 'edited' seems shifted by .*turn alignment off"):
        estimate_alignment(original, moved(original, (0.0, 24.0)))


def test_a_box_of_the_warp_and_the_validity_of_a_mask_equal_those_of_the_whole_warp():
    """The pipeline warps only the boxes it reads (AlignedEdit): bit for bit the same pixels and validity."""
    original, edited, _ = scene(height=96, width=136, shift=(-7.5, 5.25), scale=1.04, rotation=2.0)
    found = estimate_alignment(original, edited)
    whole, inside = warp_to_original(edited, found)
    assert not bool(inside.all())  # the box below reaches pixels without data
    box = (slice(0, 41), slice(90, 136))
    crop, crop_inside = warp_to_original(edited, found, box=box)
    assert torch.equal(crop, whole[box]) and torch.equal(crop_inside, inside[box])
    edit = AlignedEdit(edited, found)
    assert torch.equal(edit.crop(box), whole[box])
    mask = torch.zeros(96, 136, dtype=torch.bool)
    mask[2:30, 100:135] = True
    mask[60:90, 3:9] = True
    assert torch.equal(edit.restrict(mask), mask & inside)
    assert torch.equal(edit.full()[0], whole) and edit.full() is edit.full()  # computed once


def test_the_composite_equals_the_one_made_from_the_whole_aligned_edit():
    """keep_unedited reads the aligned, colour-matched edit only on M_f's box plus the smoother's reach: its
    image and final mask equal ZONE's smoother and composite run on the whole aligned edit. The rough mask
    given is 3 px inside the painted region, so M_f* reaches to the edge of the smoother's dilation."""
    original, edited, region = scene(height=120, width=160, shift=(2.4, -1.7), scale=1.02, rotation=0.5)
    inner = ~F.max_pool2d((~region)[None, None].float(), 7, 1, 3)[0, 0].bool()  # eroded by 3 px
    item = keep_unedited(original, edited, rough_mask=inner).items[0]
    assert item.status == "local" and not item.alignment.identity
    aligned, inside = warp_to_original(edited, item.alignment)
    matched = apply_colour_transform(aligned, item.colour_transform)
    final = fft_edge_smooth(original, matched, item.refined_mask).final_mask & inside
    band = final & ~F.max_pool2d(inner[None, None].float(), 5, 1, 2)[0, 0].bool()
    assert bool(band.any())  # M_f* holds pixels more than 2 px beyond M_f
    assert torch.equal(item.final_mask, final)
    assert torch.equal(item.image, composite(original, matched, item.refined_mask & final, final))


def test_change_map_of_the_reduced_warp_matches_the_full_warps():
    """M_b is computed on the edit reduced then warped at the working size; the old order (warp at full size,
    then reduce) gives nearly the same mask."""
    original, edited, region = scene(height=300, width=420, shift=(3.6, -2.2), scale=1.015, rotation=0.3)
    found = estimate_alignment(original, edited)
    aligned, inside = warp_to_original(edited, found)
    full_order = change_mask(original, aligned, inside).mask
    reduced_order = keep_unedited(original, edited).rough_mask
    assert iou(reduced_order, full_order) > 0.97 and iou(reduced_order, region) > 0.9


# ---------------------------------------------------------------- change map and the pipeline


def test_change_map_ignores_colour_drift_and_finds_the_edit():
    original, _, region = scene(shift=(0.0, 0.0))
    edited = drift(torch.where(region[..., None], RED, original))
    change = change_mask(original, edited)
    assert iou(change.mask, region) > 0.9
    assert not change_mask(original, drift(original)).mask.any()  # drift and noise alone: nothing changed


@pytest.mark.parametrize("size", [(120, 200), (150, 96)], ids=["landscape", "portrait"])
def test_final_mask_covers_the_edit_and_every_other_pixel_is_the_original(size):
    original, edited, region = scene(*size, shift=(2.4, -1.7), scale=1.02, rotation=0.5)
    result = keep_unedited(original, edited)
    final = result.final_mask
    assert result.items[0].status == "local"
    assert iou(final, region) >= 0.8, iou(final, region)  # the smoother widens M_f by <= 4 px
    assert float((final & region).sum()) >= 0.98 * float(region.sum())
    assert torch.equal(result.image[~final], original[~final])
    assert result.image.shape == original.shape and "scale 1.0" in result.report


def test_no_edit_returns_the_original_bit_for_bit_with_an_empty_mask():
    original = texture(80, 112)
    for edited in (original.clone(), drift(original)):
        result = keep_unedited(original, edited)
        assert torch.equal(result.image, original) and not result.final_mask.any()
        assert result.items[0].status == "no_edit" and "no edit found" in result.report


def test_an_edit_everywhere_keeps_the_aligned_edit_whole_and_says_so():
    original = texture(96, 128)
    restyled = (0.45 * original + 0.55 * texture(96, 128, seed=11)).clamp(0, 1)
    restyled[:, :, 0] = 1 - restyled[:, :, 0]  # a new palette and new textures everywhere
    result = keep_unedited(original, restyled, align=False)
    assert result.items[0].status == "global" and "restyle" in result.report
    assert result.report.startswith("alignment: off;")
    assert bool(result.final_mask.all()) and torch.equal(result.image, result.aligned)


def test_rough_mask_and_float_segments_choose_the_segment():
    original, edited, region = scene(shift=(0.0, 0.0))
    rough = torch.zeros_like(region)
    rough[region.nonzero()[:, 0].min() + 4:, :][:, :80] = True  # a sloppy M_b overlapping the edit
    rough &= region | torch.roll(region, 6, 0)
    segments = torch.zeros(3, *region.shape)
    segments[0, :20] = 1.0
    segments[1] = region.float() * 0.9  # a soft MASK from another pack (> 0.5 counts)
    segments[2, 60:] = 0.7
    result = keep_unedited(original, edited, rough, segments)
    item = result.items[0]
    assert item.segment == 1 and torch.equal(item.refined_mask, region)
    assert torch.equal(result.image[~result.final_mask], original[~result.final_mask])
    assert "segment 1 of 3" in result.report


def test_batches_broadcast_one_original_and_keep_layouts():
    original, edited_a, region = scene(shift=(2.0, 1.0))
    _, edited_b, _ = scene(shift=(-1.5, 0.5))
    result = keep_unedited(original[None], torch.stack([edited_a, edited_b]))
    assert result.image.shape == (2, *original.shape) and result.final_mask.shape == (2, *region.shape)
    for k, item in enumerate(result.items):
        assert torch.equal(result.image[k][~item.final_mask], original[~item.final_mask])
        assert float((item.final_mask & region).sum()) >= 0.98 * float(region.sum())
    assert [round(item.alignment.shift[0]) for item in result.items] == [2, -2]
    assert result.report.startswith("image 0: ") and "\nimage 1: " in result.report


def test_bad_inputs_are_refused_naming_the_input():
    original, edited, region = scene(shift=(0.0, 0.0))
    with pytest.raises(ValueError, match="'edited' is 200x100 but 'original' is 200x120"):
        keep_unedited(original, edited[:100])
    assert keep_unedited(original, edited[:100], resize_edited=True).image.shape == original.shape
    with pytest.raises(ValueError, match="'original' holds 2 but 'edited' holds 3"):
        keep_unedited(torch.stack([original] * 2), torch.stack([edited] * 3))
    with pytest.raises(ValueError, match="'rough_mask' is 100x60"):
        keep_unedited(original, edited, torch.ones(60, 100))
    with pytest.raises(ValueError, match="'segments' is 100x60"):
        keep_unedited(original, edited, segments=torch.ones(2, 60, 100))
    broken = edited.clone()
    broken[5, 5, 1] = float("nan")
    with pytest.raises(ValueError, match="'edited' has NaN or infinite pixels"):
        keep_unedited(original, broken)
    with pytest.raises(ValueError, match="'original' must be an image"):
        keep_unedited(original[..., 0], edited)
    with pytest.raises(AlignmentError, match="^RealEdit: 'edited' seems shifted"):
        keep_unedited(original, moved(original, (40.0, 0.0)))


# ---------------------------------------------------------------- Region-IoU on float MASK batches


def test_float_mask_batches_give_the_bool_results_exactly():
    g = torch.Generator().manual_seed(0)
    rough = torch.rand(40, 52, generator=g) > 0.6
    soft = torch.rand(30, 40, 52, generator=g)
    soft[3, 0, 0] = 0.5  # exactly the threshold: not in the segment
    soft[4, 1, 1] = float("nan")
    for segments in (soft, soft.half(), soft.double(), soft[:, :, :50].transpose(1, 2).transpose(1, 2),
                     (soft > 0.5).float()):
        ref = segments.float() > 0.5 if segments.dtype != torch.float64 else segments > 0.5
        size = tuple(segments.shape[1:])
        m_b = rough[: size[0], : size[1]]
        assert torch.equal(segment_ious(m_b, segments), segment_ious(m_b, ref))
        got, want = region_iou(m_b, segments), region_iou(m_b, ref)
        assert (got.index, got.iou) == (want.index, want.iou) and torch.equal(got.mask, want.mask)
        assert got.mask.dtype == torch.bool


@pytest.mark.parametrize("background", ["flat", "ramp"])
def test_images_with_little_structure_keep_the_identity_and_still_find_the_edit(background):
    """A flat background (nothing to register, two colours an affine colour map could swap) and a ramp
    (structure in one direction only): alignment keeps the identity and says why; the edit is found."""
    height, width = 64, 96
    if background == "flat":
        original = torch.full((height, width, 3), 0.5)
    else:
        original = torch.linspace(0.1, 0.9, width)[None, :, None].expand(height, width, 3).contiguous()
    region = torch.zeros(height, width, dtype=torch.bool)
    region[10:30, 20:50] = True
    edited = torch.where(region[..., None], RED, original)
    result = keep_unedited(original, edited)
    item = result.items[0]
    assert item.alignment.identity and item.alignment.note and item.alignment.note in result.report
    assert bool(result.final_mask[region].all()) and iou(result.final_mask, region) > 0.6
    assert torch.equal(result.image[~result.final_mask], original[~result.final_mask])
    assert torch.equal(result.image[region], edited[region])


def test_colour_matching_near_the_mask_gives_the_whole_image_result():
    """The kept edit is colour-matched only around M_f (masks/keep.py); the smoother and the composite read
    nothing beyond, so the result equals the pipeline on the fully colour-matched edit."""
    from realedit.masks import composite, fft_edge_smooth
    from realedit.masks.change_map import apply_colour_transform

    original, edited, _ = scene(shift=(1.5, -0.5))
    item = keep_unedited(original, edited).items[0]
    assert "colour drift undone: RGB gains" in item.report
    matched = apply_colour_transform(item.aligned, item.colour_transform)
    final = fft_edge_smooth(original, matched, item.refined_mask).final_mask
    assert torch.equal(final, item.final_mask)
    assert torch.equal(composite(original, matched, item.refined_mask, final), item.image)


@pytest.mark.parametrize("size", [(600, 40), (40, 600), (31, 33)], ids=["tall", "wide", "small"])
def test_an_inpainting_output_keeps_the_grid_and_the_edit_exactly(size):
    """An editor that kept the original's own pixels outside its edit (inpainting), on elongated and small
    images of pure noise: no alignment (the untouched share is reported), no colour drift fitted (the large
    strong edit drops out of the robust fit), and the edit's own pixels inside M_f."""
    height, width = size
    original = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(0))
    region = torch.zeros(height, width, dtype=torch.bool)
    region[height // 3: 2 * height // 3, width // 3: 2 * width // 3] = True
    edited = torch.where(region[..., None], RED, original)
    item = keep_unedited(original, edited).items[0]
    assert item.alignment.identity and "of the pixels are the original's own" in item.report
    assert torch.allclose(item.colour_transform, torch.eye(3, 4), atol=1e-3)
    assert bool(item.final_mask[region].all())
    assert torch.allclose(item.image[region], edited[region], atol=1e-3)
    assert torch.equal(item.image[~item.final_mask], original[~item.final_mask])


# ---------------------------------------------------------------- edits of flat scenes (an edit model's own scenes)


def flat_scene() -> tuple[torch.Tensor, torch.Tensor]:
    """(picture, object region): a red square and a blue disc on a flat grey background, 96x128."""
    height, width = 96, 128
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    square = (ys >= 20) & (ys < 50) & (xs >= 14) & (xs < 44)
    disc = (ys - 60).square() + (xs - 90).square() < 18 ** 2
    picture = torch.full((height, width, 3), 0.5)
    picture[square] = RED
    picture[disc] = torch.tensor([0.1, 0.2, 0.85])
    return picture, square | disc


def test_drift_reach_is_the_delta_e_a_transform_moves_colours_by():
    colours = torch.rand(400, 3, generator=torch.Generator().manual_seed(0))
    assert drift_reach(colours, IDENTITY_COLOUR) == 0.0
    brighter = torch.cat([torch.eye(3), torch.full((3, 1), 0.1)], 1)
    assert 5 < drift_reach(colours, brighter) < 15  # +0.1 on every channel: about Delta E 10
    assert drift_reach(colours, brighter) > drift_reach(colours, torch.cat([torch.eye(3), torch.full((3, 1), 0.02)], 1))


def test_a_recoloured_background_is_an_edit_not_colour_drift():
    """A new background colour for the two objects: on three colours an affine colour map can send the new
    background back onto the old one and keep the objects, a 'drift' that would undo the edit. It moves the
    background further than the threshold, so it is dropped: the change covers the background, and the edit
    comes back whole."""
    original, objects = flat_scene()
    edited = torch.where(objects[..., None], original, torch.tensor([0.6, 0.5, 0.3]))
    edited = (edited + 0.01 * torch.randn(edited.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    item = keep_unedited(original, edited).items[0]
    assert torch.equal(item.colour_transform, IDENTITY_COLOUR) and "an edit, not drift; not undone" in item.report
    assert item.status == "global" and torch.equal(item.image, edited)


def test_removing_the_only_structure_is_kept_without_alignment():
    """Removing both objects leaves a flat picture that correlates with nothing: alignment keeps the identity
    and says it could not verify, and the removal is kept with every other pixel the original's."""
    original, objects = flat_scene()
    edited = 0.5 + 0.01 * torch.randn(original.shape, generator=torch.Generator().manual_seed(2))  # redrawn
    item = keep_unedited(original, edited).items[0]
    assert item.alignment.note.startswith(UNVERIFIED) and "alignment: unverified" in item.report
    assert item.status == "local" and bool(item.final_mask[objects].all())
    assert torch.equal(item.image[objects], edited[objects])
    assert torch.equal(item.image[~item.final_mask], original[~item.final_mask])

"""ZONE mask pipeline on plain tensors: actions, Region-IoU (Eq. 6), FFT smoother (Eq. 7-8), composite."""

from __future__ import annotations

import importlib
import math

import kornia
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from realedit.masks import (
    ACTION_WORDS,
    AUTO_BETA,
    ZONE_DEFAULTS,
    ZoneSettings,
    action_tooltip,
    classify_action,
    close_and_fill,
    closing,
    composite,
    difference_magnitude,
    dilate,
    fft_edge_smooth,
    fuse_latents,
    fusion_beta,
    local_edit,
    lowpass_mask,
    luma,
    origin,
    region_iou,
    region_iou_union,
    segment_ious,
    smooth_and_composite,
)

# ----------------------------------------------------------------------------------------- settings


def test_settings_defaults_and_origins():
    s = ZONE_DEFAULTS
    # T: the official code's effective threshold (was the paper's 128/255); layers: 1/32 of the image only
    assert s.mask_threshold == 0.21 and s.fft_threshold == 30 / 255 and s.mask_downscales == (4,)
    assert "official code" in origin("mask_threshold") and "128/255" in origin("mask_threshold")
    assert (s.fft_d0, s.fft_d0_reference_size) == (200.0, 512)
    assert (s.dilation_kernel, s.dilation_iterations, s.closing_kernel) == (3, 4, 21)
    assert s.blend_alpha == 0.6 and s.blend_original_weight == pytest.approx(0.4)
    assert (s.beta("remove"), s.beta("add"), s.beta("change")) == (0.2, 0.01, 0.01)
    assert (s.sam_points_per_side, s.sam_pred_iou_thresh) == (32, 0.88)
    assert (s.sam_stability_score_thresh, s.sam_box_nms_thresh) == (0.95, 0.7)
    assert (s.steps, s.text_cfg, s.image_cfg) == (20, 7.5, 1.5)
    for name in ZoneSettings.__dataclass_fields__:
        assert origin(name)
    with pytest.raises(KeyError):
        origin("nope")


# ------------------------------------------------------------------------------------------ actions

ACTION_TABLE = [
    # paper, appendix C.2 Table 3 (the classifier's training examples)
    ("Turn the bicycle into a motorcycle", "change"),
    ("Make the apple a banana", "change"),
    ("Swap the baseball glove for a tennis racket", "change"),
    ("Replace the chair with a couch", "change"),
    ("Put a frisbee next to the cat", "add"),
    ("Attach a remote to the TV", "add"),
    ("Include a toothbrush on the dining table", "add"),
    ("Give the horse a suitcase", "add"),
    ("Remove the horse", "remove"),
    ("Take away the umbrella", "remove"),
    ("Delete the traffic light", "remove"),
    ("Erase the microwave", "remove"),
    # paper Table 4, the GPT prompt and the issue
    ("paint the car red", "change"),
    ("get off his tie", "remove"),
    ("give him glasses", "add"),
    ("turn the cat into a dog", "change"),
    ("give the dog a hat", "add"),
    ("get rid of the person on the left", "remove"),
    ("make his tie blue", "change"),
    ("give her a hat", "add"),
    ("remove the cup", "remove"),
    ("make her old", "change"),
    # case, punctuation, inflections, phrases
    ("REMOVE THE CUP!!!", "remove"),
    ("Please, get-rid-of the cup.", "remove"),
    ("take-away the umbrella", "remove"),
    ("Could you place a vase on the table?", "add"),
    ("Adding a rainbow to the sky", "add"),
    ("Put on sunglasses", "add"),
    ("Take off his hat", "remove"),
    ("the photo with the cup removed", "remove"),
    ("make the cup disappear", "remove"),
    ("Got rid of the lamp", "remove"),
    # whole words only
    ("the address on the padded envelope", "change"),
    ("give the room a warmer tone", "add"),
    ("what if the horse wears a hat?", "change"),
    # precedence: removal anywhere, else the first add/change verb
    ("add a scarf and remove the hat", "remove"),
    ("Replace the sky with a sunset and put a bird in it", "change"),
    ("put a bird in the sky and make it blue", "add"),
    # noun and negated uses
    ("Change the place to Paris", "change"),
    ("Move the vase to the place by the window", "change"),
    ("don't remove the cup, make it red", "change"),
    ("make it snowy without removing the trees", "change"),
]


@pytest.mark.parametrize(("instruction", "expected"), ACTION_TABLE)
def test_action_rules(instruction, expected):
    assert classify_action(instruction) == expected


@pytest.mark.parametrize("instruction", ["", "   ", "42 !!", "?!", "..."])
@pytest.mark.parametrize("override", [None, "auto", "add"])
def test_an_instruction_without_words_is_refused_by_name(instruction, override):
    """An empty or punctuation-only instruction used to run silently as 'change'."""
    with pytest.raises(ValueError, match="RealEdit: the instruction .* has no words"):
        classify_action(instruction, override)


def test_action_override():
    assert classify_action("Remove the cup", "add") == "add"
    assert classify_action("Make it red", " REMOVE ") == "remove"
    assert classify_action("Remove the cup", "auto") == "remove"
    assert classify_action("Remove the cup", None) == "remove"
    with pytest.raises(ValueError, match="auto"):
        classify_action("Remove the cup", "move")


def test_action_tooltip_lists_every_word():
    tip = action_tooltip()
    for words in ACTION_WORDS.values():
        for word in words:
            assert word in tip


# ------------------------------------------------------------------------------------ fusion (Eq. 5)


def test_fuse_latents_is_eq5():
    gen = torch.Generator().manual_seed(0)
    z_ip2p, z_mb = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    fused = fuse_latents(z_ip2p, z_mb, 0.2)
    assert torch.allclose(fused, (z_ip2p + 0.2 * z_mb) / 1.2, atol=1e-7)
    assert torch.allclose(fused, z_ip2p + (0.2 / 1.2) * (z_mb - z_ip2p), atol=1e-6)  # a pull towards z_mb
    assert fuse_latents(z_ip2p, z_mb, 0.0) is z_ip2p  # beta 0: the IP2P latent itself, bit for bit
    assert torch.allclose(fuse_latents(z_ip2p, z_ip2p.clone(), 0.01), z_ip2p, atol=1e-6)
    assert fuse_latents(z_ip2p, z_mb.double(), 0.2).dtype == torch.float32
    with pytest.raises(ValueError, match="latent space"):
        fuse_latents(z_ip2p, z_mb[..., :4], 0.2)
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="beta"):
            fuse_latents(z_ip2p, z_mb, bad)


def test_fusion_beta_by_action_and_override():
    assert [fusion_beta(a) for a in ("remove", "add", "change")] == [0.2, 0.01, 0.01]
    assert fusion_beta(" Remove ", AUTO_BETA) == 0.2 and fusion_beta("add", None) == 0.01
    assert fusion_beta("remove", 0.0) == 0.0 and fusion_beta("change", 0.5) == 0.5
    assert fusion_beta("remove", settings=ZoneSettings(beta_remove=0.3)) == 0.3
    with pytest.raises(ValueError, match="connect RealEdit Instruction Action"):
        fusion_beta("explode")
    with pytest.raises(ValueError, match="finite"):
        fusion_beta("remove", float("nan"))


# --------------------------------------------------------------------------------------- Region-IoU


def brute_force_region_iou(rough: torch.Tensor, segs: torch.Tensor) -> tuple[int, float, list[float]]:
    """Eq. 6 one segment at a time: strict '>' keeps the first of equal maxima."""
    best_j, best, ious = -1, -1.0, []
    for j in range(segs.shape[0]):
        inter = int((segs[j] & rough).sum())
        union = int((segs[j] | rough).sum())
        ious.append(inter / union)
        if ious[-1] > best:
            best_j, best = j, ious[-1]
    return best_j, best, ious


def random_case(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = (int(v) for v in torch.randint(3, 41, (2,), generator=gen))
    n = int(torch.randint(1, 13, (1,), generator=gen))
    density = torch.rand(n, 1, 1, generator=gen)
    segs = torch.rand(n, h, w, generator=gen) < density
    segs[torch.rand(n, generator=gen) < 0.15] = False  # some empty segments
    if n > 2 and bool(torch.rand(1, generator=gen) < 0.3):
        segs[n - 1] = segs[1]  # a duplicate: an exact tie
    rough = torch.rand(h, w, generator=gen) < float(torch.rand(1, generator=gen))
    return rough, segs


def test_region_iou_matches_brute_force_on_random_masks():
    gen = torch.Generator().manual_seed(1234)
    checked = 0
    for _ in range(400):
        rough, segs = random_case(gen)
        if not rough.any():
            with pytest.raises(ValueError, match="rough_mask"):
                region_iou(rough, segs)
            continue
        index, best, ious = brute_force_region_iou(rough, segs)
        assert segment_ious(rough, segs).tolist() == ious
        if best == 0.0:
            with pytest.raises(ValueError, match="overlaps"):
                region_iou(rough, segs)
            continue
        result = region_iou(rough, segs)
        assert (result.index, result.iou) == (index, best)
        assert torch.equal(result.mask, segs[index]) and not result.fallback_used
        checked += 1
    assert checked > 300


@pytest.mark.parametrize("size", [(32, 32), (37, 53), (512, 512)])
def test_region_iou_exact_counts_at_word_boundaries(size):
    gen = torch.Generator().manual_seed(7)
    segs = torch.rand(3, *size, generator=gen) < 0.5
    rough = torch.rand(*size, generator=gen) < 0.5
    assert segment_ious(rough, segs).tolist() == brute_force_region_iou(rough, segs)[2]


def test_region_iou_counts_exactly_when_m_b_is_a_small_band_of_a_large_image():
    """The intersections read only the lanes holding M_b: bands starting and ending on either side of a lane
    boundary (1024 pixels), bool and float segments, against brute force."""
    gen = torch.Generator().manual_seed(9)
    segs = torch.rand(4, 96, 80, generator=gen) < 0.4
    segs[3] = False
    for top, bottom in ((0, 1), (12, 13), (12, 39), (50, 96), (95, 96)):
        rough = torch.zeros(96, 80, dtype=torch.bool)
        rough[top:bottom, 5:70] = torch.rand(bottom - top, 65, generator=gen) < 0.7
        rough[top, 5] = True
        expected = brute_force_region_iou(rough, segs)[2]
        assert segment_ious(rough, segs).tolist() == expected
        assert segment_ious(rough, segs.float()).tolist() == expected


@pytest.mark.parametrize("block_bytes", [1, 3000, 1 << 21])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_region_iou_reads_areas_of_touching_segments_only_and_stays_exact(monkeypatch, block_bytes, dtype):
    """Areas are counted only for segments that meet M_b (non-consecutive indices, runs cut by the block
    size, one segment per block and everything in one): every IoU equals brute force."""
    monkeypatch.setattr(importlib.import_module("realedit.masks.region_iou"), "_BLOCK_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(21)
    segs = torch.rand(9, 40, 72, generator=gen) < 0.3
    rough = torch.zeros(40, 72, dtype=torch.bool)
    rough[14:30, 20:50] = True
    for miss in (0, 3, 4, 8):  # these never meet M_b
        segs[miss, 14:30, 20:50] = False
    expected = brute_force_region_iou(rough, segs)[2]
    assert [expected[i] for i in (0, 3, 4, 8)] == [0.0] * 4 and min(expected[i] for i in (1, 2, 5, 6, 7)) > 0
    assert segment_ious(rough, segs.to(dtype)).tolist() == expected


def test_region_iou_ties_lowest_index_and_empty_segments():
    rough = torch.zeros(8, 8, dtype=torch.bool)
    rough[:, :4] = True  # 32 pixels
    segs = torch.zeros(5, 8, 8, dtype=torch.bool)
    segs[1, :4, :4] = True  # inside M_b, 16 px: IoU 16/32 = 1/2
    segs[2, :, :2] = True  # another 16 px inside: 1/2, a tie with 1
    segs[3, :2, :] = True  # 8 inside, 16 px: IoU 8/40
    result = region_iou(rough, segs)
    assert (result.index, result.iou) == (1, 0.5)
    assert result.ious.tolist() == [0.0, 0.5, 0.5, 0.2, 0.0]  # empty segments have IoU 0
    assert segment_ious(torch.zeros(8, 8), segs).tolist() == [0.0] * 5  # empty vs empty: 0, not NaN


def test_region_iou_empty_rough_mask_errors_and_falls_back():
    segs = torch.ones(2, 6, 6, dtype=torch.bool)
    empty = torch.zeros(6, 6)
    with pytest.raises(ValueError, match=r"rough_mask.*empty[\s\S]*fallback"):
        region_iou(empty, segs)
    result = region_iou(empty, segs, fallback="rough")
    assert (result.index, result.iou, result.fallback_used) == (-1, 0.0, True)
    assert not result.mask.any() and result.mask.shape == (6, 6)


def test_region_iou_no_overlap_and_no_segments():
    rough = torch.zeros(6, 6, dtype=torch.bool)
    rough[0, 0] = True
    segs = torch.zeros(3, 6, 6, dtype=torch.bool)
    segs[0, 5, 5] = True
    with pytest.raises(ValueError, match="none of the 3 segments overlaps"):
        region_iou(rough, segs)
    result = region_iou(rough, segs, fallback="rough")
    assert result.fallback_used and torch.equal(result.mask, rough)
    with pytest.raises(ValueError, match="'segments' is empty"):
        region_iou(rough, torch.zeros(0, 6, 6))
    assert region_iou(rough, [], fallback="rough").index == -1
    with pytest.raises(ValueError, match="fallback must be"):
        region_iou(rough, segs, fallback="nearest")  # type: ignore[arg-type]


def reshape_segments() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M_b, the edited image's segments, the original's, the true region) of 'turn the square into a circle':
    a 12x12 square at rows/columns 4-16 became a disc of radius 5 inside it; M_b marks about the disc."""
    ys, xs = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    square = (ys >= 4) & (ys < 16) & (xs >= 4) & (xs < 16)
    disc = (ys - 10).square() + (xs - 10).square() <= 25
    return disc.clone(), torch.stack([disc, ~disc]), torch.stack([square, ~square]), square | disc


def test_region_iou_union_adds_the_originals_outline_of_a_reshaped_object():
    """The edited image's choice (the disc) restores the square's corners outside it; the union with the
    original's choice (the square) covers both outlines: the region the edit changed."""
    rough, edited, original, changed = reshape_segments()
    paper = region_iou(rough, edited)
    assert torch.equal(paper.mask, edited[0]) and not bool(paper.mask[changed].all())
    union = region_iou_union(rough, edited, original)
    assert torch.equal(union.mask, changed) and (union.index, union.original_index) == (0, 0)
    assert union.iou == pytest.approx(float((changed & rough).sum() / (changed | rough).sum()))
    assert union.iou < paper.iou and torch.equal(union.ious, paper.ious)  # R of the mask returned, not the edit's
    same = region_iou_union(rough, edited, edited)  # a recolour: both images segment alike
    assert torch.equal(same.mask, paper.mask)


def test_region_iou_union_leaves_out_the_originals_background_around_a_grown_object():
    """'make the dot bigger': M_b marks the big new disc, which in the original is mostly background, so the
    original's best segment is the background; it lies mostly outside M_b and the disc and does not join."""
    ys, xs = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    disc = (ys - 12).square() + (xs - 12).square() <= 64
    dot = (ys >= 11) & (ys < 13) & (xs >= 11) & (xs < 13)
    grown = region_iou_union(disc, torch.stack([disc, ~disc]), torch.stack([dot, ~dot]))
    assert region_iou(disc, torch.stack([dot, ~dot])).index == 1  # the background
    assert torch.equal(grown.mask, disc) and grown.original_index == -1


def test_region_iou_union_takes_the_side_that_overlaps_and_falls_back_as_region_iou():
    rough, edited, original, _ = reshape_segments()
    apart = torch.zeros(1, 24, 24, dtype=torch.bool)
    apart[0, 20:, 20:] = True
    only_original = region_iou_union(rough, apart, original)
    assert torch.equal(only_original.mask, original[0])
    assert (only_original.index, only_original.original_index) == (-1, 0)
    only_edited = region_iou_union(rough, edited, apart)
    assert torch.equal(only_edited.mask, edited[0]) and only_edited.original_index == -1
    with pytest.raises(ValueError, match="none of the edited image's or the original's segments overlaps"):
        region_iou_union(rough, apart, apart)
    assert torch.equal(region_iou_union(rough, apart, apart, fallback="rough").mask, rough)
    with pytest.raises(ValueError, match="segment both at the image size"):
        region_iou_union(rough, edited, original[:, :12, :12])
    with pytest.raises(ValueError, match="fallback must be"):
        region_iou_union(rough, edited, original, fallback="nearest")  # type: ignore[arg-type]


def test_region_iou_resizes_rough_mask_and_binarises_floats():
    rough = torch.zeros(16, 16)
    rough[4:12, 4:12] = 0.8  # float: > 0.5 counts
    rough[0, 0] = 0.3  # does not
    segs = torch.zeros(3, 64, 64)
    segs[1, 16:48, 16:48] = 1.0  # the rough square at 4x
    segs[2, 16:48, 16:40] = 0.9
    result = region_iou(rough, segs)
    assert (result.index, result.iou) == (1, 1.0)
    assert result.mask.dtype == torch.bool and result.mask.shape == (64, 64)
    numpy_segs = [s.numpy() > 0.5 for s in segs]  # SAM's layout: a list of (H, W) bool arrays
    assert region_iou(rough.numpy(), numpy_segs).index == 1
    with pytest.raises(ValueError, match="segments"):
        region_iou(rough, torch.zeros(2, 2, 8, 8))


# -------------------------------------------------------------------------------------- FFT smoother


def grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [0, 1]: the same scene renders at any size."""
    c = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return c[:, None].expand(n, n), c[None, :].expand(n, n)


def texture(n: int) -> torch.Tensor:
    y, x = grid(n)
    base = 0.5 + 0.15 * torch.sin(2 * math.pi * 7 * x) * torch.cos(2 * math.pi * 5 * y)
    base = base + 0.1 * torch.sin(2 * math.pi * (3 * x + 11 * y))
    return torch.stack([base, 0.9 * base + 0.05, 0.8 * base + 0.1], -1).float()  # (n, n, 3)


def noise(shape: tuple[int, ...], amplitude: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return amplitude * (2 * torch.rand(shape, generator=gen) - 1)


def box(n: int, cy: float, cx: float, half: float) -> torch.Tensor:
    y, x = grid(n)
    return ((y - cy).abs() < half) & ((x - cx).abs() < half)


def square_scene(n: int = 256):
    """A darkened square whose edit spills past M_f (2 px at 512); over-edit noise and a far object."""
    orig = (texture(n) + noise((n, n, 3), 0.02, 0)).clamp(0, 1)
    edited = orig + noise((n, n, 3), 0.03, 1)  # IP2P's global over-edit
    m_f = box(n, 0.4, 0.35, 0.1)
    changed = box(n, 0.4, 0.35, 0.1 + 2 / 512)  # the edit reaches beyond the segment
    assert bool(changed[m_f].all())
    edited[changed] = 0.1 * edited[changed] + 0.9 * torch.tensor([0.02, 0.02, 0.1])
    far = box(n, 0.8, 0.8, 0.08)
    edited[far] = 1 - edited[far]  # over-edited elsewhere: must stay original
    return orig, edited.clamp(0, 1), m_f, changed, far


def shadow_scene(n: int = 512, width: float = 2.5 / 512):
    """A recoloured disk (M_f) casting a soft shadow: strength 0.35 * exp(-d / width) outside."""
    y, x = grid(n)
    d = torch.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2) - 0.12  # signed distance to the disk
    orig = texture(n)
    disk = d <= 0
    edited = orig.clone()
    edited[disk] = torch.tensor([0.9, 0.3, 0.2])
    shadow = (0.35 * torch.exp(-d.clamp(min=0) / width)).float() * ~disk
    edited = edited - shadow[..., None] + noise((n, n, 3), 0.03, 2)
    return orig, edited.clamp(0, 1), disk, (d * n).float()  # distance in pixels


def test_smoother_square_keeps_the_change_and_drops_the_background():
    orig, edited, m_f, changed, far = square_scene()
    assert bool((changed & ~m_f).any()), "the edit spills past M_f at 256 px"
    for clip in (True, False):
        result = fft_edge_smooth(orig, edited, m_f, clip_to_dilation=clip)
        final, band = result.final_mask, result.dilated_mask
        assert final.dtype == torch.bool and final.shape == m_f.shape
        assert torch.equal(band, dilate(m_f, 3, 4))
        assert bool(final[changed].all()), "the changed region (incl. its spill) is in M_f*"
        assert not (final & ~band).any(), "nothing beyond the dilation band"
        assert not (final & far).any()
        outer_ring = band & ~dilate(changed, 3, 2)  # unchanged, 3 px from the change
        assert not (final & outer_ring).any()


def test_smoother_soft_shadow():
    orig, edited, disk, dist = shadow_scene()
    result = fft_edge_smooth(orig, edited, disk)
    final = result.final_mask
    assert bool(final[disk].all())
    strong = (dist > 0) & (dist <= 2)  # shadow >= 0.16 here, above 30/255
    assert bool(final[strong].all()), "the strong part of the shadow joins M_f*"
    assert not (final & ~result.dilated_mask).any()
    unclipped = fft_edge_smooth(orig, edited, disk, clip_to_dilation=False).final_mask
    assert not (unclipped & (dist > 4.5)).any(), "the faint shadow tail and background stay out"


def upsample(mask: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0] > 0.5


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


@pytest.mark.parametrize("scene", ["square", "shadow"])
def test_smoother_scale_invariance(scene):
    def final(n: int) -> torch.Tensor:
        if scene == "square":
            orig, edited, m_f, *_ = square_scene(n)
        else:
            orig, edited, m_f, _ = shadow_scene(n)
        return fft_edge_smooth(orig, edited, m_f).final_mask

    assert iou(upsample(final(256), 512), final(512)) > 0.9


def test_lowpass_radius_scales_with_size():
    def keeps(h: int, w: int, ky: int, kx: int) -> bool:
        return bool(lowpass_mask(h, w)[ky % h, kx % w])

    k = torch.fft.fftfreq(512, 1 / 512)
    assert int(lowpass_mask(512, 512).sum()) == int(((k[:, None] ** 2 + k[None] ** 2) <= 200**2).sum())
    assert keeps(512, 512, 120, 160) and keeps(512, 512, -200, 0) and not keeps(512, 512, 0, 201)
    assert keeps(256, 256, 60, -80) and not keeps(256, 256, 101, 0)  # D0 = 100 at 256
    assert keeps(256, 512, 100, 0) and not keeps(256, 512, 101, 0)  # per axis: 200/512 cycles/px
    assert keeps(256, 512, 0, 200) and not keeps(256, 512, 0, 201)


def test_difference_equals_the_papers_two_transforms():
    orig, edited, m_f, *_ = square_scene(64)
    m_d = dilate(m_f)
    keep = lowpass_mask(64, 64)
    low_l = torch.fft.fft2(luma(edited) * m_d) * keep  # H(f(I_L,d))
    low_g = torch.fft.fft2(luma(orig) * m_d) * keep  # H(f(I_G,d))
    expected = torch.fft.ifft2(low_l - low_g).abs()
    assert torch.allclose(difference_magnitude(orig, edited, m_d), expected, atol=1e-6)


def test_morphology_matches_kornia_reference():
    mask = torch.rand(48, 40, generator=torch.Generator().manual_seed(3)) < 0.2
    x = mask[None, None].float()
    iterated = x
    for _ in range(4):
        iterated = kornia.morphology.dilation(iterated, torch.ones(3, 3))
    assert torch.equal(dilate(mask, 3, 4), iterated[0, 0] > 0.5)
    reference = kornia.morphology.closing(x, torch.ones(21, 21))[0, 0] > 0.5
    assert torch.equal(closing(mask, 21), reference)
    assert torch.equal(dilate(mask, 3, 0), mask)
    with pytest.raises(ValueError, match="odd"):
        closing(mask, 20)


def test_square_morphology_equals_kornia_geodesic_at_every_size_and_border():
    """Dilation and erosion by k x k squares (separable shifted ORs) against kornia's flat morphology
    with its default geodesic border, on random masks whose true pixels touch every edge."""
    from realedit.masks.fft_smooth import square_dilation, square_erosion

    gen = torch.Generator().manual_seed(11)
    for h, w, density in ((31, 45, 0.1), (16, 9, 0.5), (50, 50, 0.9)):
        mask = torch.rand(h, w, generator=gen) < density
        mask[0, :3] = mask[-1, -3:] = True
        mask[:, 0] |= torch.rand(h, generator=gen) < 0.5
        x = mask[None, None].float()
        for size in (1, 3, 5, 9, 21):
            kernel = torch.ones(size, size)
            assert torch.equal(square_dilation(mask, size), kornia.morphology.dilation(x, kernel)[0, 0] > 0.5), size
            assert torch.equal(square_erosion(mask, size), kornia.morphology.erosion(x, kernel)[0, 0] > 0.5), size


def test_close_and_fill_on_the_bounding_box_equals_the_whole_image():
    from realedit.masks import fill_holes

    gen = torch.Generator().manual_seed(5)
    cases = [torch.zeros(64, 80, dtype=torch.bool), torch.ones(64, 80, dtype=torch.bool)]
    ring = box(96, 0.5, 0.5, 0.2) & ~box(96, 0.5, 0.5, 0.15)  # a hole far wider than the closing
    cases += [ring, ring.roll(40, dims=1), ring.roll(45, dims=0)]  # whole, and cut by the image border
    for _ in range(30):  # sparse specks and blobs anywhere, some touching the border
        h, w = (int(v) for v in torch.randint(24, 97, (2,), generator=gen))
        blobs = torch.rand(1, 1, h // 8 + 1, w // 8 + 1, generator=gen) < 0.15
        mask = F.interpolate(blobs.float(), size=(h, w), mode="nearest")[0, 0] > 0.5
        cases.append(mask | (torch.rand(h, w, generator=gen) < 0.002))
    for mask in cases:
        for kernel in (1, 5, 21):
            assert torch.equal(close_and_fill(mask, kernel), fill_holes(closing(mask, kernel))), kernel
    assert close_and_fill(ring, 21)[48, 48]  # the hole was filled


def test_smoother_contains_m_f_and_handles_empty_and_layouts():
    gen = torch.Generator().manual_seed(5)
    orig = torch.rand(1, 40, 48, 3, generator=gen)  # a batch of one
    edited = orig.clone()  # no change at all: M_f* is M_f (nothing else differs)
    m_f = torch.rand(40, 48, generator=gen) < 0.05
    result = fft_edge_smooth(orig, edited, m_f[None].float())
    assert bool(result.final_mask[m_f].all())
    empty = fft_edge_smooth(orig, torch.rand(40, 48, 3, generator=gen), torch.zeros(40, 48))
    assert not empty.final_mask.any() and not empty.dilated_mask.any()
    with pytest.raises(ValueError, match="refined_mask is 20x48"):
        fft_edge_smooth(orig, edited, torch.zeros(20, 48))
    with pytest.raises(ValueError, match="size mismatch"):
        fft_edge_smooth(orig, edited[:, :20], m_f)
    with pytest.raises(ValueError, match="batch of 2"):
        fft_edge_smooth(orig.expand(2, -1, -1, -1), edited, m_f)


def test_luma_is_bt601():
    image = torch.eye(3)[None]  # (1, 3, 3): one red, one green, one blue pixel
    assert torch.allclose(luma(image), torch.tensor([[0.299, 0.587, 0.114]]))


# ----------------------------------------------------------------------------------------- composite


def composite_case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    orig = torch.rand(64, 80, 3, generator=gen)
    edited = torch.rand(64, 80, 3, generator=gen)
    m_f = torch.zeros(64, 80, dtype=torch.bool)
    m_f[20:40, 30:50] = True
    m_f_star = dilate(m_f, 3, 3)
    return orig, edited, m_f, m_f_star


def test_composite_is_bit_identical_outside_and_edited_inside():
    orig, edited, m_f, m_f_star = composite_case()
    outside, band = ~m_f_star, m_f_star & ~m_f
    orig[:4] = -0.0  # a blend with weight 0 would turn these into +0.0
    edited[-4:] = float("nan")  # a broken decode far from the edit must not leak in
    out = composite(orig, edited, m_f, m_f_star)
    assert torch.equal(out[outside].view(torch.int32), orig[outside].view(torch.int32))
    assert torch.equal(out[m_f], edited[m_f])
    assert torch.allclose(out[band], 0.6 * edited[band] + 0.4 * orig[band], atol=1e-6)


def test_composite_layouts_dtypes_and_m_f_outside_m_f_star():
    orig, edited, m_f, m_f_star = composite_case(1)
    out = composite(orig[None].double(), edited[None], m_f[None].float(), m_f_star.numpy())
    assert out.shape == (1, 64, 80, 3) and out.dtype == torch.float64
    assert torch.equal(out[0][~m_f_star], orig.double()[~m_f_star])
    # M_f reaching past M_f*: still edited there, never blended
    shrunk = m_f.clone()
    shrunk[20] = False
    out = composite(orig, edited, m_f, shrunk)
    assert torch.equal(out[m_f], edited[m_f]) and torch.equal(out[~m_f], orig[~m_f])
    empty = torch.zeros(64, 80, dtype=torch.bool)
    assert torch.equal(composite(orig, edited, empty, empty), orig)


def test_composite_size_errors():
    orig, edited, m_f, m_f_star = composite_case()
    with pytest.raises(ValueError, match="edited is"):
        composite(orig, edited[:32], m_f, m_f_star)
    with pytest.raises(ValueError, match="m_f_star is 32x80"):
        composite(orig, edited, m_f, m_f_star[:32])
    with pytest.raises(ValueError, match="batch of 2"):
        composite(torch.stack([orig, orig]), edited, m_f, m_f_star)
    with pytest.raises(ValueError, match="mask"):
        composite(orig, edited, np.zeros((2, 64, 80)), m_f_star)


# ------------------------------------------------------------------------- the pipeline on plain tensors


def test_local_edit_end_to_end_on_plain_tensors():
    orig, edited, m_f, changed, far = square_scene(128)
    rough = F.interpolate(changed[None, None].float(), size=(16, 16), mode="area")[0, 0] > 0.3  # coarse M_b
    segments = torch.stack([far, m_f, torch.zeros_like(m_f), ~m_f])  # SAM-like candidates at image size
    result = local_edit(orig, edited, rough, segments)
    assert result.index == 1 and torch.equal(result.refined_mask, m_f) and 0.5 < result.iou <= 1.0
    # the same as the stages one by one
    refined = region_iou(rough, segments)
    smoothed, image = smooth_and_composite(orig, edited, refined.mask)
    assert torch.equal(smoothed.final_mask, result.final_mask) and torch.equal(image, result.image)
    outside = ~result.final_mask
    assert outside.any() and torch.equal(result.image[outside], orig[outside])
    assert torch.equal(result.image[m_f], edited[m_f]) and not (result.final_mask & far).any()
    batched = local_edit(orig[None], edited[None], rough[None], [s.numpy() for s in segments])  # ComfyUI layouts
    assert batched.image.shape == (1, 128, 128, 3) and torch.equal(batched.image[0], result.image)
    nothing = local_edit(orig, edited, torch.zeros(16, 16), segments, fallback="rough")
    assert nothing.index == -1 and torch.equal(nothing.image, orig)


def test_delta_e_equals_kornia_lab_distance():
    from realedit.masks.change_map import delta_e

    gen = torch.Generator().manual_seed(2)
    a, b = torch.rand(1, 3, 37, 29, generator=gen), torch.rand(1, 3, 37, 29, generator=gen)
    a[..., :3, :3] = 0.0  # the linear branches: dark pixels, and f's linear part
    b[..., :2, :2] = 0.01
    lab = kornia.color.rgb_to_lab(torch.cat([a, b]))
    expected = (lab[0] - lab[1]).square().sum(0).sqrt()
    assert torch.allclose(delta_e(a, b), expected, atol=2e-4, rtol=1e-5)
    assert float(delta_e(a, a).max()) < 1e-3  # the same image: nothing but rounding

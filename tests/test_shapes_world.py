"""The shapes world's renderer, captions, edits with ground truth, and reader (plain PyTorch)."""

from __future__ import annotations

import random

import pytest
import torch
from realedit.testbed.shapes_world.edits import (
    EDIT_KINDS,
    Edit,
    apply,
    footprint,
    ground_truth,
    instruction,
    random_edit,
)
from realedit.testbed.shapes_world.reader import attribute_accuracy, attributes_right, read, scene_matches
from realedit.testbed.shapes_world.scene import (
    BACKGROUNDS,
    SHAPES,
    SIZE,
    SIZES,
    TEXTURES,
    Appearance,
    Obj,
    Scene,
    random_scene,
    render,
)

RED, BLUE = Appearance("colour", "red"), Appearance("colour", "blue")


def _scenes(n: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng, two_objects=0.5, unnamed=0.4, textured=0.3) for _ in range(n)]


def test_render_is_deterministic_and_seeded():
    a, b = _scenes(3, seed=7), _scenes(3, seed=7)
    assert a == b
    assert all(torch.equal(render(x), render(y)) for x, y in zip(a, b))
    image = render(a[0])
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert _scenes(3, seed=8) != a


def test_jitter_moves_the_object_and_nothing_else():
    still = Scene("grey", (Obj("circle", RED, "left", "small"),))
    moved = Scene("grey", (Obj("circle", RED, "left", "small", dx=2.0),))
    diff = (render(still) != render(moved)).any(-1)
    columns = diff.nonzero()[:, 1]
    assert diff.any() and columns.max() < SIZE // 2  # only around the left object


def test_caption_names_every_object_left_to_right():
    scene = Scene("grey", (Obj("circle", RED, "left", "small"), Obj("square", BLUE, "right", "large")))
    assert scene.caption() == ("a small red circle on the left and a large blue square on the right, "
                               "on a grey background")
    centre = Scene("striped", (Obj("star", Appearance("colour", "yellow"), "centre", "large"),))
    assert centre.caption() == "a large yellow star in the centre, on a striped background"


def test_caption_has_no_word_for_unnamed_appearances():
    teal = Scene("white", (Obj("triangle", Appearance("offvocab", "teal"), "left", "small"),))
    stripes = Scene("white", (Obj("triangle", Appearance("pattern", "candy_stripes"), "left", "small"),))
    assert teal.caption() == stripes.caption() == "a small triangle on the left, on a white background"
    assert not torch.equal(render(teal), render(stripes))  # the image carries what the text cannot
    assert Scene("black", ()).caption() == "a black background"


def test_instructions_name_the_target():
    scene = Scene("grey", (Obj("circle", RED, "left", "small"), Obj("square", BLUE, "right", "large")))
    assert instruction(scene, Edit("recolour", 0, "blue")) == "make the circle blue"
    assert instruction(scene, Edit("remove", 1)) == "remove the square"
    assert instruction(scene, Edit("reshape", 0, "star")) == "turn the circle into a star"
    assert instruction(scene, Edit("background", 0, "white")) == "make the background white"
    assert instruction(scene, Edit("resize", 0, "large")) == "make the circle bigger"
    twins = Scene("grey", (Obj("circle", RED, "left", "small"), Obj("circle", BLUE, "right", "small")))
    assert instruction(twins, Edit("remove", 1)) == "remove the circle on the right"


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_region_is_where_expected_differs_and_inside_the_edit_footprint(kind: str):
    rng = random.Random(EDIT_KINDS.index(kind))
    checked = 0
    for scene in _scenes(40, seed=11):
        try:
            edit = random_edit(scene, rng, (kind,))
        except ValueError:
            continue
        truth = ground_truth(scene, edit)
        assert torch.equal(truth.region, (truth.source != truth.expected).any(-1))
        assert truth.region.any(), f"{kind} changed nothing in {scene.caption()!r}"
        allowed = footprint(scene, edit)
        assert not (truth.region & ~allowed).any()
        assert torch.equal(truth.expected[~allowed], truth.source[~allowed])  # nothing else moves
        assert truth.target_caption == apply(scene, edit).caption()
        checked += 1
        if checked == 4:
            break
    assert checked == 4


def test_reader_round_trip_on_jittered_renders():
    """Every attribute (background, shape, appearance incl. unnamed ones, position, size) reads back."""
    scenes = _scenes(30, seed=3)
    wrong = [s.caption() for s in scenes if not scene_matches(read(render(s)), s, size=True)]
    assert wrong == []


def test_reader_reads_edits_as_the_edited_scene():
    rng = random.Random(5)
    for scene in _scenes(8, seed=21):
        truth = ground_truth(scene, random_edit(scene, rng))
        assert scene_matches(read(truth.expected), truth.edited, size=True), truth.instruction


def test_segments_are_each_object_and_the_background_as_the_renderer_draws_them():
    """The world's stand-in for SAM: one mask per object and one for the background, each overlapping the
    renderer's own mask of it (IoU over 0.9, textures and patterns included), largest first."""
    from realedit.testbed.shapes_world.reader import segments
    from realedit.testbed.shapes_world.world_batch import segments as true_segments

    for scene in _scenes(12, seed=8):
        found = segments(render(scene))
        truth = [mask > 0.5 for mask in true_segments(scene)]
        assert found.dtype == torch.bool and len(found) == len(truth), scene.caption()
        assert [int(m.sum()) for m in found] == sorted((int(m.sum()) for m in found), reverse=True)
        for mask in truth:
            best = max(float((mask & f).sum() / (mask | f).sum()) for f in found)
            assert best > 0.9, scene.caption()


def test_attributes_are_counted_per_object_and_a_misplaced_object_has_none_right():
    """What the gates report per attribute: each object paired by position, its colour and shape judged apart;
    the score counts an extra object's attributes wrong."""
    scene = Scene("white", (Obj("square", RED, "left", "large"), Obj("star", BLUE, "right", "large")))
    drawn = Scene("white", (Obj("square", BLUE, "left", "large"), Obj("circle", BLUE, "right", "large")))
    assert attributes_right(read(render(drawn)), scene) == {"position": 2, "colour": 1, "shape": 1}
    assert attribute_accuracy(read(render(drawn)), scene) == (4, 6)
    moved = Scene("white", (Obj("square", RED, "centre", "large"),))
    assert attributes_right(read(render(moved)), Scene("white", scene.objects[:1])) == dict.fromkeys(
        ("position", "colour", "shape"), 0)
    extra = Scene("white", scene.objects[:1] + (Obj("circle", RED, "right", "large"),))
    assert attribute_accuracy(read(render(extra)), Scene("white", scene.objects[:1])) == (3, 6)


def test_reader_finds_no_object_on_a_bare_background_and_tolerates_noise():
    assert read(render(Scene("striped", ()))).objects == ()
    scene = _scenes(1, seed=9)[0]
    noisy = (render(scene) + 0.03 * torch.randn(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert scene_matches(read(noisy), scene)


def _blurred(scene: Scene, sigma: float) -> torch.Tensor:
    """The scene's render blurred by a Gaussian of ``sigma`` pixels (about what the world's 8x VAE loses)."""
    import scipy.ndimage

    return torch.from_numpy(scipy.ndimage.gaussian_filter(render(scene).numpy(), (sigma, sigma, 0)))


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
def test_reader_reads_every_shape_through_blur(sigma: float):
    """Shapes are read from the soft coverage, so a blur that rounds a star's points or a small square's
    corners still reads as that shape (the thresholded mask's IoU read such round trips as circles)."""
    for shape in SHAPES:
        for size in SIZES:
            for background in (*BACKGROUNDS, *TEXTURES):
                scene = Scene(background, (Obj(shape, RED, "centre", size),))
                got = read(_blurred(scene, sigma)).objects
                assert [(o.shape, o.size) for o in got] == [(shape, size)], (scene.caption(), sigma)


def test_reader_reads_a_blurred_disc_as_a_circle_and_nothing_sharper():
    """The reader does not find corners a blob lacks: a disc blurred far more than the VAE blurs still reads
    as a circle, and a square blurred as much does not."""
    disc = Scene("white", (Obj("circle", BLUE, "left", "large"),))
    square = Scene("white", (Obj("square", BLUE, "right", "large"),))
    assert [o.shape for o in read(_blurred(disc, 4.0)).objects] == ["circle"]
    assert [o.shape for o in read(_blurred(square, 2.0)).objects] == ["square"]

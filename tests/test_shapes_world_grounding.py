"""Token grounding of the world's text-to-image UNet (testbed/shapes_world/grounding.py, TokenCompose's L_token):
the words it grounds are each object's own, the attention it records is the UNet's own, its loss is 0 exactly
when every grounded word attends inside its region, and a grounded training run uses it."""

from __future__ import annotations

import dataclasses

import pytest
import torch


@pytest.fixture(scope="module")
def tokenize(comfy):
    from realedit.attention.tokens import from_hf_tokenizer
    from realedit.testbed.shapes_world.models import make_clip

    return from_hf_tokenizer(make_clip().tokenizer.clip_l.tokenizer)


def test_each_object_grounds_its_own_words_and_the_background_its_name(tokenize):
    from realedit.testbed.shapes_world.grounding import scene_words
    from realedit.testbed.shapes_world.scene import Appearance, Obj, Scene, coverage

    white, red = Appearance("colour", "white"), Appearance("colour", "red")
    left, right = Obj("circle", white, "left", "large"), Obj("circle", red, "right", "small")
    scene = Scene("white", (left, right))  # one shape twice, and an object of the background's colour
    # "a large white circle on the left and a small red circle on the right, on a white background"
    words = scene_words(scene, tokenize)
    assert [positions for positions, _ in words] == [[4], [3], [12], [11], [19]]
    for (_, region), expected in zip(words, (left, left, right, right)):
        assert torch.equal(region, coverage(expected).float())
    assert torch.equal(words[-1][1], 1 - torch.maximum(coverage(left), coverage(right)).float())
    unnamed = Scene("grey", (Obj("star", Appearance("pattern", "candy_stripes"), "centre", "large"),))
    assert len(scene_words(unnamed, tokenize)) == 2  # a pattern has no word: the shape and the background
    empty = scene_words(Scene("grey", ()), tokenize)
    assert [p for p, _ in empty] == [[2]] and bool((empty[0][1] == 1).all())


def test_the_recorded_attention_is_the_unets_own(comfy):
    """The patches compute what ComfyUI's attention computes (the output agrees to float rounding) and record one
    probability map per cross-attention call, each row summing to 1."""
    from realedit.testbed.shapes_world.grounding import CrossAttentionProbs, attn2_blocks
    from realedit.testbed.shapes_world.models import make_unet

    unet = make_unet().model.diffusion_model
    torch.manual_seed(0)
    for param in unet.out[-1].parameters():
        param.data.normal_(0, 0.1)  # the output conv starts at 0: give the output something to compare
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 64)
    recorder = CrossAttentionProbs(unet)
    with torch.no_grad():
        plain = unet(x, timesteps=t, context=context)
        recorded = unet(x, timesteps=t, context=context, transformer_options=recorder.options())
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    assert len(recorder.probs) == len(attn2_blocks(unet)) == 10
    assert sorted({p.shape[1] for p in recorder.probs}) == [16, 64, 256]  # the 4x4, 8x8 and 16x16 layers
    for probs in recorder.probs:
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))


def test_the_token_loss_is_zero_exactly_when_each_word_attends_inside_its_region(comfy):
    from realedit.testbed.shapes_world.grounding import grounding_loss

    regions = torch.zeros(1, 2, 4, 4)
    regions[0, 0, :2], regions[0, 1, 2:] = 1, 1  # word 0: the top half; word 1: the bottom half
    positions = torch.tensor([[5, 7]])
    inside = torch.full((1, 16, 77), 1e-3)
    inside[0, :8, 5], inside[0, 8:, 7] = 1.0, 1.0  # each word drawn from its own half only
    inside = inside / inside.sum(-1, keepdim=True)
    exact = inside.clone()
    exact[0, 8:, 5], exact[0, :8, 7] = 0.0, 0.0
    assert grounding_loss([exact], positions, regions).item() == 0.0
    assert 0 < grounding_loss([inside], positions, regions).item() < 1e-4
    swapped = torch.tensor([[7, 5]])  # each word's attention in the other's region
    assert grounding_loss([exact], swapped, regions).item() == 1.0
    half = torch.ones(1, 16, 77) / 77  # uniform attention: half of each word's mass is inside
    assert grounding_loss([half], positions, regions).item() == pytest.approx(0.25)
    # A layer of another grid reads the regions resized by area; a word at -1 (a dropped caption) counts nothing.
    coarse = torch.ones(1, 4, 77) / 77
    assert grounding_loss([half, coarse], torch.tensor([[5, -1]]), regions).item() == pytest.approx(0.25)
    assert grounding_loss([half], torch.tensor([[-1, -1]]), regions).item() == 0.0


def test_a_grounded_run_checks_its_scenes_and_trains_other_weights(comfy, tmp_path, monkeypatch):
    """The targets are the data stage's own scenes (a data file of other scenes is refused), and the grounded UNet
    stage (its own stage file) trains other weights than the plain one from the same start and batches."""
    import safetensors.torch
    from comfy_helpers import miniature_world_with_data
    from realedit.testbed.shapes_world import training
    from realedit.testbed.shapes_world.config import DEFAULT_CONFIG
    from realedit.testbed.shapes_world.models import make_clip
    from realedit.testbed.shapes_world.train_unet import add_grounding_targets

    plain = miniature_world_with_data(tmp_path, monkeypatch, unet_steps=2, token_grounding=0.0)
    grounded = dataclasses.replace(plain, token_grounding=1.0)
    data = safetensors.torch.load_file(str(training.work_path(plain, "data", training._DATA_FIELDS)))
    add_grounding_targets(data, make_clip(plain), plain)
    assert data["t2i_ground_positions"].shape == (12, 5) and data["t2i_ground_regions"].shape == (12, 5, 16, 16)
    data["t2i_text"] = data["t2i_text"].flip(0)
    with pytest.raises(RuntimeError, match="does not hold this config's text-to-image scenes"):
        add_grounding_targets(data, make_clip(plain), plain)
    assert training.work_path(grounded, "t2i", training._STAGE_FIELDS["t2i"]) != training.work_path(
        plain, "t2i", training._STAGE_FIELDS["t2i"])
    lines: list[str] = []
    for config in (plain, grounded):
        training.stage_t2i(config, log=lines.append)
    assert any("token grounding" in line for line in lines) and "token-grounding targets" in "".join(lines)
    weights = [training.trained_unet(c, "t2i").model.diffusion_model.state_dict() for c in (plain, grounded)]
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    with pytest.raises(ValueError, match="token_grounding must be >= 0"):
        dataclasses.replace(DEFAULT_CONFIG, token_grounding=-1.0)

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


def test_edit_grounding_grounds_the_start_token_outside_the_edit_and_the_end_of_text_inside(tokenize):
    """The two keys ZONE's rough mask reads: the start token (0) on everything the edit leaves, the instruction's
    end-of-text position (n + 1 for n tokens, where ZONE's A^L is read) on what it changes, area-averaged."""
    from realedit.testbed.shapes_world.edits import Edit, edit_regions, ground_truth, instruction
    from realedit.testbed.shapes_world.grounding import edit_grounding_targets
    from realedit.testbed.shapes_world.scene import Appearance, Obj, Scene

    scene = Scene("grey", (Obj("circle", Appearance("colour", "red"), "left", "large"),
                           Obj("square", Appearance("colour", "blue"), "right", "small")))
    pairs = [(scene, Edit("remove", 1)), (scene, Edit("recolour", 0, "green"))]
    texts = [instruction(s, e) for s, e in pairs]
    assert texts == ["remove the square", "make the circle green"]
    regions = edit_regions(pairs)
    assert all(torch.equal(r, ground_truth(s, e).region) for r, (s, e) in zip(regions, pairs))
    positions, targets = edit_grounding_targets(texts, regions, tokenize, (16, 16))
    assert positions.tolist() == [[0, 4], [0, 5]]  # BOS, then "remove the square" + EOT, "make the circle green" + EOT
    assert targets.shape == (2, 2, 16, 16) and targets.dtype == torch.float16
    changed = regions.float().view(2, 16, 8, 16, 8).mean((2, 4))  # 8x8 pixel cells of the 128 px image
    torch.testing.assert_close(targets[:, 1].float(), changed, atol=1e-3, rtol=0)
    torch.testing.assert_close(targets.float().sum(1), torch.ones(2, 16, 16), atol=1e-3, rtol=0)
    assert targets[0, 1, :, :8].sum() == 0 and targets[0, 1, :, 8:].sum() > 0  # the square on the right


def test_the_edit_grounding_stage_fine_tunes_the_last_ip2p_round_on_the_rows_that_keep_the_image(
        comfy, tmp_path, monkeypatch):
    """``ip2p_grounding`` starts from the last IP2P round's weights exactly, grounds only the rows whose image is
    kept (a dropped image has no edit region), trains other weights than the round it starts from, and is the IP2P
    UNet the config packs; without that round, or with a data file of other pairs, it refuses; with 0 steps it is
    no stage at all."""
    import safetensors.torch
    from comfy_helpers import miniature_world_with_data
    from realedit.testbed.shapes_world import grounding, train_unet, training
    from realedit.testbed.shapes_world.models import make_clip

    config = miniature_world_with_data(tmp_path, monkeypatch, ip2p_steps=2, edit_grounding_steps=2,
                                       edit_grounding=1.0, ip2p_dropout=0.3, unet_batch=8)
    quiet = lambda line: None  # noqa: E731
    with pytest.raises(FileNotFoundError, match="run `train --stage ip2p` first"):
        training.stage_ip2p_grounding(config, log=quiet)
    training.stage_ip2p(config, log=quiet)
    start = training.trained_unet(config, "ip2p").model.diffusion_model.state_dict()
    starts, grounded_rows = [], []

    def recording(model, data, cfg, kind, **kwargs):
        starts.append({k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()})
        return train_unet.train_unet(model, data, cfg, kind, **kwargs)

    def loss(probs, positions, regions):
        grounded_rows.append(positions.clone())
        return grounding.grounding_loss(probs, positions, regions)

    monkeypatch.setattr(training, "train_unet", recording)
    monkeypatch.setattr(train_unet, "grounding_loss", loss)
    lines: list[str] = []
    assert training.stage_ip2p_grounding(config, log=lines.append)["ip2p_grounding_steps_run"] == 2
    assert "edit-grounding targets of 12 pairs" in "".join(lines) and any("edit grounding" in line for line in lines)
    assert len(starts) == 1 and all(torch.equal(starts[0][k], start[k]) for k in start)
    # The first batch's draws, in train_unet's order: rows, then u; u in [p, 3p) drops the image.
    generator = torch.Generator().manual_seed(train_unet.unet_seed(config, "ip2p_grounding"))
    rows = torch.randint(0, 12, (config.unet_batch,), generator=generator)
    u = torch.rand(config.unet_batch, generator=generator)
    image_kept = ~((u >= 0.3) & (u < 0.9))
    assert not image_kept.all() and image_kept.any()  # the seed draws both kinds of row
    data = safetensors.torch.load_file(str(training.work_path(config, "data", training._DATA_FIELDS)))
    train_unet.add_edit_grounding_targets(data, make_clip(config), config)
    expected = torch.where(image_kept[:, None], data["ip2p_ground_positions"][rows], -1)
    assert torch.equal(grounded_rows[0], expected)
    assert training.ip2p_stage(config) == "ip2p_grounding"
    tuned = training.trained_unet(config, "ip2p_grounding").model.diffusion_model.state_dict()
    assert not all(torch.equal(tuned[k], start[k]) for k in start)
    assert training.stage_ip2p_grounding(config, log=quiet)["ip2p_grounding_steps_run"] == 2 and len(starts) == 1
    data["ip2p_text"] = data["ip2p_text"].flip(0)
    with pytest.raises(RuntimeError, match="does not hold this config's IP2P pairs"):
        train_unet.add_edit_grounding_targets(data, make_clip(config), config)
    none = dataclasses.replace(config, edit_grounding_steps=0)
    assert training.stage_ip2p_grounding(none, log=quiet) == {} and training.ip2p_stage(none) == "ip2p"


def test_the_committed_checkpoints_seed_the_cache_as_the_stages_they_were_packed_from(comfy, tmp_path, monkeypatch):
    """``train --stage committed``: the stage files of the committed config hold the committed weights (fp16 values
    in fp32), so the later stages start from them; a file in the cache stays, and a config that trained a stage
    otherwise is refused."""
    import safetensors.torch
    from realedit.testbed.shapes_world import training
    from realedit.testbed.shapes_world.config import CHECKPOINT_DIR, IP2P_FILE, T2I_FILE, WorldConfig
    from realedit.testbed.shapes_world.models import CONFIG_METADATA_KEY

    monkeypatch.setenv("REALEDIT_CACHE", str(tmp_path))
    with safetensors.safe_open(str(CHECKPOINT_DIR / T2I_FILE), framework="pt") as file:
        config = WorldConfig.from_json(file.metadata()[CONFIG_METADATA_KEY])  # the committed files' config
    ip2p = training.ip2p_stage(config)  # the edit-grounding stage's file, when the config has one
    written = training.stage_committed(config, log=lambda line: None)
    assert sorted(written) == sorted(["decoder", ip2p, "t2i", "vae"])
    committed = {name: safetensors.torch.load_file(str(CHECKPOINT_DIR / name)) for name in (T2I_FILE, IP2P_FILE)}
    for kind, name in (("t2i", T2I_FILE), (ip2p, IP2P_FILE)):
        unet = training.trained_unet(config, kind).model.diffusion_model.state_dict()
        prefix = "model.diffusion_model."
        assert set(unet) == {k[len(prefix):] for k in committed[name] if k.startswith(prefix)}
        assert all(torch.equal(unet[k], committed[name][prefix + k].float()) for k in unet)
    vae = training.trained_vae(config).first_stage_model.state_dict()
    assert all(torch.equal(v.float(), committed[T2I_FILE]["first_stage_model." + k].float()) for k, v in vae.items())
    assert training.training_record(config)["t2i_from_checkpoint"] == config.key()
    assert training.stage_committed(config, log=lambda line: None) == {}  # all there already
    with pytest.raises(ValueError, match="t2i stage .* other settings"):
        training.stage_committed(dataclasses.replace(config, unet_steps=1), log=lambda line: None)

"""The shapes world's training pipeline (``python -m realedit.testbed.shapes_world train``): its parts are
exact (parallel rendering, batched text encoding), its plans keep to their budget, and a miniature run
goes through every stage, exports its weights and resumes from them in another cache."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from realedit.testbed.shapes_world.edits import IP2P_KINDS, ground_truth, random_edit, render_edit_pairs
from realedit.testbed.shapes_world.scene import random_scene, render_batch, render_pool, to_uint8
from realedit.testbed.shapes_world.schedule import StepPlan, cosine_lr, ema_decay_at


def test_cosine_lr_warms_up_independently_of_the_total_then_decays_to_its_floor():
    warm = range(10)
    assert [cosine_lr(s, 100, 1.0, warmup=10) for s in warm] == [cosine_lr(s, 7, 1.0, warmup=10) for s in warm]
    assert cosine_lr(9, 100, 2.0, warmup=10) == 2.0 and cosine_lr(10, 100, 2.0, warmup=10) == 2.0
    assert cosine_lr(100, 100, 2.0, warmup=10, floor=0.05) == pytest.approx(0.1)
    values = [cosine_lr(s, 100, 1.0, warmup=10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_the_warmed_up_ema_forgets_the_initial_weights():
    """The average of a parameter that jumps from 0 (the random start) to 1 at the first step: with the
    warm-up, the start's share after 2 400 steps is a 1e-5-order residue; without it, 0.999 ** 2400."""
    def start_share(warmup: bool, steps: int = 2400) -> float:
        average = torch.zeros(1)
        for step in range(steps):
            average.lerp_(torch.ones(1), 1.0 - ema_decay_at(step, 0.999, warmup))
        return 1.0 - average.item()

    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(20_000, 0.999) == 0.999
    assert start_share(False) == pytest.approx(0.999**2400, rel=1e-3)  # 9%
    assert start_share(True) < 1e-4


def test_offset_noise_adds_one_constant_per_image_and_channel(comfy):
    from realedit.testbed.shapes_world.train_unet import training_noise

    shape = torch.Size((4000, 4, 16, 16))
    plain = training_noise(shape, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    offset = training_noise(shape, 0.4, torch.Generator().manual_seed(0))
    shift = offset - plain
    torch.testing.assert_close(shift, shift[..., :1, :1].expand(shape), atol=1e-6, rtol=0)  # constant over (h, w)
    # The spatial mean's spread: 1/16 from the plain noise alone, sqrt(0.4^2 + 1/16^2) with the offset.
    assert plain.mean((2, 3)).std().item() == pytest.approx(1 / 16, rel=0.05)
    assert offset.mean((2, 3)).std().item() == pytest.approx((0.4**2 + 1 / 256) ** 0.5, rel=0.05)


def test_the_ip2p_unet_learns_the_image_conditioning_comfyui_gives_it(comfy):
    """IP2P's c_I in training is what ComfyUI's SD1.5 IP2P model concatenates at sampling time from
    InstructPixToPixConditioning's latent (VAEEncode's, unscaled), not the model-space latent."""
    from realedit.testbed.shapes_world.models import make_unet, make_vae
    from realedit.testbed.shapes_world.train_unet import encode_images, ip2p_concat

    vae, model = make_vae(), make_unet(in_channels=8).model
    photo = render_batch([random_scene(random.Random(3))])
    noise = torch.zeros(1, 4, 16, 16)
    sampled = model.concat_cond(concat_latent_image=vae.encode(photo), noise=noise, device=torch.device("cpu"))
    model_space = encode_images(vae, photo)
    torch.testing.assert_close(ip2p_concat(model_space), sampled, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model_space, sampled, atol=1e-2)


def test_each_training_target_is_what_both_hosts_sample_that_prediction_with(comfy):
    """The UNet's target for ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``: the world MODEL of each prediction (ComfyUI's
    EPS or V_PREDICTION sampling) recovers x0 from it, and the v target is diffusers' ``get_velocity``."""
    from realedit.testbed.diffusers_models import make_ddim_scheduler
    from realedit.testbed.shapes_world.config import DEFAULT_CONFIG
    from realedit.testbed.shapes_world.models import make_unet
    from realedit.testbed.shapes_world.train_unet import alphas_cumprod, training_target

    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 16, 16, generator=generator), torch.randn(3, 4, 16, 16, generator=generator)
    t = torch.tensor([10, 500, 999])
    a = alphas_cumprod(make_unet())[t].view(-1, 1, 1, 1)
    sigma = ((1 - a) / a).sqrt()  # ComfyUI's x = x0 + sigma eps is x_t / sqrt(a)
    for prediction in ("eps", "v"):
        sampling = make_unet(dataclasses.replace(DEFAULT_CONFIG, prediction=prediction)).model.model_sampling
        denoised = sampling.calculate_denoised(sigma.flatten(), training_target(prediction, x0, noise, a),
                                               x0 + sigma * noise)
        torch.testing.assert_close(denoised, x0, atol=2e-5, rtol=1e-5)
    scheduler = make_ddim_scheduler(prediction_type="v_prediction")
    torch.testing.assert_close(training_target("v", x0, noise, a), scheduler.get_velocity(x0, noise, t))
    with pytest.raises(ValueError, match="prediction 'x0'"):
        training_target("x0", x0, noise, a)


def test_a_v_prediction_world_loads_as_v_prediction_in_both_hosts(comfy, tmp_path):
    """``WorldConfig.prediction = "v"``: the untrained MODELs sample as V_PREDICTION, their checkpoints carry
    ComfyUI's ``v_pred`` marker and load as V_PREDICTION (t2i and IP2P), and the diffusers loader gives the
    schedulers ``v_prediction``; an eps world's files have no marker and load as EPS. Either way the file
    holds the UNet it was given (ComfyUI 0.33.0 changed ``BaseModel.state_dict_for_saving``'s arguments)."""
    import comfy.model_base
    import safetensors
    from realedit.testbed.shapes_world import diffusers_loader
    from realedit.testbed.shapes_world.config import DEFAULT_CONFIG
    from realedit.testbed.shapes_world.models import (
        V_PRED_KEY,
        load_checkpoint,
        make_clip,
        make_unet,
        make_vae,
        save_checkpoint,
    )

    clip, vae = make_clip(), make_vae()
    for prediction, model_type, scheduler_type in (("v", comfy.model_base.ModelType.V_PREDICTION, "v_prediction"),
                                                   ("eps", comfy.model_base.ModelType.EPS, "epsilon")):
        config = dataclasses.replace(DEFAULT_CONFIG, prediction=prediction)
        for in_channels in (4, 8):
            model = make_unet(config, in_channels)
            assert model.model.model_type == model_type
            path = tmp_path / f"{prediction}-{in_channels}.safetensors"
            save_checkpoint(path, model, clip, vae, config, {})
            with safetensors.safe_open(str(path), framework="pt") as file:
                assert (V_PRED_KEY in file.keys()) == (prediction == "v")
            loaded, _, _ = load_checkpoint(path)
            assert loaded.model.model_type == model_type and loaded.model.diffusion_model.in_channels == in_channels
            saved, back = model.model.diffusion_model.state_dict(), loaded.model.diffusion_model.state_dict()
            assert all(torch.equal(back[k].float(), saved[k].half().float()) for k in saved)  # the UNet it packed
            assert diffusers_loader.load(path).prediction_type == scheduler_type


def _run(plan: StepPlan, now: list[float], seconds_per_step) -> int:
    step = 0
    while step < plan.total:
        now[0] += seconds_per_step(step)
        plan.after(step)
        step += 1
    return step


def test_step_plan_keeps_the_steps_without_a_budget_and_caps_them_with_one(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("realedit.testbed.shapes_world.schedule.time.perf_counter", lambda: now[0])
    assert _run(StepPlan(500), now, lambda step: 1.0) == 500
    assert _run(StepPlan(500, seconds=100.0), now, lambda step: 1.0) == 100  # timed over steps 5-35
    assert _run(StepPlan(50, seconds=100.0), now, lambda step: 1.0) == 50  # never more than planned
    # Slower after the probe (other processes joined): stopped at the first check past 1.25 x the budget.
    assert _run(StepPlan(500, seconds=100.0), now, lambda step: 0.01 if step < 35 else 3.0) == 101


def test_parallel_rendering_gives_the_same_pixels():
    rng = random.Random(5)
    scenes = [random_scene(rng, two_objects=0.5, unnamed=0.3, textured=0.3) for _ in range(6)]
    expected = to_uint8(render_batch(scenes))
    assert torch.equal(render_pool(scenes, workers=2, chunk=3), expected)
    pairs = [(s, random_edit(s, rng, IP2P_KINDS)) for s in scenes]
    sources, targets = render_edit_pairs(pairs)
    truths = [ground_truth(s, e) for s, e in pairs]
    assert torch.equal(sources, to_uint8(torch.stack([t.source for t in truths])))
    assert torch.equal(targets, to_uint8(torch.stack([t.expected for t in truths])))


def test_batched_text_encoding_equals_clip_text_encode_one_by_one(comfy):
    from realedit.testbed.shapes_world.models import make_clip
    from realedit.testbed.shapes_world.train_unet import encode_texts

    clip = make_clip()
    rng = random.Random(0)
    texts = [random_scene(rng, two_objects=0.5).caption() for _ in range(9)] + [""]
    alone = torch.cat([clip.encode_from_tokens_scheduled(clip.tokenize(t))[0][0] for t in texts])
    assert torch.allclose(encode_texts(clip, texts, batch=4), alone, atol=1e-6, rtol=0)


def test_a_miniature_run_trains_every_stage_exports_and_resumes_elsewhere(comfy, tmp_path, monkeypatch):
    import safetensors.torch
    from realedit.testbed.shapes_world import training
    from realedit.testbed.shapes_world.config import DEFAULT_CONFIG

    config = dataclasses.replace(DEFAULT_CONFIG, vae_pool=8, vae_steps=3, vae_batch=2, vae_crop=64, decoder_steps=2,
                                 decoder_batch=2, dataset_scenes=12, unet_steps=2, unet_batch=4, ip2p_steps=2,
                                 edit_grounding_steps=1)
    monkeypatch.setenv("REALEDIT_CACHE", str(tmp_path / "first"))
    quiet = lambda line: None  # noqa: E731
    planned = {"vae": 3, "decoder": 2, "data": None, "t2i": 2, "ip2p": 2, "ip2p_grounding": 1}
    for stage, steps in planned.items():
        numbers = getattr(training, f"stage_{stage}")(config, log=quiet)
        assert numbers.get(f"{stage}_steps_run") == steps, stage
    record = training.training_record(config)
    assert record["t2i_steps_run"] == 2 and "data_seconds" in record
    exported = training.export_stages(config, tmp_path / "out", tuple(planned))
    assert sorted(p.name.split("-")[0] for p in exported) == ["decoder", "ip2p", "ip2p_grounding", "t2i", "vae"]
    for path in exported:
        assert {v.dtype for v in safetensors.torch.load_file(str(path)).values()} == {torch.float16}

    # The exported files, dropped into another cache, are the trained stages there (fp16-rounded).
    trained = training.trained_unet(config, "t2i").model.diffusion_model.state_dict()
    monkeypatch.setenv("REALEDIT_CACHE", str(tmp_path / "second"))
    (tmp_path / "second" / "shapes_world").mkdir(parents=True)
    for path in exported:
        path.rename(tmp_path / "second" / "shapes_world" / path.name)
    assert training.stage_t2i(config, log=quiet)["t2i_steps_run"] == 2  # found, not retrained
    resumed = training.trained_unet(config, "t2i").model.diffusion_model.state_dict()
    assert all(torch.equal(resumed[k], trained[k].half().float()) for k in trained)
    assert training.trained_vae(config) is not None


def test_the_cpu_recipe_trains_the_same_models_on_fewer_samples():
    """The two recipes differ in steps, rounds, batches and data size only: the checkpoints' architecture (VAE,
    CLIP, UNets) and seeds are one, so a checkpoint of either loads the same way."""
    from realedit.testbed.shapes_world.config import CPU_RECIPE, RECIPES

    gpu, cpu = (dataclasses.asdict(RECIPES[name]) for name in ("gpu", "cpu"))
    assert {k for k in gpu if gpu[k] != cpu[k]} == set(CPU_RECIPE)
    assert all(k.endswith(("_steps", "_rounds", "_batch", "_crop", "_scenes")) for k in CPU_RECIPE)
    assert RECIPES["cpu"].key() != RECIPES["gpu"].key()  # their stage files never mix


def test_a_setting_added_later_changes_the_hash_only_away_from_the_value_older_files_have(comfy):
    """``prediction`` (eps before session 13), ``unet_rounds`` (1 before session 14), ``token_grounding`` (0 before
    session 18) and the edit grounding (none before session 20) came after the first files: at those values they are
    left out of the hash and the recorded JSON (so older files and stage caches keep their hash and names), away from
    them they are in both, and they name the files of the UNet stages they train (token grounding: the text-to-image
    one's; edit grounding: its own fine-tuning stage's), not those of the stages before them."""
    from realedit.testbed.shapes_world.config import DEFAULT_CONFIG, LATER_SETTINGS, RECIPES, WorldConfig
    from realedit.testbed.shapes_world.training import _STAGE_FIELDS, stage_key

    assert LATER_SETTINGS == {"prediction": "eps", "unet_rounds": 1, "token_grounding": 0.0, "edit_grounding": 0.0,
                              "edit_grounding_steps": 0}
    assert DEFAULT_CONFIG.prediction == "v"
    older = dataclasses.replace(DEFAULT_CONFIG, **LATER_SETTINGS)
    unets = ("t2i", "ip2p", "ip2p_grounding")
    laters = (("prediction", "v", unets), ("unet_rounds", 2, unets), ("token_grounding", 0.1, unets[:1]),
              ("edit_grounding", 0.1, unets[2:]), ("edit_grounding_steps", 2000, unets[2:]))
    for name, later, named in laters:
        newer = dataclasses.replace(older, **{name: later})
        assert f'"{name}"' not in older.to_json() and f'"{name}": {json.dumps(later)}' in newer.to_json()
        assert WorldConfig.from_json(older.to_json()) == older and WorldConfig.from_json(newer.to_json()) == newer
        assert newer.key() != older.key()
        for stage, fields in _STAGE_FIELDS.items():
            assert (stage_key(newer, fields) != stage_key(older, fields)) == (stage in named), (name, stage)
    session_18 = dataclasses.replace(RECIPES["cpu"], edit_grounding=0.0, edit_grounding_steps=0)
    assert session_18.key() == "1bac22b959e30f44"  # session 18's files
    session_15 = dataclasses.replace(session_18, vae_steps=1200, token_grounding=0.0)  # VAE of sessions 7-15
    assert session_15.key() == "6cd9fb29ef649ce7"  # session 15's files
    earlier = dataclasses.replace(session_15, decoder_steps=600)  # the decoder of sessions 7-14
    assert dataclasses.replace(earlier, prediction="eps", unet_rounds=1).key() == "6586959c0c5f7490"  # 9-12
    assert dataclasses.replace(earlier, unet_rounds=1).key() == "523bac92ee6df241"  # session 13's files
    assert dataclasses.replace(earlier, unet_rounds=3).key() == "c7d594277fef5deb"  # session 14's files
    assert RECIPES["cpu"].key() != session_18.key()  # session 20's: the IP2P UNet fine-tuned with edit grounding
    with pytest.raises(ValueError, match="prediction 'x0'"):
        dataclasses.replace(DEFAULT_CONFIG, prediction="x0")
    with pytest.raises(ValueError, match="unet_rounds must be a whole number >= 1, not 0"):
        dataclasses.replace(DEFAULT_CONFIG, unet_rounds=0)
    with pytest.raises(ValueError, match="edit_grounding must be >= 0"):
        dataclasses.replace(DEFAULT_CONFIG, edit_grounding=-0.1)
    with pytest.raises(ValueError, match="edit_grounding_steps must be a whole number >= 0"):
        dataclasses.replace(DEFAULT_CONFIG, edit_grounding_steps=-1)


def test_a_second_round_restarts_from_the_first_rounds_weights_with_its_own_seed(comfy, tmp_path, monkeypatch):
    """``unet_rounds = 2``: round 1 is the one-round config's stage file (trained, or found in the cache), round 2
    starts from exactly those weights, draws another seed, and the file records both rounds' steps."""
    from comfy_helpers import miniature_world_with_data
    from realedit.testbed.shapes_world import train_unet, training

    one = miniature_world_with_data(tmp_path, monkeypatch, unet_steps=3, ip2p_steps=2)
    two = dataclasses.replace(one, unet_rounds=2)
    quiet = lambda line: None  # noqa: E731
    starts, seeds = [], []

    def recording(model, data, config, kind, **kwargs):
        starts.append({k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()})
        seeds.append(train_unet.unet_seed(config, kind))
        return train_unet.train_unet(model, data, config, kind, **kwargs)

    monkeypatch.setattr(training, "train_unet", recording)
    loaded = []
    load_file = training.safetensors.torch.load_file
    monkeypatch.setattr(training.safetensors.torch, "load_file", lambda path: loaded.append(path) or load_file(path))
    assert training.stage_t2i(two, log=quiet)["t2i_steps_run"] == 6  # both rounds, 3 steps each
    assert len(loaded) == 1  # the data set, once for both rounds
    first = training.trained_unet(one, "t2i").model.diffusion_model.state_dict()
    assert len(starts) == 2 and all(torch.equal(starts[1][k], first[k]) for k in first)
    assert not all(torch.equal(starts[0][k], first[k]) for k in first)  # round 1 trained from random weights
    assert seeds == [one.seed + 3, one.seed + 103]
    second = training.trained_unet(two, "t2i").model.diffusion_model.state_dict()
    assert not all(torch.equal(second[k], first[k]) for k in first)
    assert training.stage_ip2p(two, log=quiet)["ip2p_steps_run"] == 4 and seeds[2:] == [one.seed + 4, one.seed + 104]
    assert training.stage_t2i(two, log=quiet)["t2i_steps_run"] == 6 and len(starts) == 4  # found: no round reran
    three = dataclasses.replace(one, unet_rounds=3)  # rounds 1 and 2 in the cache: only round 3 trains, from 2
    assert training.stage_t2i(three, log=quiet)["t2i_steps_run"] == 9 and len(starts) == 5
    assert all(torch.equal(starts[4][k], second[k]) for k in second) and seeds[4] == one.seed + 203


class _Stopped(Exception):
    """Stands for the run being killed."""


def test_a_stopped_round_goes_on_from_its_progress_to_the_same_weights(comfy, tmp_path, monkeypatch):
    """A UNet round killed after its progress was kept (step 2 of 4) and started again goes on from step 2 and
    trains exactly the weights of a run that never stopped (grounding on: every random draw and AdamW's state
    come back); the progress file goes once the round's file is written. A time-capped run keeps none."""
    import safetensors.torch
    from comfy_helpers import miniature_world_with_data
    from realedit.testbed.shapes_world import training

    config = miniature_world_with_data(tmp_path / "straight", monkeypatch, unet_steps=4, token_grounding=0.1)
    monkeypatch.setattr(training, "PROGRESS_EVERY", 2)
    training.stage_t2i(config, log=lambda line: None)
    straight = safetensors.torch.load_file(str(training.work_path(config, "t2i", training._UNET_FIELDS)))

    miniature_world_with_data(tmp_path / "stopped", monkeypatch, unet_steps=4, token_grounding=0.1)
    stage_file = training.work_path(config, "t2i", training._UNET_FIELDS)
    progress = training.progress_file(stage_file)

    def killed_at_step_2(line: str) -> None:
        if "step     2/4" in line:
            raise _Stopped

    with pytest.raises(_Stopped):
        training.stage_t2i(config, log=killed_at_step_2)
    assert progress.is_file() and not stage_file.exists()
    lines: list[str] = []
    training.stage_t2i(config, log=lines.append)
    assert any("going on from step 2" in line for line in lines)
    assert [line for line in lines if "t2i step" in line] == [lines[-1]] and "step     4/4" in lines[-1]
    resumed = safetensors.torch.load_file(str(stage_file))
    assert set(resumed) == set(straight) and all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not progress.exists()
    with pytest.raises(ValueError, match="only without a time cap"):
        training.train_unet(training.make_unet(config, 4), {}, config, "t2i", seconds=1.0, progress=progress)


def test_the_recipe_follows_the_training_device(comfy, monkeypatch):
    """``--recipe auto`` (the default): the GPU recipe where ComfyUI trains on CUDA, else the CPU one."""
    import comfy.model_management
    from realedit.testbed.shapes_world import __main__ as cli
    from realedit.testbed.shapes_world import training
    from realedit.testbed.shapes_world.config import RECIPES

    seen = []
    monkeypatch.setattr(training, "stage_vae", lambda config, **kwargs: seen.append(config) or {})
    for device, recipe in (("cpu", "cpu"), ("cuda", "gpu")):
        monkeypatch.setattr(comfy.model_management, "get_torch_device", lambda d=device: torch.device(d))
        cli.main(["train", "--stage", "vae"])
        assert seen[-1] == RECIPES[recipe]

"""The committed shapes world checkpoints: loaded by CheckpointLoaderSimple in ComfyUI's executor and by
the diffusers loader; the quality gates on a seeded CI subset.

A gate the committed weights miss is marked ``xfail(strict=True)`` with the committed measurement in
the reason (from ``testbed/shapes_world_models/gates.json``, the same seeded subset): the target is
never lowered, and the mark must go once the weights meet it.
"""

from __future__ import annotations

import json
from typing import Callable

import pytest
import torch
from realedit.testbed.shapes_world.config import CHECKPOINT_DIR, GATES_FILE, IP2P_FILE, T2I_FILE

REPORT = json.loads((CHECKPOINT_DIR / GATES_FILE).read_text())
TARGETS = REPORT["targets"]
CI = REPORT["measured_ci"]


def _gate(key: str, target: str, unit: str) -> Callable[[Callable], Callable]:
    """No mark when the committed CI measurement meets the target; else a strict xfail that says so."""
    value = CI[key]
    if value >= TARGETS[target]:
        return lambda test: test
    return pytest.mark.xfail(strict=True, reason=(
        f"committed weights measure {value:.3g}{unit} on this subset (full set: {REPORT['measured'][key]:.3g}{unit}), "
        f"target {TARGETS[target]:g}{unit}: retrain (testbed/shapes_world_models/README.md says what limits it)"))


def test_checkpoints_are_fp16_sd15_layout_and_record_their_training_config():
    """Each file carries the config it was trained with (hash and JSON agree, as in gates.json), and that
    config's architecture is the one the loader registers (``DEFAULT_CONFIG``'s). The training recipe
    in ``DEFAULT_CONFIG`` may be newer than the committed weights until they are retrained."""
    import hashlib

    import safetensors
    from realedit.testbed.shapes_world.config import DEFAULT_CONFIG, WorldConfig

    for name in (T2I_FILE, IP2P_FILE):
        with safetensors.safe_open(str(CHECKPOINT_DIR / name), framework="pt") as file:
            keys = list(file.keys())
            assert {file.get_tensor(k).dtype for k in keys} == {torch.float16}
            metadata = file.metadata()
        text = metadata["realedit.shapes_world.config"]  # WorldConfig.to_json() of the training run
        assert metadata["realedit.shapes_world.config_hash"] == hashlib.sha256(text.encode()).hexdigest()[:16]
        assert metadata["realedit.shapes_world.config_hash"] == REPORT["config_hash"]
        assert WorldConfig.from_json(text).key() == REPORT["config_hash"]  # the config class still hashes it so
        trained = json.loads(text)
        for part in ("vae", "unet", "clip", "unet_heads"):
            assert trained[part] == getattr(DEFAULT_CONFIG, part), part
        prefixes = {k.split(".")[0] for k in keys}
        v_pred = {"v_pred"} if WorldConfig.from_json(text).prediction == "v" else set()  # ComfyUI's marker
        assert prefixes == {"model", "first_stage_model", "cond_stage_model"} | v_pred


def test_checkpoint_loader_builds_the_world_model_classes(shapes_world):
    from realedit.testbed.shapes_world.models import ShapesWorldAwareVAE, ShapesWorldIP2P, ShapesWorldSD15

    model, clip, vae = shapes_world.t2i
    ip2p_model, _, _ = shapes_world.ip2p
    assert type(model.model.model_config) is ShapesWorldSD15
    assert type(ip2p_model.model.model_config) is ShapesWorldIP2P
    assert ip2p_model.model.diffusion_model.input_blocks[0][0].in_channels == 8
    assert isinstance(vae, ShapesWorldAwareVAE) and vae.latent_channels == 4
    assert clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))[0][0].shape == (1, 77, 64)


def test_registration_leaves_other_checkpoints_alone(comfy):
    """Real SD1.5 detection still picks SD15 (the world classes match only context_dim 64 / 32 channels)."""
    import comfy.model_detection
    import comfy.supported_models
    from realedit.testbed.shapes_world.models import register_comfy

    register_comfy()
    sd15 = {"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False, "adm_in_channels": None,
            "use_temporal_attention": False, "in_channels": 4, "channel_mult": [1, 2, 4, 4],
            "num_res_blocks": [2, 2, 2, 2]}
    assert type(comfy.model_detection.model_config_from_unet_config(sd15)) is comfy.supported_models.SD15


def test_txt2img_workflow_through_the_executor_equals_direct_sampling(shapes_world, runner):
    from realedit.testbed.shapes_world import gates

    caption = gates.gate_scenes(1)[0].caption()
    workflow = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": T2I_FILE}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": caption, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 0,
            "steps": 20, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    }
    image = runner.run_workflow(workflow, outputs=["6"], tiny_checkpoint=None, pack=False)["6"][0]
    model, clip, vae = shapes_world.t2i
    with torch.inference_mode():  # as the executor runs
        direct = vae.decode(gates.sample(model, gates.conditioning(clip, caption), gates.conditioning(clip, ""),
                                         cfg=7.5, seed=0))
    assert image.shape == (1, 128, 128, 3)
    torch.testing.assert_close(image, direct, atol=1e-4, rtol=0)


@_gate("vae_psnr_db", "vae", " dB")
def test_gate_vae_round_trip(shapes_world):
    from realedit.testbed.shapes_world import gates

    assert gates.vae_gate(shapes_world.t2i[2], n=REPORT["sizes_ci"]["vae"]) >= TARGETS["vae"]


@_gate("t2i_attributes", "t2i", "")
def test_gate_generated_scenes_read_back_at_cfg_7_5(shapes_world):
    from realedit.testbed.shapes_world import gates

    result = gates.t2i_gate(*shapes_world.t2i, n=REPORT["sizes_ci"]["t2i"])
    assert result.attributes >= TARGETS["t2i"]


@_gate("ip2p_success", "ip2p", "")
def test_gate_ip2p_carries_out_held_out_instructions(shapes_world):
    from realedit.testbed.shapes_world import gates

    model, clip, _ = shapes_world.ip2p
    assert gates.ip2p_gate(model, clip, shapes_world.t2i[2], n=REPORT["sizes_ci"]["ip2p"]) >= TARGETS["ip2p"]


@_gate("ddim_psnr_db", "ddim", " dB")
def test_gate_ddim_inversion_reconstructs_a_held_out_photo(shapes_world):
    from realedit.testbed.shapes_world import gates

    assert gates.ddim_gate(*shapes_world.t2i) >= TARGETS["ddim"]


def test_gate_measurements_are_reproducible(shapes_world):
    """The CI subset measured now equals the committed numbers (seeded end to end), so the marks above
    are decided by the same numbers the tests compute."""
    from realedit.testbed.shapes_world import gates

    assert gates.vae_gate(shapes_world.t2i[2], n=REPORT["sizes_ci"]["vae"]) == pytest.approx(CI["vae_psnr_db"],
                                                                                             abs=0.05)
    assert gates.ddim_gate(*shapes_world.t2i) == pytest.approx(CI["ddim_psnr_db"], abs=0.05)


def test_renders_read_back_exactly_and_the_vae_ceiling_is_the_committed_one(shapes_world):
    """The t2i gate's scorer gives every attribute and scene of the renders themselves; through the VAE
    (no UNet) it gives the committed ceiling of that gate (seeded, as the gates)."""
    from realedit.testbed.shapes_world import gates
    from realedit.testbed.shapes_world.scene import render_batch

    n = REPORT["sizes_ci"]["t2i"]
    scenes = gates.gate_scenes(n)
    objects = sum(len(scene.objects) for scene in scenes)
    every = dict.fromkeys(("position", "colour", "shape"), objects)
    assert gates.read_back(render_batch(scenes), scenes) == gates.T2IGate(1.0, 1.0, n, objects, every)
    ceiling = gates.vae_read_back(shapes_world.t2i[2], n=n)
    committed = (CI["vae_read_back_attributes"], CI["vae_read_back_scenes"])
    assert (ceiling.attributes, ceiling.scenes) == pytest.approx(committed, abs=0.05)


def test_ip2p_gate_reads_its_expected_images_exactly_and_its_vae_ceiling_is_the_committed_one(shapes_world):
    """The IP2P gate's scorer accepts every expected image itself; through the VAE alone it gives the
    committed ceiling of that gate (the share an IP2P UNet reproducing the encoder's latents would score)."""
    from realedit.testbed.shapes_world import gates
    from realedit.testbed.shapes_world.reader import read, scene_matches

    n = REPORT["sizes_ci"]["ip2p"]
    assert all(scene_matches(read(case.expected), case.edited) for case in gates.gate_edits(n))
    kinds = [edit.kind for _, edit in gates.gate_pairs(n)]
    assert set(kinds) == set(gates.IP2P_KINDS)  # the subset holds every kind the IP2P UNet trains on
    outcomes = [(kind, i % 3 == 0) for i, kind in enumerate(kinds)]
    counts = gates.by_kind(outcomes)
    assert sum(total for _, total in counts.values()) == n and [k for k in counts] == list(gates.IP2P_KINDS)
    assert sum(done for done, _ in counts.values()) == sum(done for _, done in outcomes)
    assert gates.ip2p_read_back(shapes_world.t2i[2], n=n) == pytest.approx(CI["vae_read_back_ip2p"], abs=1e-9)


def test_the_ip2p_unet_uses_its_image_conditioning_where_the_edit_keeps_the_image(shapes_world):
    """Over the latent cells an edit leaves untouched, the IP2P UNet's x0 at high noise is at least twice as near
    the edited latent with c_I (as the hosts feed it) as with c_I zero (training's dropped image). Copying c_I
    would be nearer still on these weights: bench/bench_world_ip2p_copy.py, what limits the IP2P gate."""
    from realedit.testbed.shapes_world import gates

    errors = gates.ip2p_kept_x0_errors(shapes_world.ip2p, shapes_world.t2i[0], (700, 900), n=REPORT["sizes_ci"]["ip2p"])
    assert errors[700]["copy"] == errors[900]["copy"]  # c_I does not depend on t
    for row in errors.values():
        assert row["ip2p"] < row["ip2p_no_image"] / 2


@pytest.mark.parametrize("name", [T2I_FILE, IP2P_FILE])
def test_diffusers_loader_gives_the_same_unet_and_vae_as_comfyui(shapes_world, name):
    """Same weights, same inputs: ComfyUI's UNetModel and diffusers' UNet2DConditionModel agree to 1e-4
    (relative to the output scale; both fp32 from the fp16 file, only the op order differs); the VAEs too."""
    from realedit.testbed.shapes_world.diffusers_loader import load

    world = load(CHECKPOINT_DIR / name)
    model, _, vae = shapes_world.t2i if name == T2I_FILE else shapes_world.ip2p
    unet = model.model.diffusion_model
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, world.unet.config.in_channels, 16, 16, generator=generator)
    context = torch.randn(2, 77, 64, generator=generator)
    t = torch.tensor([25.0, 700.0])
    with torch.inference_mode():  # the executor loaded ComfyUI's weights as inference tensors
        ours = unet(x, timesteps=t, context=context)
        theirs = world.unet(x, t, encoder_hidden_states=context).sample
    assert ours.abs().max() > 0.1  # trained weights, not a zeroed output layer
    torch.testing.assert_close(theirs, ours, atol=1e-4 * ours.abs().max().item(), rtol=0)
    image = torch.rand(1, 128, 128, 3, generator=generator)
    with torch.inference_mode():
        latent = vae.encode(image)
        theirs_latent = world.vae.encode(image.movedim(-1, 1) * 2 - 1).latent_dist.mode()
        decoded = ((world.vae.decode(latent).sample + 1) / 2).clamp(0, 1).movedim(1, -1)
        comfy_decoded = vae.decode(latent)
    torch.testing.assert_close(theirs_latent, latent, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(decoded, comfy_decoded, atol=1e-4, rtol=0)


def test_diffusers_loader_gives_the_same_text_encoder_as_comfyui(shapes_world):
    """The transformers CLIPTextModel holds the checkpoint's text weights (whatever key layout the installed
    transformers uses) and gives CLIPTextEncode's embedding for the same token ids."""
    from realedit.testbed.shapes_world.diffusers_loader import load

    world = load(CHECKPOINT_DIR / T2I_FILE)
    _, clip, _ = shapes_world.t2i
    tokens = clip.tokenize("a red circle on the left and a blue square on the right")
    ids = torch.tensor([[token for token, _ in tokens["l"][0]]])  # (1, 77), ComfyUI's padding
    with torch.inference_mode():
        ours = clip.encode_from_tokens_scheduled(tokens)[0][0]
        theirs = world.text_encoder(ids).last_hidden_state
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_the_gate_report_says_what_each_unet_gate_misses(shapes_world):
    """``measure`` (what ``train --stage pack`` writes and prints): beside each UNet gate's score, the t2i gate's
    objects right per attribute and the IP2P gate's instructions by kind, consistent with the score."""
    from realedit.testbed.shapes_world import gates
    from realedit.testbed.shapes_world.training import gate_lines

    sizes = {"t2i": 2, "vae": 2, "ip2p": 4}
    measured = gates.measure(shapes_world.t2i, shapes_world.ip2p, sizes)
    objects = measured["t2i_objects_right"]
    assert objects["objects"] == sum(len(scene.objects) for scene in gates.gate_scenes(2))
    assert all(0 <= objects[a] <= objects["position"] <= objects["objects"] for a in ("colour", "shape"))
    counts = measured["ip2p_by_kind"]
    assert sum(total for _, total in counts.values()) == 4
    assert measured["ip2p_success"] == sum(done for done, _ in counts.values()) / 4
    lines = "\n".join(gate_lines(measured))
    assert f"objects read back right, of {objects['objects']}: position {objects['position']}," in lines
    assert "carried out by kind: recolour " in lines and "background" in lines


def test_a_candidate_world_folder_comes_before_the_committed_files(runner, tmp_path, monkeypatch):
    """bench --models DIR: CheckpointLoaderSimple loads DIR's text-to-image file (here the committed one with one
    bias changed), the committed IP2P file where DIR has none, and the diffusers twin reads the same file; a folder
    holding neither world file is refused by name. ComfyUI's folder list is restored afterwards."""
    import folder_paths
    import safetensors
    import safetensors.torch
    from realedit.testbed.shapes_world.comfy_world import loader_workflow, use_candidate_models
    from realedit.testbed.shapes_world.diffusers_loader import edit_model

    paths, extensions = folder_paths.folder_names_and_paths["checkpoints"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", (list(paths), extensions))
    with pytest.raises(ValueError, match=f"holds neither {T2I_FILE} nor {IP2P_FILE}"):
        use_candidate_models(tmp_path)
    state = safetensors.torch.load_file(str(CHECKPOINT_DIR / T2I_FILE))
    with safetensors.safe_open(str(CHECKPOINT_DIR / T2I_FILE), framework="pt") as file:
        metadata = file.metadata()
    key = "model.diffusion_model.out.2.bias"
    state[key] = state[key] + 1
    safetensors.torch.save_file(state, str(tmp_path / T2I_FILE), metadata=metadata)

    loaded = use_candidate_models(tmp_path)
    assert loaded == {T2I_FILE: tmp_path.resolve() / T2I_FILE, IP2P_FILE: CHECKPOINT_DIR / IP2P_FILE}
    assert folder_paths.get_full_path("checkpoints", T2I_FILE) == str(tmp_path.resolve() / T2I_FILE)
    assert folder_paths.get_full_path("checkpoints", IP2P_FILE) == str(CHECKPOINT_DIR / IP2P_FILE)
    result = runner.run_workflow(loader_workflow(), outputs=["1", "2"], tiny_checkpoint=None, pack=False)
    bias = result["1"][0].model.diffusion_model.out[2].bias.float()
    torch.testing.assert_close(bias, state[key].float())
    twin = edit_model("shapes-world", T2I_FILE, torch.device("cpu"), torch.float32, tmp_path)
    torch.testing.assert_close(twin.unet.conv_out.bias, state[key].float())

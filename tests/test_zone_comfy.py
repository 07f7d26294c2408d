"""ZONE's ComfyUI side: the IP2P mask hook and host, SAM automatic masks, the ZONE nodes and workflow."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from realedit.attention.hooks import AttentionContext, LayerInfo, RowInfo
from realedit.attention.maps import normalize_max
from realedit.attention.math import attention_probs
from realedit.masks.ip2p_mask import IP2PMaskRecorder, rough_mask
from test_masks import reshape_segments

ROOT = Path(__file__).resolve().parent.parent
HEADS, DIM = 2, 8


def _ctx(layer: LayerInfo, rows: RowInfo, grid: tuple[int, int], kind: str = "cross",
         step: int = 0) -> AttentionContext:
    return AttentionContext(layer=layer, kind=kind, grid=grid, heads=HEADS, dim_head=DIM, rows=rows, step=step,
                            total_steps=4)


# ---------------------------------------------------------------- Eq. 4 and the recorder (no ComfyUI)


def test_rough_mask_thresholds_the_max_scaled_difference():
    first = torch.tensor([[4.0, 2.0], [1.0, 0.0]])  # / 4 -> 1, .5, .25, 0
    last = torch.tensor([[0.0, 2.0], [2.0, 1.0]])  # / 2 -> 0, 1, 1, .5
    out = rough_mask(first, last, threshold=0.3)
    assert torch.allclose(out.difference, torch.tensor([[1.0, -0.5], [-0.75, -0.5]]))
    assert out.mask.tolist() == [[False, True], [True, True]]
    assert rough_mask(first, last, threshold=-0.6).mask.tolist() == [[False, False], [True, False]]
    assert torch.equal(normalize_max(torch.zeros(2, 2)), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="A\\^1 and A\\^L"):
        rough_mask(first, last[:1])


def test_recorder_reads_only_empty_text_rows_of_small_encoder_decoder_layers():
    """The option 'layers at 1/16 and 1/32 of the image' (downscales 2 and 4)."""
    torch.manual_seed(0)
    rows = RowInfo(("uncond", "uncond", "cond"), (0, 0, 0))
    down = LayerInfo(2, "down", 2, ("input", 4, 0))
    up = LayerInfo(9, "up", 4, ("output", 5, 0))
    skipped = [LayerInfo(0, "down", 1, ("input", 1, 0)), LayerInfo(6, "mid", 8, ("middle", 0, 0))]
    recorder = IP2PMaskRecorder(downscales=(2, 4))
    direct = {}
    for step in range(2):
        for layer, grid in ((down, (4, 4)), (up, (2, 2))):
            q, k = torch.randn(3, grid[0] * grid[1], HEADS * DIM), torch.randn(3, 5, HEADS * DIM)
            assert recorder(q, k, k, _ctx(layer, rows, grid, step=step)) is None  # never changes attention
            probs = attention_probs(q[:2], k[:2], HEADS).mean(dim=(0, 1))  # rows 0-1, heads
            maps = probs[:, [0, -1]].T.reshape(2, *grid)
            direct[layer.index] = direct.get(layer.index, 0) + maps / 2
            recorder(q, k, k, _ctx(layer, rows, grid, kind="self", step=step))
        for layer in skipped:
            recorder(torch.randn(3, 4, HEADS * DIM), torch.randn(3, 5, HEADS * DIM), None, _ctx(layer, rows, (2, 2)))
    assert {(layer, rows) for layer, _, rows in recorder.recorded} == {(2, (0, 1)), (9, (0, 1))}
    up_resized = torch.nn.functional.interpolate(direct[9][None], size=(4, 4), mode="bilinear")[0]
    expected = (direct[2] + up_resized) / 2
    first, last = recorder.maps()
    assert torch.allclose(first, expected[0], atol=1e-6) and torch.allclose(last, expected[1], atol=1e-6)
    assert torch.equal(recorder.rough_mask(threshold=0.1).mask, rough_mask(expected[0], expected[1], 0.1).mask)
    recorder.begin_run()
    with pytest.raises(RuntimeError, match="no cross-attention of the empty-text rows"):
        recorder.maps()


def test_the_instruction_rows_give_the_maps_when_asked_and_nothing_else_does():
    """mask_rows "instruction": A^1 and A^L of the instruction row (the hosts' cond row) alone; the default reads
    the empty-text rows; another row kind is refused by name."""
    rows = RowInfo(("uncond", "cond", "uncond"), (0, 0, 0))
    layer = LayerInfo(4, "down", 4, ("input", 7, 0))
    q, k = torch.randn(3, 4, HEADS * DIM), torch.randn(3, 77, HEADS * DIM)
    instruction, empty = IP2PMaskRecorder("cond", eot_position=5), IP2PMaskRecorder(eot_position=5)
    for recorder in (instruction, empty):
        recorder(q, k, k, _ctx(layer, rows, (2, 2)))
    assert instruction.recorded[0][2] == (1,) and empty.recorded[0][2] == (0, 2)
    probs = attention_probs(q[1:2], k[1:2], HEADS).mean(dim=(0, 1))  # (4, 77): the instruction row's heads
    assert torch.allclose(instruction.maps()[0], probs[:, 0].reshape(2, 2), atol=1e-7)
    assert torch.allclose(instruction.maps()[1], probs[:, 5].reshape(2, 2), atol=1e-7)
    assert not torch.allclose(instruction.maps()[0], empty.maps()[0])
    with pytest.raises(ValueError, match="'cond' \\(instruction\\) or 'uncond'"):
        IP2PMaskRecorder("negative")
    instruction.begin_run()
    with pytest.raises(RuntimeError, match="no cross-attention of the instruction rows"):
        instruction.maps()


def test_by_default_only_the_layers_at_1_32_of_the_image_are_averaged():
    """Official code: M_b from the 16x16 layers at 512 px only (downscale 4), not the 32x32 ones too."""
    rows = RowInfo(("uncond", "cond"), (0, 0))
    recorder = IP2PMaskRecorder()
    layers = ((LayerInfo(2, "down", 2, ("input", 4, 0)), (4, 4)), (LayerInfo(4, "down", 4, ("input", 7, 0)), (2, 2)),
              (LayerInfo(9, "up", 4, ("output", 5, 0)), (2, 2)))
    for layer, grid in layers:
        q, k = torch.randn(2, grid[0] * grid[1], HEADS * DIM), torch.randn(2, 77, HEADS * DIM)
        recorder(q, k, k, _ctx(layer, rows, grid))
    assert sorted(layer for layer, _, _ in recorder.recorded) == [4, 9]
    assert recorder.maps()[0].shape == (2, 2)


def test_a_l_is_read_at_the_instructions_end_of_text_token():
    """Paper and official code: A^L is the instruction's EOT map (key n + 1), not key 76 (the last padding)."""
    from realedit.masks.ip2p_mask import instruction_eot_position

    def tokenize(text):
        return [(i, w) for i, w in enumerate(text.split())]

    assert instruction_eot_position("make his tie blue", tokenize) == 5
    rows = RowInfo(("uncond", "cond"), (0, 0))
    layer = LayerInfo(4, "down", 4, ("input", 7, 0))
    q, k = torch.randn(2, 4, HEADS * DIM), torch.randn(2, 77, HEADS * DIM)
    at_eot, at_end = IP2PMaskRecorder(eot_position=5), IP2PMaskRecorder()
    for recorder in (at_eot, at_end):
        recorder(q, k, k, _ctx(layer, rows, (2, 2)))
    probs = attention_probs(q[:1], k[:1], HEADS).mean(dim=(0, 1))  # (4, 77)
    assert torch.allclose(at_eot.maps()[1], probs[:, 5].reshape(2, 2), atol=1e-7)
    assert torch.allclose(at_end.maps()[1], probs[:, 76].reshape(2, 2), atol=1e-7)
    assert not torch.allclose(at_eot.maps()[1], at_end.maps()[1])
    assert instruction_eot_position("a " * 80, tokenize) == 76  # beyond one chunk: its last key, with a warning


# ---------------------------------------------------------------- SAM (no ComfyUI)


def test_nms_fallback_is_used_when_torchvision_op_raises(monkeypatch):
    import segment_anything.automatic_mask_generator as amg
    import torchvision.ops
    from realedit.compat import torchvision_ops
    from realedit.masks import sam_auto
    from realedit.testbed.sam import make_tiny_sam

    def broken(*args, **kwargs):
        raise NotImplementedError("Could not run 'torchvision::nms' with arguments from the 'CPU' backend")

    monkeypatch.setattr(torchvision.ops, "batched_nms", broken)
    assert not sam_auto.torchvision_nms_works()
    assert sam_auto.nms_function() is torchvision_ops.batched_nms
    calls = []

    def spy(boxes, scores, idxs, iou_threshold):
        calls.append(len(boxes))
        return torchvision_ops.batched_nms(boxes, scores, idxs, iou_threshold)

    original = amg.batched_nms
    monkeypatch.setattr(sam_auto, "fallback_batched_nms", spy)
    image = torch.rand(1, 64, 64, 3)
    settings = sam_auto.SamSettings(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    segments = sam_auto.sam_segments(make_tiny_sam(), image, settings)
    assert calls and amg.batched_nms is original  # the fallback ran, SAM's module name is restored
    assert segments.dtype == torch.bool and segments.shape[1:] == (64, 64)


class _Pickled:
    """An arbitrary object: a pickle torch's weights_only reader refuses (with advice to load unsafely)."""


def test_load_sam_by_file_name_with_safe_readers(tmp_path, monkeypatch):
    import segment_anything
    from realedit.masks import sam_auto
    from realedit.testbed.sam import make_tiny_sam
    from safetensors.torch import save_file

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: make_tiny_sam(seed=5))
    state = make_tiny_sam(seed=1).state_dict()
    torch.save(state, tmp_path / "sam_vit_b_tiny.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "tiny_vit_b.safetensors"))
    for name in ("sam_vit_b_tiny.pth", "tiny_vit_b.safetensors"):
        sam = sam_auto.load_sam(str(tmp_path / name))
        assert all(torch.equal(v, state[k]) for k, v in sam.state_dict().items())
    with pytest.raises(sam_auto.SamCheckpointError, match="vit_h, vit_l, vit_b"):
        sam_auto.load_sam(str(tmp_path / "mystery.pth"))
    (tmp_path / "sam_vit_b_bad.pth").write_bytes(b"not a checkpoint")
    torch.save({"model": _Pickled()}, tmp_path / "sam_vit_b_code.pth")  # weights_only refuses it
    for name in ("sam_vit_b_bad.pth", "sam_vit_b_code.pth"):
        with pytest.raises(sam_auto.SamCheckpointError, match="not a SAM checkpoint, or it is corrupt") as info:
            sam_auto.load_sam(str(tmp_path / name))
        message = str(info.value)
        assert "sam_vit_h_4b8939.pth" in message and "weights_only" not in message  # no unsafe loading advice
    torch.save(make_tiny_sam(seed=1, embed_dim=16).state_dict(), tmp_path / "sam_vit_b_other_size.pth")
    with pytest.raises(sam_auto.SamCheckpointError, match="does not hold vit_b SAM weights"):
        sam_auto.load_sam(str(tmp_path / "sam_vit_b_other_size.pth"))


# ---------------------------------------------------------------- ComfyUI host


@pytest.fixture(scope="module")
def tiny_ip2p(comfy):
    from realedit.testbed.comfy_models import make_tiny_checkpoint

    return make_tiny_checkpoint("ip2p")


def _cond(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 64, generator=g), {}]]


class _Spy:
    """Records q, k and the row kinds of every cross-attention call; declines."""

    def __init__(self) -> None:
        self.calls: list[tuple[AttentionContext, torch.Tensor, torch.Tensor]] = []

    def __deepcopy__(self, memo: dict) -> _Spy:
        return self

    def __call__(self, q, k, v, ctx):
        if ctx.kind == "cross":
            self.calls.append((ctx, q.detach().clone(), k.detach().clone()))
        return None


def test_ip2p_mask_comes_from_the_empty_text_rows_only(tiny_ip2p):
    from realedit.attention.hooks import ChainHook
    from realedit.hosts.comfy_ip2p import ip2p_edit

    model, _, _ = tiny_ip2p
    instruction, empty = _cond(1), _cond(2)
    photo = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    spy, recorder = _Spy(), IP2PMaskRecorder()
    ip2p_edit(model, photo, instruction, empty, steps=3, hook=ChainHook(spy, recorder))
    wanted = [(ctx, q, k) for ctx, q, k in spy.calls if recorder.wants(ctx)]
    assert wanted and len(recorder.recorded) == len(wanted)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for (ctx, q, k), (layer, _step, rows) in zip(wanted, recorder.recorded):
        assert ctx.layer.index == layer and ctx.layer.stage != "mid" and ctx.layer.downscale >= 2
        assert len(ctx.rows) == 3 and tuple(ctx.rows.uncond_rows) == rows and len(rows) == 2
        (cond_row,) = ctx.rows.cond_rows
        # both recorded rows attend to the empty text's keys; the instruction row's keys differ
        assert torch.equal(k[rows[0]], k[rows[1]]) and not torch.allclose(k[rows[0]], k[cond_row])
        probs = attention_probs(q[list(rows)], k[list(rows)], ctx.heads).mean(dim=(0, 1))
        maps = probs[:, [0, -1]].T.reshape(2, *ctx.grid)
        sums[layer] = sums.get(layer, 0) + maps
        counts[layer] = counts.get(layer, 0) + 1
    assert {step for _, step, _ in recorder.recorded} == {0, 1, 2}
    means = [sums[i] / counts[i] for i in sorted(sums)]
    size = recorder.maps()[0].shape
    direct = torch.stack([torch.nn.functional.interpolate(m[None], size=size, mode="bilinear")[0] for m in means])
    first, last = recorder.maps()
    assert torch.allclose(first, direct.mean(0)[0], atol=1e-6) and torch.allclose(last, direct.mean(0)[1], atol=1e-6)


def test_ip2p_guidance_matches_comfyui_dual_cfg(tiny_ip2p):
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    from realedit.hosts.comfy_ip2p import ip2p_edit, with_concat

    model, _, _ = tiny_ip2p
    instruction, empty = _cond(1), _cond(2)
    photo = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ours = ip2p_edit(model, photo, instruction, empty, steps=3, seed=7, hook=IP2PMaskRecorder())
    guider = Guider_DualCFG(model)
    guider.set_conds(with_concat(instruction, photo), with_concat(empty, photo), empty)
    guider.set_cfg(7.5, 1.5)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
    latent = torch.zeros_like(photo)
    theirs = guider.sample(comfy.sample.prepare_noise(latent, 7), latent, comfy.samplers.sampler_object("euler"),
                           sigmas, disable_pbar=True, seed=7)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_non_ip2p_model_is_refused(comfy):
    from realedit.hosts.comfy_ip2p import NotIP2PModelError, ip2p_edit
    from realedit.testbed.comfy_models import make_tiny_unet

    with pytest.raises(NotIP2PModelError, match="8 input channels"):
        ip2p_edit(make_tiny_unet("sd1"), torch.zeros(1, 4, 16, 16), _cond(1), _cond(2), steps=2)


# ---------------------------------------------------------------- fused IP2P + second model (Eq. 5)


@pytest.fixture(scope="module")
def second_ip2p(comfy):
    from realedit.testbed.comfy_models import make_tiny_unet

    return make_tiny_unet("ip2p", seed=11)  # another "finetune": same base, other weights


def _edit_inputs() -> tuple[list, list, torch.Tensor]:
    photo = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    return _cond(1), _cond(2), photo


def _untouched(model) -> tuple:
    """What a node must never change on the user's MODEL."""
    return dict(model.additional_models), dict(model.wrappers), repr(model.model_options)


def test_fusion_off_is_bit_identical_to_the_single_model_edit(tiny_ip2p, second_ip2p):
    from realedit.hosts.comfy_ip2p import ip2p_edit

    model, _, _ = tiny_ip2p
    instruction, empty, photo = _edit_inputs()
    single_rec, zero_rec = IP2PMaskRecorder(), IP2PMaskRecorder()
    single = ip2p_edit(model, photo, instruction, empty, steps=3, seed=7, hook=single_rec)
    beta_zero = ip2p_edit(model, photo, instruction, empty, steps=3, seed=7, hook=zero_rec,
                          second_model=second_ip2p, beta=0.0)
    no_second = ip2p_edit(model, photo, instruction, empty, steps=3, seed=7, beta=0.2)
    assert torch.equal(single, beta_zero) and torch.equal(single, no_second)
    assert all(torch.equal(a, b) for a, b in zip(single_rec.maps(), zero_rec.maps()))


def test_fusion_with_the_same_model_twice_is_the_single_model_edit(tiny_ip2p):
    from realedit.hosts.comfy_ip2p import ip2p_edit

    model, _, _ = tiny_ip2p
    before = _untouched(model)
    instruction, empty, photo = _edit_inputs()
    single_rec, fused_rec = IP2PMaskRecorder(), IP2PMaskRecorder()
    single = ip2p_edit(model, photo, instruction, empty, steps=3, seed=7, hook=single_rec)
    fused = ip2p_edit(model, photo, instruction, empty, steps=3, seed=7, hook=fused_rec, second_model=model,
                      beta=0.2)
    # (z + beta z) / (1 + beta) = z, up to float rounding carried through three steps
    assert not torch.equal(single, fused)  # the second model did run
    assert torch.allclose(fused, single, rtol=1e-5, atol=1e-5 * float(single.abs().max()))
    # M_b is read from the first model only: the second model's calls are not recorded
    assert [(layer, step) for layer, step, _ in fused_rec.recorded] == [
        (layer, step) for layer, step, _ in single_rec.recorded]
    for a, b in zip(single_rec.maps(), fused_rec.maps()):
        assert torch.allclose(a, b, atol=1e-5)
    assert _untouched(model) == before


def _direct_fused_euler(model, second, photo, instruction, empty, steps: int, seed: int, beta: float) -> torch.Tensor:
    """Eq. 5 written out: at every step, ComfyUI's own DualCFG guider of each model takes an Euler step from the
    same z_t, and the two stepped latents are fused. Both guiders are live at once (one nested in the other)."""
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    from realedit.hosts.comfy_ip2p import with_concat

    def dual_cfg(m):
        guider = Guider_DualCFG(m)
        guider.set_conds(with_concat(instruction, photo), with_concat(empty, photo), empty)
        guider.set_cfg(7.5, 1.5)
        return guider

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    latent = torch.zeros_like(photo)
    noise = comfy.sample.prepare_noise(latent, seed)
    out: dict[str, torch.Tensor] = {}

    def first_sampler(first, x, sigmas, extra_args=None, callback=None, disable=None):
        first_args = extra_args

        def second_sampler(second_denoiser, _x, _sigmas, extra_args=None, callback=None, disable=None):
            z = x
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                sigma = s * z.new_ones([z.shape[0]])
                steps_taken = [z + (z - denoise(z, sigma, **args)) / s * (s_next - s)  # Euler
                               for denoise, args in ((first, first_args), (second_denoiser, extra_args))]
                z = (steps_taken[0] + beta * steps_taken[1]) / (1 + beta)  # Eq. 5
            out["z"] = z
            return z

        dual_cfg(second).sample(noise, latent, comfy.samplers.KSAMPLER(second_sampler), sigmas, disable_pbar=True,
                                seed=seed)
        return out["z"]

    with torch.no_grad():
        return dual_cfg(model).sample(noise, latent, comfy.samplers.KSAMPLER(first_sampler), sigmas,
                                      disable_pbar=True, seed=seed)


def test_fusion_is_eq5_on_the_stepped_latents(tiny_ip2p, second_ip2p):
    from realedit.hosts.comfy_ip2p import ip2p_edit

    model, _, _ = tiny_ip2p
    instruction, empty, photo = _edit_inputs()
    fused = ip2p_edit(model, photo, instruction, empty, steps=3, seed=7, second_model=second_ip2p, beta=0.2)
    direct = _direct_fused_euler(model, second_ip2p, photo, instruction, empty, steps=3, seed=7, beta=0.2)
    single = ip2p_edit(model, photo, instruction, empty, steps=3, seed=7)
    scale = float(direct.abs().max())
    assert torch.allclose(fused, direct, rtol=1e-5, atol=1e-5 * scale)
    assert (fused - single).abs().max() > 1e-2 * scale  # the second model's weights matter


def test_a_second_model_that_cannot_be_fused_is_refused(tiny_ip2p):
    import comfy.model_patcher
    import comfy.supported_models
    from realedit.hosts.comfy_ip2p import NotIP2PModelError, ip2p_edit
    from realedit.testbed.comfy_models import TINY_UNET_CONFIGS, make_tiny_unet

    model, _, _ = tiny_ip2p
    before = _untouched(model)
    instruction, empty, photo = _edit_inputs()
    with pytest.raises(NotIP2PModelError, match="'second_model' input is a .* with 4 input channels"):
        ip2p_edit(model, photo, instruction, empty, steps=2, second_model=make_tiny_unet("sd1"), beta=0.2)
    config = comfy.supported_models.SDXL_instructpix2pix(dict(TINY_UNET_CONFIGS["sdxl"], in_channels=8))
    config.unet_config.pop("num_heads", None)
    config.unet_config.update(num_head_channels=16, dtype=torch.float32)
    sdxl_ip2p = comfy.model_patcher.ModelPatcher(config.get_model({}, "", device=torch.device("cpu")),
                                                 load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    with pytest.raises(NotIP2PModelError, match="same base"):
        ip2p_edit(model, photo, instruction, empty, steps=2, second_model=sdxl_ip2p, beta=0.2)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        ip2p_edit(model, photo, instruction, empty, steps=2, second_model=model, beta=-0.5)
    with pytest.raises(ValueError, match="expected \\(1, 4, h, w\\)"):
        ip2p_edit(model, photo[:, :3], instruction, empty, steps=2)
    assert _untouched(model) == before


# ---------------------------------------------------------------- nodes


def test_sam_loader_names_the_folder_and_files_when_empty(comfy, tmp_path, monkeypatch):
    import folder_paths
    from realedit.nodes.zone import SAMLoader

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sams", ([str(tmp_path)], {".pth", ".safetensors"}))
    message = SAMLoader.validate_inputs("sam_vit_h_4b8939.pth")
    assert isinstance(message, str) and str(tmp_path) in message and "sam_vit_b_01ec64.pth" in message
    with pytest.raises(FileNotFoundError, match="found: nothing"):
        SAMLoader.execute("sam_vit_h_4b8939.pth", "cpu")


def test_region_iou_node_with_a_mask_batch(comfy):
    from realedit.nodes.zone import RegionIoURefine

    segments = torch.zeros(3, 32, 32)
    segments[0, :16] = 1
    segments[1, 8:20, 8:20] = 1
    segments[2, 20:, 20:] = 1
    rough = torch.zeros(1, 32, 32)
    rough[0, 9:21, 9:19] = 1
    image = torch.rand(1, 32, 32, 3)
    out = RegionIoURefine.execute(image, image, rough, "error", 32, 0.88, 0.95, 0.7, action="remove",
                                  segments=segments)
    refined, iou, preview = out.result
    assert torch.equal(refined, segments[1:2]) and iou == pytest.approx(110 / 154)
    assert preview.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="connect a SAM model"):
        RegionIoURefine.execute(image, image, rough, "error", 32, 0.88, 0.95, 0.7)
    with pytest.raises(ValueError, match="no segment overlaps|does not overlap|overlap"):
        RegionIoURefine.execute(image, image, rough, "error", 32, 0.88, 0.95, 0.7, segments=segments[2:])


def test_region_iou_node_segments_both_images_for_a_change_when_asked(comfy, monkeypatch):
    """segment 'edited and original (ours)': a 'change' takes the union of both images' choices (the original's
    from 'original_segments', else SAM on the original); 'add' and 'remove' segment one image as in the paper; the
    default is the paper's, bit for bit; without the original's candidates the node says what to connect."""
    from realedit.masks.settings import DEFAULT_SEGMENT, SEGMENT_CHOICES
    from realedit.nodes import zone
    from realedit.nodes.zone import RegionIoURefine

    rough, edited, original, changed = (x.float() for x in reshape_segments())
    image = torch.rand(1, 24, 24, 3)
    both = next(label for label, value in SEGMENT_CHOICES.items() if value)
    run = functools.partial(RegionIoURefine.execute, image, image, rough[None], "error", 32, 0.88, 0.95, 0.7,
                            segments=edited)
    paper = run().result
    assert DEFAULT_SEGMENT == "edited image (paper)"
    for same in (run(segment=DEFAULT_SEGMENT), *(run(action=action, segment=both, original_segments=original)
                                                 for action in ("add", "remove"))):
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(same.result, paper))
    refined, iou, preview = run(action="change", segment=both, original_segments=original).result
    assert torch.equal(refined[0], changed) and 0 < iou < paper[1] and preview.shape == (4, 24, 24)
    segmented = []

    def fake_sam(sam, image, settings):  # SAM's automatic masks of the image it is given
        segmented.append(image)
        return list(original.bool())

    monkeypatch.setattr(zone, "sam_segments", fake_sam)
    with_sam = run(action="change", segment=both, sam=object()).result
    assert len(segmented) == 1 and torch.equal(segmented[0], image[0]) and torch.equal(with_sam[0][0], changed)
    with pytest.raises(ValueError, match="connect them on 'original_segments'"):
        run(segment=both)
    with pytest.raises(ValueError, match="RealEdit Region-IoU: 'segment' is 'both'"):
        run(segment="both")


def test_fft_smooth_node_composite_is_the_original_outside_the_final_mask(comfy):
    from realedit.nodes.zone import FFTEdgeSmooth

    g = torch.Generator().manual_seed(0)
    original = torch.rand(1, 64, 64, 3, generator=g)
    edited = original.clone()
    edited[:, 20:40, 24:44] = torch.rand(1, 20, 20, 3, generator=g)
    refined = torch.zeros(1, 64, 64)
    refined[:, 20:40, 24:44] = 1
    final, image = FFTEdgeSmooth.execute(original, edited, refined, 200.0, 30 / 255, 0.6).result
    outside = final[0] < 0.5
    assert outside.any() and torch.equal(image[0][outside], original[0][outside])
    inside = refined[0] > 0.5
    assert torch.equal(image[0][inside], edited[0][inside])
    with pytest.raises(ValueError, match="decode the edit at the photo's size"):
        FFTEdgeSmooth.execute(original, edited[:, :32], refined, 200.0, 30 / 255, 0.6)


def _ip2p_node(tiny_ip2p, image: torch.Tensor, **kwargs):
    from realedit.nodes.zone import IP2PEditMask

    model, _, vae = tiny_ip2p
    args = dict(model=model, vae=vae, image=image, positive=_cond(1), negative=_cond(2), seed=0, steps=2,
                text_guidance=7.5, image_guidance=1.5, threshold=0.502, sampler_name="euler", scheduler="normal")
    return IP2PEditMask.execute(**{**args, **kwargs}).result


def test_ip2p_node_fuses_by_action_and_refuses_bad_inputs(tiny_ip2p, second_ip2p):
    from realedit.hosts.comfy_ip2p import NotIP2PModelError, ip2p_edit
    from realedit.testbed.comfy_models import make_tiny_unet

    model, _, vae = tiny_ip2p
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    latent = vae.encode(photo[..., :3])
    for action, beta in (("remove", 0.2), ("change", 0.01), ("add", 0.01)):
        edited = _ip2p_node(tiny_ip2p, photo, second_model=second_ip2p, action=action)[0]["samples"]
        direct = ip2p_edit(model, latent, _cond(1), _cond(2), steps=2, second_model=second_ip2p, beta=beta)
        assert torch.equal(edited, direct), action
    overridden = _ip2p_node(tiny_ip2p, photo, second_model=second_ip2p, action="remove", beta=0.5)[0]["samples"]
    assert torch.equal(overridden, ip2p_edit(model, latent, _cond(1), _cond(2), steps=2, second_model=second_ip2p,
                                             beta=0.5))
    alone = _ip2p_node(tiny_ip2p, photo)[0]["samples"]  # no second model, action unconnected
    assert torch.equal(alone, _ip2p_node(tiny_ip2p, photo, second_model=second_ip2p, beta=0.0)[0]["samples"])
    with pytest.raises(NotIP2PModelError, match="'second_model'"):
        _ip2p_node(tiny_ip2p, photo, second_model=make_tiny_unet("sd1"))
    with pytest.raises(NotIP2PModelError, match="'model'"):
        _ip2p_node(tiny_ip2p, photo, model=make_tiny_unet("sd1"))
    with pytest.raises(ValueError, match="'action' input is 'explode'"):
        _ip2p_node(tiny_ip2p, photo, second_model=second_ip2p, action="explode")
    with pytest.raises(ValueError, match="multiples of 8"):
        _ip2p_node(tiny_ip2p, photo[:, :60])


def test_ip2p_node_reads_a_l_at_the_connected_instructions_end_of_text_token(comfy, caplog):
    """With 'instruction' connected, the recorder's A^L key is its EOT as ComfyUI's CLIP tokenizer places it
    (weights syntax parsed away); unconnected, a warning says A^L comes from a padding token."""
    from realedit.nodes.zone import IP2PEditMask, instruction_tokens, mask_recorder

    inputs = {i.id: i for i in IP2PEditMask.define_schema().inputs}
    assert inputs["threshold"].default == 0.21 and "official code" in inputs["threshold"].tooltip  # was 128/255
    assert "0.502" in inputs["threshold"].tooltip  # the paper's T, still reachable
    assert inputs["mask_layers"].default == "1/32 (official code)"

    assert [t for t, _ in instruction_tokens("make his tie blue")] == [1078, 787, 3422, 1746]
    assert mask_recorder("make his tie blue", None).last_token == 5
    assert mask_recorder("make (his tie:1.2) blue", None).last_token == 5
    wide = mask_recorder("make his tie blue", "1/16 and 1/32")
    assert wide.downscales == {2, 4} and mask_recorder("x y", None).downscales == {4}
    assert inputs["mask_rows"].default == "empty text (official code)"
    assert "official code" in inputs["mask_rows"].tooltip
    assert mask_recorder("x y", None).row_kind == "uncond"
    assert mask_recorder("x y", None, "instruction").row_kind == "cond"
    for name, value in (("mask_layers", "1/8"), ("mask_rows", "negative")):
        with pytest.raises(ValueError, match=f"RealEdit IP2P Edit Mask: '{name}' is '{value}'; use one of"):
            mask_recorder("x y", **{"mask_layers": None, name: value})
    with pytest.raises(ValueError, match="has no words"):
        mask_recorder(" !! ", None)
    with caplog.at_level("WARNING", logger="realedit"):
        assert mask_recorder(None, None).last_token == -1
    assert any("not connected" in r.getMessage() for r in caplog.records)


def test_empty_rough_mask_warns_and_the_rough_fallback_keeps_the_photo(tiny_ip2p, caplog):
    from realedit.nodes.zone import FFTEdgeSmooth, RegionIoURefine

    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    edited = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    with caplog.at_level("WARNING", logger="realedit"):
        _, rough, difference = _ip2p_node(tiny_ip2p, photo, threshold=-1.0)  # A^1 - A^L >= -1: nothing passes
    assert not rough.any() and difference.shape == (1, 64, 64)
    assert any("M_b is empty" in r.getMessage() for r in caplog.records)
    segments = torch.zeros(2, 64, 64)
    segments[0, 10:30, 10:30] = 1
    with pytest.raises(ValueError, match="rough mask M_b .* is empty"):
        RegionIoURefine.execute(photo, edited, rough, "error", 32, 0.88, 0.95, 0.7, segments=segments)
    caplog.clear()
    with caplog.at_level("WARNING", logger="realedit"):
        refined, iou, _ = RegionIoURefine.execute(photo, edited, rough, "rough", 32, 0.88, 0.95, 0.7,
                                                  segments=segments).result
    assert not refined.any() and iou == 0.0
    assert any("fallback 'rough'" in r.getMessage() for r in caplog.records)
    final, image = FFTEdgeSmooth.execute(photo, edited, refined, 200.0, 30 / 255, 0.6).result
    assert not final.any() and torch.equal(image, photo)


def test_region_iou_node_checks_sizes_and_action(comfy):
    from realedit.nodes.zone import RegionIoURefine

    image = torch.rand(1, 32, 32, 3)
    rough = torch.ones(1, 32, 32)
    segments = torch.ones(1, 32, 32)
    with pytest.raises(ValueError, match="'original' is \\(32, 32, 3\\) but 'edited' is \\(16, 32, 3\\)"):
        RegionIoURefine.execute(image, image[:, :16], rough, "error", 32, 0.88, 0.95, 0.7, segments=segments)
    with pytest.raises(ValueError, match="'action' input is 'erase'"):
        RegionIoURefine.execute(image, image, rough, "error", 32, 0.88, 0.95, 0.7, action="erase", segments=segments)


def test_instruction_action_node(comfy):
    from realedit.nodes.zone import InstructionAction

    assert InstructionAction.execute("remove the cup", "auto").result == ("remove",)
    assert InstructionAction.execute("remove the cup", "add").result == ("add",)
    with pytest.raises(ValueError, match="has no words"):  # used to run silently as 'change'
        InstructionAction.execute(" ?! ", "auto")


# ---------------------------------------------------------------- workflow


def test_zone_workflow_runs_with_tiny_ip2p_and_tiny_sam(comfy, tmp_path):
    from realedit.testbed import comfy_runner
    from realedit.testbed.sam import make_tiny_sam

    workflow = json.loads((ROOT / "api_workflows" / "zone_instruction_edit.json").read_text())
    ids = {node["class_type"]: key for key, node in workflow.items()}
    workflow[ids["RealEditIP2PEditMask"]]["inputs"]["steps"] = 2
    refine = workflow[ids["RealEditRegionIoURefine"]]["inputs"]
    refine.update(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, fallback="rough")
    photo = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0))
    overrides = {ids["LoadImage"]: (photo, torch.zeros(1, 128, 128)), ids["RealEditSAMLoader"]: (make_tiny_sam(),)}
    smooth = ids["RealEditFFTEdgeSmooth"]
    result = comfy_runner.run_workflow(workflow, outputs=[smooth, ids["RealEditIP2PEditMask"]],
                                       overrides=overrides, tiny_checkpoint="ip2p", output_dir=tmp_path)
    final, image = result[smooth]
    assert image.shape == photo.shape and final.shape == (1, 128, 128)
    outside = final[0] < 0.5
    assert torch.equal(image[0][outside], photo[0][outside])
    assert result[ids["RealEditIP2PEditMask"]][1].shape == (1, 128, 128)
    assert len(list(tmp_path.rglob("*.png"))) >= 4
    # the same graph with a second IP2P loader on 'second_model' (the tiny loaders share their weights, so the
    # fused edit is the single one up to rounding): the fusion runs under ComfyUI's executor and model management
    edit = ids["RealEditIP2PEditMask"]
    fused_graph = {**workflow, "99": {"class_type": "CheckpointLoaderSimple",
                                      "inputs": {"ckpt_name": "magicbrush-jul7.safetensors"}}}
    fused_graph[edit] = {**workflow[edit], "inputs": {**workflow[edit]["inputs"], "second_model": ["99", 0]}}
    fused = comfy_runner.run_workflow(fused_graph, outputs=[edit], overrides=overrides, tiny_checkpoint="ip2p",
                                      output_dir=tmp_path)[edit][0]["samples"]
    single = result[edit][0]["samples"]
    assert not torch.equal(fused, single)
    assert torch.allclose(fused, single, rtol=1e-5, atol=1e-5 * float(single.abs().max()))


@pytest.mark.parametrize("name", ["zone_instruction_edit", "zone_multi_turn"])
def test_each_instruction_is_typed_once(comfy, name):
    from realedit.testbed.comfy_runner import load_comfy_nodes, load_pack
    from realedit.testbed.workflow_format import ui_to_api

    import nodes

    load_comfy_nodes()
    load_pack()
    workflow = json.loads((ROOT / "api_workflows" / f"{name}.json").read_text())
    texts = {key: node for key, node in workflow.items() if node["class_type"] == "PrimitiveStringMultiline"}
    users = {key: [(n["class_type"], field) for n in workflow.values() for field, value in n["inputs"].items()
                   if value == [key, 0]] for key in texts}
    assert texts and all(sorted(u) == [("CLIPTextEncode", "text"), ("RealEditIP2PEditMask", "instruction"),
                                       ("RealEditInstructionAction", "instruction")] for u in users.values())
    for node in workflow.values():  # no other node holds an instruction of its own
        if node["class_type"] in ("RealEditInstructionAction", "CLIPTextEncode"):
            field = "instruction" if node["class_type"] == "RealEditInstructionAction" else "text"
            assert isinstance(node["inputs"][field], list) or node["inputs"][field] == ""
    ui = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
    assert ui_to_api(ui, nodes.NODE_CLASS_MAPPINGS) == workflow  # the UI file links the widget inputs too
    linked_widgets = [i for n in ui["nodes"] for i in n["inputs"] if "widget" in i]
    assert len(linked_widgets) == 2 * len(texts) and all(i["link"] is not None for i in linked_widgets)


def test_multi_turn_workflow_keeps_every_pixel_outside_both_final_masks(comfy, tmp_path):
    from realedit.testbed import comfy_runner
    from realedit.testbed.demo_inputs import tiny_run

    workflow, overrides, family = tiny_run(
        json.loads((ROOT / "api_workflows" / "zone_multi_turn.json").read_text()), size=128, steps=2)
    smooth = [key for key, node in workflow.items() if node["class_type"] == "RealEditFFTEdgeSmooth"]
    first, second = sorted(smooth, key=int)
    assert workflow[second]["inputs"]["original"] == [first, 1]  # turn 2 edits turn 1's composite
    (photo_node,) = [key for key, node in workflow.items() if node["class_type"] == "LoadImage"]
    result = comfy_runner.run_workflow(workflow, outputs=[first, second], overrides=overrides,
                                       tiny_checkpoint=family, output_dir=tmp_path)
    photo = overrides[photo_node][0][0]
    (mask_1, turn_1), (mask_2, turn_2) = result[first], result[second]
    outside_1, outside_2 = mask_1[0] < 0.5, mask_2[0] < 0.5
    outside = outside_1 & outside_2
    assert outside.any() and (~outside_1).any() and (~outside_2).any()  # both turns edited a part of the image
    assert torch.equal(turn_1[0][outside_1], photo[outside_1])
    assert torch.equal(turn_2[0][outside_2], turn_1[0][outside_2])
    assert torch.equal(turn_2[0][outside], photo[outside])
    assert not torch.equal(turn_2[0], photo)
    saved = {p.name.rsplit("_", 2)[0] for p in tmp_path.rglob("*.png")}
    assert {"realedit_zone_turn1", "realedit_zone_turn2", "realedit_zone_turn2_final_mask"} <= saved

"""StyleDiffusion on the ComfyUI host: the value patch, value-embedding inversion on a clone, P2Plus editing,
and bad input (tiny random SD1 UNet)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from realedit.attention.p2p import Replace
from realedit.attention.settings import P2PSettings, SpecRefSettings
from realedit.attention.specref import SpecRefControls
from realedit.attention.stylediffusion import LiveValue, P2PlusControls, StyleDiffusionError
from realedit.inversion.ddim import Inversion

STEPS, ITERATIONS = 3, 3


@pytest.fixture(scope="module")
def setup(comfy):
    import comfy_helpers
    from realedit.hosts.comfy_stylediffusion import value_invert
    from realedit.testbed.comfy_models import make_tiny_unet

    model = make_tiny_unet("sd1", output_scale=0.01)
    source, negative = comfy_helpers.conditioning("sd1", 1), comfy_helpers.conditioning("sd1", 2)
    target = comfy_helpers.conditioning("sd1", 3)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():  # as ComfyUI runs nodes
        inversion = value_invert(model, latent, source, negative, steps=STEPS, max_iterations=ITERATIONS)
    return model, inversion, source, target, negative, latent


def _sample(model, seed: int = 0) -> torch.Tensor:
    import comfy_helpers

    return comfy_helpers.sample(model, steps=3, seed=seed)


# -- the value patch -----------------------------------------------------------------------------------------
def test_identity_value_input_samples_bit_for_bit(setup):
    """A = 1, B = 0 on every conditional row: KSampler's output is the unpatched output, bit for bit."""
    import comfy_helpers
    from realedit.hosts.comfy import install_value_schedule

    model = setup[0]
    cond = comfy_helpers.conditioning("sd1", 1)[0][0]
    live = LiveValue()
    live.value = cond * torch.ones_like(cond) + torch.zeros_like(cond)
    assert torch.equal(_sample(install_value_schedule(model, live)), _sample(model))


class _Probe:
    """Records k, v and the rows of every cross-attention call (declines)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, tuple]] = []

    def __call__(self, q, k, v, ctx):
        if ctx.kind == "cross":
            probs = (q @ k.transpose(-1, -2)).softmax(-1)  # one-head stand-in: depends on q and k only
            self.calls.append((ctx.layer.index, k.clone(), v.clone(), probs, ctx.rows.kind))
        return None


def test_the_value_reaches_every_cross_attention_call_of_the_cond_rows_only(setup):
    """Keys never change; unconditional rows never change; every conditional cross-attention call gets the new
    value; the first layer's cross map does not depend on it (its queries precede every value)."""
    from realedit.hosts.comfy import install_hook, install_value_schedule

    model = setup[0]
    plain, patched = _Probe(), _Probe()
    live = LiveValue()
    live.value = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(9))
    _sample(install_hook(model, plain, self_attention=False))
    _sample(install_value_schedule(install_hook(model, patched, self_attention=False), live))
    assert len(plain.calls) == len(patched.calls) == 3 * 16  # 3 steps, one batched CFG call each, 16 layers
    for call, ((layer, k0, v0, p0, kinds), (_, k1, v1, p1, _)) in enumerate(zip(plain.calls, patched.calls)):
        cond = [i for i, kind in enumerate(kinds) if kind == "cond"]
        uncond = [i for i, kind in enumerate(kinds) if kind == "uncond"]
        assert cond and uncond
        assert torch.equal(k0, k1) and torch.equal(v0[uncond], v1[uncond])
        assert not torch.allclose(v0[cond], v1[cond])
        if call == 0:  # layer 0 of the first step: nothing before it saw a value
            assert layer == 0 and torch.equal(p0, p1)


def test_the_value_patch_keeps_another_packs_value_on_rows_it_does_not_name(setup):
    from realedit.hosts.comfy import install_value_schedule

    model = setup[0]
    seen: list[tuple] = []

    def other_pack(n, context, value, extra_options):
        seen.append(extra_options["cond_or_uncond"])
        return n, context, value * 0.5  # another pack's value edit, on every row

    live = LiveValue()
    stacked = model.clone()
    stacked.set_model_attn2_patch(other_pack)
    stacked = install_value_schedule(stacked, live)
    assert seen == [] and torch.equal(_sample(stacked), _sample(_with(model, other_pack)))  # live.value None: no-op
    assert seen


def _with(model, patch):
    clone = model.clone()
    clone.set_model_attn2_patch(patch)
    return clone


# -- inversion --------------------------------------------------------------------------------------------
def test_inversion_learns_per_step_values_and_reports_every_step(setup):
    _, inversion, source, *_ = setup
    assert inversion.steps == STEPS and len(inversion.scales) == len(inversion.shifts) == STEPS
    assert inversion.parameterisation == "direct"
    assert all(1 <= n <= ITERATIONS for n in inversion.iterations)
    assert all(a > 0 for step in inversion.attention_losses for a in step)
    assert not torch.equal(inversion.scales[0], torch.ones_like(inversion.scales[0]))
    assert torch.equal(inversion.source_embedding, source[0][0].float())
    assert not any(t.requires_grad for t in (*inversion.scales, *inversion.shifts))
    assert inversion.report().splitlines()[1].startswith("step 0:")


def test_inversion_leaves_the_model_unchanged_and_sampling_bit_identical(setup):
    from realedit.hosts.comfy_stylediffusion import value_invert

    model, _, source, _, negative, latent = setup
    before = _sample(model)
    options = copy.deepcopy(model.model_options)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    uuid, wrappers = model.patches_uuid, dict(model.weight_wrapper_patches)
    with torch.inference_mode():
        value_invert(model, latent, source, negative, steps=2, max_iterations=2)
    assert model.model_options == options and model.patches_uuid == uuid
    assert model.weight_wrapper_patches == wrappers
    assert all(torch.equal(weights[k], v) for k, v in model.model.state_dict().items())
    assert all(p.grad is None for p in model.model.parameters())  # gradients reached only A_s, B_s
    assert torch.equal(_sample(model), before)


def test_a_cancelled_inversion_leaves_nothing_patched(setup):
    from realedit.hosts.comfy_stylediffusion import value_invert

    model, _, source, _, negative, latent = setup
    before, options = _sample(model), copy.deepcopy(model.model_options)

    def cancel(step, iteration, loss):
        if step == 1:
            raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        value_invert(model, latent, source, negative, steps=STEPS, max_iterations=2, callback=cancel)
    assert model.model_options == options and torch.equal(_sample(model), before)


def test_clip_parameterisation_learns_through_the_mapping_network(setup):
    from realedit.hosts.comfy_stylediffusion import value_invert

    model, _, source, _, negative, latent = setup
    features = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(4))
    inversion = value_invert(model, latent, source, negative, steps=2, max_iterations=2, features=features)
    again = value_invert(model, latent, source, negative, steps=2, max_iterations=2, features=features)
    assert inversion.parameterisation == "clip"
    assert inversion.losses == again.losses  # seeded init: a re-run repeats itself
    with pytest.raises(StyleDiffusionError, match="32 wide.*64 wide"):
        value_invert(model, latent, source, negative, steps=2, max_iterations=1, features=torch.zeros(1, 10, 32))


# -- P2Plus editing -------------------------------------------------------------------------------------------
def _edit(setup, target=None, **controls):
    from realedit.hosts.comfy_stylediffusion import stylediffusion_edit

    model, inversion, source, tgt, negative, _ = setup
    return stylediffusion_edit(model, inversion, source, target or tgt, negative, controls=P2PlusControls(**controls))


def test_target_equal_to_source_with_tau_v_one_reproduces_the_reconstruction(setup):
    model, inversion, source, *_ = setup
    result = _edit(setup, target=source, tau_v=1.0, tau_c=0.0, tau_s=0.0)
    reconstruction = model.model.process_latent_in(result.reconstruction)
    assert torch.allclose(reconstruction, inversion.reconstruction, rtol=1e-4, atol=1e-5)
    assert torch.allclose(result.latent, result.reconstruction, rtol=1e-4, atol=1e-5)


def test_tau_u_zero_and_values_off_is_plain_p2p(setup):
    """P2Plus without its two additions is the SpecRef sampler's P2P (pinned source row), bit for bit."""
    from realedit.hosts.comfy_edit import specref_edit

    model, inversion, source, target, negative, _ = setup
    replace = Replace(torch.eye(77))
    ours = _edit(setup, tau_u=0.0, use_values=False, pin_source=True, cross_edit=replace)
    plain = Inversion(inversion.trajectory, inversion.sigmas, inversion.convention, inversion.fingerprint)
    p2p = SpecRefSettings(p2p=P2PSettings(cross_replace=0.6, self_replace=0.6))
    theirs = specref_edit(model, plain, source, target, negative, controls=SpecRefControls(settings=p2p,
                                                                                            cross_edit=replace))
    assert torch.equal(ours.latent, theirs.latent) and torch.equal(ours.reconstruction, theirs.reconstruction)


def test_the_learned_values_and_tau_u_change_the_edit_and_the_model_stays_unpatched(setup):
    model = setup[0]
    options = copy.deepcopy(model.model_options)
    base = _edit(setup)
    assert not torch.allclose(base.latent, _edit(setup, use_values=False).latent, atol=1e-4)
    assert not torch.allclose(base.latent, _edit(setup, tau_u=1.0).latent, atol=1e-5)
    assert torch.equal(base.reconstruction, _edit(setup, tau_u=1.0).reconstruction)  # tau_u: target rows only
    pinned = _edit(setup, pin_source=True)
    assert torch.equal(model.model.process_latent_in(pinned.reconstruction), setup[1].trajectory[0])
    assert model.model_options == options


# -- bad input ---------------------------------------------------------------------------------------------------
def test_inversions_of_another_kind_model_or_prompt_length_are_refused_by_name(setup):
    from realedit.hosts.comfy_autograd import null_text_invert, ttis_invert
    from realedit.hosts.comfy_baret import baret_edit
    from realedit.hosts.comfy_edit import specref_edit
    from realedit.hosts.comfy_stylediffusion import stylediffusion_edit, value_invert
    from realedit.testbed.comfy_models import make_tiny_unet

    model, inversion, source, target, negative, latent = setup
    ttis = ttis_invert(model, latent, target, negative, steps=2, iterations=1)
    null = null_text_invert(model, latent, source, negative, steps=2, iterations=1)
    with pytest.raises(StyleDiffusionError, match="Target-Text Inversion"):
        stylediffusion_edit(model, ttis, source, target, negative)
    with pytest.raises(StyleDiffusionError, match="Null-Text Inversion"):
        stylediffusion_edit(model, null, source, target, negative)
    with pytest.raises(ValueError, match="StyleDiffusion Edit Sampler"):
        specref_edit(model, inversion, source, target, negative)
    with pytest.raises(ValueError, match="StyleDiffusion Edit Sampler"):
        baret_edit(model, inversion, target, negative)
    with pytest.raises(ValueError, match="different model"):
        stylediffusion_edit(make_tiny_unet("sd1", seed=7, output_scale=0.01), inversion, source, target, negative)
    long = [[torch.zeros(1, 154, 64), {}]]
    with pytest.raises(StyleDiffusionError, match="154 tokens"):
        stylediffusion_edit(model, inversion, source, long, negative)
    with pytest.raises(StyleDiffusionError, match="154 tokens"):
        value_invert(model, latent, long, negative, steps=2)


def _tiny_clip_vision(tmp_path, projection: int | None):
    import comfy.clip_vision
    from realedit.testbed.weights import randomise

    config = {"hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 28, "intermediate_size": 64,
              "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
              "num_hidden_layers": 2, "patch_size": 14}
    if projection is not None:
        config["projection_dim"] = projection
    path = tmp_path / f"vision_{projection}.json"
    path.write_text(json.dumps(config))
    vision = comfy.clip_vision.ClipVisionModel(str(path))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        randomise(vision.model)
    return vision


def test_clip_vision_features_need_the_text_width_or_a_projection_to_it(setup, tmp_path):
    from realedit.hosts.comfy_stylediffusion import image_features

    image = torch.rand(1, 32, 32, 3)
    features = image_features(_tiny_clip_vision(tmp_path, 64), image, 64)
    assert features.shape == (1, 5, 64)  # 2x2 patches + class token, projected 32 -> 64
    with pytest.raises(StyleDiffusionError, match="32 wide \\(projection: 48\\).*64 wide"):
        image_features(_tiny_clip_vision(tmp_path, 48), image, 64)
    with pytest.raises(StyleDiffusionError, match="32 wide \\(projection: none\\).*64 wide"):
        image_features(_tiny_clip_vision(tmp_path, None), image, 64)


def test_only_the_five_16x16_class_cross_attention_layers_count(setup):
    """SD1.x's maps at latent / 4: input 7-8 and output 3-5 (sd:731-733), found by resolution."""
    from realedit.attention.stylediffusion import CrossMapRecorder
    from realedit.hosts.comfy import discover_layers, install_hook

    model = setup[0]
    recorder = CrossMapRecorder()
    recorder.active = True
    _sample(install_hook(model, recorder, self_attention=False))
    maps = recorder.take()
    keys = {layer.index: layer.host_key[:2] for layer in discover_layers(model)}
    assert sorted(keys[i] for i in maps) == [("input", 7), ("input", 8), ("output", 3), ("output", 4), ("output", 5)]
    assert all(m.shape == (1, 8, 4 * 4, 77) for m in maps.values())  # cond row, 8 heads, 4x4 at 16x16 latent


def test_an_identity_inversion_edits_exactly_as_without_value_inputs(setup):
    """A = 1, B = 0 at every step: the P2Plus edit with its value patch is the edit without it, bit for bit."""
    import dataclasses

    from realedit.hosts.comfy_stylediffusion import stylediffusion_edit

    model, inversion, source, target, negative, _ = setup
    identity = dataclasses.replace(inversion, scales=tuple(torch.ones_like(a) for a in inversion.scales),
                                   shifts=tuple(torch.zeros_like(b) for b in inversion.shifts))
    with_values = stylediffusion_edit(model, identity, source, target, negative, controls=P2PlusControls(tau_v=1.0))
    without = stylediffusion_edit(model, identity, source, target, negative, controls=P2PlusControls(use_values=False))
    assert torch.equal(with_values.latent, without.latent)
    assert torch.equal(with_values.reconstruction, without.reconstruction)

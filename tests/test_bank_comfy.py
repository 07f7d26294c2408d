"""The reference feature bank (SpecRef stage 1) on the ComfyUI host."""

from __future__ import annotations

import copy

import pytest
import torch
from realedit.inversion.bank import BankSettings, LayerWindow, StepWindow

pytestmark = pytest.mark.comfy
STEPS = 10  # ddim_uniform gives exactly this many steps (it adds one for some counts, e.g. 6 or 7)


@pytest.fixture(scope="module")
def env(comfy):
    import comfy_helpers
    from realedit.hosts import comfy as host
    from realedit.hosts import comfy_sampling
    from realedit.testbed.comfy_models import make_tiny_unet

    return comfy_sampling, host, make_tiny_unet("sd1"), comfy_helpers


def _latent() -> torch.Tensor:
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))


def _features(env, **settings):
    sampling, _, model, helpers = env
    cond = helpers.conditioning("sd1", 1)
    return sampling.reference_features(model, _latent(), cond, BankSettings(**settings), steps=STEPS)


def test_default_window_is_the_decoder_two_finest_resolutions(env):
    sampling, host, model, _ = env
    assert LayerWindow().select(host.discover_layers(model)) == [10, 11, 12, 13, 14, 15]
    assert list(StepWindow().select(50)) == list(range(4, 50))


def test_bank_holds_exactly_the_configured_layers_steps_dtype_and_device(env):
    features = _features(env, steps=StepWindow(0.2, 1.0), dtype=torch.bfloat16, device=torch.device("cpu"))
    bank = features.bank
    assert set(bank.entries) == {(layer, s) for layer in range(10, 16) for s in range(2, STEPS)}
    for k, v in bank.entries.values():
        assert k.dtype == v.dtype == torch.bfloat16 and k.device.type == "cpu"
        assert k.shape[-1] == v.shape[-1] and k.ndim == 2
    assert bank.nbytes == sum(k.numel() * 2 * 2 for k, _ in bank.entries.values())
    assert "MiB" in features.describe()


def _capture_kv(env, x_in: torch.Tensor, sigma: float, cond: torch.Tensor) -> dict[int, tuple]:
    """Run the UNet once at (x_in, sigma) and capture every self-attention's K and V."""
    _, host, model, _ = env
    seen: dict[int, tuple] = {}

    def hook(q, k, v, ctx):
        if ctx.kind == "self":
            seen[ctx.layer.index] = (k[0].clone(), v[0].clone())

    patched = host.install_hook(model, hook, cross_attention=False)
    with torch.no_grad():
        patched.model.apply_model(x_in, torch.tensor([sigma]), c_crossattn=cond,
                                  transformer_options=patched.model_options["transformer_options"])
    return seen


@pytest.mark.parametrize("convention", ["next", "current"])
def test_edit_step_reads_what_was_saved_at_its_own_timestep_and_live_matches(env, convention):
    sampling, _, model, helpers = env
    cond = helpers.conditioning("sd1", 1)
    settings = BankSettings(dtype=torch.float32, steps=StepWindow(0.0, 1.0))
    features = sampling.reference_features(model, _latent(), cond, settings, steps=STEPS, convention=convention)
    sampling_sigmas = sampling.sampling_sigmas(model, "ddim_uniform", STEPS)
    first = 0 if convention == "next" else 1  # "current" never evaluates sigma_max
    assert {s for _, s in features.bank.entries} == set(range(first, STEPS))
    for s in range(first, STEPS):
        x_in, sigma = features.inversion.pinned_model_input(s)
        assert sigma == pytest.approx(float(sampling_sigmas[s]), rel=1e-6)  # the edit step's timestep
        live = _capture_kv(env, x_in, sigma, cond[0][0])  # what live mode computes at step s
        for layer in range(10, 16):
            k, v = features.bank.get(layer, s)
            torch.testing.assert_close(live[layer][0], k, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(live[layer][1], v, rtol=1e-5, atol=1e-6)


def test_empty_step_window_stores_nothing_and_live_mode_stores_no_bank(env):
    assert _features(env, steps=StepWindow(0.5, 0.5)).bank.entries == {}
    live = _features(env, mode="live")
    assert live.bank is None and len(live.inversion.trajectory) == STEPS + 1
    assert "live" in live.describe()


def test_window_selecting_no_layer_is_refused(env):
    with pytest.raises(ValueError, match="selects no attention layer"):
        _features(env, layers=LayerWindow(finest=0))


def test_weight_patched_model_is_inverted_with_its_patch_and_left_unpatched(env):
    sampling, host, model, helpers = env
    lora_like = model.clone()
    key = "diffusion_model.out.2.weight"
    weight = model.model.state_dict()[key]
    lora_like.add_patches({key: (torch.randn_like(weight) * 0.5,)}, strength_patch=1.0)
    before = copy.deepcopy(lora_like.model_options)
    cond = helpers.conditioning("sd1", 1)
    with torch.inference_mode():
        patched = sampling.ddim_invert(lora_like, _latent(), cond, steps=3).z_T
        plain = sampling.ddim_invert(model, _latent(), cond, steps=3).z_T
    assert not torch.allclose(patched, plain)  # the weight patch took part
    assert torch.equal(model.model.state_dict()[key], weight)  # and was removed afterwards
    assert lora_like.model_options == before
    assert sampling.model_fingerprint(lora_like) != sampling.model_fingerprint(model)


def test_window_of_a_stage_without_layers_at_those_resolutions_is_refused(env):
    sampling, _, model, helpers = env
    with pytest.raises(ValueError, match="selects no attention layer.*stage 'up'"):
        _features(env, layers=LayerWindow(stage="mid", finest=1))  # the middle block is not at the finest level


def test_reference_bad_inputs_name_the_input(env):
    sampling, _, model, helpers = env
    cond = helpers.conditioning("sd1", 1)
    with pytest.raises(ValueError, match="steps must be at least 2"):
        sampling.reference_features(model, _latent(), cond, steps=1)
    with pytest.raises(ValueError, match="reference LATENT has 16 channels but the MODEL expects 4"):
        sampling.reference_features(model, torch.zeros(1, 16, 16, 16), cond, steps=3)
    bad = _latent()
    bad[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="reference LATENT contains NaN or inf"):
        sampling.reference_features(model, bad, cond, steps=3)


# -- what REF_FEATURES carry, and refusing mismatched ones ---------------------------------------------------


def test_ref_features_carry_size_fingerprint_and_steps(env):
    sampling, _, model, helpers = env
    latent = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(2))
    for mode in ("stored", "live"):
        features = sampling.reference_features(model, latent, helpers.conditioning("sd1", 1),
                                               BankSettings(mode=mode), steps=STEPS)
        assert features.latent_shape == (1, 4, 16, 24)
        assert features.total_steps == STEPS == features.inversion.steps
        assert features.fingerprint == sampling.model_fingerprint(model)
        assert torch.equal(features.sigmas, features.inversion.sigmas)
        assert "16x24" in features.describe() and f"{STEPS} steps" in features.describe()
    assert features.nbytes == sum(t.numel() * 4 for t in features.inversion.trajectory)  # live: the latents


def test_ref_features_from_another_model_steps_schedule_or_size_are_refused(env):
    sampling, _, model, helpers = env
    cond = helpers.conditioning("sd1", 1)
    stored = _features(env)
    live = _features(env, mode="live")
    fingerprint = sampling.model_fingerprint(model)
    source = sampling.ddim_invert(model, _latent(), cond, steps=STEPS)
    for features in (stored, live):
        features.check_compatible(fingerprint, STEPS, source=source)  # the matching case passes
        with pytest.raises(ValueError, match=f"REF_FEATURES was made with {STEPS} steps but this node uses 12"):
            features.check_compatible(fingerprint, 12)
        lora_like = model.clone()
        key = "diffusion_model.out.2.weight"
        lora_like.add_patches({key: (torch.zeros_like(model.model.state_dict()[key]),)})
        with pytest.raises(ValueError, match="REF_FEATURES was made with a different model"):
            features.check_compatible(sampling.model_fingerprint(lora_like), STEPS)
        other_steps = sampling.ddim_invert(model, _latent(), cond, steps=STEPS // 2)
        with pytest.raises(ValueError, match=f"but the source INVERSION with {STEPS // 2}"):
            features.check_compatible(fingerprint, STEPS, source=other_steps)
        other_schedule = sampling.ddim_invert(model, _latent(), cond, steps=STEPS, scheduler="normal")
        with pytest.raises(ValueError, match="different schedules"):
            features.check_compatible(fingerprint, STEPS, source=other_schedule)
    bigger = sampling.ddim_invert(model, torch.randn(1, 4, 16, 24), cond, steps=STEPS)
    stored.check_compatible(fingerprint, STEPS, source=bigger)  # stored K/V work for a source of another size
    with pytest.raises(ValueError, match="live REF_FEATURES need a reference latent of the source's size.*16x24"):
        live.check_compatible(fingerprint, STEPS, source=bigger)


# -- source and reference in one batch ---------------------------------------------------------------------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


BATCH_TOLERANCE = 1e-5  # relative, per latent and per K/V entry (float rounding of batched kernels)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_batched_source_and_reference_equal_separate_inversions(env, family):
    """One batch of two (row 0 source, row 1 reference) == two runs: trajectories and bank, and the bank
    holds the reference row only. Prompts of different token counts share the batch (repeated to 154)."""
    sampling, _, _, helpers = env
    from realedit.testbed.comfy_models import make_tiny_unet

    model = make_tiny_unet(family, seed=3, output_scale=0.01)  # smooth: rounding is not amplified
    source, reference = _latent(), torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    source_cond = helpers.conditioning(family, 1)
    reference_cond = helpers.conditioning(family, 2, tokens=154)
    settings = BankSettings(dtype=torch.float32, device=torch.device("cpu"), steps=StepWindow(0.0, 1.0))
    calls = []
    with torch.inference_mode():
        pair = sampling.invert_source_and_reference(model, source, source_cond, reference, reference_cond, settings,
                                                    steps=STEPS, callback=lambda i, x: calls.append(x.shape[0]))
        alone = sampling.ddim_invert(model, source, source_cond, steps=STEPS)
        ref_alone = sampling.reference_features(model, reference, reference_cond, settings, steps=STEPS)
        source_kv = sampling.reference_features(model, source, source_cond, settings, steps=STEPS).bank
    assert pair.batched and pair.note == ""
    assert calls == [2] * STEPS  # one batch of two per step
    for ours, theirs in ((pair.source, alone), (pair.reference.inversion, ref_alone.inversion)):
        assert ours.latent_shape == (1, 4, 16, 16) and ours.steps == STEPS
        assert ours.fingerprint == theirs.fingerprint and torch.equal(ours.sigmas, theirs.sigmas)
        for a, b in zip(ours.trajectory, theirs.trajectory):
            assert _rel(a, b) < BATCH_TOLERANCE
    bank, expected = pair.reference.bank, ref_alone.bank
    assert set(bank.entries) == set(expected.entries) and bank.entries
    for key, (k, v) in bank.entries.items():
        assert _rel(k, expected.entries[key][0]) < BATCH_TOLERANCE
        assert _rel(v, expected.entries[key][1]) < BATCH_TOLERANCE
        assert _rel(k, source_kv.entries[key][0]) > 0.01  # not the source row's K
    assert pair.reference.conditioning is reference_cond and pair.reference.total_steps == STEPS


def test_batched_live_mode_keeps_the_reference_trajectory_only(env):
    sampling, _, model, helpers = env
    source, reference = _latent(), torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    cond = helpers.conditioning("sd1", 1)
    with torch.inference_mode():
        pair = sampling.invert_source_and_reference(model, source, cond, reference, cond, BankSettings(mode="live"),
                                                    steps=STEPS)
    assert pair.batched and pair.reference.bank is None and pair.reference.mode == "live"
    assert torch.equal(pair.reference.inversion.trajectory[0], model.model.process_latent_in(reference))
    assert torch.equal(pair.source.trajectory[0], model.model.process_latent_in(source))
    pair.reference.check_compatible(sampling.model_fingerprint(model), STEPS, source=pair.source)


def test_unbatchable_pairs_are_inverted_separately_with_the_reason(env):
    sampling, _, model, helpers = env
    cond = helpers.conditioning("sd1", 1)
    source, wide = _latent(), torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(9))
    steps_seen = []
    pair = sampling.invert_source_and_reference(model, source, cond, wide, cond, steps=STEPS,
                                                callback=lambda i, x: steps_seen.append(i))
    assert not pair.batched and "(16, 16)" in pair.note and "(16, 24)" in pair.note
    assert steps_seen == list(range(2 * STEPS))  # one progress count over both runs
    assert pair.reference.latent_shape == (1, 4, 16, 24) and pair.source.latent_shape == (1, 4, 16, 16)
    controlled = [[cond[0][0], {"control": object()}]]
    assert "different options" in sampling.batch_obstacle(source, source, cond, controlled)
    combined = cond + helpers.conditioning("sd1", 2)
    assert "holds 2 entries" in sampling.batch_obstacle(source, source, combined, cond)
    assert sampling.batch_obstacle(source, source, cond, helpers.conditioning("sd1", 2, tokens=154)) is None
    off = sampling.invert_source_and_reference(model, source, cond, source, cond, steps=3, batched=False)
    assert not off.batched and "batching is off" in off.note


def test_pair_bad_inputs_name_the_input(env):
    sampling, _, model, helpers = env
    cond = helpers.conditioning("sd1", 1)
    bad = _latent()
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="reference LATENT contains NaN"):
        sampling.invert_source_and_reference(model, _latent(), cond, bad, cond, steps=3)
    with pytest.raises(ValueError, match="source LATENT has 8 channels"):
        sampling.invert_source_and_reference(model, torch.zeros(1, 8, 16, 16), cond, _latent(), cond, steps=3)
    with pytest.raises(ValueError, match="steps must be at least 2"):
        sampling.invert_source_and_reference(model, _latent(), cond, _latent(), cond, steps=1)


def test_current_convention_has_no_kv_at_sigma_max_but_pins_every_edit_step(env):
    """Under 'current' no inversion call used sigma_max: no window includes edit step 0 (stored or live),
    and the live reference row still has an input at every edit step (z_T at sigma_max for step 0)."""
    sampling, _, model, helpers = env
    cond = helpers.conditioning("sd1", 1)
    window = BankSettings(steps=StepWindow(0.0, 1.0))
    for mode in ("stored", "live"):
        features = sampling.reference_features(model, _latent(), cond, BankSettings(mode=mode, steps=window.steps),
                                               steps=STEPS, convention="current")
        assert features.steps == range(1, STEPS)
    inversion = features.inversion
    x_in, sigma = inversion.pinned_model_input(0)
    assert torch.equal(x_in, inversion.z_T) and sigma == float(inversion.sigmas[-1])
    assert all(inversion.pinned_model_input(s)[0].shape == x_in.shape for s in range(STEPS))
    with pytest.raises(ValueError, match="outside the 10 steps"):
        inversion.pinned_model_input(STEPS)
    nxt = sampling.reference_features(model, _latent(), cond, window, steps=STEPS, convention="next")
    assert nxt.steps == range(0, STEPS) and nxt.bank.steps == range(0, STEPS)


def test_ref_features_with_another_channel_count_are_refused(env):
    sampling, _, model, helpers = env
    features = _features(env)
    other = sampling.ddim_invert(model, _latent(), helpers.conditioning("sd1", 1), steps=STEPS)
    from dataclasses import replace

    trajectory = tuple(t.repeat(1, 2, 1, 1) for t in features.inversion.trajectory)
    eight_channels = replace(features.inversion, trajectory=trajectory)
    eight = replace(features, inversion=eight_channels)
    assert eight.latent_shape == (1, 8, 16, 16)
    with pytest.raises(ValueError, match="8 channels but the source INVERSION's has 4"):
        eight.check_compatible(sampling.model_fingerprint(model), STEPS, source=other)

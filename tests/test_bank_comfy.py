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

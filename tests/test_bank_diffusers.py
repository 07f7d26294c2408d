"""The reference feature bank on the diffusers host (Python API), and parity with the ComfyUI host."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from realedit.hosts.diffusers_bank import reference_features  # noqa: E402
from realedit.hosts.diffusers_sampling import ddim_invert, unet_fingerprint  # noqa: E402
from realedit.inversion.bank import BankSettings, LayerWindow, StepWindow  # noqa: E402
from realedit.testbed.diffusers_models import (  # noqa: E402
    make_ddim_scheduler,
    make_tiny_diffusers_unet,
    sdxl_added_cond,
)

STEPS = 10
# ComfyUI and diffusers UNets on the same weights agree to ~2e-5 relative per call (test_testbed); after
# 10 inversion steps the bank entries still agree to ~3e-5 on a raw random UNet.
HOST_TOLERANCE = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def sd1():
    g = torch.Generator().manual_seed(0)
    return make_tiny_diffusers_unet("sd1"), torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 64, generator=g)


def test_bank_holds_the_configured_layers_steps_dtype_and_device(sd1):
    unet, latent, cond = sd1
    processors = dict(unet.attn_processors)
    settings = BankSettings(steps=StepWindow(0.2, 1.0), dtype=torch.bfloat16, device=torch.device("cpu"))
    features = reference_features(unet, make_ddim_scheduler(), latent, cond, settings, steps=STEPS)
    assert set(features.bank.entries) == {(layer, s) for layer in range(10, 16) for s in range(2, STEPS)}
    assert all(k.dtype == v.dtype == torch.bfloat16 and k.ndim == 2 for k, v in features.bank.entries.values())
    assert unet.attn_processors == processors  # the recorder is taken off again
    assert features.fingerprint == unet_fingerprint(unet) and features.total_steps == STEPS
    assert features.latent_shape == (1, 4, 16, 16) and features.layers == tuple(range(10, 16))


def test_stored_entries_are_the_kv_of_the_pinned_input_and_live_keeps_the_trajectory(sd1):
    """Edit step s reads what the UNet computes at the inversion's input for step s: what live mode runs."""
    unet, latent, cond = sd1
    scheduler = make_ddim_scheduler()
    settings = BankSettings(dtype=torch.float32, steps=StepWindow(0.0, 1.0))
    stored = reference_features(unet, scheduler, latent, cond, settings, steps=STEPS)
    live = reference_features(unet, scheduler, latent, cond, BankSettings(mode="live"), steps=STEPS)
    assert live.bank is None and live.mode == "live"
    assert all(torch.equal(a, b) for a, b in zip(live.inversion.trajectory, stored.inversion.trajectory))
    from realedit.hosts.diffusers import DiffusersHost
    from realedit.hosts.diffusers_sampling import timestep_for_sigma

    for s in (0, STEPS // 2, STEPS - 1):
        x_in, sigma = live.inversion.pinned_model_input(s)
        seen = {}

        def capture(q, k, v, ctx, seen=seen):
            if ctx.kind == "self":
                seen[ctx.layer.index] = (k[0].clone(), v[0].clone())

        with torch.no_grad(), DiffusersHost(unet, capture):
            t = torch.tensor(timestep_for_sigma(sigma, scheduler.alphas_cumprod))
            unet(x_in / (1 + sigma**2) ** 0.5, t, cond)
        for layer in range(10, 16):
            k, v = stored.bank.get(layer, s)
            torch.testing.assert_close(seen[layer][0], k, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(seen[layer][1], v, rtol=1e-5, atol=1e-6)


def test_sdxl_added_cond_is_kept_for_live_mode():
    unet = make_tiny_diffusers_unet("sdxl")
    g = torch.Generator().manual_seed(1)
    latent, cond = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 64, generator=g)
    added = sdxl_added_cond(1)
    features = reference_features(unet, make_ddim_scheduler(), latent, cond, BankSettings(mode="live"), steps=3,
                                  **added)
    assert features.added_cond.keys() == {"text_embeds", "time_ids"} and features.conditioning is cond
    stored = reference_features(unet, make_ddim_scheduler(), latent, cond, steps=3, **added)
    assert stored.bank.entries and all(k.dtype == torch.float16 for k, _ in stored.bank.entries.values())


def test_bad_inputs_get_clear_errors(sd1):
    unet, latent, cond = sd1
    scheduler = make_ddim_scheduler()
    with pytest.raises(ValueError, match="selects no attention layer"):
        reference_features(unet, scheduler, latent, cond, BankSettings(layers=LayerWindow(stage="mid", finest=1)))
    with pytest.raises(ValueError, match="steps must be at least 2"):
        reference_features(unet, scheduler, latent, cond, steps=1)
    with pytest.raises(ValueError, match="reference latent has 16 channels"):
        reference_features(unet, scheduler, torch.zeros(1, 16, 16, 16), cond, steps=3)
    with pytest.raises(ValueError, match="batch of 2"):
        reference_features(unet, scheduler, latent.repeat(2, 1, 1, 1), cond, steps=3)
    bad = latent.clone()
    bad[..., 0] = float("inf")
    with pytest.raises(ValueError, match="reference latent contains NaN or inf"):
        reference_features(unet, scheduler, bad, cond, steps=3)
    processors = dict(unet.attn_processors)
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in processors.values())  # nothing left installed


def test_features_refuse_a_source_inversion_of_another_unet_or_step_count(sd1):
    unet, latent, cond = sd1
    scheduler = make_ddim_scheduler()
    features = reference_features(unet, scheduler, latent, cond, steps=4)
    from realedit.attention.probe import ProbeHook
    from realedit.hosts.diffusers import DiffusersHost

    other_unet = make_tiny_diffusers_unet("sd1", seed=1)
    with torch.no_grad(), DiffusersHost(other_unet, ProbeHook()) as host:
        other = ddim_invert(host, scheduler, latent, cond, steps=4)
    with pytest.raises(ValueError, match="different models"):
        features.check_compatible(unet_fingerprint(unet), 4, source=other)
    with pytest.raises(ValueError, match="REF_FEATURES was made with a different model"):
        features.check_compatible(unet_fingerprint(other_unet), 4)
    with pytest.raises(ValueError, match="made with 4 steps but this node uses 5"):
        features.check_compatible(unet_fingerprint(unet), 5)


# -- the same bank on both hosts --------------------------------------------------------------------------

@pytest.mark.comfy
@pytest.mark.parametrize("convention", ["next", "current"])
def test_comfy_and_diffusers_hosts_record_the_same_bank(comfy, convention):
    """Same weights (ComfyUI's key map), same schedule (ddim_uniform == DDIMScheduler leading + offset 1),
    same latent in the model's space (ComfyUI's process_latent_in): the same entries, to HOST_TOLERANCE."""
    from realedit.hosts import comfy_sampling
    from realedit.testbed.comfy_models import make_tiny_unet
    from realedit.testbed.parity import comfy_unet_to_diffusers

    model = make_tiny_unet("sd1", seed=3)
    unet = comfy_unet_to_diffusers(model, "sd1")
    g = torch.Generator().manual_seed(0)
    user_latent, cond = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 64, generator=g)
    settings = BankSettings(dtype=torch.float32, device=torch.device("cpu"), steps=StepWindow(0.0, 1.0))
    with torch.inference_mode():
        ours = comfy_sampling.reference_features(model, user_latent, [[cond, {}]], settings, steps=STEPS,
                                                 convention=convention)
        live = comfy_sampling.reference_features(model, user_latent, [[cond, {}]], BankSettings(mode="live"),
                                                 steps=STEPS, convention=convention)
    latent = model.model.process_latent_in(user_latent)
    theirs = reference_features(unet, make_ddim_scheduler(), latent, cond, settings, steps=STEPS,
                                convention=convention)
    theirs_live = reference_features(unet, make_ddim_scheduler(), latent, cond, BankSettings(mode="live"),
                                     steps=STEPS, convention=convention)
    assert ours.layers == theirs.layers and ours.steps == theirs.steps and ours.total_steps == theirs.total_steps
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=1e-5, atol=1e-5)
    assert set(ours.bank.entries) == set(theirs.bank.entries) and len(ours.bank.entries) > 0
    for key, (k, v) in ours.bank.entries.items():
        assert _rel(k, theirs.bank.entries[key][0]) < HOST_TOLERANCE, key
        assert _rel(v, theirs.bank.entries[key][1]) < HOST_TOLERANCE, key
    for features, other in ((ours, theirs), (live, theirs_live)):
        for a, b in zip(features.inversion.trajectory, other.inversion.trajectory):
            assert _rel(a, b) < HOST_TOLERANCE

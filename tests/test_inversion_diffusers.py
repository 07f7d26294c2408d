"""DDIM inversion on the diffusers host (the Python API) against diffusers' DDIMInverseScheduler."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMInverseScheduler  # noqa: E402
from realedit.attention.probe import ProbeHook  # noqa: E402
from realedit.hosts.diffusers import DiffusersHost  # noqa: E402
from realedit.hosts.diffusers_sampling import cfg_denoiser, ddim_invert, sample, sampling_sigmas, use_schedule  # noqa: E402
from realedit.testbed.diffusers_models import make_ddim_scheduler, make_tiny_diffusers_unet  # noqa: E402

STEPS = 10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    return make_tiny_diffusers_unet("sd1"), make_ddim_scheduler(), torch.randn(1, 4, 16, 16, generator=g), \
        torch.randn(1, 77, 64, generator=g)


def test_next_convention_equals_ddim_inverse_scheduler(setup):
    unet, scheduler, latent, cond = setup
    with torch.no_grad(), DiffusersHost(unet, ProbeHook()) as host:
        ours = ddim_invert(host, scheduler, latent, cond, steps=STEPS, convention="next")
        inverse = DDIMInverseScheduler.from_config(scheduler.config, set_alpha_to_one=True)
        inverse.set_timesteps(STEPS)
        x = latent.clone()
        for i, t in enumerate(inverse.timesteps):
            eps = unet(x, t, cond).sample
            x = inverse.step(eps, t, x).prev_sample
            level = ours.sigmas[i + 1].double()
            assert _rel(ours.trajectory[i + 1].double() / (1 + level**2).sqrt(), x.double()) < 1e-5, i


def test_hooks_see_inversion_labels_like_on_comfyui(setup):
    """Step indices during inversion are label indices in the ascending schedule (1..N for 'next')."""
    unet, scheduler, latent, cond = setup
    probe = ProbeHook()
    with torch.no_grad(), DiffusersHost(unet, probe) as host:
        ddim_invert(host, scheduler, latent, cond, steps=4, convention="next")
    assert sorted({r.step for r in probe.records}) == [1, 2, 3, 4]
    assert {r.total_steps for r in probe.records} == {4}


def test_round_trip_on_a_smooth_model(setup):
    _, scheduler, latent, cond = setup
    unet = make_tiny_diffusers_unet("sd1")
    with torch.no_grad():
        for p in unet.conv_out.parameters():
            p.mul_(0.002)  # a smooth UNet: the prediction barely depends on its input
        with DiffusersHost(unet, ProbeHook()) as host:
            inversion = ddim_invert(host, scheduler, latent, cond, steps=20)
            _, sigmas = sampling_sigmas(scheduler, 20)
            use_schedule(host, sigmas, scheduler.alphas_cumprod)
            back = sample(cfg_denoiser(host, scheduler.alphas_cumprod, cond, total_steps=20), inversion.z_T, sigmas)
    assert _rel(back, latent) < 0.01


def test_bad_inputs_get_clear_errors(setup):
    unet, scheduler, latent, cond = setup
    ip2p = make_tiny_diffusers_unet("ip2p")
    with torch.no_grad(), DiffusersHost(unet, ProbeHook()) as host:
        with pytest.raises(ValueError, match="steps must be at least 2"):
            ddim_invert(host, scheduler, latent, cond, steps=1)
        with pytest.raises(ValueError, match="latent has 16 channels but the UNet expects 4"):
            ddim_invert(host, scheduler, torch.zeros(1, 16, 16, 16), cond, steps=3)
        bad = latent.clone()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN or inf"):
            ddim_invert(host, scheduler, bad, cond, steps=3)
    with torch.no_grad(), DiffusersHost(ip2p, ProbeHook()) as host:
        with pytest.raises(ValueError, match="expects 8.*InstructPix2Pix"):
            ddim_invert(host, scheduler, latent, cond, steps=3)


def test_inversion_keeps_no_autograd_graph(setup):
    unet, scheduler, latent, cond = setup
    with DiffusersHost(unet, ProbeHook()) as host:  # called without torch.no_grad()
        inversion = ddim_invert(host, scheduler, latent, cond, steps=3)
    assert all(not t.requires_grad and t.grad_fn is None for t in inversion.trajectory)


@pytest.mark.comfy
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("convention", ["next", "current"])
def test_comfy_and_diffusers_hosts_invert_alike(comfy, prediction, convention):
    """Same weights, schedule and model-space latent: the same trajectory on both hosts (1e-4 relative),
    for epsilon- and v-prediction UNets (diffusers: the scheduler's prediction_type)."""
    from diffusers import DDIMScheduler
    from realedit.hosts import comfy_sampling
    from realedit.testbed.comfy_models import make_tiny_unet
    from realedit.testbed.parity import comfy_unet_to_diffusers

    model = make_tiny_unet("sd1", seed=3, prediction=prediction)
    unet = comfy_unet_to_diffusers(model, "sd1")
    scheduler = make_ddim_scheduler()
    if prediction == "v":
        scheduler = DDIMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(4)
    user_latent, cond = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 64, generator=g)
    with torch.inference_mode():
        ours = comfy_sampling.ddim_invert(model, user_latent, [[cond, {}]], steps=STEPS, convention=convention)
    with DiffusersHost(unet, ProbeHook()) as host:
        theirs = ddim_invert(host, scheduler, model.model.process_latent_in(user_latent), cond, steps=STEPS,
                             convention=convention)
    for a, b in zip(ours.trajectory, theirs.trajectory):
        assert _rel(a, b) < 1e-4
    assert _rel(ours.z_T, user_latent) > 0.1  # the inversion moved


def test_unsupported_prediction_type_is_refused(setup):
    unet, scheduler, latent, cond = setup
    from diffusers import DDIMScheduler

    sample_prediction = DDIMScheduler.from_config(scheduler.config, prediction_type="sample")
    with DiffusersHost(unet, ProbeHook()) as host, pytest.raises(ValueError, match="prediction_type 'sample'"):
        ddim_invert(host, sample_prediction, latent, cond, steps=3)

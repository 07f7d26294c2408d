"""DDIM inversion on the ComfyUI host against independent references on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def env(comfy):
    import comfy_helpers
    from realedit.hosts import comfy_sampling
    from realedit.testbed.comfy_models import make_tiny_unet

    return comfy_sampling, make_tiny_unet, comfy_helpers


def _latent(seed: int = 3, hw=(16, 16)) -> torch.Tensor:
    return torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_current_convention_equals_flipsigmas_euler_at_cfg1(env):
    """SpecRef Eq. 1 as written == ComfyUI's FlipSigmas + euler (cfg 1), step by step."""
    import comfy.samplers

    sampling, make, helpers = env
    model = make("sd1")
    latent, cond = _latent(), helpers.conditioning("sd1", 1)
    inv = sampling.ddim_invert(model, latent, cond, steps=10, convention="current")

    flipped = inv.sigmas  # what FlipSigmas makes of the sampling schedule
    reference = []
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(cond, cond)
    guider.set_cfg(1.0)
    guider.sample(torch.zeros_like(latent), latent, comfy.samplers.sampler_object("euler"), flipped,
                  callback=lambda i, x0, x, total: reference.append(x.clone()), disable_pbar=True, seed=0)
    # the euler callback reports x before each step; ours holds x_0..x_N
    assert len(reference) == 10
    for i, x in enumerate(reference):
        assert _rel(inv.trajectory[i], x) < 1e-5, i


def test_next_convention_equals_ddpm_space_reference(env):
    """The P2P / diffusers DDIMInverseScheduler update, written independently in alpha-bar space."""
    sampling, make, helpers = env
    model = make("sd1")
    latent, cond = _latent(), helpers.conditioning("sd1", 1)
    steps = 10
    inv = sampling.ddim_invert(model, latent, cond, steps=steps, convention="next")

    ms = model.get_model_object("model_sampling")
    unet = model.model.diffusion_model
    alphas = 1.0 / (1.0 + ms.sigmas.double() ** 2)  # alphas_cumprod of the model's discrete schedule
    timesteps = [ms.timestep(s).item() for s in inv.sigmas]  # ascending; first is the clean end
    x = model.model.process_latent_in(latent).double() / (1 + inv.sigmas[0].double() ** 2).sqrt()  # DDPM space
    for i in range(steps):
        t_next = round(timesteps[i + 1])
        a_cur = 1.0 / (1.0 + inv.sigmas[i].double() ** 2)  # level of x (sigma stand-in at the clean end)
        a_next = alphas[t_next]
        with torch.no_grad():
            eps = unet(x.float(), torch.tensor([float(t_next)]), context=cond[0][0]).double()
        x0 = (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        ours_ddpm = inv.trajectory[i + 1].double() / (1 + inv.sigmas[i + 1].double() ** 2).sqrt()
        assert _rel(ours_ddpm, x) < 1e-5, i


def test_conventions_differ_measurably(env):
    """Both conventions are kept because they are not the same computation (~1-2% apart here)."""
    sampling, make, helpers = env
    model = make("sd1", output_scale=0.01)
    latent, cond = _latent(), helpers.conditioning("sd1", 1)
    a = sampling.ddim_invert(model, latent, cond, steps=10, convention="current").z_T
    b = sampling.ddim_invert(model, latent, cond, steps=10, convention="next").z_T
    assert 1e-3 < _rel(a, b) < 0.1


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_round_trip_returns_the_latent_on_a_smooth_model(env, prediction):
    """Invert, then denoise from z_T with ComfyUI's own euler (noise off): back to z_0."""
    sampling, make, helpers = env
    model = make("sd1", output_scale=0.002, prediction=prediction)
    latent, cond = _latent(), helpers.conditioning("sd1", 1)
    inv = sampling.ddim_invert(model, latent, cond, steps=20)
    z_T = model.model.process_latent_out(inv.z_T)
    import comfy.sample

    out = comfy.sample.sample(model, torch.zeros_like(latent), 20, 1.0, "euler", "ddim_uniform", cond, cond,
                              z_T, seed=0, disable_noise=True, disable_pbar=True)
    assert _rel(out, latent) < 0.01  # stated tolerance: 1% on a smooth tiny model, 20 steps


def test_inversion_leaves_the_model_untouched_and_runs_under_inference_mode(env):
    sampling, make, helpers = env
    model = make("sd1")
    before = copy.deepcopy(model.model_options)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    with torch.inference_mode():
        sampling.ddim_invert(model, _latent(), helpers.conditioning("sd1", 1), steps=3)
    assert model.model_options == before
    assert all(torch.equal(weights[k], v) for k, v in model.model.state_dict().items())


def test_bad_inputs_get_clear_errors(env):
    sampling, make, helpers = env
    cond = helpers.conditioning("sd1", 1)
    with pytest.raises(ValueError, match="steps must be at least 2"):
        sampling.ddim_invert(make("sd1"), _latent(), cond, steps=1)
    with pytest.raises(ValueError, match="InstructPix2Pix"):
        sampling.ddim_invert(make("ip2p"), _latent(), cond, steps=3)
    bad = _latent()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sampling.ddim_invert(make("sd1"), bad, cond, steps=3)
    with pytest.raises(ValueError, match="negative CONDITIONING"):
        sampling.ddim_invert(make("sd1"), _latent(), cond, steps=3, guidance=3.0)


def test_wrong_latent_channels_and_inf_are_named(env):
    sampling, make, helpers = env
    cond = helpers.conditioning("sd1", 1)
    with pytest.raises(ValueError, match="LATENT has 16 channels but the MODEL expects 4.*this model's VAE"):
        sampling.ddim_invert(make("sd1"), torch.zeros(1, 16, 16, 16), cond, steps=3)  # e.g. an SD3/Flux latent
    with pytest.raises(ValueError, match="LATENT has 4 channels but the MODEL expects 8.*InstructPix2Pix"):
        sampling.ddim_invert(make("ip2p"), _latent(), cond, steps=3)  # IP2P without its image concat
    bad = _latent()
    bad[0, 3, 5, 5] = float("-inf")
    with pytest.raises(ValueError, match="NaN or inf.*re-encode"):
        sampling.ddim_invert(make("sd1"), bad, cond, steps=3)


def test_inversion_from_another_model_or_step_count_is_refused(env):
    sampling, make, helpers = env
    model = make("sd1")
    inv = sampling.ddim_invert(model, _latent(), helpers.conditioning("sd1", 1), steps=4)
    inv.check_compatible(sampling.model_fingerprint(model.clone()), 4)  # a clone (attention patches) is the same
    with pytest.raises(ValueError, match="INVERSION was made with 4 steps but this node uses 5; set the same steps"):
        inv.check_compatible(sampling.model_fingerprint(model), 5)
    with pytest.raises(ValueError, match="INVERSION was made with a different model") as info:
        inv.check_compatible(sampling.model_fingerprint(make("sd1", seed=1)), 4)
    # in a user's words, never the internal ids (used to show 'BaseModel@7fcf.../uuid')
    assert "other SD15 weights (another checkpoint" in str(info.value) and "@" not in str(info.value)
    lora = model.clone()
    key = next(k for k in lora.model.state_dict() if k.endswith(".weight"))
    lora.add_patches({key: (torch.zeros_like(lora.model.state_dict()[key]),)}, 0.5)
    with pytest.raises(ValueError, match="same SD15 checkpoint with other weight patches \\(a LoRA") as info:
        inv.check_compatible(sampling.model_fingerprint(lora), 4)
    assert "@" not in str(info.value)
    with pytest.raises(ValueError, match="another model family \\(SD15 then, SDXL now\\)"):
        inv.check_compatible(sampling.model_fingerprint(make("sdxl")), 4)


def test_trajectory_is_moved_to_the_cpu_once_and_rows_split(env):
    sampling, make, helpers = env
    model = make("sd1")
    latent = torch.cat([_latent(1), _latent(2)])
    inv = sampling.ddim_invert(model, latent, helpers.conditioning("sd1", 1), steps=4)
    assert len(inv.trajectory) == 5 and all(t.device.type == "cpu" and t.shape == (2, 4, 16, 16)
                                            for t in inv.trajectory)
    first = inv.row(1)
    assert first.latent_shape == (1, 4, 16, 16) and first.steps == 4 and first.fingerprint == inv.fingerprint
    assert all(torch.equal(a, b[1:2]) for a, b in zip(first.trajectory, inv.trajectory))
    assert first.trajectory[0].untyped_storage().nbytes() == first.trajectory[0].numel() * 4  # its own copy
    with pytest.raises(IndexError):
        inv.row(2)

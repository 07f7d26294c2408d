"""TTIS (BARET Sec. 3.1) and null-text inversion: the shared per-step embedding optimisation loop.

Core tests run on a toy differentiable denoiser (no host); ComfyUI tests on a tiny smooth UNet.
"""

from __future__ import annotations

import copy
import gc
import math
import warnings

import pytest
import torch
from realedit.inversion.baret_settings import BARET_DEFAULTS, BaretSettings, origin, transition_lambda
from realedit.inversion.ddim import invert
from realedit.inversion.embedding_opt import (
    NonFiniteLossError,
    OptimisationSettings,
    cfg_denoiser,
    null_text_lr,
    optimise_embeddings,
    reconstruct,
)

SIGMAS = torch.tensor([0.0, 0.3, 0.8, 1.6, 3.0])  # ascending, 4 steps (exact 0 at the clean end)
SHAPE = (1, 4, 4, 4)
EMB = (1, 3, 8)


class Toy:
    """A smooth denoiser, linear in the embedding: denoised = a(sigma) x + proj(mean token)."""

    def __init__(self, nan_calls: tuple[int, ...] = ()):
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(EMB[-1], math.prod(SHAPE), generator=g) * 0.1
        self.nan_calls = nan_calls  # 1-based indices of calls with grad enabled that return NaN
        self.grad_calls = 0
        self.seen: list[torch.Tensor] = []  # embeddings passed while grad is on
        self.values: list[torch.Tensor] = []  # and their values then (Adam updates them in place)

    def __call__(self, x: torch.Tensor, sigma: float, emb: torch.Tensor, branch: str) -> torch.Tensor:
        out = 0.7 * x / (1 + sigma**2) ** 0.5 + (emb.mean(1) @ self.proj.to(emb)).view(SHAPE).to(x)
        if torch.is_grad_enabled() and emb.requires_grad:
            self.grad_calls += 1
            self.seen.append(emb)
            self.values.append(emb.detach().clone())
            if self.grad_calls in self.nan_calls:
                return out * float("nan")
        return out


def _setup(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(SHAPE, generator=g)
    cond, uncond = torch.randn(EMB, generator=g), torch.randn(EMB, generator=g)
    toy = Toy()
    trajectory = invert(lambda x, s: toy(x, s, cond, "cond"), x0, SIGMAS)  # guidance 1, target prompt
    return toy, trajectory, cond, uncond


def _settings(**kw) -> OptimisationSettings:
    return OptimisationSettings(**{"iterations": 5, "lr": 0.1, "eps": 0.0, "delta": 0.0, "cfg": 7.5, **kw})


# --------------------------------------------------------------------------------------------------
# Core loop
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("branch", ["cond", "uncond"])
def test_optimisation_beats_plain_cfg_reconstruction_on_every_step(branch):
    toy, trajectory, cond, uncond = _setup()
    result = optimise_embeddings(toy, trajectory, SIGMAS, cond, uncond, branch, _settings())
    _, plain = reconstruct(toy, trajectory, SIGMAS, cond, uncond, 7.5)
    assert all(ours < 0.5 * base for ours, base in zip(result.final_losses, plain)), (result.final_losses, plain)
    assert result.losses[0][0] == pytest.approx(plain[0], rel=1e-5)  # iteration 0 of step 0 is plain CFG


def test_final_losses_are_the_reconstruction_with_the_kept_embeddings():
    toy, trajectory, cond, uncond = _setup()
    ttis = optimise_embeddings(toy, trajectory, SIGMAS, cond, uncond, "cond", _settings(iterations=3))
    x, errors = reconstruct(toy, trajectory, SIGMAS, list(ttis.embeddings), uncond, 7.5)
    assert errors == pytest.approx(list(ttis.final_losses), rel=1e-5)
    assert torch.allclose(x, ttis.reconstruction)
    null = optimise_embeddings(toy, trajectory, SIGMAS, cond, uncond, "uncond", _settings(iterations=3))
    _, errors = reconstruct(toy, trajectory, SIGMAS, cond, list(null.embeddings), 7.5)
    assert errors == pytest.approx(list(null.final_losses), rel=1e-5)


def test_each_step_stops_as_soon_as_under_threshold_or_at_the_cap():
    toy, trajectory, cond, uncond = _setup()
    _, plain = reconstruct(toy, trajectory, SIGMAS, cond, uncond, 7.5)
    eps, delta = 0.6 * plain[0], 0.1 * plain[0]  # some steps converge, others hit the cap
    settings = _settings(iterations=6, eps=eps, delta=delta)
    result = optimise_embeddings(toy, trajectory, SIGMAS, cond, uncond, "cond", settings)
    assert result.thresholds == pytest.approx([eps + s * delta for s in range(4)])
    for losses, threshold, count in zip(result.losses, result.thresholds, result.iterations):
        assert all(loss >= threshold for loss in losses[:-1])
        assert losses[-1] < threshold or count == settings.iterations
    assert any(result.converged) and not all(result.converged), result.losses
    assert "capped" in result.report() and result.report().count("\n") == 3
    # a converged step keeps the embedding that met the threshold (no update after the check)
    for s, ok in enumerate(result.converged):
        if ok:
            assert result.final_losses[s] == pytest.approx(result.losses[s][-1], rel=1e-6)


def test_a_threshold_met_at_once_keeps_the_warm_start_unchanged():
    toy, trajectory, cond, uncond = _setup()
    result = optimise_embeddings(toy, trajectory, SIGMAS, cond, uncond, "cond", _settings(eps=1e9))
    assert result.iterations == (1, 1, 1, 1)
    assert all(torch.equal(e, cond) for e in result.embeddings)


def test_warm_start_and_per_step_learning_rate_schedule():
    """One Adam update per step moves every element by exactly lr_s (Adam's first step is lr * sign)."""
    toy, trajectory, cond, uncond = _setup()
    schedule = null_text_lr(0.1, 10)  # 0.1, 0.09, 0.08, 0.07
    result = optimise_embeddings(toy, trajectory, SIGMAS, cond, uncond, "uncond", _settings(iterations=1, lr=schedule))
    previous = uncond
    for s, embedding in enumerate(result.embeddings):
        moved = (embedding - previous).abs()
        assert moved.max().item() == pytest.approx(schedule(s), rel=1e-3)  # warm start: moved from e_{s-1}
        previous = embedding
    assert result.iterations == (1, 1, 1, 1) and not any(result.converged)


def test_fp32_whatever_the_input_dtype_and_inference_mode():
    toy, trajectory, cond, uncond = _setup()
    with torch.inference_mode():
        half = [t.half() for t in trajectory]
        result = optimise_embeddings(toy, half, SIGMAS, cond.half(), uncond.half(), "cond", _settings(iterations=2))
    assert all(t.dtype == torch.float32 for t in toy.seen)
    assert all(e.dtype == torch.float32 and not e.requires_grad and not e.is_inference() for e in result.embeddings)


class Cancelled(Exception):
    pass


def test_cancelling_from_the_callback_leaves_no_grad_state():
    toy, trajectory, cond, uncond = _setup()
    calls = []

    def cancel(step: int, iteration: int, loss: float) -> None:
        calls.append((step, iteration))
        if len(calls) == 7:
            raise Cancelled()

    with pytest.raises(Cancelled):
        optimise_embeddings(toy, trajectory, SIGMAS, cond, uncond, "cond", _settings(iterations=3), cancel)
    assert calls[:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert toy.seen and all(not e.requires_grad and e.grad is None for e in toy.seen)


def test_non_finite_loss_keeps_the_last_finite_embedding_and_warns(caplog):
    toy, trajectory, cond, uncond = _setup()
    toy.nan_calls = (7,)  # step 0 takes grad calls 1-5; step 1 calls 6 (iteration 0) and 7 (iteration 1)
    result = optimise_embeddings(toy, trajectory, SIGMAS, cond, uncond, "cond", _settings(iterations=5))
    assert len(result.warnings) == 1 and "step 1, iteration 1" in result.warnings[0]
    assert "non-finite" in caplog.text
    assert result.iterations[1] == 2 and math.isnan(result.losses[1][1])
    kept = toy.values[5]  # the embedding evaluated at step 1, iteration 0 (the last finite loss)
    assert torch.equal(result.embeddings[1], kept) and not torch.equal(toy.values[6], kept)
    assert result.final_losses[1] == pytest.approx(result.losses[1][0])
    assert all(math.isfinite(v) for v in result.final_losses) and result.iterations[2:] == (5, 5)


def test_non_finite_loss_before_any_update_is_an_error():
    toy, trajectory, cond, uncond = _setup()
    toy.nan_calls = (1,)
    with pytest.raises(NonFiniteLossError, match="before optimising"):
        optimise_embeddings(toy, trajectory, SIGMAS, cond, uncond, "cond", _settings())


@pytest.mark.parametrize(("kw", "message"), [
    ({"lr": 0.0}, "learning rate must be > 0"),
    ({"lr": -1e-3}, "learning rate must be > 0"),
    ({"lr": float("nan")}, "learning rate must be > 0"),
    ({"lr": null_text_lr(1e-2, 2)}, "schedule reaches 0"),
    ({"iterations": 0}, "iterations per step must be an integer >= 1"),
    ({"iterations": 2.5}, "iterations per step must be an integer >= 1"),
    ({"eps": -1.0}, "eps and delta must be >= 0"),
])
def test_bad_settings_are_clear_errors(kw, message):
    toy, trajectory, cond, uncond = _setup()
    with pytest.raises(ValueError, match=message):
        optimise_embeddings(toy, trajectory, SIGMAS, cond, uncond, "cond", _settings(**kw))
    assert toy.grad_calls == 0


def test_inert_guidance_and_mismatched_inputs_are_errors():
    toy, trajectory, cond, uncond = _setup()
    with pytest.raises(ValueError, match="uncond embedding has no effect"):
        optimise_embeddings(toy, trajectory, SIGMAS, cond, uncond, "uncond", _settings(cfg=1.0))
    with pytest.raises(ValueError, match="must match"):
        optimise_embeddings(toy, trajectory[:-1], SIGMAS, cond, uncond, "cond", _settings())


def test_cfg_denoiser_is_the_two_branch_form():
    toy, trajectory, cond, uncond = _setup()
    x = trajectory[2]
    guided = cfg_denoiser(toy)(x, 0.8, cond, uncond, 7.5)
    assert torch.allclose(guided, toy(x, 0.8, uncond, "uncond") + 7.5 * (toy(x, 0.8, cond, "cond")
                                                                          - toy(x, 0.8, uncond, "uncond")))


def test_baret_settings_defaults_and_validation():
    d = BARET_DEFAULTS
    assert (d.steps, d.cfg, d.ttis_iterations, d.ttis_lr, d.early_stop_eps, d.early_stop_delta) == (
        50, 7.5, 5, 1e-3, 1e-5, 2e-5)
    assert d.null_text_iterations == 10 and null_text_lr()(0) == 1e-2
    assert null_text_lr()(30) == pytest.approx(7e-3) and null_text_lr()(49) == pytest.approx(1e-2 * 0.51)
    assert transition_lambda(d.lambda_start, d.lambda_end, 0, 50) == 0.8
    assert transition_lambda(d.lambda_start, d.lambda_end, 49, 50) == pytest.approx(0.1)
    assert transition_lambda(d.lambda_start, d.lambda_end, 10, 50, rigid=True) == 1.0
    assert 0.2 <= d.self_attention_fraction <= 0.4 and 0.4 <= d.cross_attention_fraction <= 0.8
    assert "Sec. 4.3" in origin("self_attention_fraction")
    with pytest.raises(ValueError, match="ttis_lr must be > 0"):
        BaretSettings(ttis_lr=0.0)
    with pytest.raises(ValueError, match="null_text_iterations must be >= 1"):
        BaretSettings(null_text_iterations=0)
    with pytest.raises(ValueError, match="lambda_end must be in"):
        BaretSettings(lambda_end=1.2)


# --------------------------------------------------------------------------------------------------
# ComfyUI host
# --------------------------------------------------------------------------------------------------

STEPS, ITERATIONS, LR = 3, 3, 2e-2  # tiny model: a larger lr than SD's 1e-3 shows the effect in 3 iterations


@pytest.fixture(scope="module")
def env(comfy):
    import comfy_helpers
    from realedit.hosts import comfy_autograd
    from realedit.testbed.comfy_models import make_tiny_unet

    return comfy_autograd, make_tiny_unet, comfy_helpers


def _latent(seed: int = 3) -> torch.Tensor:
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _model_state(model) -> dict:
    return {
        "weights": {k: v.clone() for k, v in model.model.state_dict().items()},
        "options": copy.deepcopy(model.model_options),
        "patches": dict(model.patches), "uuid": model.patches_uuid, "object_patches": dict(model.object_patches),
        "wrappers": dict(model.weight_wrapper_patches), "cast": model.model.manual_cast_dtype,
        "requires_grad": [p.requires_grad for p in model.model.parameters()],
    }


def _assert_no_wrappers(model) -> None:
    """No weight wrapper of ours left on the shared modules (checked before any other sampling)."""
    from realedit.hosts.comfy_autograd import CopyInferenceWeight

    for module in model.model.modules():
        functions = list(getattr(module, "weight_function", [])) + list(getattr(module, "bias_function", []))
        assert not any(isinstance(f, CopyInferenceWeight) for f in functions)


def _assert_untouched(model, before: dict, emb_shape: tuple[int, ...]) -> None:
    after = _model_state(model)
    assert all(torch.equal(before["weights"][k], v) for k, v in after["weights"].items())
    assert {k: v for k, v in after.items() if k != "weights"} == {k: v for k, v in before.items() if k != "weights"}
    _assert_no_wrappers(model)
    assert all(p.grad is None for p in model.model.parameters())  # no gradient reached the weights
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch module objects warns
        warnings.simplefilter("ignore")
        leftovers = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf
                     and tuple(t.shape) == emb_shape]
    assert not leftovers, "an optimised embedding still requires grad"


def _plain_cfg_errors(model, inversion, cond, negative) -> list[float]:
    """Independent baseline: ComfyUI's own euler (= DDIM) at CFG 7.5 from z_T with the same prompt;
    the per-step DDPM-space MSE to the inversion trajectory."""
    import comfy.sample

    steps, latents = inversion.steps, []
    z_T = model.model.process_latent_out(inversion.z_T)
    out = comfy.sample.sample(model, torch.zeros_like(z_T), steps, 7.5, "euler", "ddim_uniform", cond, negative, z_T,
                              seed=0, disable_noise=True, disable_pbar=True,
                              callback=lambda i, x0, x, total: latents.append(x.clone()))
    latents = latents[1:] + [model.model.process_latent_in(out)]  # x after each step
    sigmas = inversion.sigmas
    return [((x - inversion.trajectory[steps - s - 1]).pow(2).mean() / (1 + sigmas[steps - s - 1] ** 2)).item()
            for s, x in enumerate(latents)]


def test_ttis_lowers_per_step_error_below_plain_ddim_on_comfy(env):
    autograd, make, helpers = env
    model = make("sd1", output_scale=0.01)
    cond, negative = helpers.conditioning("sd1", 1), helpers.conditioning("sd1", 2)
    inv = autograd.ttis_invert(model, _latent(), cond, negative, steps=STEPS, iterations=ITERATIONS, lr=LR,
                               eps=0.0, delta=0.0)
    plain = _plain_cfg_errors(model, inv, cond, negative)
    result = inv.optimisation
    # the loop's first evaluation is exactly ComfyUI's CFG step (same denoiser, same schedule)
    assert result.losses[0][0] == pytest.approx(plain[0], rel=1e-4)
    assert all(ours < 0.9 * base for ours, base in zip(result.final_losses, plain)), (result.final_losses, plain)
    assert inv.branch == "cond" and len(inv.embeddings) == STEPS and inv.steps == STEPS
    assert torch.equal(inv.initial_embedding, cond[0][0]) and torch.equal(inv.fixed_embedding, negative[0][0])
    assert all(e.dtype == torch.float32 and e.device.type == "cpu" for e in inv.embeddings)
    assert all(p.grad is None for p in model.model.parameters())  # the weights' requires_grad is True here
    from realedit.hosts.comfy_sampling import model_fingerprint
    assert inv.fingerprint == model_fingerprint(model)  # usable by samplers on the caller's MODEL


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_the_denoiser_is_comfyuis_cfg_step_on_other_families(env, family):
    """SD2 (v-prediction, linear projections) and SDXL (pooled ``y`` from the CONDITIONING)."""
    autograd, make, helpers = env
    model = make(family, output_scale=0.01, prediction="v" if family == "sd2" else "eps")
    cond, negative = helpers.conditioning(family, 1), helpers.conditioning(family, 2)
    inv = autograd.ttis_invert(model, _latent(), cond, negative, steps=2, iterations=2, lr=LR, eps=0.0, delta=0.0)
    assert inv.optimisation.losses[0][0] == pytest.approx(_plain_cfg_errors(model, inv, cond, negative)[0], rel=1e-4)
    assert inv.optimisation.final_losses[0] < inv.optimisation.losses[0][0]


def test_ttis_and_null_text_leave_the_model_untouched_under_inference_mode(env):
    autograd, make, helpers = env
    with torch.inference_mode():  # as in a ComfyUI node: the weights are inference tensors
        model = make("sd1", output_scale=0.01)
        assert next(model.model.parameters()).is_inference()
        cond, negative = helpers.conditioning("sd1", 1), helpers.conditioning("sd1", 2)
        before, sample = _model_state(model), helpers.sample(model, steps=3)
        ttis = autograd.ttis_invert(model, _latent(), cond, negative, steps=STEPS, iterations=2, lr=LR)
        _assert_no_wrappers(model)
        null = autograd.null_text_invert(model, _latent(), cond, negative, steps=STEPS, iterations=2)
        _assert_no_wrappers(model)
        again = helpers.sample(model, steps=3)
    _assert_untouched(model, before, tuple(cond[0][0].shape))
    assert torch.equal(sample, again)
    assert null.branch == "uncond" and torch.equal(null.fixed_embedding, cond[0][0])
    for inv in (ttis, null):
        assert all(not e.requires_grad for e in inv.embeddings) and inv.optimisation.total_iterations <= 2 * STEPS
        assert inv.optimisation.final_losses[0] <= inv.optimisation.losses[0][0]


def test_optimisation_runs_in_fp32_whatever_the_compute_dtype(env):
    autograd, make, helpers = env
    model = make("sd1", output_scale=0.01)
    cond, negative = helpers.conditioning("sd1", 1), helpers.conditioning("sd1", 2)
    half = model.clone()
    half.set_model_compute_dtype(torch.bfloat16)
    runs = [autograd.ttis_invert(m, _latent(), cond, negative, steps=2, iterations=2, lr=LR) for m in (model, half)]
    assert half.model.manual_cast_dtype == torch.bfloat16  # handed back: the caller's compute dtype, not ours
    assert runs[0].optimisation.final_losses == pytest.approx(runs[1].optimisation.final_losses, rel=1e-5)
    assert autograd.compute_dtype(half) == torch.bfloat16  # yet the losses match fp32 to 1e-5 (bf16: ~1e-2)


def test_cancelling_mid_optimisation_raises_and_leaves_no_patch(env):
    import comfy.model_management

    autograd, make, helpers = env
    with torch.inference_mode():
        model = make("sd1", output_scale=0.01)
        cond, negative = helpers.conditioning("sd1", 1), helpers.conditioning("sd1", 2)
        before, sample = _model_state(model), helpers.sample(model, steps=3)
        seen = []

        def cancel_after_three(step: int, iteration: int, loss: float) -> None:
            seen.append((step, iteration))
            if len(seen) == 3:
                raise comfy.model_management.InterruptProcessingException()

        with pytest.raises(comfy.model_management.InterruptProcessingException) as cancelled:
            autograd.ttis_invert(model, _latent(), cond, negative, steps=STEPS, iterations=2, lr=LR,
                                 callback=cancel_after_three)
        assert seen == [(0, 0), (0, 1), (1, 0)]
        _assert_no_wrappers(model)
        comfy.model_management.interrupt_current_processing(True)  # the Cancel button, during inversion
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            autograd.null_text_invert(model, _latent(), cond, negative, steps=STEPS, iterations=2)
        assert not comfy.model_management.processing_interrupted()
        again = helpers.sample(model, steps=3)
    _assert_untouched(model, before, tuple(cond[0][0].shape))  # even with the traceback's frames alive
    assert torch.equal(sample, again) and cancelled.traceback


def test_bad_inputs_on_comfy_are_clear_errors_before_any_work(env):
    autograd, make, helpers = env
    model = make("sd1")
    cond, negative = helpers.conditioning("sd1", 1), helpers.conditioning("sd1", 2)
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        autograd.ttis_invert(model, _latent(), cond, negative, steps=3, lr=0.0)
    with pytest.raises(ValueError, match="iterations per step"):
        autograd.null_text_invert(model, _latent(), cond, negative, steps=3, iterations=0)
    with pytest.raises(ValueError, match="schedule reaches 0"):
        autograd.null_text_invert(model, _latent(), cond, negative, steps=101)
    with pytest.raises(ValueError, match="carries control"):
        autograd.ttis_invert(model, _latent(), [[cond[0][0], {"control": object()}]], negative, steps=3)
    with pytest.raises(ValueError, match="exactly one prompt"):
        autograd.ttis_invert(model, _latent(), cond + cond, negative, steps=3)
    with pytest.raises(ValueError, match="InstructPix2Pix"):
        autograd.ttis_invert(make("ip2p"), _latent(), cond, negative, steps=3)


def _dynamic(model, deep_copy_source=None):
    """``model`` posing as a dynamic-VRAM patcher (ComfyUI builds none on a CPU). With ``deep_copy_source``, a
    cached_patcher_init that rebuilds the model from it, as ComfyUI's loaders register for clone(disable_dynamic)."""
    model.is_dynamic = lambda: True
    if deep_copy_source is not None:
        model.cached_patcher_init = (lambda disable_dynamic=False: deep_copy_source(), ())
    return model


def _dynamic_vram_case(env) -> tuple:
    """A tiny SD1 model and its two prompts where this release has dynamic VRAM, else ``(None, None, None)``
    after checking that such a release never treats a model as dynamic (the plain clone, no per-forward copy),
    so the tests still assert something on old releases."""
    import inspect

    autograd, make, helpers = env
    model = make("sd1", output_scale=0.01)
    if "disable_dynamic" not in inspect.signature(model.clone).parameters:
        clone, always = autograd.trainable_copy(model)
        assert not autograd.is_dynamic(model) and clone.model is model.model and not always
        return None, None, None
    return model, helpers.conditioning("sd1", 1), helpers.conditioning("sd1", 2)


def test_dynamic_vram_optimises_a_fully_loaded_non_dynamic_deep_copy(env, monkeypatch):
    """As ComfyUI's trainer: a deep copy (patches kept, the caller's model untouched), loaded whole; the
    same embeddings as on the plain model, bit for bit."""
    import comfy.model_management

    autograd, make, _ = env
    with torch.inference_mode():
        model, cond, negative = _dynamic_vram_case(env)
        if model is None:
            return
        plain = autograd.ttis_invert(model, _latent(), cond, negative, steps=STEPS, iterations=2, lr=LR)
        copies = []
        dynamic = _dynamic(model.clone(), lambda: copies.append(make("sd1", output_scale=0.01)) or copies[-1])
        before = _model_state(dynamic)
        loads = []
        real_load = comfy.model_management.load_models_gpu
        monkeypatch.setattr(comfy.model_management, "load_models_gpu",
                            lambda models, **kw: loads.append((models[0], kw.get("force_full_load"))) or
                            real_load(models, **kw))
        ttis = autograd.ttis_invert(dynamic, _latent(), cond, negative, steps=STEPS, iterations=2, lr=LR)
    assert len(copies) == 1 and copies[0].model is not dynamic.model
    optimised_on = [(m, full) for m, full in loads if m.model is copies[0].model]
    assert optimised_on[-1][1] is True and not optimised_on[-1][0].is_dynamic()  # the optimisation's load: whole
    assert [torch.equal(a, b) for a, b in zip(ttis.embeddings, plain.embeddings)] == [True] * STEPS
    _assert_untouched(dynamic, before, tuple(cond[0][0].shape))


def test_dynamic_vram_without_a_deep_copy_copies_every_weight_and_gives_the_same_result(env, caplog):
    autograd, _, _ = env
    with torch.inference_mode():
        model, cond, negative = _dynamic_vram_case(env)
        if model is None:
            return
        plain = autograd.null_text_invert(model, _latent(), cond, negative, steps=STEPS, iterations=2)
        clone, always = autograd.trainable_copy(_dynamic(model.clone()))
        assert always and clone.model is model.model  # built in code: no cached_patcher_init to deep-copy from
        with caplog.at_level("WARNING"):
            dynamic = autograd.null_text_invert(_dynamic(model.clone()), _latent(), cond, negative, steps=STEPS,
                                                iterations=2)
    assert "every weight copied per forward" in caplog.text
    assert [torch.equal(a, b) for a, b in zip(dynamic.embeddings, plain.embeddings)] == [True] * STEPS
    _assert_no_wrappers(model)


def test_copy_every_weight_wrapper_never_returns_the_buffer_it_was_given():
    from realedit.hosts.comfy_autograd import CopyInferenceWeight

    staging = torch.randn(4, 4)
    assert CopyInferenceWeight()(staging).data_ptr() == staging.data_ptr()  # a normal tensor: no copy
    copied = CopyInferenceWeight(always=True)(staging)
    assert copied.data_ptr() != staging.data_ptr() and torch.equal(copied, staging)

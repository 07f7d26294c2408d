"""StyleDiffusion's core: the official schedule, the mapping network, the attention loss and its map pairing,
the value schedule of P2Plus, the tau_u window, and the shared loop's guarantees (host-free)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from realedit.attention.hooks import AttentionContext, LayerInfo, RowInfo
from realedit.attention.p2p import P2PHook
from realedit.attention.settings import P2PSettings
from realedit.attention.stylediffusion import (
    CrossMapRecorder,
    LiveValue,
    P2PlusControls,
    P2PlusHook,
    P2PlusValues,
    StyleDiffusionError,
    attention_loss,
    check_edit_prompts,
    map_target_call,
)
from realedit.inversion.ddim import Inversion
from realedit.inversion.embedding_opt import OptimisationSettings, OptimisedInversion, optimise_steps
from realedit.inversion.value_inversion import (
    DirectValues,
    MappingNetwork,
    ValueInversion,
    check_value_inversion,
    optimise_values,
    parameterisation_for,
    refuse_value_inversion,
    value_settings,
)
from realedit.settings.stylediffusion import SD_DEFAULTS, StyleDiffusionSettings, iteration_cap


# -- the official schedule ---------------------------------------------------------------------------------
def test_official_caps_lr_and_threshold():
    settings = value_settings()
    caps = [settings.cap_at(s) for s in range(30)]
    assert caps[:4] == [100, 91, 82, 75] and caps[-1] == 6 and sum(caps) == 1015  # sd:772, 982
    assert [settings.lr_at(s) for s in (0, 10, 29)] == pytest.approx([1e-2, 9e-3, 7.1e-3])  # sd:783
    assert settings.threshold(0) == pytest.approx(1e-5) and settings.threshold(10) == pytest.approx(2.1e-4)
    assert settings.cfg == 7.5
    assert [value_settings(max_iterations=50).cap_at(s) for s in (0, 7, 8)] == [50, 50, 45]
    assert iteration_cap(29) == math.ceil(100 * math.exp(-2.9))


def test_settings_refuse_bad_values_by_name():
    with pytest.raises(ValueError, match="tau_u"):
        StyleDiffusionSettings(tau_u=1.5)
    with pytest.raises(StyleDiffusionError, match="tau_v"):
        P2PlusControls(tau_v=-0.1)
    assert (SD_DEFAULTS.tau_v, SD_DEFAULTS.tau_c, SD_DEFAULTS.tau_s, SD_DEFAULTS.tau_u) == (0.5, 0.6, 0.6, 0.0)
    assert SD_DEFAULTS.steps == 30 and SD_DEFAULTS.pin_source is False


# -- the mapping network -------------------------------------------------------------------------------------
def _official_network(t: int, tokens: int) -> torch.nn.Module:
    out = 2 * tokens
    return torch.nn.Sequential(torch.nn.Conv1d(t, out, 1), torch.nn.Conv1d(out, out, 1), torch.nn.BatchNorm1d(out),
                               torch.nn.LeakyReLU(), torch.nn.Conv1d(out, out, 1))


def test_mapping_network_is_the_official_modules_in_train_mode():
    """Functional M_s = the official nn modules (BatchNorm in train mode, batch 1), same init for the same seed;
    78,540 parameters for ViT-B/16's 197 tokens and 77 text tokens (sd:563-573)."""
    features = torch.randn(1, 9, 16)
    net = MappingNetwork(features, tokens=5, seed=3)
    params = net.start()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        official = _official_network(9, 5)
    official.train()
    with torch.no_grad():
        expected = official(features)
        for p, q in zip(params, official.parameters()):
            assert torch.equal(p, q)
    scale, shift = net.scale_shift(params)
    assert torch.allclose(torch.cat([scale, shift], 1), expected, atol=1e-6)
    assert sum(p.numel() for p in MappingNetwork(torch.zeros(1, 197, 768), 77).start()) == 78540


def test_batchnorm_with_batch_one_normalises_each_token_over_the_features():
    features = torch.randn(1, 4, 32)
    net = MappingNetwork(features, tokens=2)
    w1, b1, w2, b2, gamma, beta, w3, b3 = net.start()
    h = F.conv1d(F.conv1d(features, w1, b1), w2, b2)
    per_token = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    out = F.conv1d(F.leaky_relu(per_token, 0.01), w3, b3)
    scale, shift = net.scale_shift((w1, b1, w2, b2, gamma, beta, w3, b3))
    assert torch.allclose(torch.cat([scale, shift], 1), out, atol=1e-5)


def test_direct_starts_from_identity_and_width_mismatch_names_both_widths():
    a, b = DirectValues(77, 64).start()
    c = torch.randn(1, 77, 64)
    assert torch.equal(c * a + b, c)
    with pytest.raises(StyleDiffusionError, match="1024 wide.*64 wide"):
        parameterisation_for(torch.zeros(1, 257, 1024), c, "cpu")
    assert parameterisation_for(torch.zeros(1, 257, 64), c, "cpu").name == "clip"
    assert parameterisation_for(None, c, "cpu").name == "direct"


# -- attention loss and map pairing ------------------------------------------------------------------------------
def _ctx(kind: str, downscale: int, rows: RowInfo, step: int = 0, total: int = 4, index: int = 3,
         grid: tuple[int, int] = (4, 4)) -> AttentionContext:
    return AttentionContext(layer=LayerInfo(index, "down", downscale, ("input", index)), kind=kind, grid=grid,
                            heads=2, dim_head=4, rows=rows, step=step, total_steps=total)


def test_recorder_keeps_only_cond_rows_of_the_map_layers_and_declines():
    recorder = CrossMapRecorder(downscale=4)
    recorder.active = True
    rows = RowInfo.from_chunks(["cond", "uncond"], 1)
    q, k = torch.randn(2, 16, 8), torch.randn(2, 7, 8)
    assert recorder(q, k, k, _ctx("cross", 4, rows)) is None
    assert recorder(q, k, k, _ctx("cross", 2, rows, index=1)) is None  # another resolution: not recorded
    assert recorder(q, q, q, _ctx("self", 4, rows, index=5)) is None
    maps = recorder.take()
    assert list(maps) == [3]
    qh, kh = q[:1].view(1, 16, 2, 4).transpose(1, 2), k[:1].view(1, 7, 2, 4).transpose(1, 2)
    assert torch.allclose(maps[3], (qh @ kh.transpose(-1, -2) / 2).softmax(-1))  # cond row, per head
    assert recorder.take() == {}


def test_attention_loss_is_the_sum_of_per_layer_map_mse():
    maps = {3: torch.rand(1, 2, 16, 7), 11: torch.rand(1, 2, 16, 7)}
    targets = {3: torch.rand(1, 2, 16, 7), 11: torch.rand(1, 2, 16, 7)}
    direct = sum(((maps[layer] - targets[layer]) ** 2).mean() for layer in maps)
    assert attention_loss(maps, targets).item() == pytest.approx(direct.item(), rel=1e-6)
    with pytest.raises(StyleDiffusionError, match="layers"):
        attention_loss({3: maps[3]}, targets)


def test_map_target_is_the_inversion_call_with_the_same_input_latent():
    """Edit step s starts from z_{N-s}, the input of inversion call N - s (sd:746, 809); step 0 uses call N - 1."""
    assert [map_target_call(s, 5) for s in range(5)] == [4, 4, 3, 2, 1]


# -- the value schedule and P2Plus ------------------------------------------------------------------------------
def _value_inversion(steps: int = 4, tokens: int = 77, width: int = 8, identity: bool = False) -> ValueInversion:
    g = torch.Generator().manual_seed(0)
    trajectory = tuple(torch.randn(1, 4, 4, 4, generator=g) for _ in range(steps + 1))
    shape = (1, tokens, width)
    scales = tuple(torch.ones(shape) if identity else torch.rand(shape, generator=g) + 0.5 for _ in range(steps))
    shifts = tuple(torch.zeros(shape) if identity else torch.randn(shape, generator=g) for _ in range(steps))
    return ValueInversion(trajectory=trajectory, sigmas=torch.linspace(0, 3, steps + 1), convention="next",
                          fingerprint="toy", scales=scales, shifts=shifts,
                          source_embedding=torch.randn(shape, generator=g),
                          parameterisation="direct", cfg=7.5, losses=((0.0,),) * steps,
                          attention_losses=((0.0,),) * steps, final_losses=(0.0,) * steps,
                          thresholds=(0.0,) * steps, reconstruction=trajectory[0])


def test_value_schedule_source_always_target_while_s_below_tau_v_n():
    inversion = _value_inversion(steps=4)
    target = torch.randn(1, 77, 8)
    values = P2PlusValues(inversion, target, tau_v=0.5)
    for s in range(4):
        assert torch.equal(values("cond", 0, s), inversion.source_embedding * inversion.scales[s] + inversion.shifts[s])
        assert values("uncond", 0, s) is None and values("uncond", 1, s) is None
    assert torch.equal(values("cond", 1, 1), target * inversion.scales[1] + inversion.shifts[1])
    assert values("cond", 1, 2) is None and values("cond", 1, 3) is None  # int(0.5 * 4) = 2
    assert P2PlusValues(inversion, target, tau_v=0.0)("cond", 1, 0) is None
    assert values("cond", 0, None) is None  # a call outside sampling is never changed


def _self_qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(4, 16, 8, generator=g) for _ in range(3))


def test_tau_u_zero_is_plain_p2p_self_replacement():
    rows = RowInfo.from_chunks(["uncond", "cond"], 2)  # diffusers' order: [u0, u1, c0, c1]
    plain = P2PHook(None, P2PSettings(self_replace=0.6))
    hook = P2PlusHook(P2PlusControls(tau_s=0.6, tau_u=0.0))
    for step in range(4):
        ctx = _ctx("self", 1, rows, step=step)
        ours, theirs = hook(*_self_qkv(), ctx), plain(*_self_qkv(), ctx)
        assert (ours is None) == (theirs is None)
        if ours is not None:
            assert torch.equal(ours, theirs)


def test_tau_u_replaces_only_the_unconditional_target_rows_in_small_layers():
    rows = RowInfo.from_chunks(["uncond", "cond"], 2)
    q, k, v = _self_qkv()
    hook = P2PlusHook(P2PlusControls(tau_s=0.0, tau_u=0.5))
    out = hook(q, k, v, _ctx("self", 1, rows, step=1))  # int(0.5 * 4) = 2 > 1: inside the window
    plain = torch.nn.functional.scaled_dot_product_attention(
        *(t.view(4, 16, 2, 4).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(4, 16, 8)
    assert torch.allclose(out[[0, 2, 3]], plain[[0, 2, 3]], atol=1e-6)  # source uncond, both cond rows
    q2, k2 = q.clone(), k.clone()
    q2[1], k2[1] = q[0], k[0]
    swapped = torch.nn.functional.scaled_dot_product_attention(
        *(t.view(4, 16, 2, 4).transpose(1, 2) for t in (q2, k2, v))).transpose(1, 2).reshape(4, 16, 8)
    assert torch.allclose(out[1], swapped[1], atol=1e-6) and not torch.allclose(out[1], plain[1], atol=1e-4)
    assert hook(q, k, v, _ctx("self", 1, rows, step=2)) is None  # after the window
    big = P2PlusHook(P2PlusControls(tau_s=0.0, tau_u=1.0, self_replace_max_tokens=8))
    assert big(q, k, v, _ctx("self", 1, rows, step=0)) is None  # 16 queries > 8
    assert hook(q, k[:, :7], v[:, :7], _ctx("cross", 4, rows, step=1)) is None  # cross-attention: no P2P edit


def test_live_value_reaches_cond_rows_only():
    live = LiveValue()
    live.value = torch.ones(1, 77, 8)
    assert live("cond", 3, None) is live.value and live("uncond", 0, 1) is None


# -- refusals -------------------------------------------------------------------------------------------
def test_each_inversion_kind_is_refused_where_it_does_not_belong():
    plain = Inversion(trajectory=(torch.zeros(1, 4, 4, 4),) * 3, sigmas=torch.linspace(0, 1, 3), convention="next",
                      fingerprint="toy")
    with pytest.raises(StyleDiffusionError, match="plain DDIM"):
        check_value_inversion(plain)
    for branch, name in (("cond", "Target-Text Inversion"), ("uncond", "Null-Text Inversion")):
        opt = OptimisedInversion(trajectory=plain.trajectory, sigmas=plain.sigmas, convention="next",
                                 fingerprint="toy", optimisation=_optimisation(branch))
        with pytest.raises(StyleDiffusionError, match=name):
            check_value_inversion(opt)
    with pytest.raises(StyleDiffusionError, match="Value-Embedding Inversion.*StyleDiffusion Edit Sampler"):
        refuse_value_inversion(_value_inversion(), "the SpecRef Edit Sampler")
    assert check_value_inversion(_value_inversion()).steps == 4


def _optimisation(branch: str):
    from realedit.inversion.embedding_opt import EmbeddingOptimisation

    return EmbeddingOptimisation(branch=branch, embeddings=(torch.zeros(1, 77, 8),), losses=((0.0,),),
                                 final_losses=(0.0,), thresholds=(0.0,), reconstruction=torch.zeros(1, 4, 4, 4))


def test_prompts_of_another_length_or_over_77_tokens_are_refused_by_name():
    inversion = _value_inversion()
    with pytest.raises(StyleDiffusionError, match="target.*154 tokens.*one 77-token"):
        check_edit_prompts(inversion, [("target CONDITIONING", torch.zeros(1, 154, 8))])
    with pytest.raises(StyleDiffusionError, match="source.*76 tokens x 8"):
        check_edit_prompts(inversion, [("source CONDITIONING", torch.zeros(1, 76, 8))])


# -- the loop on a toy denoiser ----------------------------------------------------------------------------
class ToyModel:
    """A differentiable toy 'UNet': the cond branch reads the value input the host's value patch would give it
    and emits one 'cross-attention map' (recorded through the recorder, as a host would call it)."""

    def __init__(self, recorder: CrossMapRecorder, live: LiveValue, nan_at: int | None = None) -> None:
        self.recorder, self.live, self.nan_at = recorder, live, nan_at
        self.weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)) * 0.1
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: float, embedding: torch.Tensor, branch: str) -> torch.Tensor:
        value = self.live("cond", 0, 0) if branch == "cond" else None
        v = embedding if value is None else value
        q = x.flatten(2).transpose(1, 2)[:, :, :4].repeat(1, 1, 2)  # (1, 16, 8): depends on x only
        ctx = _ctx("cross", 4, RowInfo.from_chunks([branch], 1))
        self.recorder(q, embedding, v, ctx)
        self.calls += 1
        out = x * 0.9 + (v.mean(1) @ self.weight.T)[..., None, None] * 0.01
        if self.nan_at is not None and sigma == self.nan_at:
            out = out * float("nan")
        return out


def _toy_setup(steps: int = 3, **kw):
    recorder, live = CrossMapRecorder(4), LiveValue()
    model = ToyModel(recorder, live, **kw)
    g = torch.Generator().manual_seed(2)
    sigmas = torch.linspace(0.0, 2.0, steps + 1)
    trajectory = [torch.randn(1, 4, 4, 4, generator=g) * (1 + s) for s in sigmas.tolist()]
    cond, uncond = torch.randn(1, 77, 8, generator=g), torch.randn(1, 77, 8, generator=g)
    targets = []
    for i in range(steps):  # the "inversion's" maps, one call per step, recorded by input latent
        recorder.active = True
        model(trajectory[i], float(sigmas[i + 1]), cond, "cond")
        recorder.active = False
        targets.append({k: m.detach() for k, m in recorder.take().items()})
    return model, recorder, live, trajectory, sigmas, cond, uncond, targets


def test_a_few_iterations_lower_the_loss_and_gradients_reach_only_the_learned_parameters():
    model, recorder, live, trajectory, sigmas, cond, uncond, targets = _toy_setup()
    weight = model.weight.clone()
    settings = OptimisationSettings(iterations=5, lr=0.05, eps=0.0, delta=0.0)
    found = optimise_values(model, recorder, live, trajectory, sigmas, cond, uncond, targets,
                            DirectValues(77, 8), settings)
    assert all(step[-1] < step[0] for step in found.losses)
    assert torch.equal(model.weight, weight) and not model.weight.requires_grad
    assert live.value is None and not recorder.active and recorder.take() == {}
    assert not any(t.requires_grad for t in (*found.scales, *found.shifts, cond, uncond))
    assert all(len(a) == len(step) for a, step in zip(found.attention_losses, found.losses))


def test_direct_mode_starts_as_plain_ddim_plus_cfg_and_warm_starts():
    """The first latent loss of direct mode is the plain DDIM + CFG error; each step starts where the previous
    ended (a fresh Adam: the first update of every step has the size lr, Adam's first step)."""
    model, recorder, live, trajectory, sigmas, cond, uncond, targets = _toy_setup()
    settings = OptimisationSettings(iterations=1, lr=lambda s: 0.05 * (1 - s / 100), eps=0.0, delta=0.0)
    found = optimise_values(model, recorder, live, trajectory, sigmas, cond, uncond, targets,
                            DirectValues(77, 8), settings, attention_weight=0.0)
    from realedit.inversion.embedding_opt import cfg_combine, ddpm_mse, euler_step

    sigma, sigma_next = float(sigmas[-1]), float(sigmas[-2])
    x = trajectory[-1]
    with torch.no_grad():
        plain = euler_step(x, cfg_combine(model(x, sigma, cond, "cond"), model(x, sigma, uncond, "uncond"), 7.5),
                           sigma, sigma_next)
    assert found.losses[0][0] == pytest.approx(ddpm_mse(plain, trajectory[-2], sigma_next).item(), rel=1e-6)
    steps_0, steps_1 = found.scales[0] - 1, found.scales[1] - found.scales[0]
    assert torch.allclose(steps_0.abs().max(), torch.tensor(0.05), rtol=1e-3)  # Adam's first step: lr * sign
    assert torch.allclose(steps_1.abs().max(), torch.tensor(0.05 * (1 - 1 / 100)), rtol=1e-3)


def test_attention_loss_is_zero_on_the_exact_trajectory_with_the_official_pairing():
    """A label-blind toy (maps depend on the input latent only): evaluated at z_{N-s} with A = 1, B = 0 the
    attention term is 0 for s >= 1 with call N - s as target, and not with the label pairing N - 1 - s."""
    model, recorder, live, trajectory, sigmas, cond, uncond, targets = _toy_setup(steps=4)
    for s in range(1, 4):
        live.value, recorder.active = cond, True
        model(trajectory[4 - s], float(sigmas[4 - s]), cond, "cond")
        recorder.active, live.value = False, None
        maps = recorder.take()
        assert attention_loss(maps, targets[map_target_call(s, 4)]).item() == 0.0
        assert attention_loss(maps, targets[4 - 1 - s]).item() > 0.0


def test_a_non_finite_loss_stops_the_step_with_a_message_naming_it(caplog):
    model, recorder, live, trajectory, sigmas, cond, uncond, targets = _toy_setup(nan_at=None)
    model.nan_at = float(sigmas[-1])  # the first step's level: NaN before any update
    settings = OptimisationSettings(iterations=2, lr=0.05, eps=0.0, delta=0.0)
    with pytest.raises(ValueError, match="NaN/inf at step 0"):
        optimise_values(model, recorder, live, trajectory, sigmas, cond, uncond, targets, DirectValues(77, 8),
                        settings)
    assert live.value is None and not recorder.active
    model.nan_at = float(sigmas[-2])  # the second step's level
    with pytest.raises(ValueError, match="NaN/inf at step 1"):
        optimise_values(model, recorder, live, trajectory, sigmas, cond, uncond, targets, DirectValues(77, 8),
                        settings)


def test_optimise_steps_takes_any_parameter_set_and_per_step_caps():
    """The shared loop with two parameters, a cap per step and an extra term: x advances with the kept pair."""
    target = torch.tensor([3.0, -2.0])

    def step_loss(s: int, x: torch.Tensor):
        def evaluate(params):
            a, b = params
            return ((a + b - target) ** 2).sum() + 0.1 * (a**2).sum(), x + a.detach() + b.detach()
        return evaluate

    settings = OptimisationSettings(iterations=lambda s: s + 1, lr=0.1, eps=0.0, delta=0.0)
    results = optimise_steps(step_loss, torch.zeros(2), (torch.zeros(2), torch.zeros(2)), 3, settings)
    assert [len(r.losses) for r in results] == [1, 2, 3]
    assert results[-1].losses[-1] < results[0].losses[0]
    assert not any(p.requires_grad for r in results for p in r.params)
    with pytest.raises(ValueError, match="iterations per step.*at step 0"):
        OptimisationSettings(iterations=lambda s: 0, lr=0.1).validate(2, "cond")


def test_another_cfg_or_source_prompt_in_the_edit_is_named_in_a_warning():
    from realedit.attention.stylediffusion import edit_warnings

    inversion = _value_inversion()
    assert edit_warnings(inversion, inversion.source_embedding.clone(), 7.5, 7.5) == []
    warnings = edit_warnings(inversion, inversion.source_embedding + 1, 5.0, 7.5)
    assert "CFG 7.5" in warnings[0] and "source prompt differs" in warnings[1]

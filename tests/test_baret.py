"""BARET's edit stage: progressive transition (Eq. 3), BAM (Eq. 4-5) and the three-process sampler.

Core tests check the embeddings and the hook's row routing on plain tensors; ComfyUI tests run TTIS
and the edit on a tiny smooth UNet and compare with ComfyUI's own sampler and with the core loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
from realedit.attention.baret import (
    EDIT_SLOT,
    RECONSTRUCTION_SLOT,
    TRANSITION_SLOT,
    BaretControls,
    BaretError,
    BaretHook,
    transition_embeddings,
)
from realedit.attention.hooks import AttentionContext, LayerInfo, RowInfo
from realedit.attention.math import attention, attention_probs

EMB = (1, 77, 8)


def _embeddings(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(EMB, generator=g) for _ in range(n)]


# -- core -------------------------------------------------------------------------------------------------
def test_transition_is_eq3_with_lambda_falling_linearly():
    optimised, (target,) = _embeddings(5), _embeddings(1, seed=1)
    plan = transition_embeddings(optimised, target, BaretControls(lambda_start=0.8, lambda_end=0.1))
    assert plan.lambdas == pytest.approx([0.8, 0.625, 0.45, 0.275, 0.1])
    for lam, e, trans in zip(plan.lambdas, optimised, plan.transition):
        assert torch.allclose(trans, lam * e + (1 - lam) * target)
    assert all(torch.equal(a, b) for a, b in zip(plan.reconstruction, optimised))


def test_rigid_transition_is_exactly_the_optimised_embedding():
    optimised, (target,) = _embeddings(3), _embeddings(1, seed=1)
    plan = transition_embeddings(optimised, target, BaretControls(rigid=True))
    assert plan.lambdas == (1.0, 1.0, 1.0)
    assert all(torch.equal(t, e) for t, e in zip(plan.transition, optimised))


def test_row_schedule_replaces_only_reconstruction_and_transition_cond_rows():
    optimised, (target,) = _embeddings(2), _embeddings(1, seed=1)
    plan = transition_embeddings(optimised, target, BaretControls())
    assert torch.equal(plan.for_row("cond", RECONSTRUCTION_SLOT, 1), optimised[1])
    assert torch.equal(plan.for_row("cond", TRANSITION_SLOT, 0), plan.transition[0])
    assert plan.for_row("cond", EDIT_SLOT, 0) is None
    assert plan.for_row("uncond", RECONSTRUCTION_SLOT, 0) is None
    assert plan.for_row("cond", RECONSTRUCTION_SLOT, 2) is None  # outside the schedule


def test_mismatched_token_counts_and_missing_embeddings_are_clear_errors():
    with pytest.raises(BaretError, match="token by token"):
        transition_embeddings(_embeddings(2), torch.zeros(1, 154, 8), BaretControls())
    with pytest.raises(BaretError, match="Target-Text Inversion"):
        transition_embeddings([], torch.zeros(EMB), BaretControls())
    with pytest.raises(BaretError, match="lambda_start"):
        BaretControls(lambda_start=1.5)


def _ctx(kind: str, step: int, total: int = 10, tokens: int = 16) -> AttentionContext:
    return AttentionContext(layer=LayerInfo(0, "up", 1, ("output", 0, 0)), kind=kind, grid=(4, tokens // 4),
                            heads=2, dim_head=4, rows=RowInfo.from_chunks(["uncond", "cond"], 3), step=step,
                            total_steps=total, host_attention=None)


def _qkv(kind: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    keys = 16 if kind == "self" else 77
    return tuple(torch.randn(6, n, 8, generator=g) for n in (16, keys, keys))


def test_bam_injects_reconstruction_self_maps_and_transition_cross_maps_into_the_edit_cond_row():
    hook = BaretHook(BaretControls(self_attention_fraction=0.3, cross_attention_fraction=0.6))
    cond = {slot: 3 + slot for slot in range(3)}  # rows: uncond 0-2, cond 3-5
    q, k, v = _qkv("self")
    out = hook(q, k, v, _ctx("self", 2))
    plain = attention(q, k, v, 2)
    probs = attention_probs(q, k, 2)  # (rows, heads, q, k)
    expected = (probs[cond[RECONSTRUCTION_SLOT]] @ v[cond[EDIT_SLOT]].view(16, 2, 4).transpose(0, 1))
    assert torch.allclose(out[cond[EDIT_SLOT]], expected.transpose(0, 1).reshape(16, 8), atol=1e-6)
    untouched = [r for r in range(6) if r != cond[EDIT_SLOT]]
    assert torch.allclose(out[untouched], plain[untouched], atol=1e-6)
    assert hook(q, k, v, _ctx("self", 3)) is None  # int(0.3 * 10) = 3: window over
    assert hook(*_qkv("self"), _ctx("self", 0, tokens=64 * 64 // 64)) is not None
    q, k, v = _qkv("cross")
    out = hook(q, k, v, _ctx("cross", 5))
    probs = attention_probs(q, k, 2)
    expected = probs[cond[TRANSITION_SLOT]] @ v[cond[EDIT_SLOT]].view(77, 2, 4).transpose(0, 1)
    assert torch.allclose(out[cond[EDIT_SLOT]], expected.transpose(0, 1).reshape(16, 8), atol=1e-6)
    assert torch.allclose(out[untouched], attention(q, k, v, 2)[untouched], atol=1e-6)
    assert hook(q, k, v, _ctx("cross", 6)) is None


def test_bam_leaves_large_layers_alone():
    hook = BaretHook(BaretControls(attention_max_tokens=8))
    assert hook(*_qkv("self"), _ctx("self", 0)) is None  # 16 query tokens > 8


# -- ComfyUI host -----------------------------------------------------------------------------------------
STEPS, ITERATIONS, LR = 3, 2, 2e-2


@pytest.fixture(scope="module")
def setup(comfy):
    import comfy_helpers
    from realedit.hosts.comfy_autograd import ttis_invert
    from realedit.testbed.comfy_models import make_tiny_unet

    model = make_tiny_unet("sd1", output_scale=0.01)
    target, negative = comfy_helpers.conditioning("sd1", 1), comfy_helpers.conditioning("sd1", 2)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    inversion = ttis_invert(model, latent, target, negative, steps=STEPS, iterations=ITERATIONS, lr=LR,
                            eps=0.0, delta=0.0)
    return model, inversion, target, negative


def _edit(setup, **controls):
    from realedit.hosts.comfy_baret import baret_edit

    model, inversion, target, negative = setup
    return baret_edit(model, inversion, target, negative, controls=BaretControls(**controls))


def test_rigid_transition_equals_reconstruction(setup):
    result = _edit(setup, rigid=True)
    assert torch.equal(result.transition, result.reconstruction)
    assert not torch.equal(result.edit, result.reconstruction)


def test_without_bam_the_edit_is_comfyuis_own_sampler_with_the_target_prompt(setup):
    import comfy.sample

    model, inversion, target, negative = setup
    result = _edit(setup, self_attention_fraction=0.0, cross_attention_fraction=0.0)
    z_T = model.model.process_latent_out(inversion.z_T)
    plain = comfy.sample.sample(model, torch.zeros_like(z_T), STEPS, 7.5, "euler", "ddim_uniform", target, negative,
                                z_T, seed=0, disable_noise=True, disable_pbar=True)
    # a batch of 3 rows vs 1: the same math, float rounding only
    assert torch.allclose(result.edit, plain, rtol=1e-4, atol=1e-5), (result.edit - plain).abs().max()


def test_reconstruction_and_transition_follow_the_per_step_embeddings(setup):
    """The scheduled contexts give the rows e_opt,s and e_trans,s: equal to the core loop's sampling."""
    from realedit.hosts.comfy_autograd import branch_denoiser, embedding_and_extras
    from realedit.inversion.embedding_opt import reconstruct

    model, inversion, target, negative = setup
    result = _edit(setup)
    plan = transition_embeddings(inversion.embeddings, target[0][0], BaretControls())
    shape, device = inversion.z_T.shape, torch.device("cpu")
    _, cond_extras = embedding_and_extras(model, target, shape, device, "positive")
    uncond, uncond_extras = embedding_and_extras(model, negative, shape, device, "negative")
    denoise = branch_denoiser(model, {"cond": cond_extras, "uncond": uncond_extras}, inversion.sampling_sigmas)
    for rows, latent in ((plan.reconstruction, result.reconstruction), (plan.transition, result.transition)):
        with torch.no_grad():
            expected, _ = reconstruct(denoise, inversion.trajectory, inversion.sigmas, list(rows), uncond, 7.5)
        got = model.model.process_latent_in(latent)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    assert torch.allclose(model.model.process_latent_in(result.reconstruction), inversion.optimisation.reconstruction,
                          rtol=1e-4, atol=1e-5)


def test_bam_changes_only_the_edit_and_leaves_the_model_unpatched(setup):
    model, *_ = setup
    options = copy.deepcopy(model.model_options)
    with_bam = _edit(setup)
    without = _edit(setup, self_attention_fraction=0.0, cross_attention_fraction=0.0)
    # BAM's cross-attention computes every row's softmax explicitly: float rounding on the other rows only
    assert torch.allclose(with_bam.reconstruction, without.reconstruction, atol=2e-5)
    assert torch.allclose(with_bam.transition, without.transition, atol=2e-5)
    assert not torch.allclose(with_bam.edit, without.edit, rtol=1e-3, atol=1e-3)
    assert model.model_options == options


def test_scheduled_context_stacks_with_another_packs_attn2_patch(setup):
    model, inversion, target, negative = setup
    seen = []

    def other_pack(n, context, value, extra_options):
        seen.append(context.shape)
        return n, context, value

    patched = model.clone()
    patched.set_model_attn2_patch(other_pack)
    from realedit.hosts.comfy_baret import baret_edit

    baret_edit(patched, inversion, target, negative)
    assert seen, "the other pack's attn2 patch no longer runs"


def test_bad_inversions_are_clear_errors(setup):
    from realedit.hosts.comfy_autograd import null_text_invert
    from realedit.hosts.comfy_baret import baret_edit
    from realedit.hosts.comfy_sampling import ddim_invert
    from realedit.testbed.comfy_models import make_tiny_unet

    model, inversion, target, negative = setup
    latent = torch.randn(1, 4, 16, 16)
    plain = ddim_invert(model, latent, target, steps=STEPS)
    with pytest.raises(BaretError, match="no optimised embeddings"):
        baret_edit(model, plain, target, negative)
    null = null_text_invert(model, latent, target, negative, steps=STEPS, iterations=1)
    with pytest.raises(BaretError, match="null-text"):
        baret_edit(model, null, target, negative)
    with pytest.raises(ValueError, match="another model|different model|MODEL"):
        baret_edit(make_tiny_unet("sd1", seed=7, output_scale=0.01), inversion, target, negative)
    with pytest.raises(BaretError, match="token by token"):
        baret_edit(model, inversion, [[torch.zeros(1, 154, 64), {}]], negative)


def test_the_edit_refuses_another_target_negative_or_cfg_than_ttis_used(setup):
    """Eq. 3 and the reconstruction hold only for TTIS's own target, negative and CFG: a mismatch used to run
    silently; now it is refused by name (and the inputs TTIS used still pass)."""
    import comfy_helpers
    from realedit.hosts.comfy_baret import baret_edit

    model, inversion, target, negative = setup
    other = comfy_helpers.conditioning("sd1", 9)
    with pytest.raises(BaretError, match="target prompt of the BARET edit differs"):
        baret_edit(model, inversion, other, negative)
    with pytest.raises(BaretError, match="negative prompt of the BARET edit differs"):
        baret_edit(model, inversion, target, other)
    with pytest.raises(BaretError, match="cfg is 5 but Target-Text Inversion optimised .* for cfg 7.5"):
        baret_edit(model, inversion, target, negative, cfg=5.0)
    assert torch.isfinite(baret_edit(model, inversion, target, negative, cfg=inversion.cfg).edit).all()


class _SpyBam(BaretHook):
    """BaretHook that checks, in the real sampling run, which process supplied the maps each BAM call used."""

    calls: list[tuple[str, int, int, bool]] = []

    def __call__(self, q, k, v, ctx):
        out = super().__call__(q, k, v, ctx)
        _SpyBam.calls.append((ctx.kind, ctx.tokens, ctx.step, out is not None))
        if out is None:
            return out
        row = {slot: ctx.rows.rows("cond", slot)[0] for slot in (RECONSTRUCTION_SLOT, TRANSITION_SLOT, EDIT_SLOT)}
        donor = row[RECONSTRUCTION_SLOT] if ctx.kind == "self" else row[TRANSITION_SLOT]
        heads, edit = ctx.heads, row[EDIT_SLOT]
        probs = attention_probs(q[donor : donor + 1], k[donor : donor + 1], heads)[0]  # (heads, q, k) of the donor
        expected = (probs @ v[edit].view(k.shape[1], heads, -1).transpose(0, 1)).transpose(0, 1).reshape(q.shape[1], -1)
        assert torch.allclose(out[edit].float(), expected, atol=1e-4), (ctx.kind, ctx.step, ctx.layer.index)
        others = [r for r in range(q.shape[0]) if r != edit]
        assert torch.allclose(out[others], attention(q, k, v, heads)[others], atol=1e-4)
        return out


@pytest.mark.slow
def test_in_a_real_run_bam_takes_reconstruction_self_maps_and_transition_cross_maps_and_skips_large_layers(
        comfy, monkeypatch):
    """A 40x40 latent: the tiny UNet's finest layers have 1600 > 32x32 query tokens. In ComfyUI's own sampling
    run the edit's self-attention maps come from the reconstruction, its cross-attention maps from the
    transition (checked numerically on the very rows of each call), and those large layers are left alone."""
    import comfy_helpers
    from realedit.hosts import comfy_baret
    from realedit.hosts.comfy_sampling import ddim_invert
    from realedit.inversion.embedding_opt import EmbeddingOptimisation, OptimisedInversion
    from realedit.testbed.comfy_models import make_tiny_unet

    model = make_tiny_unet("sd1", output_scale=0.01)
    target, negative = comfy_helpers.conditioning("sd1", 1), comfy_helpers.conditioning("sd1", 2)
    latent = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(3))
    plain = ddim_invert(model, latent, target, steps=2)
    # per-step "optimised" target embeddings (no autograd needed to route maps): e_target plus a little noise
    e = target[0][0]
    found = tuple(e + 0.1 * torch.randn(e.shape, generator=torch.Generator().manual_seed(s)) for s in range(2))
    optimisation = EmbeddingOptimisation("cond", found, ((0.0,),) * 2, (0.0,) * 2, (1.0,) * 2, plain.z_T)
    inversion = OptimisedInversion.from_result(plain, optimisation, target[0][0], negative[0][0], 7.5)
    monkeypatch.setattr(comfy_baret, "BaretHook", _SpyBam)
    _SpyBam.calls = []
    controls = BaretControls(self_attention_fraction=0.5, cross_attention_fraction=0.5)
    comfy_baret.baret_edit(model, inversion, target, negative, controls=controls)
    in_window = [(kind, tokens, acted) for kind, tokens, step, acted in _SpyBam.calls if step == 0]
    large = [acted for kind, tokens, acted in in_window if kind == "self" and tokens > 32 * 32]
    small = [acted for kind, tokens, acted in in_window if kind == "self" and tokens <= 32 * 32]
    cross = [acted for kind, _, acted in in_window if kind == "cross"]
    assert large and not any(large)  # 40x40 = 1600 tokens: the host's own attention
    assert small and all(small) and cross and all(cross)
    assert not any(acted for _, _, step, acted in _SpyBam.calls if step != 0)  # int(0.5 * 2) = 1: window over


# -- nodes and the shipped workflow ---------------------------------------------------------------------
WORKFLOW = "baret_text_edit.json"


def _workflow(steps: int = 3) -> tuple[dict, dict, str]:
    import json
    from pathlib import Path

    from realedit.testbed.demo_inputs import tiny_run

    path = Path(__file__).resolve().parent.parent / "api_workflows" / WORKFLOW
    return tiny_run(json.loads(path.read_text()), steps=steps)


def test_workflow_runs_ttis_and_the_edit_and_reports_every_step(runner, tmp_path):
    workflow, overrides, family = _workflow()
    result = runner.run_workflow(workflow, outputs=["6", "7"], overrides=overrides, tiny_checkpoint=family,
                                 output_dir=tmp_path)
    edit, transition, reconstruction = (out["samples"] for out in result["7"])
    assert edit.shape == transition.shape == reconstruction.shape == (1, 4, 16, 16)
    assert all(torch.isfinite(t).all() for t in (edit, transition, reconstruction))
    assert not torch.equal(edit, transition)
    report = result.ui["6"]["text"][0]
    assert [line.split(":")[0] for line in report.splitlines()[:3]] == ["step 0", "step 1", "step 2"]
    assert len(list(tmp_path.rglob("realedit_baret_*.png"))) == 3


def test_rigid_node_setting_makes_the_transition_the_reconstruction(runner, tmp_path):
    workflow, overrides, family = _workflow(steps=2)
    workflow["7"]["inputs"]["rigid"] = True
    result = runner.run_workflow(workflow, outputs=["7"], overrides=overrides, tiny_checkpoint=family,
                                 output_dir=tmp_path)
    _, transition, reconstruction = (out["samples"] for out in result["7"])
    assert torch.equal(transition, reconstruction)


def test_a_plain_ddim_inversion_fed_to_the_baret_sampler_is_refused_by_name(runner, tmp_path):
    workflow, overrides, family = _workflow(steps=2)
    workflow["6"] = {"class_type": "RealEditDDIMInvert", "inputs": {
        "model": ["1", 0], "latent": ["3", 0], "positive": ["4", 0], "steps": 2, "guidance": 1.0,
        "scheduler": "ddim_uniform", "convention": "next"}}
    with pytest.raises(runner.WorkflowError, match="Target-Text Inversion"):
        runner.run_workflow(workflow, outputs=["7"], overrides=overrides, tiny_checkpoint=family, output_dir=tmp_path)


def test_iterations_below_one_are_refused_by_name(runner, tmp_path):
    workflow, overrides, family = _workflow(steps=2)
    workflow["6"]["inputs"]["iterations"] = 0
    with pytest.raises(runner.WorkflowError, match="iterations"):
        runner.run_workflow(workflow, outputs=["6"], overrides=overrides, tiny_checkpoint=family, output_dir=tmp_path)

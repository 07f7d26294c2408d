"""Null-text inversion + the SpecRef (P2P) edit sampler: the classic real-image editing pipeline.

The edit batch's unconditional rows take the embedding null-text inversion optimised for each step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfy
STEPS = 3
WORKFLOW = Path(__file__).resolve().parent.parent / "api_workflows" / "nulltext_p2p_edit.json"


@pytest.fixture(scope="module")
def setup(comfy):
    import comfy_helpers
    from realedit.hosts.comfy_autograd import null_text_invert
    from realedit.testbed.comfy_models import make_tiny_unet

    model = make_tiny_unet("sd1", output_scale=0.01)
    source, target = comfy_helpers.conditioning("sd1", 1), comfy_helpers.conditioning("sd1", 4)
    negative = comfy_helpers.conditioning("sd1", 2)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    inversion = null_text_invert(model, latent, source, negative, steps=STEPS, iterations=2)
    return model, inversion, source, target, negative


def test_every_uncond_row_takes_the_null_text_embedding_of_its_step(setup):
    """With every control off, the edit path is CFG sampling from z_T with the target prompt and the
    per-step null-text embeddings: equal to the core loop's sampling with exactly those embeddings."""
    from realedit.attention.settings import P2PSettings, SpecRefSettings
    from realedit.attention.specref import SpecRefControls
    from realedit.hosts.comfy_autograd import branch_denoiser, embedding_and_extras
    from realedit.hosts.comfy_edit import specref_edit
    from realedit.inversion.embedding_opt import reconstruct

    model, inversion, source, target, negative = setup
    controls = SpecRefControls(settings=SpecRefSettings(p2p=P2PSettings(cross_replace=0.0, self_replace=0.0)))
    result = specref_edit(model, inversion, source, target, negative, cfg=7.5, controls=controls)
    shape, device = inversion.z_T.shape, torch.device("cpu")
    target_emb, cond_extras = embedding_and_extras(model, target, shape, device, "positive")
    _, uncond_extras = embedding_and_extras(model, negative, shape, device, "negative")
    denoise = branch_denoiser(model, {"cond": cond_extras, "uncond": uncond_extras}, inversion.sampling_sigmas)
    with torch.no_grad():
        expected, _ = reconstruct(denoise, inversion.trajectory, inversion.sigmas, target_emb,
                                  list(inversion.embeddings), 7.5)
        with_empty, _ = reconstruct(denoise, inversion.trajectory, inversion.sigmas, target_emb, negative[0][0], 7.5)
    got = model.model.process_latent_in(result.latent)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(got, with_empty, rtol=1e-4, atol=1e-5)  # the schedule made a difference


def test_a_ttis_inversion_is_sent_to_the_baret_sampler(setup):
    from realedit.attention.specref import SpecRefError
    from realedit.hosts.comfy_autograd import ttis_invert
    from realedit.hosts.comfy_edit import specref_edit

    model, _, source, target, negative = setup
    ttis = ttis_invert(model, torch.randn(1, 4, 16, 16), target, negative, steps=STEPS, iterations=1)
    with pytest.raises(SpecRefError, match="BARET Edit Sampler"):
        specref_edit(model, ttis, source, target, negative)


def test_null_text_workflow_runs_and_its_reconstruction_is_pinned(runner, tmp_path):
    from realedit.testbed.demo_inputs import tiny_run

    workflow, overrides, family = tiny_run(json.loads(WORKFLOW.read_text()), steps=STEPS)
    result = runner.run_workflow(workflow, outputs=["3", "7", "8"], overrides=overrides, tiny_checkpoint=family,
                                 output_dir=tmp_path)
    edit, reconstruction = result["8"][0]["samples"], result["8"][1]["samples"]
    assert edit.shape == (1, 4, 16, 16) and torch.isfinite(edit).all()
    assert not torch.equal(edit, reconstruction)
    assert torch.allclose(reconstruction, result["3"][0]["samples"], atol=1e-5)  # pinned to the photo's inversion
    assert result["7"][1].branch == "uncond" and len(result["7"][1].embeddings) == STEPS
    assert list(tmp_path.rglob("realedit_nulltext_p2p_edited*.png"))

"""StyleDiffusion nodes and the shipped workflow, through ComfyUI's executor (tiny checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from realedit.settings.stylediffusion import SD_DEFAULTS, origin

WORKFLOW = Path(__file__).resolve().parent.parent / "api_workflows" / "stylediffusion_edit.json"


def _workflow(steps: int = 2, iterations: int = 2) -> tuple[dict, dict, str]:
    from realedit.testbed.demo_inputs import tiny_run

    workflow, overrides, family = tiny_run(json.loads(WORKFLOW.read_text()), steps=steps)
    workflow["7"]["inputs"]["max_iterations"] = iterations
    return workflow, overrides, family


def _inputs(node: type) -> dict:
    schema = node.define_schema()
    return {i.id: i for i in schema.inputs}


def test_node_defaults_and_tooltips_come_from_the_settings(runner):
    from realedit.nodes.stylediffusion import StyleDiffusionEditSampler, ValueEmbeddingInversion

    inv, edit = _inputs(ValueEmbeddingInversion), _inputs(StyleDiffusionEditSampler)
    for name, field in (("steps", "steps"), ("cfg", "cfg"), ("learning_rate", "lr"),
                        ("early_stop_eps", "early_stop_eps"), ("early_stop_delta", "early_stop_delta"),
                        ("attention_weight", "attention_weight"), ("seed", "seed")):
        assert inv[name].default == getattr(SD_DEFAULTS, field), name
        assert origin(field) in inv[name].tooltip, name
    assert inv["max_iterations"].default == SD_DEFAULTS.iteration_base
    for name in ("tau_v", "tau_c", "tau_s", "tau_u", "blend_threshold", "steps", "cfg", "reweight_factor"):
        assert edit[name].default == getattr(SD_DEFAULTS, name), name
        assert origin(name) in edit[name].tooltip, name
    assert edit["source_row"].default == "free" and "pin_source" not in edit
    assert "official" in origin("tau_v") and "direct" in ValueEmbeddingInversion.define_schema().description


def test_workflow_inverts_edits_and_reports_every_step(runner, tmp_path):
    workflow, overrides, family = _workflow()
    result = runner.run_workflow(workflow, outputs=["7", "8"], overrides=overrides, tiny_checkpoint=family,
                                 output_dir=tmp_path)
    z_T, inversion = result["7"]
    edited, source, blend = result["8"]
    assert inversion.steps == 2 and inversion.parameterisation == "direct"
    assert edited["samples"].shape == source["samples"].shape == z_T["samples"].shape == (1, 4, 16, 16)
    assert torch.isfinite(edited["samples"]).all() and not torch.equal(edited["samples"], source["samples"])
    assert blend.shape == (1, 128, 128)
    report = result.ui["7"]["text"][0].splitlines()
    assert report[0].startswith("StyleDiffusion value inversion (direct)")
    assert [line.split(":")[0] for line in report[1:3]] == ["step 0", "step 1"]
    assert len(list(tmp_path.rglob("realedit_stylediffusion_*.png"))) == 2


def test_progress_counts_every_inversion_step_and_iteration_and_cancel_stops(runner, tmp_path, monkeypatch):
    import comfy.model_management
    import comfy.utils

    updates: list[tuple[int, int]] = []
    original = comfy.utils.ProgressBar.update_absolute

    def record(self, value, total=None, preview=None):
        updates.append((value, total))
        return original(self, value, total, preview)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", record)
    workflow, overrides, family = _workflow(iterations=2)
    workflow["7"]["inputs"]["early_stop_eps"] = 0.0
    workflow["7"]["inputs"]["early_stop_delta"] = 0.0
    runner.run_workflow(workflow, outputs=["7"], overrides=overrides, tiny_checkpoint=family, output_dir=tmp_path)
    inversion_bar = [u for u in updates if u[1] == 2 + 2 * 2]  # 2 inversion steps + 2 x 2 iterations
    assert [v for v, _ in inversion_bar] == [1, 2, 3, 4, 5, 6]

    def interrupt(self, value, total=None, preview=None):
        if value == 3:
            comfy.model_management.interrupt_current_processing(True)
        return original(self, value, total, preview)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", interrupt)
    with pytest.raises(Exception, match="Interrupt|interrupt"):
        runner.run_workflow(workflow, outputs=["7"], overrides=overrides, tiny_checkpoint=family, output_dir=tmp_path)
    comfy.model_management.interrupt_current_processing(False)


def test_a_plain_ddim_inversion_is_refused_by_the_stylediffusion_sampler_by_name(runner, tmp_path):
    workflow, overrides, family = _workflow()
    workflow["7"] = {"class_type": "RealEditDDIMInvert", "inputs": {
        "model": ["1", 0], "latent": ["3", 0], "positive": ["5", 0], "steps": 2, "guidance": 1.0,
        "scheduler": "ddim_uniform", "convention": "next"}}
    with pytest.raises(runner.WorkflowError, match="plain DDIM.*Value-Embedding Inversion"):
        runner.run_workflow(workflow, outputs=["8"], overrides=overrides, tiny_checkpoint=family, output_dir=tmp_path)


def test_a_stylediffusion_inversion_is_refused_by_the_specref_sampler_by_name(runner, tmp_path):
    workflow, overrides, family = _workflow()
    workflow["8"] = {"class_type": "RealEditSpecRefEditSampler", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "inversion": ["7", 1], "source_text": ["4", 0],
        "target_text": "a photo of a dog on a stone wall", "negative": ["6", 0], "steps": 2, "cfg": 7.5,
        "edit_mode": "auto", "cross_replace": 0.8, "self_replace": 0.4, "blend_threshold": 0.3}}
    del workflow["11"], workflow["12"]
    with pytest.raises(runner.WorkflowError, match="StyleDiffusion Edit Sampler"):
        runner.run_workflow(workflow, outputs=["8"], overrides=overrides, tiny_checkpoint=family, output_dir=tmp_path)


def test_a_step_count_ddim_uniform_runs_one_more_of_edits_as_set_on_both_nodes(runner, tmp_path):
    """ComfyUI's ddim_uniform runs 7 steps for 6 (31 for the shipped workflow's 30, which every run refused): the
    same steps on both nodes edit along the inversion's 7; 7 on the edit node is refused, naming the 6."""
    workflow, overrides, family = _workflow(steps=6, iterations=1)
    result = runner.run_workflow(workflow, outputs=["7", "8"], overrides=overrides, tiny_checkpoint=family,
                                 output_dir=tmp_path)
    inversion = result["7"][1]
    assert (inversion.steps, inversion.steps_asked) == (7, 6) and len(inversion.scales) == 7
    assert torch.isfinite(result["8"][0]["samples"]).all()
    workflow["8"]["inputs"]["steps"] = 7
    with pytest.raises(runner.WorkflowError, match="INVERSION was made with 6 steps but this node uses 7"):
        runner.run_workflow(workflow, outputs=["8"], overrides=overrides, tiny_checkpoint=family, output_dir=tmp_path)


def test_steps_other_than_the_inversions_long_prompts_and_absent_map_layers_are_refused_by_name(runner, tmp_path):
    workflow, overrides, family = _workflow()
    workflow["8"]["inputs"]["steps"] = 3
    with pytest.raises(runner.WorkflowError, match="made with 2 steps"):
        runner.run_workflow(workflow, outputs=["8"], overrides=overrides, tiny_checkpoint=family, output_dir=tmp_path)
    workflow, overrides, family = _workflow()
    workflow["8"]["inputs"]["target_text"] = "a cat " * 60
    with pytest.raises(runner.WorkflowError, match="target prompt.*tokens"):
        runner.run_workflow(workflow, outputs=["8"], overrides=overrides, tiny_checkpoint=family, output_dir=tmp_path)
    for node in ("7", "8"):  # the inversion's maps and the edit's
        workflow, overrides, family = _workflow()
        workflow[node]["inputs"]["map_downscale"] = 3
        with pytest.raises(runner.WorkflowError, match="no attention layers at map_downscale 3"):
            runner.run_workflow(workflow, outputs=["8"], overrides=overrides, tiny_checkpoint=family,
                                output_dir=tmp_path)


def test_the_inversion_keeps_the_maps_of_the_layers_map_downscale_names(runner, tmp_path):
    """The attention term of the value inversion reads the layers at ``map_downscale``: at 2 (8x8 maps of the
    tiny model's 16x16 latent) it differs from the default 4's, and so do the values it learns."""
    inversions = {}
    for downscale in (4, 2):
        workflow, overrides, family = _workflow()
        workflow["7"]["inputs"]["map_downscale"] = downscale
        inversions[downscale] = runner.run_workflow(workflow, outputs=["7"], overrides=overrides,
                                                    tiny_checkpoint=family, output_dir=tmp_path)["7"][1]
    default, finer = inversions[4], inversions[2]
    assert default.attention_losses[0][0] != finer.attention_losses[0][0]
    assert not all(torch.equal(a, b) for a, b in zip(default.shifts, finer.shifts))


def test_the_inversion_node_takes_a_clip_vision_of_the_text_width_and_refuses_others(runner, tmp_path):
    import comfy_helpers
    from realedit.nodes.stylediffusion import ValueEmbeddingInversion
    from realedit.testbed.comfy_models import make_tiny_unet
    from test_stylediffusion_comfy import _tiny_clip_vision

    model = make_tiny_unet("sd1", output_scale=0.01)
    source, negative = comfy_helpers.conditioning("sd1", 1), comfy_helpers.conditioning("sd1", 2)
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))}
    image = torch.rand(1, 32, 32, 3)
    settings = dict(steps=2, cfg=7.5, max_iterations=1, learning_rate=1e-2, early_stop_eps=1e-5,
                    early_stop_delta=2e-5, attention_weight=1.0, seed=0, scheduler="ddim_uniform", convention="next")
    out = ValueEmbeddingInversion.execute(model, latent, source, negative, **settings,
                                          clip_vision=_tiny_clip_vision(tmp_path, 64), image=image)
    assert out.result[1].parameterisation == "clip"
    with pytest.raises(ValueError, match="32 wide \\(projection: 48\\).*64 wide"):
        ValueEmbeddingInversion.execute(model, latent, source, negative, **settings,
                                        clip_vision=_tiny_clip_vision(tmp_path, 48), image=image)
    with pytest.raises(ValueError, match="image is not"):
        ValueEmbeddingInversion.execute(model, latent, source, negative, **settings,
                                        clip_vision=_tiny_clip_vision(tmp_path, 64))

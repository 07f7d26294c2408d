"""Shipped workflows: UI files match their API twins, and the twins run through ComfyUI's executor."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfy
ROOT = Path(__file__).resolve().parent.parent
API_TWINS = sorted((ROOT / "api_workflows").glob("*.json"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def small(workflow: dict, size: int = 128, steps: int = 3) -> dict:
    """The twin at test size: 128 px images and a few steps (the graph itself is unchanged)."""
    workflow = copy.deepcopy(workflow)
    for node in workflow.values():
        inputs = node["inputs"]
        for key in ("width", "height"):
            if key in inputs and not isinstance(inputs[key], list):
                inputs[key] = size
        if "steps" in inputs and not isinstance(inputs["steps"], list):
            inputs["steps"] = steps
    return workflow


@pytest.mark.parametrize("api_path", API_TWINS, ids=lambda p: p.stem)
def test_ui_workflow_queues_exactly_its_api_twin(runner, api_path):
    from realedit.testbed.workflow_format import ui_to_api

    import nodes

    ui_path = ROOT / "example_workflows" / api_path.name
    assert ui_path.is_file(), "run scripts/build_ui_workflows.py"
    assert ui_to_api(_load(ui_path), nodes.NODE_CLASS_MAPPINGS) == _load(api_path)


def test_template_browser_lists_each_workflow_once():
    """ComfyUI serves templates from every one of these folder names (app/custom_node_manager.py): only
    example_workflows/ may exist, and it holds exactly one UI file per API twin."""
    scanned = ["example_workflows", "example", "examples", "workflow", "workflows"]
    assert [name for name in scanned if (ROOT / name).exists()] == ["example_workflows"]
    assert sorted(p.name for p in (ROOT / "example_workflows").glob("*.json")) == [p.name for p in API_TWINS]


def test_probe_workflow_runs_and_reports_every_layer_and_step(runner, tmp_path):
    workflow = small(_load(ROOT / "api_workflows" / "attention_probe.json"))
    first = runner.run_workflow(workflow, outputs=["6", "9"], output_dir=tmp_path)
    summary = first["9"][0]
    assert "16 layers" in summary and "steps seen: [0, 1, 2] of [3]" in summary
    assert "[uncond,cond]" in summary or "[cond,uncond]" in summary
    assert list(first.ui["9"]["text"]) == [summary]
    # the same graph again: identical latent, identical report (no state leaks across runs)
    second = runner.run_workflow(workflow, outputs=["6", "9"], output_dir=tmp_path)
    assert torch.equal(first["6"][0]["samples"], second["6"][0]["samples"])
    assert second["9"][0] == summary


def test_saved_images_go_to_a_relative_output_folder(runner, tmp_path, monkeypatch):
    """The demo's default ``--out out/demo`` is relative: ComfyUI's SaveImage used to refuse it ("Can't mix
    absolute and relative paths")."""
    monkeypatch.chdir(tmp_path)
    result = runner.run_workflow(small(_load(ROOT / "api_workflows" / "attention_probe.json")), output_dir="out/demo")
    saved = [image["filename"] for ui in result.ui.values() for image in ui.get("images", [])]
    assert saved and all((tmp_path / "out" / "demo" / name).is_file() for name in saved)


def test_probe_changes_nothing_compared_with_the_unprobed_graph(runner, tmp_path):
    workflow = small(_load(ROOT / "api_workflows" / "attention_probe.json"))
    probed = runner.run_workflow(workflow, outputs=["6"], output_dir=tmp_path)["6"][0]["samples"]
    plain_graph = copy.deepcopy(workflow)
    plain_graph["6"]["inputs"]["model"] = ["1", 0]
    del plain_graph["9"], plain_graph["2"]
    plain = runner.run_workflow(plain_graph, outputs=["6"], output_dir=tmp_path)["6"][0]["samples"]
    assert torch.equal(probed, plain)

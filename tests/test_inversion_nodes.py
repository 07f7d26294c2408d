"""The inversion nodes in ComfyUI's executor: RealEdit Invert Source + Reference equals RealEdit DDIM
Invert + RealEdit Reference Features, and mismatched INVERSION / REF_FEATURES are refused by the sampler."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfy
ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "api_workflows" / "specref_object_replace.json"
INVERT, REFERENCE, SAMPLER, PAIR = "9", "10", "11", "19"
SIZE, STEPS = 128, 3
TOLERANCE = 1e-4  # relative: batched vs separate kernels, through the tiny (rough) random UNet


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def overrides():
    from realedit.testbed.images import reference_scene, source_scene

    source, reference = source_scene(SIZE, SIZE), reference_scene(SIZE, SIZE)
    return {"2": (source.image, torch.zeros(1, SIZE, SIZE)), "3": (reference.image, reference.mask)}


@pytest.fixture(scope="module")
def workflow() -> dict:
    """The shipped SpecRef workflow at test size, fp32 bank, plus the pair node fed the same inputs."""
    workflow = json.loads(WORKFLOW.read_text())
    for node in workflow.values():
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = STEPS
    workflow[REFERENCE]["inputs"]["dtype"] = "fp32"
    pair_inputs = {k: v for k, v in workflow[REFERENCE]["inputs"].items() if k not in ("reference", "conditioning")}
    pair_inputs.update(source=["4", 0], source_conditioning=["6", 0], reference=["5", 0],
                       reference_conditioning=["7", 0], batch=True)
    workflow[PAIR] = {"class_type": "RealEditInvertSourceAndReference", "inputs": pair_inputs}
    return workflow


def test_pair_node_equals_the_two_nodes_and_feeds_the_sampler(runner, overrides, workflow, tmp_path):
    result = runner.run_workflow(workflow, outputs=[INVERT, REFERENCE, PAIR, SAMPLER], overrides=overrides,
                                 output_dir=tmp_path)
    z_T, inversion = result[INVERT]
    features = result[REFERENCE][0]
    pair_z_T, pair_inversion, pair_features = result[PAIR]
    assert "one batch" in result.ui[PAIR]["text"][0]
    assert _rel(pair_z_T["samples"], z_T["samples"]) < TOLERANCE
    for a, b in zip(pair_inversion.trajectory, inversion.trajectory):
        assert _rel(a, b) < TOLERANCE
    assert set(pair_features.bank.entries) == set(features.bank.entries)
    for key, (k, v) in pair_features.bank.entries.items():
        assert _rel(k, features.bank.entries[key][0]) < TOLERANCE
        assert _rel(v, features.bank.entries[key][1]) < TOLERANCE

    paired = copy.deepcopy(workflow)
    paired[SAMPLER]["inputs"].update(inversion=[PAIR, 1], ref_features=[PAIR, 2])
    edited = runner.run_workflow(paired, outputs=[SAMPLER], overrides=overrides, output_dir=tmp_path)[SAMPLER][0]
    assert _rel(edited["samples"], result[SAMPLER][0]["samples"]) < 1e-3  # the same edit


def test_pair_node_with_different_sizes_inverts_separately(runner, overrides, workflow, tmp_path):
    from realedit.testbed.images import reference_scene

    wide = reference_scene(SIZE, SIZE + 64)
    different = {**overrides, "3": (wide.image, wide.mask)}
    result = runner.run_workflow(workflow, outputs=[PAIR], overrides=different, output_dir=tmp_path)
    assert f"inverted separately: the source latent is (16, 16) and the reference (16, {(SIZE + 64) // 8})" in \
        result.ui[PAIR]["text"][0]
    _, inversion, features = result[PAIR]
    assert inversion.latent_shape == (1, 4, SIZE // 8, SIZE // 8)
    assert features.latent_shape == (1, 4, SIZE // 8, (SIZE + 64) // 8)


def test_inversion_with_other_steps_fed_to_the_sampler_is_refused(runner, overrides, workflow, tmp_path):
    bad = copy.deepcopy(workflow)
    bad[INVERT]["inputs"]["steps"] = STEPS + 1
    with pytest.raises(runner.WorkflowError, match=r"INVERSION was made with \d+ steps but this node uses"):
        runner.run_workflow(bad, outputs=[SAMPLER], overrides=overrides, output_dir=tmp_path)


def test_inversion_from_another_model_fed_to_the_sampler_is_refused(runner, overrides, workflow, tmp_path):
    bad = copy.deepcopy(workflow)
    bad["18"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.safetensors"}}
    bad[INVERT]["inputs"]["model"] = ["18", 0]
    with pytest.raises(runner.WorkflowError, match="INVERSION was made with a different model"):
        runner.run_workflow(bad, outputs=[SAMPLER], overrides=overrides, output_dir=tmp_path)

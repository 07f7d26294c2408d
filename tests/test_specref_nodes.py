"""RealEdit SpecRef Edit Sampler: the shipped workflow runs on the tiny SD1 model with synthetic photos,
and bad inputs (a word missing from the prompt, REF_FEATURES from another model) are clear errors."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfy
ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "workflows" / "api" / "specref_object_replace.json"
SAMPLER = "11"
SIZE = 128


def _small(workflow: dict, steps: int = 3) -> dict:
    """Test size: a few steps on every node that has them (invert, reference and sampler stay equal)."""
    workflow = copy.deepcopy(workflow)
    for node in workflow.values():
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = steps
    return workflow


@pytest.fixture(scope="module")
def runner(comfy):
    from realedit.testbed import comfy_runner

    comfy_runner.load_comfy_nodes()
    comfy_runner.load_pack()
    return comfy_runner


@pytest.fixture(scope="module")
def overrides():
    from realedit.testbed.images import reference_scene, source_scene

    source, reference = source_scene(SIZE, SIZE), reference_scene(SIZE, SIZE)
    return {"2": (source.image, torch.zeros(1, SIZE, SIZE)), "3": (reference.image, reference.mask)}


@pytest.fixture(scope="module")
def workflow() -> dict:
    return _small(json.loads(WORKFLOW.read_text()))


def test_workflow_gives_edited_latent_and_image_size_masks(runner, overrides, workflow, tmp_path):
    result = runner.run_workflow(workflow, outputs=[SAMPLER, "12"], overrides=overrides, output_dir=tmp_path)
    edited, reconstruction, m_t, blend = result[SAMPLER]
    assert edited["samples"].shape == (1, 4, SIZE // 8, SIZE // 8)
    assert reconstruction["samples"].shape == edited["samples"].shape
    assert torch.isfinite(edited["samples"]).all()
    assert not torch.equal(edited["samples"], reconstruction["samples"])
    for mask in (m_t, blend):
        assert mask.shape == (1, SIZE, SIZE)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert m_t.sum() > 0 and blend.sum() > 0  # the target word drew some attention; LocalBlend ran
    assert result["12"][0].shape == (1, SIZE, SIZE, 3)
    saved = {name for name, ui in result.ui.items() if ui.get("images")}
    assert saved == {"13", "15", "17"}  # edited image, M_t and LocalBlend previews
    assert _sr_calls(result) > 0


def _sr_calls(result) -> int:
    text = result.ui[SAMPLER]["text"][0]
    return int(re.search(r"SR-attention applied in (\d+) calls", text).group(1))


def test_live_reference_with_reweight(runner, overrides, workflow, tmp_path):
    live = copy.deepcopy(workflow)
    live["10"]["inputs"]["mode"] = "live"
    live[SAMPLER]["inputs"].update(edit_mode="reweight", reweight_words="tiger", reweight_factor=1.5)
    result = runner.run_workflow(live, outputs=[SAMPLER], overrides=overrides, output_dir=tmp_path)
    assert torch.isfinite(result[SAMPLER][0]["samples"]).all()
    assert "edit mode reweight" in result.ui[SAMPLER]["text"][0] and _sr_calls(result) > 0


def test_word_missing_from_the_prompt_is_named(runner, overrides, workflow, tmp_path):
    bad = copy.deepcopy(workflow)
    bad[SAMPLER]["inputs"]["target_words"] = "zebra"
    with pytest.raises(runner.WorkflowError) as error:
        runner.run_workflow(bad, outputs=[SAMPLER], overrides=overrides, output_dir=tmp_path)
    message = str(error.value)
    assert "'zebra' is not in the prompt" in message and "a photo of a tiger" in message


def test_missing_blend_word_is_named(runner, overrides, workflow, tmp_path):
    bad = copy.deepcopy(workflow)
    bad[SAMPLER]["inputs"]["blend_words"] = "cat, horse"
    with pytest.raises(runner.WorkflowError, match="'horse' is in neither"):
        runner.run_workflow(bad, outputs=[SAMPLER], overrides=overrides, output_dir=tmp_path)


def test_ref_features_from_another_model_are_refused(runner, overrides, workflow, tmp_path):
    bad = copy.deepcopy(workflow)
    bad["18"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.safetensors"}}
    bad["10"]["inputs"]["model"] = ["18", 0]
    with pytest.raises(runner.WorkflowError, match="REF_FEATURES was made with a different model"):
        runner.run_workflow(bad, outputs=[SAMPLER], overrides=overrides, output_dir=tmp_path)


def test_clip_tokenizer_strips_weights_and_matches_plain_text(comfy):
    from realedit.attention.tokens import word_token_indices
    from realedit.nodes.specref import clip_tokenizer
    from realedit.testbed.comfy_models import make_tiny_clip

    tokenize = clip_tokenizer(make_tiny_clip())
    assert tokenize("a (cat:1.3) photo") == tokenize("a cat photo")
    assert word_token_indices("a (cat:1.3), photo", "cat", tokenize) == [2]

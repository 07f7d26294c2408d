"""RealEdit Keep Unedited Pixels inside ComfyUI's executor, and its two workflows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_keep_pixels_core import flat_scene, moved, scene, texture

ROOT = Path(__file__).resolve().parent.parent
NODE = "RealEditKeepUneditedPixels"
SETTINGS = {"threshold": 10.0, "align": True, "align_scale": True, "colour_drift": True, "max_coverage": 0.6,
            "blend": 0.6, "resize_edited": False}


def _graph(**inputs: object) -> dict:
    """Two LoadImage nodes (overridden in the runs) for the photo and the edit, a third for the segments /
    mask, and the node."""
    node_inputs = {"original": ["1", 0], "edited": ["2", 0], **SETTINGS, **inputs}
    return {"1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "edit.png"}},
            "3": {"class_type": "LoadImage", "inputs": {"image": "masks.png"}},
            "4": {"class_type": NODE, "inputs": node_inputs}}


def _run(runner, photo, edit, masks=None, tmp_path=None, **inputs):
    overrides = {"1": (photo, torch.zeros(photo.shape[:3])), "2": (edit, torch.zeros(edit.shape[:3]))}
    if masks is not None:
        overrides["3"] = (photo, masks)
    graph = _graph(**inputs)
    if masks is None:
        del graph["3"]
    return runner.run_workflow(graph, outputs=["4"], overrides=overrides, output_dir=tmp_path)["4"]


def test_schema_defaults_and_tooltips_come_from_keep_settings(comfy):
    from realedit.masks.keep import KEEP_DEFAULTS, keep_origin
    from realedit.nodes import NODES
    from realedit.nodes.keep_pixels import KeepUneditedPixels

    assert KeepUneditedPixels in NODES
    schema = KeepUneditedPixels.define_schema()
    settings = [i for i in schema.inputs if i.id in SETTINGS]
    assert {i.id for i in settings} == set(SETTINGS)
    for item in settings:
        assert item.default == getattr(KEEP_DEFAULTS, item.id), item.id
        assert keep_origin(item.id) in item.tooltip, item.id
    assert SETTINGS == {i.id: i.default for i in settings}  # the workflows' values are the defaults


def test_batch_of_non_square_edits_through_the_executor(runner, tmp_path):
    photo, edit_a, region = scene(96, 160, shift=(2.0, -1.0))
    _, edit_b, _ = scene(96, 160, shift=(-1.25, 0.5), scale=1.02)
    image, final, aligned, report, rough = _run(runner, photo[None], torch.stack([edit_a, edit_b]),
                                               tmp_path=tmp_path)
    assert image.shape == (2, 96, 160, 3) and aligned.shape == image.shape
    assert final.shape == rough.shape == (2, 96, 160) and final.dtype == torch.float32
    for k in range(2):
        outside = final[k] < 0.5
        assert torch.equal(image[k][outside], photo[outside])
        assert float(((final[k] > 0.5) & region).sum()) >= 0.98 * float(region.sum())
    assert re.match(r"image 0: alignment: shift x \+(1\.9|2\.0)\d px, y -(1\.0|0\.9)\d px", report), report
    assert "\nimage 1: alignment: shift x -1.2" in report


def test_rough_mask_and_segments_inputs_through_the_executor(runner, tmp_path):
    photo, edit, region = scene(80, 120, shift=(0.0, 0.0))
    segments = torch.stack([torch.zeros(80, 120), region.float(), torch.ones(80, 120)])
    rough = region.clone()
    rough[:, :40] = False  # a partial M_b: Region-IoU completes it to the segment
    overrides = {"1": (photo[None], torch.zeros(1, 80, 120)), "2": (edit[None], torch.zeros(1, 80, 120)),
                 "3": (photo[None], segments), "5": (photo[None], rough.float()[None])}
    graph = _graph(segments=["3", 1], rough_mask=["5", 1])
    graph["5"] = {"class_type": "LoadImage", "inputs": {"image": "mask.png"}}
    image, final, _, report, m_b = runner.run_workflow(graph, outputs=["4"], overrides=overrides,
                                                       output_dir=tmp_path)["4"]
    assert "segment 1 of 3" in report and torch.equal(m_b[0] > 0.5, rough)
    assert bool((final[0] > 0.5)[region].all())
    assert torch.equal(image[0][final[0] < 0.5], photo[final[0] < 0.5])


def test_no_edit_through_the_executor_returns_the_photo(runner, tmp_path):
    photo = texture(72, 104)[None]
    image, final, _, report, _ = _run(runner, photo, photo.clone(), tmp_path=tmp_path)
    assert torch.equal(image, photo) and not final.any() and "no edit found" in report


@pytest.mark.parametrize("case", ["size", "batch", "mask size", "segments size", "nan", "alignment"])
def test_bad_inputs_fail_with_a_message_naming_the_input(runner, tmp_path, case):
    from realedit.testbed.comfy_runner import WorkflowError

    photo, edit, _ = scene(64, 96, shift=(0.0, 0.0))
    photo, edit = photo[None], edit[None]
    masks, extra, expected = None, {}, ""
    if case == "size":
        edit, expected = edit[:, :60], "'edited' is 96x60 but 'original' is 96x64"
    elif case == "batch":
        photo, edit, expected = photo.repeat(2, 1, 1, 1), edit.repeat(3, 1, 1, 1), "'original' holds 2"
    elif case == "mask size":
        masks, extra, expected = torch.ones(1, 32, 48), {"rough_mask": ["3", 1]}, "'rough_mask' is 48x32"
    elif case == "segments size":
        masks, extra, expected = torch.ones(4, 32, 48), {"segments": ["3", 1]}, "'segments' is 48x32"
    elif case == "nan":
        edit = edit.clone()
        edit[0, 3, 3, 0] = float("inf")
        expected = "'edited' has NaN or infinite pixels"
    else:
        edit, expected = moved(photo[0], (30.0, 0.0))[None], "'edited' seems shifted"
    with pytest.raises(WorkflowError, match=f"RealEdit Keep Unedited Pixels: ({expected})"):
        _run(runner, photo, edit, masks, tmp_path=tmp_path, **extra)


def test_ip2p_workflow_runs_with_the_tiny_ip2p_model(runner, tmp_path):
    """The shipped InstructPix2Pix workflow under the executor. The tiny model has random weights: its decode
    is not an edit of the photo, so alignment (on, as shipped) finds no transform to trust and says so, and
    the decode, changed everywhere, comes back whole; with alignment off and a drawn mask on the node
    (LoadImage's MASK), the composite keeps every other pixel."""
    workflow = json.loads((ROOT / "api_workflows" / "keep_unedited_ip2p.json").read_text())
    ids = {node["class_type"]: key for key, node in workflow.items()}
    workflow[ids["KSampler"]]["inputs"]["steps"] = 2
    keep, decode = ids[NODE], ids["VAEDecode"]
    photo = texture(96, 128)[None]
    drawn = torch.zeros(1, 96, 128)
    drawn[0, 20:60, 30:90] = 1.0
    overrides = {ids["LoadImage"]: (photo, drawn)}
    result = runner.run_workflow(workflow, outputs=[keep, decode], overrides=overrides, tiny_checkpoint="ip2p",
                                 output_dir=tmp_path)
    image, final, _, report, _ = result[keep]
    assert report.startswith("alignment: unverified") and "not an edit of 'original'" in report, report
    assert bool((final > 0.5).all()) and torch.equal(image, result[decode][0])
    workflow[keep]["inputs"].update(align=False, rough_mask=[ids["LoadImage"], 1])
    result = runner.run_workflow(workflow, outputs=[keep, decode], overrides=overrides, tiny_checkpoint="ip2p",
                                 output_dir=tmp_path)
    image, final, aligned, report, _ = result[keep]
    inside, outside = final[0] > 0.5, final[0] < 0.5
    assert bool(inside[20:60, 30:90].all()) and outside.any()
    assert torch.equal(image[0][outside], photo[0][outside])
    assert not torch.equal(image[0][inside], photo[0][inside]) and "the given rough_mask" in report
    assert len(list(tmp_path.rglob("*.png"))) >= 3


def _input_types(cls: type) -> dict[str, dict]:
    spec = cls.INPUT_TYPES()
    return {"required": dict(spec.get("required", {})), "optional": dict(spec.get("optional", {}))}


@pytest.mark.parametrize("name", ["keep_unedited_edit_model", "keep_unedited_ip2p"])
def test_workflow_uses_only_known_nodes_inputs_and_typed_links(runner, name):
    """Validated without weights (not executed: no Qwen-Image-Edit checkpoint here): every node type is known
    to this ComfyUI, every required input is given, every input exists, and each link joins matching types."""
    import nodes

    workflow = json.loads((ROOT / "api_workflows" / f"{name}.json").read_text())
    for key, node in workflow.items():
        cls = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
        assert cls is not None, f"#{key} {node['class_type']} unknown to this ComfyUI"
        spec = _input_types(cls)
        known = {**spec["required"], **spec["optional"]}
        assert set(spec["required"]) <= set(node["inputs"]), (key, set(spec["required"]) - set(node["inputs"]))
        for field, value in node["inputs"].items():
            assert field in known, (key, field)
            if isinstance(value, list):
                source = nodes.NODE_CLASS_MAPPINGS[workflow[value[0]]["class_type"]]
                produced = source.RETURN_TYPES[value[1]]
                wanted = known[field][0]
                assert wanted == "*" or produced == wanted or (isinstance(wanted, str) and produced in
                                                               wanted.split(",")), (key, field, produced, wanted)
            elif isinstance(known[field][0], list):  # a combo: the value is one of its options
                options = known[field][0]
                assert value in options or field.endswith("_name") or field == "image", (key, field, value)


def test_the_demo_runs_the_ip2p_workflow_on_tiny_models_and_skips_the_edit_model_one():
    from realedit.testbed.demo_inputs import tiny_run, untiny_loaders

    ip2p = json.loads((ROOT / "api_workflows" / "keep_unedited_ip2p.json").read_text())
    qwen = json.loads((ROOT / "api_workflows" / "keep_unedited_edit_model.json").read_text())
    workflow, overrides, family = tiny_run(ip2p, size=64, steps=2)
    assert family == "ip2p" and not untiny_loaders(ip2p)
    assert [n["inputs"]["align"] for n in workflow.values() if n["class_type"] == NODE] == [False]
    assert untiny_loaders(qwen) == ["CLIPLoader", "UNETLoader", "VAELoader"]


def test_an_unverified_alignment_is_logged_as_a_warning(comfy, caplog):
    """No transform to trust keeps the identity (masks/align.py): the user hears of it in the log, not only in
    the report, since the composite may then rest on an unaligned pair (here both objects removed: a local edit)."""
    import logging

    from realedit.nodes.keep_pixels import KeepUneditedPixels

    photo, _ = flat_scene()
    removed = 0.5 + 0.01 * torch.randn(photo.shape, generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.WARNING):
        out = KeepUneditedPixels.execute(photo[None], removed[None], **SETTINGS)
    assert out.result[3].startswith("alignment: unverified") and "final mask covers" in out.result[3]
    assert any("alignment: unverified" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

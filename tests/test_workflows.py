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
DOWNLOAD_HOSTS = ("https://huggingface.co/", "https://civitai.com/")  # both front ends download from these


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


@pytest.mark.parametrize("api_path", [p for p in API_TWINS if "UNETLoader" not in p.read_text()],
                         ids=lambda p: p.stem)  # not the Qwen-Image-Edit twin: no stand-in for its models
def test_each_twin_runs_at_the_steps_it_ships_with(runner, api_path, tmp_path):
    """Each twin a tiny checkpoint stands in for runs with its shipped step counts and schedulers (the other tests
    and the demo run fewer steps; at its 30 the StyleDiffusion twin was refused on every run, as ComfyUI's
    ddim_uniform runs 31 steps for 30), at one optimisation iteration a step (the steps are what is tested)."""
    from realedit.testbed.demo_inputs import tiny_run

    shipped = _load(api_path)
    workflow, overrides, family = tiny_run(shipped, steps=None)
    for node in workflow.values():
        for cap in ("iterations", "max_iterations"):
            if isinstance(node["inputs"].get(cap), int):
                node["inputs"][cap] = 1
    steps = {node_id: node["inputs"]["steps"] for node_id, node in shipped.items()
             if isinstance(node["inputs"].get("steps"), int)}
    assert steps and all(workflow[node_id]["inputs"]["steps"] == count for node_id, count in steps.items())
    result = runner.run_workflow(workflow, overrides=overrides, tiny_checkpoint=family, output_dir=tmp_path)
    assert any(ui.get("images") for ui in result.ui.values())


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


# -- what only the UI file has: layout, groups, note, titles, model metadata ------------------------------------
def _ui(api_path: Path) -> dict:
    return _load(ROOT / "example_workflows" / api_path.name)


@pytest.mark.parametrize("api_path", API_TWINS, ids=lambda p: p.stem)
def test_ui_file_is_what_the_generator_writes(runner, api_path):
    """Layout, note, titles and metadata are generated from the twin, its .md and the measured size table:
    a stale UI file (a twin, note or size changed without running scripts/build_ui_workflows.py) fails."""
    from realedit.testbed.workflow_format import api_to_ui

    import nodes

    note = api_path.with_suffix(".md")
    expected = api_to_ui(_load(api_path), nodes.NODE_CLASS_MAPPINGS, note=note.read_text().strip())
    committed, generated = _linked_outputs(_ui(api_path)), _linked_outputs(json.loads(json.dumps(expected)))
    _drop_widgets_newer_releases_appended(generated, committed)
    assert committed == generated, "run scripts/build_ui_workflows.py"


def _drop_widgets_newer_releases_appended(generated: dict, committed: dict) -> None:
    """Newer ComfyUI releases append widget inputs to some core nodes (0.33's CFGNorm gained a second one); the
    files are generated on 0.3.64, and the front end gives a missing trailing widget its default. Trim a
    generated node's widgets to the committed ones when those are exactly its leading values."""
    committed_nodes = {node["id"]: node for node in committed["nodes"]}
    for node in generated["nodes"]:
        values, kept = node["widgets_values"], committed_nodes.get(node["id"], {}).get("widgets_values")
        if kept is not None and len(values) > len(kept) and values[:len(kept)] == kept:
            node["widgets_values"] = list(kept)


def _linked_outputs(ui: dict) -> dict:
    """The UI graph with unlinked output slots dropped: hosts differ there (ComfyUI 0.33 gave Save Image an
    IMAGE output) and the front end rebuilds a node's slots from the server's definition anyway. The files are
    generated on the oldest supported host, 0.3.64."""
    ui = copy.deepcopy(ui)
    for node in ui["nodes"]:
        node["outputs"] = [slot for slot in node["outputs"] if slot["links"]]
    return ui


@pytest.mark.parametrize("api_path", API_TWINS, ids=lambda p: p.stem)
def test_each_text_is_typed_once(runner, api_path):
    """No text value (prompt, words) is typed into two nodes: one String node feeds every consumer."""
    import nodes

    seen: dict[str, str] = {}
    for node_id, node in _load(api_path).items():
        spec = nodes.NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()
        kinds = {name: value[0] for section in spec.values() for name, value in section.items()}
        for name, value in node["inputs"].items():
            if kinds.get(name) == "STRING" and isinstance(value, str) and value.strip():
                assert value not in seen, f"{value!r} is typed in node {seen[value]} and node {node_id}.{name}"
                seen[value] = f"{node_id}.{name}"


@pytest.mark.parametrize("api_path", API_TWINS, ids=lambda p: p.stem)
def test_every_prompt_and_text_node_is_titled(api_path):
    untitled = [node_id for node_id, node in _load(api_path).items()
                if node["class_type"] in ("CLIPTextEncode", "PrimitiveString", "PrimitiveStringMultiline")
                and not node.get("_meta", {}).get("title")]
    assert not untitled


def _box(node: dict) -> list[float]:
    from realedit.testbed.workflow_format import TITLE_HEIGHT

    return [node["pos"][0], node["pos"][1] - TITLE_HEIGHT, node["size"][0], node["size"][1] + TITLE_HEIGHT]


@pytest.mark.parametrize("api_path", API_TWINS, ids=lambda p: p.stem)
def test_ui_nodes_do_not_overlap_and_each_lies_in_one_stage_group(api_path):
    """Node boxes (title bar included) at their generated size, which is at least the size the measured front
    ends give them (with a preview on image nodes), never overlap; every node but the note is in one group."""
    from realedit.testbed.workflow_format import STAGE_TITLES, boxes_overlap, load_sizes

    ui, sizes = _ui(api_path), load_sizes()
    for node in ui["nodes"]:
        measured = sizes.get(node["type"], {})
        floor = measured.get("with_image") or measured.get("size") or [0, 0]
        assert node["size"][0] >= floor[0] and node["size"][1] >= floor[1], node["id"]
    boxes = [(node["id"], _box(node)) for node in ui["nodes"]]
    overlapping = [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:]
                   if boxes_overlap(box_a, box_b)]
    assert not overlapping
    groups = ui["groups"]
    assert [g["title"] for g in groups] == [t for t in STAGE_TITLES.values() if t in {g["title"] for g in groups}]
    assert not any(boxes_overlap(a["bounding"], b["bounding"]) for i, a in enumerate(groups) for b in groups[i + 1:])
    for node_id, (x, y, w, h) in boxes:
        if node_id == ui["nodes"][-1]["id"]:
            continue  # the note, left of the groups
        holders = [g for g in groups if g["bounding"][0] <= x and x + w <= g["bounding"][0] + g["bounding"][2]
                   and g["bounding"][1] <= y and y + h <= g["bounding"][1] + g["bounding"][3]]
        assert len(holders) == 1, node_id


@pytest.mark.parametrize("api_path", API_TWINS, ids=lambda p: p.stem)
def test_note_says_what_to_connect_and_is_not_queued(runner, api_path):
    from realedit.testbed.workflow_format import ui_to_api

    import nodes

    ui = _ui(api_path)
    notes = [node for node in ui["nodes"] if node["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    assert all(part in text for part in ("What it does:", "Connect", "Model:", "Change first:", "Needs:"))
    assert str(notes[0]["id"]) not in ui_to_api(ui, nodes.NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("api_path", API_TWINS, ids=lambda p: p.stem)
def test_every_model_file_has_download_metadata(api_path):
    """Each model file a loader names carries {name, url, directory} in properties.models (what the front end's
    missing-models dialog reads), on terms both front ends offer a download button for, and the workflow's models
    list has each once."""
    from realedit.testbed.workflow_format import MODEL_FILES, MODEL_SUFFIXES

    twin, ui = _load(api_path), _ui(api_path)
    by_id = {str(node["id"]): node for node in ui["nodes"]}
    expected = set()
    for node_id, node in twin.items():
        for value in node["inputs"].values():
            if isinstance(value, str) and value.endswith(MODEL_SUFFIXES):
                directory, url = MODEL_FILES[value]
                # a download button on both front ends: an allowed host, and (1.27) a .safetensors / .sft name
                assert url.startswith(DOWNLOAD_HOSTS) and value.endswith((".safetensors", ".sft")), value
                entry = {"name": value, "url": url, "directory": directory}
                assert entry in by_id[node_id]["properties"]["models"]
                expected.add(json.dumps(entry, sort_keys=True))
    assert {json.dumps(m, sort_keys=True) for m in ui.get("models", [])} == expected
    assert len(ui.get("models", [])) == len(expected)


def test_sam_files_point_at_metas_hugging_face_copies_and_name_the_official_file():
    """The SAM entries are the addresses the loader converts (facebook/sam-vit-*), under names that keep the kind,
    and the note offers each kind's official .pth as well."""
    from realedit.masks.sam_auto import OFFICIAL_SAM_FILES, SAM_KINDS, hf_sam_url
    from realedit.testbed.workflow_format import MODEL_FILES, SAM_OFFICIAL, needs_text

    for kind, official in zip(SAM_KINDS, OFFICIAL_SAM_FILES):
        name = f"sam_{kind}_hf.safetensors"
        assert MODEL_FILES[name] == ("sams", hf_sam_url(kind))
        assert SAM_OFFICIAL[name] == (official, f"https://dl.fbaipublicfiles.com/segment_anything/{official}")
    text = needs_text({"1": {"class_type": "RealEditSAMLoader", "inputs": {"sam_name": "sam_vit_l_hf.safetensors"}}})
    assert "models/sams/sam_vit_l_hf.safetensors\n  " + hf_sam_url("vit_l") in text
    assert "saves it as model.safetensors: rename it to sam_vit_l_hf.safetensors" in text
    assert "sam_vit_l_0b3195.pth" in text and "dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth" in text


@pytest.mark.parametrize("api_path", API_TWINS, ids=lambda p: p.stem)
def test_each_workflow_has_a_thumbnail(api_path):
    """The template browser shows example_workflows/<name>.jpg on each card."""
    from PIL import Image

    with Image.open(ROOT / "example_workflows" / f"{api_path.stem}.jpg") as image:
        assert image.format == "JPEG" and image.size == (512, 384)


def test_stage_fallback_places_unknown_classes_by_name_and_links():
    from realedit.testbed.workflow_format import class_stage

    assert [class_stage(name) for name in ("UNETLoader", "SomethingInversion", "FancyMaskRefiner",
                                           "PreviewAny", "ModelSamplingAuraFlow")] == [
        "inputs", "inversion", "masks", "outputs", "edit"]
    assert class_stage("MyConstant", has_links=False) == "inputs"


def test_seed_widgets_get_the_control_the_front_end_adds_unasked():
    """The front end gives an INT named seed / noise_seed a control_after_generate widget unless the node says
    otherwise; a UI file without that slot shifts every later widget value by one (caught in the browser on
    the StyleDiffusion inversion's scheduler)."""
    from realedit.testbed.workflow_format import api_to_ui, ui_to_api

    class Node:
        RETURN_TYPES = ("LATENT",)

        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802  (ComfyUI's name)
            return {"required": {"seed": ("INT", {"default": 0}), "steps": ("INT", {"default": 3}),
                                 "other": ("INT", {"default": 1, "control_after_generate": False})}}

    api = {"1": {"class_type": "Node", "inputs": {"seed": 5, "steps": 7, "other": 2}}}
    ui = api_to_ui(api, {"Node": Node})
    assert ui["nodes"][0]["widgets_values"] == [5, "fixed", 7, 2]
    assert ui_to_api(ui, {"Node": Node}) == api

"""The demo on the shapes world: every task wired to its shipped workflow, the scores, and one task run
through ComfyUI's executor into a contact sheet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from realedit.testbed.shapes_world.demo_tasks import WorldTask, psnr, score, world_tasks

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "api_workflows"


def _workflow(task: WorldTask) -> dict:
    return json.loads((WORKFLOWS / f"{task.stem}.json").read_text())


def test_every_world_task_is_wired_to_its_workflow():
    """Each task names inputs its workflow's nodes have, one photo per LoadImage, and a SaveImage as its
    edit; every shipped workflow but the Qwen-Image-Edit one (no weights) has a task."""
    tasks = world_tasks()
    shipped = {p.stem for p in WORKFLOWS.glob("*.json")}
    assert {t.stem for t in tasks} == shipped - {"keep_unedited_edit_model"}
    for task in tasks:
        workflow = _workflow(task)
        for node_id, inputs in task.inputs.items():
            assert set(inputs) <= set(workflow[node_id]["inputs"]), (task.stem, node_id)
        loads = [n for n in workflow.values() if n["class_type"] == "LoadImage"]
        assert len(loads) == len(task.photos), task.stem
        assert workflow[task.edit_node]["class_type"] == "SaveImage", task.stem
        if not task.generated:  # a real edit: the truth differs from the source exactly on its region
            diff = (task.truth.source != task.truth.expected).any(-1)
            assert diff.any() and torch.equal(diff, task.truth.region), task.stem


def test_every_world_task_reads_word_maps_from_its_methods_world_layers():
    """Every node of a world task that reads cross-attention maps (P2P's LocalBlend, SpecRef's M_t, the
    StyleDiffusion inversion's attention term, the map recorder) gets its method's map_downscale on the world
    (at 1 its 16x16 latents have the 16x16 maps SD has at 512 px at 4); the shipped workflows keep SD's 4."""
    from realedit.testbed.shapes_world.demo_tasks import WORLD_MAP_DOWNSCALE

    reading: dict[str, int] = {}
    for task in world_tasks():
        for node_id, node in _workflow(task).items():
            if "map_downscale" in node["inputs"]:
                assert node["inputs"]["map_downscale"] == 4, (task.stem, node_id)
                assert task.inputs[node_id]["map_downscale"] == WORLD_MAP_DOWNSCALE[task.stem], (task.stem, node_id)
                reading[task.stem] = reading.get(task.stem, 0) + 1
    assert reading == {"nulltext_p2p_edit": 1, "specref_object_replace": 1, "specref_sr_ksampler": 2,
                       "stylediffusion_edit": 2}
    assert set(WORLD_MAP_DOWNSCALE) == set(reading)


def test_with_inputs_merges_over_a_tasks_node_inputs_and_leaves_the_task_as_it_was():
    task = next(t for t in world_tasks() if t.stem == "nulltext_p2p_edit")
    before = {node: dict(values) for node, values in task.inputs.items()}
    changed = task.with_inputs({"8": {"cross_replace": 0.4}, "9": {"x": 1}})
    assert changed.inputs["8"] == {**before["8"], "cross_replace": 0.4} and changed.inputs["9"] == {"x": 1}
    assert {n: v for n, v in changed.inputs.items() if n not in ("8", "9")} == {
        n: v for n, v in before.items() if n != "8"}
    assert task.inputs == before and changed.truth is task.truth


def test_the_worlds_null_text_inversions_take_the_worlds_learning_rate(tmp_path):
    """Every null-text inversion of a world task (the P2P task, StyleDiffusion's P2P baseline) and the diffusers
    demo's null-text row run at the world's learning rate (the fidelity benchmark's p2p-null-text-lr sweep); the
    shipped workflow keeps the paper's 1e-2."""
    from realedit.testbed.shapes_world import fidelity
    from realedit.testbed.shapes_world.demo_tasks import WORLD_NULL_TEXT_LR
    from realedit.testbed.shapes_world.world_batch import write_world_manifest

    inverting = []
    for task in world_tasks():
        for node_id, node in _workflow(task).items():
            if node["class_type"] == "RealEditNullTextInversion":
                assert node["inputs"]["learning_rate"] == 1e-2, (task.stem, node_id)
                assert task.inputs[node_id]["learning_rate"] == WORLD_NULL_TEXT_LR, (task.stem, node_id)
                inverting.append(task.stem)
    assert inverting == ["nulltext_p2p_edit"] and WORLD_NULL_TEXT_LR != 1e-2
    style = next(m for m in fidelity.METHODS if m.name == "StyleDiffusion")
    baseline = fidelity.cases(style, 1)[0].baselines[fidelity.P2P_NTI]
    assert baseline.inputs["7"]["learning_rate"] == WORLD_NULL_TEXT_LR
    manifest, _ = write_world_manifest(tmp_path, steps=2)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["settings"]["null_text_lr"] for r in rows if r["method"] == "nulltext-p2p"] == [WORLD_NULL_TEXT_LR]


def test_the_worlds_zone_reads_m_b_as_swept_and_segments_as_sam_would(shapes_world):
    """Every IP2P Edit Mask node of a world task reads M_b as the world's sweep chose (the shipped workflows keep
    the official code's rows, layers and T), and each Region-IoU segments both images as its sweep chose (the
    shipped workflows: the paper's edited image), its candidates from the world's segmenter on the same images
    and action, which segments the original for 'remove' and the edit otherwise, and the original besides."""
    from realedit.masks.settings import DEFAULT_MASK_LAYERS, DEFAULT_MASK_ROWS, DEFAULT_SEGMENT, ZONE_DEFAULTS
    from realedit.testbed.demo_inputs import world_run
    from realedit.testbed.shapes_world.comfy_world import SEGMENTER_NODE, WorldSegments
    from realedit.testbed.shapes_world.demo_tasks import WORLD_ZONE_MASK, WORLD_ZONE_SEGMENT
    from realedit.testbed.shapes_world.reader import segments

    shipped = {"mask_rows": DEFAULT_MASK_ROWS, "mask_layers": DEFAULT_MASK_LAYERS,
               "threshold": round(ZONE_DEFAULTS.mask_threshold, 4)}
    masks = refiners = 0
    for task in world_tasks():
        for node_id, node in _workflow(task).items():
            if node["class_type"] == "RealEditIP2PEditMask":
                assert {k: node["inputs"][k] for k in shipped} == shipped, (task.stem, node_id)
                assert task.inputs[node_id] == WORLD_ZONE_MASK.inputs(), (task.stem, node_id)
                masks += 1
            if node["class_type"] == "RealEditRegionIoURefine":
                assert node["inputs"]["segment"] == DEFAULT_SEGMENT, (task.stem, node_id)
                assert task.inputs[node_id] == {"segment": WORLD_ZONE_SEGMENT}, (task.stem, node_id)
                refiners += 1
        workflow, _ = world_run(task.api_workflow(), task, 2)
        for node in workflow.values():
            if node["class_type"] == "RealEditRegionIoURefine":
                segmenter = workflow[node["inputs"]["segments"][0]]
                assert segmenter["class_type"] == SEGMENTER_NODE
                assert segmenter["inputs"] == {k: node["inputs"][k] for k in ("original", "edited", "action")}
                assert node["inputs"]["original_segments"] == [node["inputs"]["segments"][0], 1]
    assert masks == refiners == 3  # zone_instruction_edit, zone_multi_turn's two turns
    tasks = {task.stem: task for task in world_tasks()}
    one, two = (tasks[stem].truth.source[None] for stem in ("baret_text_edit", "zone_instruction_edit"))
    assert len(segments(one[0])) != len(segments(two[0]))  # one object, two
    for action, first in (("remove", one), ("change", two)):
        found, from_original = WorldSegments().segment(one, two, action)
        assert torch.equal(found, segments(first[0]).float()) and torch.equal(from_original, segments(one[0]).float())


def test_scores_of_the_truth_itself_and_of_the_untouched_source():
    task = next(t for t in world_tasks() if t.stem == "zone_instruction_edit")
    perfect = score(task, task.truth.expected)
    assert perfect.success and math.isinf(perfect.psnr_to_truth) and math.isinf(perfect.preservation_psnr)
    unchanged = score(task, task.truth.source)
    assert not unchanged.success and math.isinf(unchanged.preservation_psnr)
    assert unchanged.psnr_to_truth == pytest.approx(psnr(task.truth.source, task.truth.expected))


def test_a_world_task_runs_through_the_executor_into_a_contact_sheet(shapes_world, runner, tmp_path):
    from realedit.demo import _world_sheet
    from realedit.hosts.image_files import load_image
    from realedit.testbed.demo_inputs import run_world_task, world_run

    task = next(t for t in world_tasks() if t.stem == "zone_instruction_edit")
    workflow, _ = world_run(task.api_workflow(), task, 2)
    assert {n["inputs"]["ckpt_name"] for n in workflow.values() if n["class_type"] == "CheckpointLoaderSimple"} \
        == {task.checkpoint}
    run = run_world_task(task, 2, tmp_path)
    edit = load_image(run.first_image(task.edit_node))
    assert edit.shape == task.truth.source.shape
    _world_sheet(task, run, tmp_path / "sheet.png")
    sheet = load_image(tmp_path / "sheet.png")
    assert sheet.shape[1] > 5 * 256 and sheet.shape[0] > 256  # source, saved images, truth, region
    _assert_card_shows(tmp_path / "thumbnails" / f"{task.stem}.jpg", [task.truth.source, edit, task.truth.expected])


def _assert_card_shows(path: Path, images: list[torch.Tensor]) -> None:
    """The template browser's card: a 512x384 JPEG whose first tiles (two rows of three 160 px tiles, 8 px
    apart, below the title) are ``images`` in order, up to JPEG's loss."""
    from PIL import Image
    from realedit.testbed.shapes_world.contact_sheet import CARD_TILE, CARD_TOP

    with Image.open(path) as card:
        assert card.format == "JPEG" and card.size == (512, 384)
        pixels = torch.from_numpy(np.array(card.convert("RGB"))).float() / 255
    for i, image in enumerate(images):
        left = 8 + i * (CARD_TILE + 8)
        tile = pixels[CARD_TOP:CARD_TOP + CARD_TILE, left:left + CARD_TILE]  # (160, 160, 3)
        shown = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], size=(CARD_TILE, CARD_TILE),
                                                mode="nearest-exact")[0].permute(1, 2, 0)
        assert (tile - shown).abs().mean() < 0.03, i


def test_the_demo_without_comfyui_runs_every_method_on_the_diffusers_host(tmp_path):
    """The README's demo command on the diffusers host: the probe, BARET and StyleDiffusion images, and every
    batch method's row (SpecRef, null-text P2P, BARET, ZONE twice, Keep Unedited Pixels) done."""
    from realedit.demo import main

    main(["--host", "diffusers", "--model", "tiny", "--out", str(tmp_path), "--size", "64", "--steps", "2"])
    for name in ("probe_sample", "baret_edit", "stylediffusion_edit"):
        assert (tmp_path / f"{name}.png").is_file()
    summary = json.loads((tmp_path / "batch" / "summary.json").read_text())
    assert (summary["ok"], summary["failed"]) == (6, 0)
    methods = {record["method"] for record in summary["rows"]}
    assert methods == {"specref", "baret", "nulltext-p2p", "zone", "keep-pixels"}


def test_the_world_demo_on_the_diffusers_host_runs_every_method_against_the_truth(tmp_path):
    """The README's demo without ComfyUI: every method on the shapes world (the committed checkpoints, the
    world's token table), one contact sheet each; Keep Unedited Pixels, given the true edit shifted and
    colour-drifted, returns the source exactly outside its final mask and the edit read back as asked."""
    from realedit.batching.outputs import row_dir
    from realedit.demo import main
    from realedit.hosts.image_files import load_image
    from realedit.testbed.shapes_world.world_batch import WORKFLOW_OF

    main(["--host", "diffusers", "--out", str(tmp_path), "--steps", "2"])
    for stem in ("attention_probe", "stylediffusion_edit", *WORKFLOW_OF.values()):
        assert load_image(tmp_path / f"{stem}.png").shape[1] >= 2 * 256, stem  # at least the edit and the truth
    summary = json.loads((tmp_path / "batch" / "summary.json").read_text())
    assert (summary["ok"], summary["failed"]) == (5, 0)
    keep = row_dir(tmp_path / "batch", "keep-pixels")
    task = next(t for t in world_tasks() if t.stem == "keep_unedited_ip2p")
    edit, mask = load_image(keep / "edit.png"), load_image(keep / "mask_final.png")
    outside = mask[..., 0] < 0.5  # (H, W): the PNG holds the mask in every channel
    source = (task.truth.source * 255).round() / 255  # the photo as its PNG holds it
    assert 0 < (~outside).sum() < outside.numel() / 4
    assert torch.equal(edit[outside], source[outside])
    assert score(task, edit).success

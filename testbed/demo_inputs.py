"""Inputs for running the shipped workflows on the built-in tiny models (the demo, and smoke tests).

Workflows load photos with LoadImage and SAM from ``models/sams``; on a machine with neither, each
LoadImage is replaced by a synthetic scene (the first by the source scene, the next by the reference
scene with its object mask) and the SAM loader by a tiny random SAM. A random SAM proposes no segment
that passes SAM's quality thresholds, so Region-IoU takes every segment and falls back to the rough mask.
On the shapes world (:func:`world_run`) Region-IoU takes the world's segments instead (each object and the
background, ``shapes_world.comfy_world.WorldSegments``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import reference_scene, source_scene
from .shapes_world.demo_tasks import WorldTask
from .shapes_world.scene import SIZE

IP2P_NODES = {"RealEditIP2PEditMask", "InstructPixToPixConditioning"}
# loaders of model files the tiny models do not stand in for (a workflow using one is not run on them)
WEIGHT_LOADERS = {"UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader"}


def untiny_loaders(workflow: dict[str, Any]) -> list[str]:
    """The loaders of ``workflow`` that no tiny model replaces (e.g. a Qwen-Image-Edit UNETLoader)."""
    return sorted({node["class_type"] for node in workflow.values() if node["class_type"] in WEIGHT_LOADERS})


def tiny_run(workflow: dict[str, Any], size: int = 128, steps: int | None = 4,
             tiny_sam: bool = True) -> tuple[dict[str, Any], dict[str, tuple], str]:
    """(workflow at demo size, node overrides, tiny checkpoint family) for ``run_workflow``; ``steps`` None keeps
    each node's shipped steps."""
    photos = [(scene.image, scene.mask) for scene in (source_scene(size, size), reference_scene(size, size))]
    workflow, overrides = _stand_ins(workflow, size, steps, photos, tiny_sam)
    for node in workflow.values():
        if node["class_type"] == "RealEditKeepUneditedPixels":
            node["inputs"]["align"] = False  # a random model's output is no edit of the photo: nothing to align
    family = "ip2p" if any(n["class_type"] in IP2P_NODES for n in workflow.values()) else "sd1"
    return workflow, overrides, family


def world_run(workflow: dict[str, Any], task: WorldTask, steps: int) -> tuple[dict[str, Any], dict[str, tuple]]:
    """(workflow, node overrides) for ``run_workflow(..., tiny_checkpoint=None)`` on the shapes world: the
    task's checkpoint, photos and texts (``shapes_world.demo_tasks``), ``steps`` sampling steps; ZONE's Region-IoU
    takes the world's segments (``comfy_world.WorldSegments``), not a tiny random SAM's."""
    from .shapes_world.comfy_world import with_world_segments

    workflow, overrides = _stand_ins(workflow, SIZE, steps, list(task.photos))
    workflow = with_world_segments(workflow)
    for node_id, node in workflow.items():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = task.checkpoint
        node["inputs"].update(task.inputs.get(node_id, {}))
    return workflow, overrides


@dataclass(frozen=True)
class WorldRun:
    """What a world task's workflow wrote: per SaveImage node, its filename prefix and files; the text outputs in
    node-id order (the executor may run independent nodes in either order)."""

    saved: dict[str, tuple[str, list[Path]]]
    texts: list[str]

    def first_image(self, node_id: str) -> Path:
        return self.saved[node_id][1][0]


def run_world_task(task: WorldTask, steps: int, folder: Path) -> WorldRun:
    """Run ``task`` (:func:`world_run`) through ComfyUI's executor with the world's checkpoints, its images
    saved under ``folder``."""
    from . import comfy_runner

    workflow, overrides = world_run(task.api_workflow(), task, steps)
    result = comfy_runner.run_workflow(workflow, overrides=overrides, tiny_checkpoint=None, output_dir=folder)
    saved = {}
    for node_id, ui in result.ui.items():
        prefix = str(workflow[node_id]["inputs"].get("filename_prefix", node_id)).split("/")[-1]
        saved[node_id] = (prefix, [folder / image.get("subfolder", "") / image["filename"]
                                   for image in ui.get("images", [])])
    by_node = sorted(result.ui.items(), key=lambda item: (len(item[0]), item[0]))  # node order, not run order
    return WorldRun(saved, [str(text) for _, ui in by_node for text in ui.get("text", [])])


def _stand_ins(workflow: dict[str, Any], size: int, steps: int | None, photos: list[tuple],
               tiny_sam: bool = True) -> tuple[dict[str, Any], dict[str, tuple]]:
    """A copy of ``workflow`` at ``size`` px and ``steps`` steps (None: as shipped), and overrides: the LoadImage
    nodes in id order get ``photos`` (the last one repeats), the SAM loader a tiny random SAM (``tiny_sam``), with
    Region-IoU's quality thresholds off so its segments reach the refinement."""
    workflow = copy.deepcopy(workflow)
    overrides: dict[str, tuple] = {}
    loaded = 0
    for node_id in sorted(workflow, key=int):
        node = workflow[node_id]
        inputs = node["inputs"]
        for key, value in (("width", size), ("height", size), ("steps", steps)):
            if key in inputs and not isinstance(inputs[key], list) and value is not None:
                inputs[key] = value
        if node["class_type"] == "LoadImage":
            overrides[node_id] = tuple(photos[min(loaded, len(photos) - 1)])
            loaded += 1
        elif node["class_type"] == "RealEditSAMLoader" and tiny_sam:
            from .sam import make_tiny_sam

            overrides[node_id] = (make_tiny_sam(),)
        elif node["class_type"] == "RealEditRegionIoURefine":
            inputs.update(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, fallback="rough")
    return workflow, overrides

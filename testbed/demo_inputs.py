"""Inputs for running the shipped workflows on the built-in tiny models (the demo, and smoke tests).

Workflows load photos with LoadImage and SAM from ``models/sams``; on a machine with neither, each
LoadImage is replaced by a synthetic scene (the first by the source scene, the next by the reference
scene with its object mask) and the SAM loader by a tiny random SAM. A random SAM proposes no segment
that passes SAM's quality thresholds, so Region-IoU takes every segment and falls back to the rough mask.
"""

from __future__ import annotations

import copy
from typing import Any

from .images import reference_scene, source_scene

IP2P_NODES = {"RealEditIP2PEditMask", "InstructPixToPixConditioning"}
# loaders of model files the tiny models do not stand in for (a workflow using one is not run on them)
WEIGHT_LOADERS = {"UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader"}


def untiny_loaders(workflow: dict[str, Any]) -> list[str]:
    """The loaders of ``workflow`` that no tiny model replaces (e.g. a Qwen-Image-Edit UNETLoader)."""
    return sorted({node["class_type"] for node in workflow.values() if node["class_type"] in WEIGHT_LOADERS})


def tiny_run(workflow: dict[str, Any], size: int = 128, steps: int = 4,
             tiny_sam: bool = True) -> tuple[dict[str, Any], dict[str, tuple], str]:
    """(workflow at demo size, node overrides, tiny checkpoint family) for ``run_workflow``."""
    workflow = copy.deepcopy(workflow)
    overrides: dict[str, tuple] = {}
    scenes = [source_scene(size, size), reference_scene(size, size)]
    for node_id in sorted(workflow, key=int):
        node = workflow[node_id]
        inputs = node["inputs"]
        for key, value in (("width", size), ("height", size), ("steps", steps)):
            if key in inputs and not isinstance(inputs[key], list):
                inputs[key] = value
        if node["class_type"] == "LoadImage":
            scene = scenes[min(len(overrides), len(scenes) - 1)]
            overrides[node_id] = (scene.image, scene.mask)
        elif node["class_type"] == "RealEditSAMLoader" and tiny_sam:
            from .sam import make_tiny_sam

            overrides[node_id] = (make_tiny_sam(),)
        elif node["class_type"] == "RealEditRegionIoURefine":
            inputs.update(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, fallback="rough")
        elif node["class_type"] == "RealEditKeepUneditedPixels":
            inputs["align"] = False  # a random model's output is no edit of the photo: alignment would refuse it
    family = "ip2p" if any(n["class_type"] in IP2P_NODES for n in workflow.values()) else "sd1"
    return workflow, overrides, family

"""The committed shapes world checkpoints, loaded by ComfyUI's ``CheckpointLoaderSimple`` inside its
executor (``testbed.comfy_runner``), for tests and the demo."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...masks.actions import DEFAULT_ACTION, parse_action
from .config import CHECKPOINT_DIR, GATES_FILE, IP2P_FILE, T2I_FILE
from .models import register_comfy
from .reader import segments


@dataclass
class ComfyWorld:
    """``(MODEL, CLIP, VAE)`` of the text-to-image and InstructPix2Pix checkpoints, and the gates file."""

    t2i: tuple[Any, Any, Any]
    ip2p: tuple[Any, Any, Any]
    directory: Path
    gates: dict[str, Any]


def add_checkpoint_folder(directory: Path = CHECKPOINT_DIR, *, first: bool = False) -> None:
    """Make ``directory`` one of ComfyUI's ``checkpoints`` folders (as ``extra_model_paths.yaml`` would); ``first``:
    searched before the others, so its files win over same-named ones elsewhere."""
    import folder_paths

    if first:
        folder_paths.add_model_folder_path("checkpoints", str(directory), is_default=True)
    elif str(directory) not in folder_paths.get_folder_paths("checkpoints"):
        folder_paths.add_model_folder_path("checkpoints", str(directory))


def use_candidate_models(directory: Path) -> dict[str, Path]:
    """Measure a candidate world (a retrained checkpoint) instead of the committed one: ``directory`` holds
    ``shapes_world_t2i.safetensors``, ``shapes_world_ip2p.safetensors`` or both, and becomes ComfyUI's first
    ``checkpoints`` folder (after the committed one is added), so every workflow that loads a world file by name
    loads the candidate's where it has one and the committed file otherwise. Returns {file name: the path loaded}.
    """
    directory = Path(directory).resolve()
    held = [name for name in (T2I_FILE, IP2P_FILE) if (directory / name).is_file()]
    if not held:
        raise ValueError(f"RealEdit: the candidate world folder {directory} holds neither {T2I_FILE} nor {IP2P_FILE}; "
                         f"put the candidate checkpoints there under those names")
    add_checkpoint_folder()
    add_checkpoint_folder(directory, first=True)
    return {name: (directory if name in held else CHECKPOINT_DIR) / name for name in (T2I_FILE, IP2P_FILE)}


def loader_workflow(t2i: str = T2I_FILE, ip2p: str = IP2P_FILE) -> dict[str, Any]:
    """Two ``CheckpointLoaderSimple`` nodes, API format."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": t2i}},
            "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ip2p}}}


def load_world(directory: Path = CHECKPOINT_DIR) -> ComfyWorld:
    """Register the world's model classes, then run the loaders through ComfyUI's executor."""
    from .. import comfy_runner

    register_comfy()
    add_checkpoint_folder(directory)
    result = comfy_runner.run_workflow(loader_workflow(), outputs=["1", "2"], tiny_checkpoint=None, pack=False)
    gates = json.loads((directory / GATES_FILE).read_text()) if (directory / GATES_FILE).is_file() else {}
    return ComfyWorld(tuple(result["1"]), tuple(result["2"]), directory, gates)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# ZONE's segmenter on the world.
# ---------------------------------------------------------------------------------------------------

SEGMENTER_NODE = "TestbedWorldSegments"
REGION_IOU_NODE = "RealEditRegionIoURefine"


class WorldSegments:
    """A testbed node (never the pack's): the world's stand-in for SAM's automatic masks in ZONE's Region-IoU
    (Sec. 4.3), which segments the edited image (the original for 'remove'). A tiny random SAM proposes random
    blobs, which would decide ZONE's final mask whatever M_b says; on the world's flat shapes SAM would find each
    object and the background, which is what :func:`.reader.segments` returns."""

    RETURN_TYPES = ("MASK", "MASK")
    RETURN_NAMES = ("segments", "original_segments")
    FUNCTION = "segment"
    CATEGORY = "testbed"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, Any]]:  # noqa: N802  (ComfyUI's name)
        return {"required": {"original": ("IMAGE",), "edited": ("IMAGE",)},
                "optional": {"action": ("STRING", {"forceInput": True})}}

    def segment(self, original: torch.Tensor, edited: torch.Tensor, action: str = DEFAULT_ACTION) -> tuple:
        """(the segments of the image Region-IoU segments, the original's for its 'edited and original' option),
        each (N, H, W): a MASK batch."""
        from_original = segments(original[0]).float()
        return (from_original if parse_action(action) == "remove" else segments(edited[0]).float(), from_original)


def with_world_segments(workflow: dict[str, Any]) -> dict[str, Any]:
    """``workflow`` with each Region-IoU node's candidates (and the original's, for its 'edited and original'
    option) from a :class:`WorldSegments` node on the same images and action (registered with ComfyUI here); the
    SAM loader stays, unused."""
    import nodes

    nodes.NODE_CLASS_MAPPINGS.setdefault(SEGMENTER_NODE, WorldSegments)
    out = dict(workflow)
    next_id = max(int(node_id) for node_id in workflow) + 1
    for node_id, node in workflow.items():
        if node["class_type"] != REGION_IOU_NODE:
            continue
        links = {key: node["inputs"][key] for key in ("original", "edited", "action") if key in node["inputs"]}
        out[str(next_id)] = {"class_type": SEGMENTER_NODE, "inputs": links}
        out[node_id] = {**node, "inputs": {**node["inputs"], "segments": [str(next_id), 0],
                                           "original_segments": [str(next_id), 1]}}
        next_id += 1
    return out

"""The committed shapes world checkpoints, loaded by ComfyUI's ``CheckpointLoaderSimple`` inside its
executor (``testbed.comfy_runner``), for tests and the demo."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import CHECKPOINT_DIR, GATES_FILE, IP2P_FILE, T2I_FILE
from .models import register_comfy


@dataclass
class ComfyWorld:
    """``(MODEL, CLIP, VAE)`` of the text-to-image and InstructPix2Pix checkpoints, and the gates file."""

    t2i: tuple[Any, Any, Any]
    ip2p: tuple[Any, Any, Any]
    directory: Path
    gates: dict[str, Any]


def add_checkpoint_folder(directory: Path = CHECKPOINT_DIR) -> None:
    """Make ``directory`` one of ComfyUI's ``checkpoints`` folders (as ``extra_model_paths.yaml`` would)."""
    import folder_paths

    if str(directory) not in folder_paths.get_folder_paths("checkpoints"):
        folder_paths.add_model_folder_path("checkpoints", str(directory))


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

"""The demo's world tasks as a batch manifest, for the diffusers host (``--model shapes-world``).

Each batch method gets the scene and edit its shipped workflow gets in the ComfyUI demo
(:func:`.demo_tasks.world_tasks`), so a row's ``edit.png`` is scored against the same ground truth.
ZONE's segments are the renderer's object and background masks (Region-IoU takes segments from anything).
Keep Unedited Pixels needs another editor's output: here a stand-in, the renderer's true edit shifted by
(2, 1) pixels with a global colour drift, which is what the edit models it exists for return.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ...batching.outputs import atomic_write, png_bytes
from .demo_tasks import (
    CIRCLE,
    PAIR,
    REFERENCE,
    RESHAPE,
    WORLD_MAP_DOWNSCALE,
    WORLD_NULL_TEXT_LR,
    WORLD_ZONE_MASK,
    WorldTask,
    _words,
    world_tasks,
)
from .scene import SIZE, Scene, coverage, render

# batch method -> the shipped workflow whose task it runs
WORKFLOW_OF = {"specref": "specref_object_replace", "baret": "baret_text_edit", "nulltext-p2p": "nulltext_p2p_edit",
               "zone": "zone_instruction_edit", "keep-pixels": "keep_unedited_ip2p"}


def drifted(image: torch.Tensor) -> torch.Tensor:
    """A stand-in editor's output ``(H, W, 3)``: shifted 2 px right and 1 px down (the border wraps round,
    onto the flat background), colours x1.04 + 0.01."""
    return (torch.roll(image, shifts=(1, 2), dims=(0, 1)) * 1.04 + 0.01).clamp(0, 1)


def segments(scene: Scene) -> list[torch.Tensor]:
    """The scene's object masks (front to back) and its background's, as ``(H, W)`` floats."""
    masks, covered = [], torch.zeros(SIZE, SIZE)
    for obj in reversed(scene.objects):  # later objects are drawn over earlier ones
        mask = coverage(obj) * (1 - covered)
        masks.append(mask)
        covered = covered + mask
    return [*masks, 1 - covered]


def _zone_mask_settings() -> dict[str, str | float]:
    """The world's M_b settings (:data:`.demo_tasks.WORLD_ZONE_MASK`) under the batch runner's names."""
    return {"mask_rows": WORLD_ZONE_MASK.mask_rows, "mask_layers": WORLD_ZONE_MASK.mask_layers,
            "mask_threshold": WORLD_ZONE_MASK.threshold}


def _rows(steps: int) -> list[tuple[dict, WorldTask]]:
    """(row with paths relative to the manifest's folder, the task it is scored as: the ComfyUI demo's)."""
    s = {"steps": steps}
    tasks = {task.stem: task for task in world_tasks()}
    reshape, nulltext, adopt, recolour, keep = (tasks[WORKFLOW_OF[m]]
                                                for m in ("baret", "nulltext-p2p", "specref", "zone", "keep-pixels"))
    new = _words(CIRCLE, RESHAPE)[1]  # the batch runner's blend words are target words
    shape = CIRCLE.objects[0].shape
    zone_segments = [f"pair_segment_{i}.png" for i in range(len(segments(PAIR)))]
    return [
        ({"id": "specref", "method": "specref", "image": "circle.png", "prompt": adopt.truth.source_caption,
          "target": adopt.truth.target_caption, "word": shape, "blend_words": shape, "reference": "reference.png",
          "reference_mask": "reference_mask.png",
          "settings": {**s, "map_downscale": WORLD_MAP_DOWNSCALE[adopt.stem]}}, adopt),
        ({"id": "baret", "method": "baret", "image": "circle.png", "target": reshape.truth.target_caption,
          "settings": s}, reshape),
        ({"id": "nulltext-p2p", "method": "nulltext-p2p", "image": "circle.png",
          "prompt": reshape.truth.source_caption, "target": reshape.truth.target_caption,
          "blend_words": new,
          "settings": {**s, "map_downscale": WORLD_MAP_DOWNSCALE[nulltext.stem], "null_text_lr": WORLD_NULL_TEXT_LR}},
         nulltext),
        ({"id": "zone", "method": "zone", "image": "pair.png", "instruction": recolour.truth.instruction,
          "segments": zone_segments, "settings": {**s, **_zone_mask_settings()}}, recolour),
        ({"id": "keep-pixels", "method": "keep-pixels", "image": "pair.png", "edited": "pair_edited_elsewhere.png"},
         dataclasses.replace(keep, summary=f"Keep Unedited Pixels on a stand-in editor's output for "
                                           f"{keep.truth.instruction!r}: the true edit, shifted and colour-drifted")),
    ]


def write_world_manifest(folder: Path, steps: int) -> tuple[Path, dict[str, WorldTask]]:
    """The photos, masks and ``manifest.jsonl`` in ``folder``; returns its path and each row's task."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = _rows(steps)
    tasks = {row["id"]: task for row, task in rows}
    files = {"circle.png": render(CIRCLE), "pair.png": render(PAIR), "reference.png": render(REFERENCE),
             "reference_mask.png": coverage(REFERENCE.objects[0]),
             "pair_edited_elsewhere.png": drifted(tasks["keep-pixels"].truth.expected)}
    files.update({f"pair_segment_{i}.png": mask for i, mask in enumerate(segments(PAIR))})
    for name, tensor in files.items():
        atomic_write(folder / name, png_bytes(tensor))
    path = folder / "manifest.jsonl"
    atomic_write(path, ("\n".join(json.dumps(row) for row, _ in rows) + "\n").encode())
    return path, tasks

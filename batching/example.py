"""A small example manifest on synthetic photos (testbed scenes): for dry runs, the tests and the benchmark.

``write_example(folder)`` writes the photos, masks, a stand-in "edited" photo for the mask-pipeline methods
and ``manifest.jsonl`` with one row per method that is available here (``copies`` repeats each row under
new ids, for a longer run).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..testbed.images import reference_scene, source_scene
from .methods import METHODS
from .outputs import atomic_write, png_bytes


def _edited(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The source with its object recoloured blue: what an instruction editor might return."""
    blue = torch.tensor([0.15, 0.25, 0.85])
    return torch.where(mask[..., None] > 0.5, blue, image)


def example_rows(steps: int) -> list[dict]:
    """One row per method (paths relative to the manifest's folder)."""
    s = {"steps": steps}
    rows = [
        {"id": "specref", "method": "specref", "image": "source.png", "prompt": "a red disc on a wall",
         "target": "a blue square on a wall", "word": "square", "reference": "reference.png",
         "reference_mask": "reference_mask.png", "settings": {**s, "cross_replace": 0.6}},
        {"id": "baret", "method": "baret", "image": "source.png", "target": "a blue disc on a wall",
         "settings": {**s, "ttis_iterations": 1}, "ground_truth": "edited.png"},
        {"id": "nulltext", "method": "nulltext-p2p", "image": "source.png", "prompt": "a red disc on a wall",
         "target": "a blue disc on a wall", "blend_words": "disc", "settings": {**s, "null_text_iterations": 1}},
        {"id": "zone", "method": "zone", "image": "source.png", "edited": "edited.png", "mask": "rough_mask.png",
         "segments": ["source_mask.png"], "instruction": "make the disc blue", "ground_truth": "edited.png"},
        {"id": "zone-ip2p", "method": "zone", "image": "source.png", "instruction": "make the disc blue",
         "segments": ["source_mask.png"], "settings": {"steps": steps}},
        {"id": "keep", "method": "keep-pixels", "image": "source.png", "edited": "edited.png",
         "settings": {"align": False}, "ground_truth": "edited.png"},
    ]
    return [r for r in rows if METHODS[r["method"]].available()]


def write_example(folder: Path, *, size: int = 64, steps: int = 2, copies: int = 1,
                  methods: tuple[str, ...] | None = None) -> Path:
    """Photos, masks and ``manifest.jsonl`` in ``folder``; returns the manifest's path."""
    folder.mkdir(parents=True, exist_ok=True)
    source, reference = source_scene(size, size), reference_scene(size, size)
    image, mask = source.image[0], source.mask[0]
    rough = torch.nn.functional.max_pool2d(mask[None, None], 5, 1, 2)[0, 0]  # a rough M_b, a bit larger
    files = {"source.png": image, "source_mask.png": mask, "reference.png": reference.image[0],
             "reference_mask.png": reference.mask[0], "edited.png": _edited(image, mask), "rough_mask.png": rough}
    for name, tensor in files.items():
        atomic_write(folder / name, png_bytes(tensor))
    rows = [r for r in example_rows(steps) if methods is None or r["method"] in methods]
    lines = [json.dumps({**r, "id": r["id"] if copies == 1 else f"{r['id']}-{i:03d}"})
             for i in range(copies) for r in rows]
    path = folder / "manifest.jsonl"
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path

"""Packaging: the core imports without ComfyUI, and the entry point is ComfyUI's only door."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ["realedit", "realedit.attention.hooks", "realedit.attention.math", "realedit.attention.p2p",
        "realedit.attention.sr_attention", "realedit.inversion.ddim", "realedit.inversion.bank", "realedit.masks"]


def test_core_imports_without_comfyui():
    code = (f"import sys; import {', '.join(CORE)}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('comfy', 'comfy_api', 'folder_paths', 'nodes', 'execution')); print(bad); assert not bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr


def test_pack_modules_import_each_other_relatively_only():
    offenders = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts  # hidden folders: .git, the venvs (.venv, .venv-comfy-*)
        if any(part in {"tests", "scripts", "bench", "build"} or part.startswith(".") for part in parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):  # import statements, not docstring examples
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if any(name == "realedit" or name.startswith("realedit.") for name in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_requirements_never_list_torch_and_match_pyproject():
    import tomllib

    requirements = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert not [r for r in requirements if r.split("=")[0].split("<")[0].split(">")[0].strip() == "torch"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["dependencies"] == requirements
    assert pyproject["project"]["name"] == "realedit" and pyproject["tool"]["comfy"]["DisplayName"] == "RealEdit"


def test_torchvision_nms_works_even_after_an_availability_check():
    """transformers/diffusers call find_spec('torchvision') before importing it; NMS must still run."""
    code = ("import importlib.util, torch; importlib.util.find_spec('torchvision'); import torchvision; "
            "boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.]]); "
            "keep = torchvision.ops.batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 0]), 0.5); "
            "print(keep.tolist()); assert keep.tolist() == [0, 2]")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr


def test_pure_torch_nms_matches_greedy_definition():
    import torch
    from realedit.compat.torchvision_ops import batched_nms, nms

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 20], dim=1)
    scores = torch.rand(200, generator=g)
    keep = nms(boxes, scores, 0.5).tolist()
    # reference: plain greedy loop
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    kept: list[int] = []
    for i in order:
        if all(_iou(boxes[i], boxes[j]) <= 0.5 for j in kept):
            kept.append(i)
    assert keep == kept
    idxs = torch.randint(0, 3, (200,), generator=g)
    per_class = sorted(i for c in range(3) for i in (torch.nonzero(idxs == c).flatten()[
        nms(boxes[idxs == c], scores[idxs == c], 0.5)]).tolist())
    assert sorted(batched_nms(boxes, scores, idxs, 0.5).tolist()) == per_class


def _iou(a, b) -> float:
    lt = [max(a[0], b[0]), max(a[1], b[1])]
    rb = [min(a[2], b[2]), min(a[3], b[3])]
    inter = max(0.0, float(rb[0] - lt[0])) * max(0.0, float(rb[1] - lt[1]))
    area = lambda box: float((box[2] - box[0]) * (box[3] - box[1]))  # noqa: E731
    return inter / (area(a) + area(b) - inter)

"""Packaging: the core imports without ComfyUI, and the entry point is ComfyUI's only door."""

from __future__ import annotations

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
        if any(part in {".venv", "tests", "scripts", "bench", "build"} for part in path.relative_to(ROOT).parts):
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("from realedit", "import realedit")):
                offenders.append(f"{path.relative_to(ROOT)}: {stripped}")
    assert not offenders, offenders


def test_requirements_never_list_torch_and_match_pyproject():
    import tomllib

    requirements = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert not [r for r in requirements if r.split("=")[0].split("<")[0].split(">")[0].strip() == "torch"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["dependencies"] == requirements
    assert pyproject["project"]["name"] == "realedit" and pyproject["tool"]["comfy"]["DisplayName"] == "RealEdit"

"""Cope with a torchvision whose compiled ops do not load.

Two situations, one file:

* **At run time inside ComfyUI** the pack needs exactly one torchvision op, the box NMS that
  segment-anything's automatic mask generator calls. :func:`batched_nms` is a pure-PyTorch
  equivalent (same greedy order, same tie-breaking) that the pack uses whenever
  ``torchvision.ops.batched_nms`` cannot run.
* **On dev/test machines** whose only torchvision wheel is a CUDA build on a CPU torch,
  ``import torchvision`` itself dies while registering kernels for ``torchvision::nms``. The
  project's setup script copies this file into the virtual environment and adds a ``.pth`` line that
  calls :func:`install_import_hook`: just before torchvision is first imported, and only if its
  compiled ops cannot be loaded, the hook defines ``torchvision::nms`` with the CPU kernel below, so
  the import (and diffusers, transformers, segment-anything, ComfyUI with it) succeeds. Where the
  compiled ops load, it does nothing.

This module must stay importable on its own (the setup script copies it out of the package).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_registrations: list[Any] = []  # keeps torch.library registrations alive


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression of (N, 4) xyxy boxes; returns kept indices by falling score.

    Same contract as ``torchvision.ops.nms``: a box is dropped when its IoU with a kept,
    higher-scoring box is strictly greater than ``iou_threshold``. The IoU matrix is computed
    once, vectorised; only the greedy pass is sequential, as it must be.
    """
    import torch

    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].double()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    overlaps = (inter / (area[:, None] + area[None, :] - inter)) > iou_threshold
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.int64, device=boxes.device)]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS performed independently per category ``idxs`` (``torchvision.ops.batched_nms``)."""
    import torch

    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    # Offset each category's boxes so boxes of different categories never overlap.
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _compiled_ops_load(folders: list[str]) -> bool:
    import torch

    for folder in folders:
        library = os.path.join(folder, "_C.so")
        if os.path.exists(library):
            try:
                torch.ops.load_library(library)
                return True
            except Exception:
                return False
    return False


def _define_cpu_ops() -> None:
    import torch

    library = torch.library.Library("torchvision", "DEF")
    library.define("nms" + _NMS_SCHEMA)
    library.define("qnms" + _NMS_SCHEMA)
    library.impl("nms", nms, "CPU")
    _registrations.append(library)


class _NmsAvailableLoader(importlib.abc.Loader):
    """After torchvision has imported, tell it its ops exist so ``ops.nms`` reaches our kernel."""

    def __init__(self, loader: importlib.abc.Loader, finder: _TorchvisionFinder):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):  # noqa: D102
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: D102
        self._finder.uninstall()
        self._loader.exec_module(module)
        module.extension._has_ops = lambda: True


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs once, on the first import of torchvision."""

    _compiled: bool | None = None  # None: not checked yet

    def find_spec(self, name, path=None, target=None):  # noqa: D102
        if name != "torchvision":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        # find_spec alone (transformers' and diffusers' availability checks) must not use us up:
        # stay installed until the import itself runs through our loader.
        if self._compiled is None:
            try:
                self._compiled = _compiled_ops_load(list(spec.submodule_search_locations or []))
                if not self._compiled:
                    _define_cpu_ops()
            except Exception as error:  # never break the import itself
                print(f"realedit torchvision fallback: {error}", file=sys.stderr)
                self._compiled = True
        if self._compiled:
            self.uninstall()
            return spec
        spec.loader = _NmsAvailableLoader(spec.loader, self)
        return spec

    def uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install_import_hook() -> None:
    """Arrange for torchvision's NMS op to exist before torchvision first imports."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())

"""Segment-anything automatic masks for ZONE's Region-IoU (papers/zone.txt Sec. 4.3, Eq. 6).

* :func:`load_sam` - a ``Sam`` from a checkpoint file (vit_h / vit_l / vit_b, told by the file name),
  built empty through ``segment_anything.sam_model_registry`` and filled with ``load_state_dict`` from
  ``torch.load(weights_only=True)`` or safetensors: no pickled code ever runs.
* :func:`sam_segments` - SamAutomaticMaskGenerator with segment-anything's defaults (METHODS.md:
  32 points per side, predicted IoU 0.88, stability 0.95, box NMS 0.7) -> an (N, H, W) bool batch,
  the candidate segments S^1..S^N of Eq. 6.

SAM calls torchvision's compiled ``batched_nms``; where that op cannot run, :func:`nms_function`
picks the pure-torch ``compat.torchvision_ops.batched_nms``, patched into SAM's module only inside
:func:`patched_nms` (restored afterwards).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..compat.torchvision_ops import batched_nms as fallback_batched_nms
from .composite import as_image_hwc
from .settings import ZONE_DEFAULTS

SAM_KINDS = ("vit_h", "vit_l", "vit_b")
OFFICIAL_SAM_FILES = ("sam_vit_h_4b8939.pth", "sam_vit_l_0b3195.pth", "sam_vit_b_01ec64.pth")
NmsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class SamCheckpointError(ValueError):
    """A SAM checkpoint that cannot be used (unknown kind, unreadable, wrong weights)."""


def sam_kind(path: str) -> str:
    """vit_h / vit_l / vit_b from the checkpoint's file name (e.g. ``sam_vit_b_01ec64.pth``)."""
    name = os.path.basename(path).lower()
    for kind in SAM_KINDS:
        if kind in name:
            return kind
    raise SamCheckpointError(
        f"RealEdit SAM: cannot tell the model kind of '{os.path.basename(path)}'; the file name must contain "
        f"one of {', '.join(SAM_KINDS)} (as the official files do: sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth, "
        "sam_vit_b_01ec64.pth)."
    )


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or a .pth/.pt file, the latter with ``weights_only=True``."""
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear message
        # torch's own text is left out on purpose: it advises weights_only=False, which runs the file's code
        # and is unsafe for a corrupt or untrusted file.
        raise SamCheckpointError(
            f"RealEdit SAM: '{os.path.basename(path)}' is not a SAM checkpoint, or it is corrupt (it could not be "
            f"read as plain tensors: {type(exc).__name__}). Use one of the official files "
            f"({', '.join(OFFICIAL_SAM_FILES)}) from the segment-anything repository, or a .safetensors conversion "
            "of one, downloaded again if this one is damaged.") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise SamCheckpointError(f"RealEdit SAM: '{path}' holds a {type(state).__name__}, not a state dict.")
    return state


def load_sam(path: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the ``Sam`` of the file's kind with no weights, then load the file's tensors (strict)."""
    from segment_anything import sam_model_registry

    kind = sam_kind(path)
    state = read_state_dict(path)
    sam = sam_model_registry[kind](checkpoint=None)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SamCheckpointError(
            f"RealEdit SAM: '{os.path.basename(path)}' does not hold {kind} SAM weights (the kind comes from the "
            f"file name): {str(exc).splitlines()[0]}"
        ) from exc
    return sam.to(device).eval()


def torchvision_nms_works() -> bool:
    """Whether torchvision's compiled ``batched_nms`` runs here (it raises when its ops do not load)."""
    try:
        from torchvision.ops import batched_nms

        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
        batched_nms(boxes, torch.tensor([1.0, 0.5]), torch.tensor([0, 0]), 0.5)
        return True
    except Exception:  # noqa: BLE001 - RuntimeError/NotImplementedError/ImportError all mean "not usable"
        return False


def nms_function() -> NmsFn:
    """torchvision's ``batched_nms`` when it works, else the pure-torch fallback."""
    if torchvision_nms_works():
        from torchvision.ops import batched_nms

        return batched_nms
    return fallback_batched_nms


@contextmanager
def patched_nms(fn: NmsFn | None = None) -> Iterator[NmsFn]:
    """Point segment-anything's module-level ``batched_nms`` at ``fn`` (default :func:`nms_function`)
    for the duration of the block, restoring the original afterwards."""
    import segment_anything.automatic_mask_generator as amg

    fn = fn or nms_function()
    original = amg.batched_nms
    amg.batched_nms = fn
    try:
        yield fn
    finally:
        amg.batched_nms = original


@dataclass(frozen=True)
class SamSettings:
    """SamAutomaticMaskGenerator settings (segment-anything's defaults, as METHODS.md asks)."""

    points_per_side: int = ZONE_DEFAULTS.sam_points_per_side
    pred_iou_thresh: float = ZONE_DEFAULTS.sam_pred_iou_thresh
    stability_score_thresh: float = ZONE_DEFAULTS.sam_stability_score_thresh
    box_nms_thresh: float = ZONE_DEFAULTS.sam_box_nms_thresh
    points_per_batch: int = 64


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """A ComfyUI IMAGE (H, W, 3) or (1, H, W, 3) in [0, 1] -> SAM's uint8 HWC array."""
    image = as_image_hwc(image, "RealEdit SAM: the image", channels=None)
    if image.shape[-1] < 3:
        raise ValueError(f"RealEdit SAM: expected an (H, W, 3) image, got {tuple(image.shape)}.")
    return (image[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


@torch.no_grad()
def sam_segments(sam: torch.nn.Module, image: torch.Tensor, settings: SamSettings | None = None,
                 nms: NmsFn | None = None) -> torch.Tensor:
    """The automatic masks of ``image`` as an (N, H, W) bool tensor (N may be 0), largest first."""
    from segment_anything import SamAutomaticMaskGenerator

    settings = settings or SamSettings()
    pixels = to_uint8_hwc(image)
    generator = SamAutomaticMaskGenerator(
        sam,
        points_per_side=settings.points_per_side,
        points_per_batch=settings.points_per_batch,
        pred_iou_thresh=settings.pred_iou_thresh,
        stability_score_thresh=settings.stability_score_thresh,
        box_nms_thresh=settings.box_nms_thresh,
    )
    with patched_nms(nms):
        records = generator.generate(pixels)
    h, w = pixels.shape[:2]
    if not records:
        return torch.zeros(0, h, w, dtype=torch.bool)
    records.sort(key=lambda r: -int(r["area"]))
    return torch.from_numpy(np.stack([r["segmentation"] for r in records])).bool()

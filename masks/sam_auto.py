"""Segment-anything automatic masks for ZONE's Region-IoU (papers/zone.txt Sec. 4.3, Eq. 6).

* :func:`load_sam` - a ``Sam`` from a checkpoint file, built empty through
  ``segment_anything.sam_model_registry`` and filled with ``load_state_dict(strict=True)`` from
  ``torch.load(weights_only=True)`` or safetensors: no pickled code ever runs. Two layouts load:

  - segment-anything's own (Meta's official ``sam_vit_h_4b8939.pth`` etc. from dl.fbaipublicfiles.com, or a
    .safetensors of the same tensors): the kind (vit_h / vit_l / vit_b) comes from the file name, as before
    (a .safetensors without a kind in its name: from its weights);
  - transformers' ``SamModel`` (Meta's ``model.safetensors`` on Hugging Face: facebook/sam-vit-huge, -large,
    -base, which the front end can download): renamed to segment-anything's keys by
    :func:`transformers_to_segment_anything`, the kind told by the vision encoder's width and depth.
* :func:`sam_segments` - SamAutomaticMaskGenerator with segment-anything's defaults (METHODS.md:
  32 points per side, predicted IoU 0.88, stability 0.95, box NMS 0.7) -> an (N, H, W) bool batch,
  the candidate segments S^1..S^N of Eq. 6.

SAM calls torchvision's compiled ``batched_nms``; where that op cannot run, :func:`nms_function`
picks the pure-torch ``compat.torchvision_ops.batched_nms``, patched into SAM's module only inside
:func:`patched_nms` (restored afterwards).
"""

from __future__ import annotations

import os
import re
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
# Meta's own Hugging Face copies of the same weights, in transformers' SamModel layout (model.safetensors).
HF_SAM_REPOS = {"vit_h": "facebook/sam-vit-huge", "vit_l": "facebook/sam-vit-large", "vit_b": "facebook/sam-vit-base"}
# The image encoder of each kind: (width, blocks), as segment_anything.build_sam builds it.
SAM_ENCODERS: dict[str, tuple[int, int]] = {"vit_h": (1280, 32), "vit_l": (1024, 24), "vit_b": (768, 12)}
NmsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
StateDict = dict[str, torch.Tensor]

SEGMENT_ANYTHING, TRANSFORMERS = "segment-anything", "transformers SamModel"
# Where each layout keeps the patch embedding (its width) and the encoder blocks (their number).
LAYOUT_ENCODER_KEYS = {SEGMENT_ANYTHING: ("image_encoder.patch_embed.proj.weight", "image_encoder.blocks."),
                       TRANSFORMERS: ("vision_encoder.patch_embed.projection.weight", "vision_encoder.layers.")}


class SamCheckpointError(ValueError):
    """A SAM checkpoint that cannot be used (unknown kind, unreadable, wrong weights)."""


def hf_sam_url(kind: str) -> str:
    """The download address of Meta's Hugging Face copy of a kind (transformers' SamModel layout)."""
    return f"https://huggingface.co/{HF_SAM_REPOS[kind]}/resolve/main/model.safetensors"


def _fix_text() -> str:
    return (f"Use an official segment-anything file ({', '.join(OFFICIAL_SAM_FILES)}) or Meta's Hugging Face "
            f"model.safetensors ({', '.join(HF_SAM_REPOS.values())})")


def _kind_in_name(path: str) -> str | None:
    name = os.path.basename(path).lower()
    return next((kind for kind in SAM_KINDS if kind in name), None)


def sam_kind(path: str) -> str:
    """vit_h / vit_l / vit_b from the checkpoint's file name (e.g. ``sam_vit_b_01ec64.pth``)."""
    kind = _kind_in_name(path)
    if kind is None:
        raise SamCheckpointError(
            f"RealEdit SAM: cannot tell the model kind of '{os.path.basename(path)}'; the file name must contain "
            f"one of {', '.join(SAM_KINDS)} (as the official files do: sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth, "
            "sam_vit_b_01ec64.pth)."
        )
    return kind


def read_state_dict(path: str) -> StateDict:
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
            f"read as plain tensors: {type(exc).__name__}). {_fix_text()}, downloaded again if this one is "
            "damaged.") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise SamCheckpointError(f"RealEdit SAM: '{path}' holds a {type(state).__name__}, not a state dict.")
    return state


def checkpoint_layout(state: StateDict, name: str) -> str:
    """``SEGMENT_ANYTHING`` (``image_encoder.*`` keys) or ``TRANSFORMERS`` (``vision_encoder.*``); else an error."""
    prefixes = {key.split(".", 1)[0] for key in state}
    if "image_encoder" in prefixes:
        return SEGMENT_ANYTHING
    if "vision_encoder" in prefixes:
        return TRANSFORMERS
    shown = ", ".join(sorted(prefixes)[:6]) or "no tensors"
    raise SamCheckpointError(
        f"RealEdit SAM: '{name}' is not a SAM checkpoint: it has neither segment-anything's image_encoder.* "
        f"weights nor transformers SamModel's vision_encoder.* weights (its top-level keys: {shown}). "
        f"{_fix_text()} in models/sams.")


def encoder_kind(state: StateDict, layout: str, name: str) -> str:
    """vit_h / vit_l / vit_b from the image encoder's width (patch embedding channels) and number of blocks."""
    patch_key, blocks = LAYOUT_ENCODER_KEYS[layout]
    if patch_key not in state:
        raise SamCheckpointError(f"RealEdit SAM: '{name}' ({layout} layout) has no '{patch_key}'. {_fix_text()}.")
    width = int(state[patch_key].shape[0])
    depth = len({key[len(blocks):].split(".", 1)[0] for key in state if key.startswith(blocks)})
    for kind, shape in SAM_ENCODERS.items():
        if shape == (width, depth):
            return kind
    known = ", ".join(f"{kind} ({w} wide, {d} blocks)" for kind, (w, d) in SAM_ENCODERS.items())
    raise SamCheckpointError(
        f"RealEdit SAM: '{name}' ({layout} layout) has an image encoder {width} wide with {depth} blocks, which is "
        f"none of segment-anything's {known}: a pruned, distilled or other SAM (SlimSAM, MobileSAM, SAM 2, ...) "
        f"does not load here. {_fix_text()}.")


# transformers SamModel key -> segment-anything Sam key: the inverse of the renaming in transformers'
# models/sam/convert_sam_to_hf.py (``KEYS_TO_MODIFY_MAPPING`` and the ``output_hypernetworks_mlps`` rule in
# ``replace_keys``), the script that made Meta's facebook/sam-vit-* files from the official checkpoints.
# Module by module (segment-anything <- transformers, modeling_sam.py):
#   image_encoder <- vision_encoder; patch_embed.proj <- patch_embed.projection; blocks.i.norm1/2 <- layers.i.
#   layer_norm1/2; neck.0-3 <- neck.conv1, layer_norm1, conv2, layer_norm2 (nn.Sequential indices);
#   prompt_encoder.pe_layer.positional_encoding_gaussian_matrix <- prompt_encoder.shared_embedding.
#   positional_embedding; point_embeddings <- point_embed; mask_downscaling.0,1,3,4,6 <- mask_embed.conv1,
#   layer_norm1, conv2, layer_norm2, conv3 (the Sequential's activations hold no weights);
#   mask_decoder.output_upscaling.0,1,3 <- upscale_conv1, upscale_layer_norm, upscale_conv2;
#   transformer.layers.i.norm1-4 <- layer_norm1-4; transformer.norm_final_attn <- layer_norm_final_attn;
#   MLP heads (iou_prediction_head, output_hypernetworks_mlps.j): layers.0 <- proj_in, layers.k+1 <- layers.k,
#   layers.last <- proj_out (transformers' SamFeedForward; the converter hard-wires the 3-layer heads SAM has).
# Every other key keeps its name. SamModel's extra ``shared_image_embedding.positional_embedding`` (the dense
# positional encoding) is a copy of the prompt encoder's (the converter writes the one matrix twice; transformers
# ties them): segment-anything has the one ``pe_layer`` for both.
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(pattern), target) for pattern, target in (
    (r"^vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^vision_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^vision_encoder\.layers\.", "image_encoder.blocks."),
    (r"^vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^vision_encoder\.", "image_encoder."),
    (r"^prompt_encoder\.shared_embedding\.positional_embedding$",
     "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r"mask_decoder.transformer.layers.\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
))
# transformers' SamFeedForward heads: proj_in, layers.k (k = 0 .. depth-3), proj_out.
_HEAD = re.compile(r"^(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\."
                   r"(proj_in|layers\.(\d+)|proj_out)\.(weight|bias)$")
_PE_KEYS = ("prompt_encoder.shared_embedding.positional_embedding", "shared_image_embedding.positional_embedding")


def transformers_key_to_sam(key: str, middle_layers: dict[str, int]) -> str:
    """One transformers SamModel key renamed to segment-anything's (see ``_RENAMES``); ``middle_layers`` gives
    each feed-forward head's number of ``layers.k`` (its depth minus 2)."""
    head = _HEAD.match(key)
    if head:
        prefix, part, index, param = head.groups()
        position = 0 if part == "proj_in" else int(index) + 1 if index is not None else middle_layers[prefix] + 1
        return f"{prefix}.layers.{position}.{param}"
    for pattern, target in _RENAMES:
        if pattern.search(key):
            return pattern.sub(target, key, count=1)
    return key


def transformers_to_segment_anything(state: StateDict, name: str = "the checkpoint") -> StateDict:
    """A transformers ``SamModel`` state dict (facebook/sam-vit-* ``model.safetensors``) with segment-anything's
    ``Sam`` keys; the tensors themselves are unchanged (same shapes: the conversion only renamed them). The
    mapping (``_RENAMES``, ``_HEAD``) inverts transformers' models/sam/convert_sam_to_hf.py, module by module
    against transformers' modeling_sam.py and segment_anything.modeling (tests: a bijection onto the Sam keys of
    vit_b / vit_l / vit_h, and equal outputs of a tiny SamModel and the Sam loaded from its file).

    The positional-encoding matrix may be stored under either or both of ``_PE_KEYS`` (save_pretrained keeps one
    of two tied tensors); two different ones cannot be one ``pe_layer`` and are refused."""
    present = [state[key] for key in _PE_KEYS if key in state]
    if len(present) == 2 and not torch.equal(present[0], present[1]):
        raise SamCheckpointError(
            f"RealEdit SAM: '{name}' has two different positional encodings ({' and '.join(_PE_KEYS)}); Meta's SAM "
            f"has one, shared by the prompt and image sides, so this is not a converted SAM. {_fix_text()}.")
    middle: dict[str, int] = {}
    for key in state:
        head = _HEAD.match(key)
        if head and head.group(3) is not None:
            middle[head.group(1)] = max(middle.get(head.group(1), 0), int(head.group(3)) + 1)
    out: StateDict = {}
    for key, tensor in state.items():
        if key == _PE_KEYS[1]:
            key = _PE_KEYS[0]  # the one matrix, under the name _RENAMES maps to pe_layer
        out[transformers_key_to_sam(key, middle)] = tensor
    return out


def _load_error_detail(exc: RuntimeError, limit: int = 300) -> str:
    """The first thing ``load_state_dict`` found wrong (missing / unexpected keys, a size mismatch), shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
    return (detail[:limit] + "...") if len(detail) > limit else detail


def load_sam(path: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the ``Sam`` of the file's kind with no weights, then load the file's tensors (strict).

    A .pth/.pt file must name its kind (vit_h / vit_l / vit_b) as the official files do; a .safetensors file
    may be in transformers' SamModel layout (Meta's facebook/sam-vit-* ``model.safetensors``, any name: the kind
    comes from its weights; renamed by :func:`transformers_to_segment_anything`, the inverse of transformers'
    models/sam/convert_sam_to_hf.py) or in segment-anything's (the kind from its name, else from its weights).
    """
    from segment_anything import sam_model_registry

    name = os.path.basename(path)
    named = _kind_in_name(path) if path.lower().endswith(".safetensors") else sam_kind(path)
    state = read_state_dict(path)
    layout = checkpoint_layout(state, name)
    if layout == TRANSFORMERS:
        kind, source = encoder_kind(state, layout, name), "its weights"
        state = transformers_to_segment_anything(state, name)
    else:
        kind, source = (named, "its file name") if named else (encoder_kind(state, layout, name), "its weights")
    sam = sam_model_registry[kind](checkpoint=None)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SamCheckpointError(
            f"RealEdit SAM: '{name}' does not hold {kind} SAM weights (the kind comes from {source}; "
            f"{layout} layout): {_load_error_detail(exc)} Only Meta's SAM loads (SAM 2, HQ-SAM, SlimSAM and "
            f"MobileSAM do not). {_fix_text()}."
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

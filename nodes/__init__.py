"""ComfyUI nodes (V3 API): thin wrappers that validate inputs, call the core and report progress."""

from __future__ import annotations

import os

from comfy_api.v0_0_2 import ComfyExtension, io

from .attention_maps import AttentionMapRecorder, WordAttentionMap
from .baret import BaretEditSampler, NullTextInversion, TargetTextInversion
from .inversion import DDIMInvert, InvertSourceAndReference, ReferenceFeatures
from .keep_pixels import KeepUneditedPixels
from .probe import AttentionProbe, ProbeReport
from .specref import ApplySRAttention, SpecRefEditSampler
from .stylediffusion import StyleDiffusionEditSampler, ValueEmbeddingInversion
from .zone import SAM_FOLDER, FFTEdgeSmooth, InstructionAction, IP2PEditMask, RegionIoURefine, SAMLoader


def register_model_folders() -> None:
    """Register ``models/sams`` with folder_paths (extra_model_paths.yaml entries still apply)."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, SAM_FOLDER)
    if SAM_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[SAM_FOLDER] = ([default], {".pth", ".pt", ".safetensors"})
    else:
        folder_paths.add_model_folder_path(SAM_FOLDER, default)


NODES: list[type[io.ComfyNode]] = [AttentionProbe, ProbeReport, DDIMInvert, ReferenceFeatures, IP2PEditMask,
                                   InstructionAction, SAMLoader, RegionIoURefine, FFTEdgeSmooth, SpecRefEditSampler,
                                   TargetTextInversion, NullTextInversion, BaretEditSampler, InvertSourceAndReference,
                                   ApplySRAttention, AttentionMapRecorder, WordAttentionMap, KeepUneditedPixels]
NODES += [ValueEmbeddingInversion, StyleDiffusionEditSampler]


class RealEditExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)

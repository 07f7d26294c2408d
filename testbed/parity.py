"""The same random UNet weights in both hosts: ComfyUI's ``UNetModel`` and diffusers' twin.

``comfy_unet_to_diffusers`` builds ``diffusers.UNet2DConditionModel`` from
``testbed.diffusers_models.DIFFUSERS_TINY_CONFIGS[family]`` and fills it through ComfyUI's own key
map (``comfy.utils.unet_to_diffusers``), so a host-parity test compares the *hosts*, not two
initialisations. Imports ComfyUI (call ``testbed.comfy_env.bootstrap_comfyui()`` first) and diffusers.
"""

from __future__ import annotations

from typing import Any

import comfy.utils
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep
from diffusers import UNet2DConditionModel

from .diffusers_models import DIFFUSERS_TINY_CONFIGS, Family

# SDXL's size/crop conditioning: each of the 6 time ids becomes a 256-wide sinusoidal embedding.
SDXL_TIME_EMBED_DIM = 256


class ParityError(ValueError):
    """The ComfyUI and diffusers UNets do not have the same parameters."""


def comfy_unet_config(model_patcher: Any) -> dict[str, Any]:
    """The ``unet_config`` ComfyUI built the MODEL's diffusion model from."""
    return model_patcher.model.model_config.unet_config


def comfy_to_diffusers_state_dict(comfy_state_dict: dict[str, torch.Tensor], unet_config: dict[str, Any],
                                  diffusers_keys: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Rename a ComfyUI ``diffusion_model`` state dict to diffusers keys with ComfyUI's own key map.

    ``diffusers_keys`` maps every parameter name of the target diffusers UNet to its shape. Shapes
    must match exactly: a 1x1-conv ``proj_in``/``proj_out`` (SD1.x, ``use_linear_in_transformer``
    False) is never silently reshaped into a linear one (SD2.x/SDXL), so a config that disagrees on
    the projection type is caught. Raises :class:`ParityError` when a diffusers parameter has no
    ComfyUI source or another shape, or a ComfyUI parameter is left over.
    """
    key_map = comfy.utils.unet_to_diffusers(unet_config)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    problems: list[str] = []
    for key, shape in diffusers_keys.items():
        source = key_map.get(key)
        if source is None or source not in comfy_state_dict:
            problems.append(f"diffusers {key}: no ComfyUI weight ({source})")
            continue
        tensor = comfy_state_dict[source]
        if tensor.shape != shape:  # e.g. a 1x1-conv proj_in (SD1) against a linear one (SD2/SDXL)
            problems.append(f"diffusers {key} {tuple(shape)} vs ComfyUI {source} {tuple(tensor.shape)}")
            continue
        out[key] = tensor
        used.add(source)
    leftover = sorted(set(comfy_state_dict) - used)
    problems += [f"ComfyUI {key}: not used by the diffusers UNet" for key in leftover]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ParityError(f"ComfyUI and diffusers UNets differ ({len(problems)} problems):\n  {shown}{more}")
    return out


def comfy_unet_to_diffusers(model_patcher: Any, family: Family) -> UNet2DConditionModel:
    """A diffusers UNet (fp32, eval, CPU) holding exactly the weights of a tiny ComfyUI MODEL.

    ``model_patcher`` is e.g. ``comfy_models.make_tiny_unet(family)``; its current (unpatched)
    diffusion-model weights are copied. Raises :class:`ParityError` if the two architectures differ.
    """
    unet = UNet2DConditionModel(**DIFFUSERS_TINY_CONFIGS[family])
    diffusers_keys = {key: value.shape for key, value in unet.state_dict().items()}
    comfy_state_dict = {key: value.detach().to("cpu", torch.float32)
                        for key, value in model_patcher.model.diffusion_model.state_dict().items()}
    state_dict = comfy_to_diffusers_state_dict(comfy_state_dict, comfy_unet_config(model_patcher), diffusers_keys)
    unet.load_state_dict(state_dict, strict=True)
    return unet.eval()


def sdxl_comfy_y(text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """ComfyUI's SDXL ``y`` (adm) input from diffusers' ``added_cond_kwargs``: the pooled text
    embedding followed by a 256-wide sinusoidal embedding of each of the 6 time ids (2816 wide),
    computed with ComfyUI's own ``Timestep`` embedder as ``model_base.SDXL.encode_adm`` does."""
    embedder = Timestep(SDXL_TIME_EMBED_DIM)
    flat = embedder(time_ids.reshape(-1).to(torch.float32)).reshape(time_ids.shape[0], -1)
    return torch.cat([text_embeds.to(torch.float32), flat.to(text_embeds.device)], dim=1)

"""Load a shapes world checkpoint into diffusers (no ComfyUI import): UNet2DConditionModel,
AutoencoderKL and the CLIP text model (transformers), converted with diffusers' own single-file
converters (``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``) from the SD1.5 layout.

The architecture comes from the checkpoint's metadata (``realedit.shapes_world.config``), so the
loader follows whatever the file was trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from .config import LATER_SETTINGS

if TYPE_CHECKING:
    from ...batching.models import EditModel

CONFIG_METADATA_KEY = "realedit.shapes_world.config"  # same key as models.py (which imports ComfyUI)


@dataclass
class DiffusersWorld:
    """The diffusers twins of one checkpoint's parts, fp32, eval mode, on the CPU."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    config: dict[str, Any]

    @property
    def prediction_type(self) -> str:
        """The schedulers' ``prediction_type`` for this UNet (a file that records no ``prediction`` predates it)."""
        recorded = self.config.get("prediction", LATER_SETTINGS["prediction"])
        return {"eps": "epsilon", "v": "v_prediction"}[recorded]


def unet_config(world: dict[str, Any], in_channels: int) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs for the world's ComfyUI UNet config (SD1 layout)."""
    unet = world["unet"]
    mult, base = unet["channel_mult"], unet["model_channels"]
    channels = tuple(base * m for m in mult)
    depth = unet["transformer_depth"]
    down = tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth)
    up = tuple(reversed(["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in depth]))
    head_channels = world["unet_heads"]["num_head_channels"]
    return {
        "sample_size": unet["image_size"], "in_channels": in_channels, "out_channels": unet["out_channels"],
        "block_out_channels": channels, "layers_per_block": unet["num_res_blocks"][0],
        "down_block_types": down, "up_block_types": up, "cross_attention_dim": unet["context_dim"],
        # diffusers' ``attention_head_dim`` is the number of heads per block for SD1-style UNets.
        "attention_head_dim": tuple(c // head_channels for c in channels),
        "use_linear_projection": unet["use_linear_in_transformer"], "norm_num_groups": 32,
        "flip_sin_to_cos": True, "freq_shift": 0,
    }


def vae_config(world: dict[str, Any]) -> dict[str, Any]:
    dd = world["vae"]
    return {
        "in_channels": dd["in_channels"], "out_channels": dd["out_ch"], "latent_channels": dd["z_channels"],
        "block_out_channels": tuple(dd["ch"] * m for m in dd["ch_mult"]), "layers_per_block": dd["num_res_blocks"],
        "down_block_types": ("DownEncoderBlock2D",) * len(dd["ch_mult"]),
        "up_block_types": ("UpDecoderBlock2D",) * len(dd["ch_mult"]),
        "norm_num_groups": 32, "scaling_factor": 0.18215, "sample_size": dd["resolution"],
    }


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safetensors.safe_open(str(path), framework="pt") as file:
        state = {k: file.get_tensor(k).float() for k in file.keys()}
        metadata = file.metadata() or {}
    if CONFIG_METADATA_KEY not in metadata:
        raise ValueError(f"RealEdit: {path} is no shapes world checkpoint (no {CONFIG_METADATA_KEY} metadata); "
                         "load one from testbed/shapes_world_models/")
    return state, json.loads(metadata[CONFIG_METADATA_KEY])


def load_unet(path: Path) -> UNet2DConditionModel:
    state, world = _read(path)
    in_channels = state["model.diffusion_model.input_blocks.0.0.weight"].shape[1]
    config = unet_config(world, in_channels)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, dict(unet.config)))
    return unet.float().eval()


def _text_state(state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's ``cond_stage_model.transformer.text_model.*`` weights under the key names of the
    installed transformers' ``CLIPTextModel`` (``model_state``): ``text_model.*`` in transformers 4, without
    that level in 5. ``position_ids`` (a buffer, not saved in the checkpoint) keep the model's own values."""
    prefix = "cond_stage_model.transformer."
    text = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not any(k.startswith("text_model.") for k in model_state):
        text = {k.removeprefix("text_model."): v for k, v in text.items()}
    text.update({k: v for k, v in model_state.items() if k.endswith("position_ids") and k not in text})
    return text


def load(path: Path) -> DiffusersWorld:
    """UNet, VAE and text encoder of ``path`` (strict loads: every weight is used)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    state, world = _read(path)
    unet = load_unet(path)
    vae = AutoencoderKL(**vae_config(world))
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, dict(vae.config)))
    clip = world["clip"]
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=clip["hidden_size"], intermediate_size=clip["intermediate_size"],
        num_attention_heads=clip["num_attention_heads"], num_hidden_layers=clip["num_hidden_layers"],
        vocab_size=clip["vocab_size"], max_position_embeddings=clip["max_position_embeddings"],
        hidden_act="quick_gelu"))
    text.load_state_dict(_text_state(state, text.state_dict()), strict=True)
    return DiffusersWorld(unet, vae.float().eval(), text.float().eval(), world)


def edit_model(name: str, file: str, device: torch.device, dtype: torch.dtype,
               folder: Path | None = None) -> EditModel:
    """The batch runner's model ``name`` (``--model shapes-world`` / ``shapes-world-ip2p``) from the committed
    checkpoint ``file`` (or the one in ``folder``: a candidate world a bench measures): its UNet and VAE, SD1.5's
    DDIM schedule, and its text encoder fed by the world's token table (:mod:`.tokens`; CLIPTextEncode's
    embedding, without ComfyUI's tokenizer files)."""
    from ...batching.models import EditModel, place
    from ..diffusers_models import make_ddim_scheduler
    from .config import CHECKPOINT_DIR
    from .tokens import clip_ids, tokenize

    world = load((folder or CHECKPOINT_DIR) / file)
    place(world.unet, world.vae, device=device, dtype=dtype)
    text = world.text_encoder.to(device)

    @torch.no_grad()
    def encode(prompt: str) -> torch.Tensor:
        return text(clip_ids(prompt).to(device)).last_hidden_state.to(dtype)  # (1, 77, 64)

    scheduler = make_ddim_scheduler(prediction_type=world.prediction_type)
    return EditModel(name, world.unet, world.vae, scheduler, tokenize, encode)

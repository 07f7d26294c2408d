"""Tiny diffusers UNets with random weights, the twins of ``testbed/comfy_models.py``.

``DIFFUSERS_TINY_CONFIGS`` gives ``diffusers.UNet2DConditionModel`` keyword arguments with the same
architecture as ``TINY_UNET_CONFIGS`` (channels 32/64/64/64, two res blocks per level, the same
transformer blocks in the same order, the same heads and projections), so tests can check that the
ComfyUI and diffusers hosts see the same layers. No ComfyUI import here: the numbers are copied.

Note that diffusers' ``attention_head_dim`` is, for these UNets, the number of *heads* per level
(a historical naming quirk of ``UNet2DConditionModel``), which is why it holds 8 for SD1.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from .weights import randomise

Family = Literal["sd1", "sd2", "sdxl", "ip2p"]

_SD_COMMON: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 64, 64),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 64,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

DIFFUSERS_TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # SD1.x: 16 transformer blocks, conv proj_in/proj_out, 8 heads at every level.
    "sd1": dict(_SD_COMMON, attention_head_dim=8, use_linear_projection=False),
    # SD2.x: linear projections, 16-dim heads (32 channels -> 2 heads, 64 -> 4).
    "sd2": dict(_SD_COMMON, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True),
    # SDXL: 3 levels, none at the top level, 2 blocks per transformer, "text_time" adm of
    # 1280 (pooled text) + 6 * 256 (size/crop time ids) = 2816 inputs, as ComfyUI's SDXL.
    "sdxl": {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 2),
        "attention_head_dim": (2, 4, 4),
        "use_linear_projection": True,
        "cross_attention_dim": 64,
        "norm_num_groups": 32,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    },
}
DIFFUSERS_TINY_CONFIGS["ip2p"] = dict(DIFFUSERS_TINY_CONFIGS["sd1"], in_channels=8)

# Widths of the SDXL extra conditioning the tiny SDXL expects (``added_cond_kwargs``).
SDXL_TEXT_EMBEDS_DIM = 1280
SDXL_TIME_IDS = 6


def make_tiny_diffusers_unet(family: Family = "sd1", seed: int = 0, weight_scale: float = 1.0) -> UNet2DConditionModel:
    """A random-weight ``UNet2DConditionModel`` of the family's shape, fp32, eval mode, on the CPU.

    Weights are drawn by ``testbed.weights.randomise`` (seeded, ``weight_scale`` shrinks them), so
    the global RNG is left untouched.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**DIFFUSERS_TINY_CONFIGS[family])
        randomise(unet, weight_scale)
    return unet.float().eval() if unet.dtype != torch.float32 else unet.eval()


def sdxl_added_cond(batch: int, height: int = 128, width: int = 128, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """``added_cond_kwargs`` for the tiny SDXL: seeded pooled text embeds and SDXL-style time ids."""
    generator = torch.Generator().manual_seed(seed)
    text_embeds = torch.randn(batch, SDXL_TEXT_EMBEDS_DIM, generator=generator)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)
    return {"text_embeds": text_embeds, "time_ids": time_ids}


def make_ddim_scheduler(num_train_timesteps: int = 1000, prediction_type: str = "epsilon") -> DDIMScheduler:
    """Stable Diffusion's DDIM schedule (scaled-linear betas), built locally: no download; ``prediction_type``
    "epsilon" (SD1) or "v_prediction" (SD2)."""
    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def make_tiny_diffusers_vae(seed: int = 0) -> AutoencoderKL:
    """A random-weight SD-style ``AutoencoderKL``: 8x downscale, 4 latent channels, narrow blocks."""
    config = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32), scaling_factor=0.18215,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(**config)
    return vae.eval()

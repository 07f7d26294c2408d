"""Tiny ComfyUI models with random weights, built from ComfyUI's own classes.

The UNets keep the *shape* of the real families (same block layout, attention layer count and
order, linear vs conv projections, head layout), with narrow channels so a CPU step takes
milliseconds.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

Family = Literal["sd1", "sd2", "sdxl", "ip2p"]

_COMMON = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    in_channels=4, model_channels=32, use_temporal_attention=False, use_temporal_resblock=False,
)

# SD1.x shape: 16 transformer blocks (input 1,2,4,5,7,8 / middle 0 / output 3-11), conv proj, 8 heads.
TINY_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": dict(
        _COMMON, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 2, 2],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        use_linear_in_transformer=False, context_dim=64,
    ),
    # SD2.x shape: linear projections and fixed 64-dim heads (here 16-dim heads on narrow channels).
    "sd2": dict(
        _COMMON, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 2, 2],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        use_linear_in_transformer=True, context_dim=64, num_head_channels=16,
    ),
    # SDXL shape: 3 levels, no attention at the top level, 2 blocks per transformer, pooled adm input.
    "sdxl": dict(
        _COMMON, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
        channel_mult=[1, 2, 2], transformer_depth=[0, 0, 2, 2, 2, 2], transformer_depth_middle=2,
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 2, 2, 2], use_linear_in_transformer=True,
        context_dim=64, num_head_channels=16,
    ),
}
TINY_UNET_CONFIGS["ip2p"] = dict(TINY_UNET_CONFIGS["sd1"], in_channels=8)

_MODEL_CONFIG_CLASSES = {
    "sd1": comfy.supported_models.SD15,
    "sd2": comfy.supported_models.SD20,
    "sdxl": comfy.supported_models.SDXL,
    "ip2p": comfy.supported_models.SD15_instructpix2pix,
}


def _model_config(family: Family) -> Any:
    config = _MODEL_CONFIG_CLASSES[family](dict(TINY_UNET_CONFIGS[family]))
    if family == "sdxl":
        config.unet_config.pop("num_heads", None)
    if family == "sd2":
        config.unet_config["num_heads"] = -1
        config.unet_config["num_head_channels"] = 16
    if family == "sdxl":
        config.unet_config["num_head_channels"] = 16
    return config


def make_tiny_unet(family: Family = "sd1", seed: int = 0, weight_scale: float = 1.0,
                   prediction: Literal["eps", "v"] = "eps") -> comfy.model_patcher.ModelPatcher:
    """A random-weight ComfyUI MODEL of the given family's shape, in fp32 on the CPU.

    ``weight_scale`` < 1 shrinks every weight, which makes the UNet smooth enough for inversion round
    trips (a raw random UNet is too rough).
    """
    config = _model_config(family)
    config.unet_config["dtype"] = torch.float32
    model_type = comfy.model_base.ModelType.V_PREDICTION if prediction == "v" else comfy.model_base.ModelType.EPS
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = config.get_model({}, "", device=torch.device("cpu"))
        model.model_type = model_type
        model.model_sampling = comfy.model_base.model_sampling(config, model_type)
        _randomise(model.diffusion_model, weight_scale)
    model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def _randomise(module: torch.nn.Module, scale: float) -> None:
    """Fill every parameter with seeded noise (ComfyUI's ops leave weights uninitialised)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02 * scale)
            elif param.ndim == 1:  # norm weights
                param.fill_(1.0)
            else:
                fan_in = param[0].numel()
                param.normal_(0.0, scale / fan_in**0.5)

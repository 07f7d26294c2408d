"""Tiny ComfyUI models with random weights, built from ComfyUI's own classes.

The UNets keep the *shape* of the real families (same block layout, attention layer count and
order, linear vs conv projections, head layout), with narrow channels so a CPU step takes
milliseconds.
"""

from __future__ import annotations

from typing import Any, Literal

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.supported_models
import torch

from .weights import randomise, scale_output

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
                   prediction: Literal["eps", "v"] = "eps",
                   output_scale: float = 1.0) -> comfy.model_patcher.ModelPatcher:
    """A random-weight ComfyUI MODEL of the given family's shape, in fp32 on the CPU.

    ``output_scale`` < 1 shrinks the final convolution: the prediction then varies little with the
    input, which makes the UNet smooth enough for inversion round trips (a raw random UNet is too
    rough; shrinking every weight does not help, the group norms undo it).
    """
    config = _model_config(family)
    config.unet_config["dtype"] = torch.float32
    model_type = comfy.model_base.ModelType.V_PREDICTION if prediction == "v" else comfy.model_base.ModelType.EPS
    patcher = seeded_model(config, seed, weight_scale, output_scale)
    patcher.model.model_type = model_type
    patcher.model.model_sampling = comfy.model_base.model_sampling(config, model_type)
    return patcher


def seeded_model(model_config: Any, seed: int, weight_scale: float = 1.0, output_scale: float = 1.0,
                 markers: dict[str, torch.Tensor] | None = None) -> comfy.model_patcher.ModelPatcher:
    """``model_config``'s MODEL on the CPU with seeded random UNet weights (:func:`~.weights.randomise` at
    ``weight_scale``, the output layer scaled by ``output_scale``; 0 zeroes it, so training starts from
    eps = 0), in eval mode, loading to ComfyUI's torch device. ``markers``: the state dict keys the model
    class reads its model type from (e.g. ``v_pred``), as a checkpoint would carry them."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_config.get_model(dict(markers or {}), "", device=torch.device("cpu"))
        randomise(model.diffusion_model, weight_scale)
        scale_output(model.diffusion_model, output_scale)
    model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def make_sd15_shaped_unet(device: torch.device, output_scale: float = 1.0,
                          dtype: torch.dtype | None = None) -> tuple[comfy.model_patcher.ModelPatcher, int]:
    """A full-size SD1.5 UNet (860M parameters) with random N(0, 0.02) weights, for benchmarks; and its
    context width (768). fp16 on GPU, fp32 on CPU unless ``dtype``; ``output_scale`` as in
    :func:`make_tiny_unet` (a smoother model for inversion benchmarks)."""
    config = dict(TINY_UNET_CONFIGS["sd1"], model_channels=320, channel_mult=[1, 2, 4, 4], context_dim=768)
    config["dtype"] = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    model = comfy.supported_models.SD15(config).get_model({}, "", device=device)
    with torch.no_grad():
        for param in model.diffusion_model.parameters():
            param.normal_(0, 0.02)
    scale_output(model.diffusion_model, output_scale)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    return patcher, 768


# ---------------------------------------------------------------------------------------------------
# Text encoders: the family's own ComfyUI CLIP classes and the REAL bundled tokenizer, tiny weights.
# ---------------------------------------------------------------------------------------------------

def _tiny_text_config(hidden: int) -> dict[str, Any]:
    """Overrides for a ComfyUI CLIP text-model JSON config: 3 layers (penultimate-layer users need
    at least 3), 2 heads, the real vocabulary and 77 positions so real token ids embed."""
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=3,
                vocab_size=49408, max_position_embeddings=77)


# Per family: the ``<model_name>_model_config`` overrides ComfyUI's SDClipModel applies on top of the
# bundled JSON configs. Hidden widths add up to the tiny UNets' context_dim (64).
TINY_CLIP_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "sd1": {"clip_l_model_config": _tiny_text_config(64)},
    "sd2": {"clip_h_model_config": _tiny_text_config(64)},
    "sdxl": {"clip_l_model_config": _tiny_text_config(32), "clip_g_model_config": _tiny_text_config(32)},
}
TINY_CLIP_OPTIONS["ip2p"] = TINY_CLIP_OPTIONS["sd1"]

# SDXL's UNet adm input (2816) is the projected CLIP-G pooled output (1280) + 6 * 256 size embeddings.
SDXL_POOLED_DIM = 1280


def make_tiny_clip(seed: int = 0, family: Family = "sd1") -> comfy.sd.CLIP:
    """A ComfyUI CLIP for the family with a tiny random-weight text transformer, fp32 on the CPU.

    The tokenizer is the real one bundled with ComfyUI (``comfy/sd1_tokenizer``), so ``tokenize``,
    prompt weighting and ``CLIPTextEncode`` behave as with a real checkpoint; ``encode`` gives
    ``(1, 77, 64)`` conditioning matching the tiny UNets' ``context_dim`` (SDXL: CLIP-L 32 + CLIP-G 32
    wide, with a 1280-wide projected pooled output as the SDXL UNet's adm input needs).
    """
    target = _model_config(family).clip_target({})
    options = {key: dict(value) for key, value in TINY_CLIP_OPTIONS[family].items()}
    options.update(dtype=torch.float32, initial_device=torch.device("cpu"))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip = comfy.sd.CLIP(target=target, model_options=options)
        if family == "sdxl":  # ComfyUI's text_projection is square; SDXL needs a 1280-wide pooled output
            clip_g = clip.cond_stage_model.clip_g.transformer
            clip_g.text_projection = comfy.ops.manual_cast.Linear(
                clip_g.text_projection.in_features, SDXL_POOLED_DIM, bias=False, dtype=torch.float32)
        randomise(clip.cond_stage_model, 1.0)
    return clip


# ---------------------------------------------------------------------------------------------------
# VAE: ComfyUI's SD AutoencoderKL with narrow channels (8x downscale, 4 latent channels).
# ---------------------------------------------------------------------------------------------------

TINY_VAE_CONFIG: dict[str, Any] = {
    "params": {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
            "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
        },
    }
}


def make_tiny_vae(seed: int = 0) -> comfy.sd.VAE:
    """A ComfyUI VAE (SD-style AutoencoderKL: 3 -> 4 channels, 8x downscale), random weights, fp32.

    Built through ``comfy.sd.VAE(sd, config=...)`` so encode/decode, tiling fallbacks and the
    ``VAEEncode``/``VAEDecode`` nodes run ComfyUI's own code. 128x128 images give 16x16 latents.
    """
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoencoderKL(**TINY_VAE_CONFIG["params"])
        randomise(model, 1.0)
    state_dict = model.state_dict()
    config = {"params": {**TINY_VAE_CONFIG["params"], "ddconfig": dict(TINY_VAE_CONFIG["params"]["ddconfig"])}}
    return comfy.sd.VAE(sd=state_dict, config=config, dtype=torch.float32)


def make_tiny_checkpoint(family: Family = "sd1", seed: int = 0, weight_scale: float = 1.0,
                         prediction: Literal["eps", "v"] = "eps",
                         ) -> tuple[comfy.model_patcher.ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE]:
    """What ``CheckpointLoaderSimple`` returns, tiny: ``(MODEL, CLIP, VAE)`` for the family.

    The three parts use seeds ``seed``, ``seed + 1`` and ``seed + 2``; same arguments, same weights.
    """
    model = make_tiny_unet(family, seed=seed, weight_scale=weight_scale, prediction=prediction)
    return model, make_tiny_clip(seed + 1, family=family), make_tiny_vae(seed + 2)

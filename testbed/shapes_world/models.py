"""The shapes world's models as ComfyUI objects, and how ComfyUI's own loader learns to load them.

Why a registration: ``CheckpointLoaderSimple`` -> ``comfy.sd.load_state_dict_guess_config`` picks the
model class by matching the UNet shape it detects in the file against ``comfy.supported_models.models``
(SD15 wants ``context_dim`` 768 and 320 channels), builds the text encoder from that class's
``clip_target`` (SD15: a full-size CLIP-L) and builds the VAE from hard-coded SD sizes (128 channels;
0.33.0 reads only the decoder width from the file). None of that fits a tiny world, and neither
release offers a hook for it. So the testbed registers, on demand (:func:`register_comfy`, called by
the tests' fixture, the demo and the training command; never by product code):

* :class:`ShapesWorldSD15` and :class:`ShapesWorldIP2P`: subclasses of ComfyUI's ``SD15`` and
  ``SD15_instructpix2pix`` whose ``unet_config`` is the tiny UNet's (so detection picks them, and only
  for these files: no real checkpoint has ``context_dim`` 64) and whose ``clip_target`` builds SD1's
  CLIP with the tiny text config (the real SD1 tokenizer). Everything else (latent format, schedule,
  key layout, IP2P concat conditioning) is inherited unchanged, so the MODEL is an SD1.5 MODEL.
* The VAE: ``comfy.sd.VAE`` is swapped, in ComfyUI's ``comfy.sd`` module only, for a subclass that
  reads the ddconfig from the checkpoint's metadata key ``realedit.shapes_world.vae`` when it is there
  (and behaves exactly as ``comfy.sd.VAE`` otherwise), since both releases size an SD VAE from fixed
  numbers. :func:`unregister_comfy` restores both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import torch

from ..comfy_models import seeded_model
from ..weights import randomise
from .config import DEFAULT_CONFIG, WorldConfig

VAE_METADATA_KEY = "realedit.shapes_world.vae"
CONFIG_METADATA_KEY = "realedit.shapes_world.config"
HASH_METADATA_KEY = "realedit.shapes_world.config_hash"
GATES_METADATA_KEY = "realedit.shapes_world.gates"

V_PRED_KEY = "v_pred"  # present (empty) in v-prediction checkpoints: ComfyUI's marker (supported_models.SDXL)
_V_PRED_MARKER = torch.zeros(0, dtype=torch.float16)

_DETECTED_KEYS = ("context_dim", "model_channels", "channel_mult", "num_res_blocks", "use_linear_in_transformer",
                  "adm_in_channels", "use_temporal_attention", "in_channels")


def _unet_match(config: WorldConfig, in_channels: int) -> dict[str, Any]:
    """The keys ComfyUI's ``detect_unet_config`` reads from a file, with the tiny UNet's values."""
    unet = dict(config.unet, in_channels=in_channels)
    return {k: unet[k] for k in _DETECTED_KEYS}


class ShapesWorldClipModel(comfy.sd1_clip.SD1ClipModel):
    """ComfyUI's SD1 CLIP (CLIP-L slot) with the shapes world's tiny text config."""

    text_config: dict[str, Any] = dict(DEFAULT_CONFIG.clip)

    def __init__(self, device: Any = "cpu", dtype: Any = None, model_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        options = dict(model_options or {})
        options["clip_l_model_config"] = {**self.text_config, **options.get("clip_l_model_config", {})}
        super().__init__(device=device, dtype=dtype, model_options=options, **kwargs)


def _clip_target() -> comfy.supported_models_base.ClipTarget:
    return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, ShapesWorldClipModel)


def _model_type(state_dict: dict[str, Any]) -> comfy.model_base.ModelType:
    """V_PREDICTION for a file with :data:`V_PRED_KEY`, else SD1.5's EPS."""
    return comfy.model_base.ModelType.V_PREDICTION if V_PRED_KEY in state_dict else comfy.model_base.ModelType.EPS


class ShapesWorldSD15(comfy.supported_models.SD15):
    """SD1.5 with the tiny text-to-image UNet and text encoder of the shapes world."""

    unet_config = _unet_match(DEFAULT_CONFIG, 4)
    unet_extra_config = dict(DEFAULT_CONFIG.unet_heads)

    def clip_target(self, state_dict: dict[str, Any] | None = None) -> comfy.supported_models_base.ClipTarget:
        return _clip_target()

    def model_type(self, state_dict: dict[str, Any], prefix: str = "") -> comfy.model_base.ModelType:
        return _model_type(state_dict)


class ShapesWorldIP2P(comfy.supported_models.SD15_instructpix2pix):
    """SD1.5 InstructPix2Pix (8 input channels) with the shapes world's tiny UNet and text encoder."""

    unet_config = _unet_match(DEFAULT_CONFIG, 8)
    unet_extra_config = dict(DEFAULT_CONFIG.unet_heads)

    def clip_target(self, state_dict: dict[str, Any] | None = None) -> comfy.supported_models_base.ClipTarget:
        return _clip_target()

    def get_model(self, state_dict: dict[str, Any], prefix: str = "", device: Any = None) -> Any:
        """As ``SD15_instructpix2pix.get_model``, which always builds EPS, with the file's model type."""
        return comfy.model_base.SD15_instructpix2pix(self, model_type=_model_type(state_dict), device=device)


_ORIGINAL_VAE: list[type] = []


class ShapesWorldAwareVAE(comfy.sd.VAE):
    """``comfy.sd.VAE`` that takes its AutoencoderKL ddconfig from the shapes world metadata key."""

    def __init__(self, sd: dict[str, Any] | None = None, device: Any = None, config: dict[str, Any] | None = None,
                 dtype: Any = None, metadata: dict[str, str] | None = None, **kwargs: Any) -> None:
        if config is None and metadata and VAE_METADATA_KEY in metadata:
            config = vae_comfy_config(json.loads(metadata[VAE_METADATA_KEY]))
        super().__init__(sd=sd, device=device, config=config, dtype=dtype, metadata=metadata, **kwargs)


def register_comfy() -> None:
    """Teach this process's ComfyUI to load the shapes world checkpoints (idempotent; see module doc)."""
    models = comfy.supported_models.models
    for cls in (ShapesWorldSD15, ShapesWorldIP2P):  # first, ahead of SD15: more specific
        if cls not in models:
            models.insert(0, cls)
    if not _ORIGINAL_VAE:
        _ORIGINAL_VAE.append(comfy.sd.VAE)
        comfy.sd.VAE = ShapesWorldAwareVAE


def unregister_comfy() -> None:
    """Undo :func:`register_comfy`."""
    models = comfy.supported_models.models
    for cls in (ShapesWorldSD15, ShapesWorldIP2P):
        while cls in models:
            models.remove(cls)
    if _ORIGINAL_VAE:
        comfy.sd.VAE = _ORIGINAL_VAE.pop()


# ---------------------------------------------------------------------------------------------------
# Building untrained models (training starts from these).
# ---------------------------------------------------------------------------------------------------

def vae_comfy_config(ddconfig: dict[str, Any]) -> dict[str, Any]:
    """``comfy.sd.VAE(config=...)`` for an AutoencoderKL with ``ddconfig``."""
    return {"params": {"embed_dim": ddconfig["z_channels"], "ddconfig": dict(ddconfig)}}


def make_vae(config: WorldConfig = DEFAULT_CONFIG, state_dict: dict[str, torch.Tensor] | None = None) -> comfy.sd.VAE:
    """A ComfyUI VAE of the world's AutoencoderKL, fp32; random (seeded) unless ``state_dict``."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    if state_dict is None:
        params = vae_comfy_config(config.vae)["params"]
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            model = AutoencoderKL(**params)
            randomise(model, 1.0)
        state_dict = model.state_dict()
    return comfy.sd.VAE(sd=state_dict, config=vae_comfy_config(config.vae), dtype=torch.float32)


def make_clip(config: WorldConfig = DEFAULT_CONFIG) -> comfy.sd.CLIP:
    """The frozen tiny text encoder: ComfyUI's SD1 CLIP and tokenizer, seeded random weights, fp32."""
    options = {"clip_l_model_config": dict(config.clip), "dtype": torch.float32, "initial_device": torch.device("cpu")}
    with torch.random.fork_rng():
        torch.manual_seed(config.clip_seed)
        clip = comfy.sd.CLIP(target=_clip_target(), model_options=options)
        randomise(clip.cond_stage_model, 1.0)
    return clip


def make_unet(config: WorldConfig = DEFAULT_CONFIG, in_channels: int = 4) -> comfy.model_patcher.ModelPatcher:
    """An untrained MODEL of the world (fp32, CPU), output conv zeroed: training starts from an output of 0;
    it samples as ``config.prediction`` says."""
    model_class = ShapesWorldIP2P if in_channels == 8 else ShapesWorldSD15
    model_config = model_class(dict(config.unet, in_channels=in_channels, dtype=torch.float32))
    markers = {V_PRED_KEY: _V_PRED_MARKER} if config.prediction == "v" else {}
    return seeded_model(model_config, config.seed + in_channels, output_scale=0.0, markers=markers)


# ---------------------------------------------------------------------------------------------------
# Single-file checkpoints in SD1.5's layout.
# ---------------------------------------------------------------------------------------------------

def checkpoint_state_dict(model: comfy.model_patcher.ModelPatcher, clip: comfy.sd.CLIP,
                          vae: comfy.sd.VAE) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*``, ``cond_stage_model.transformer.text_model.*``, ``first_stage_model.*``
    (ComfyUI's own ``state_dict_for_saving``, as ``comfy.sd.save_checkpoint``; it adds :data:`V_PRED_KEY` for a
    v-prediction MODEL), fp16. ComfyUI 0.3.64 saves through ``BaseModel.state_dict_for_saving(clip, vae)``;
    later releases through ``ModelPatcher.state_dict_for_saving(clip, vae)``, whose ``BaseModel`` method
    takes the UNet's state dict first."""
    clip_sd = {k: v for k, v in clip.get_sd().items() if not k.endswith("position_ids")}
    saver = model if hasattr(model, "state_dict_for_saving") else model.model
    state = saver.state_dict_for_saving(clip_sd, vae.get_sd())
    return {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def save_checkpoint(path: Path, model: comfy.model_patcher.ModelPatcher, clip: comfy.sd.CLIP, vae: comfy.sd.VAE,
                    config: WorldConfig, gates: dict[str, Any]) -> None:
    import safetensors.torch

    metadata = {VAE_METADATA_KEY: json.dumps(config.vae), CONFIG_METADATA_KEY: config.to_json(),
                HASH_METADATA_KEY: config.key(), GATES_METADATA_KEY: json.dumps(gates)}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(checkpoint_state_dict(model, clip, vae), str(path), metadata=metadata)


def load_checkpoint(path: Path) -> tuple[comfy.model_patcher.ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE]:
    """What ``CheckpointLoaderSimple`` gives for ``path`` (registers the world first)."""
    register_comfy()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    return model, clip, vae

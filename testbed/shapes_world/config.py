"""Everything that decides the shapes world's trained weights, in one hashed config (no ComfyUI import)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The committed checkpoints and their measured gates.
CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "shapes_world_models"
T2I_FILE = "shapes_world_t2i.safetensors"
IP2P_FILE = "shapes_world_ip2p.safetensors"
GATES_FILE = "gates.json"

# ComfyUI AutoencoderKL (ldm layout), 8x downscale, 4 latent channels. 64 channels at every level and no
# residual block in the encoder levels (the decoder still gets one per level, plus the middle block):
# 0.86 M parameters. Not 32: ComfyUI's GroupNorm has 32 groups, so at 32 channels every norm removes each
# channel's mean over the image, and the absolute colour of a flat region passes the encoder's last norm and
# the decoder's norm_out only through the zero padding's border effects. bench/bench_world_vae.py measured it
# at 400 equal steps: 32 channels, 18.9 dB and flat images decoded 51 8-bit RGB units off; 64 channels
# (2 per group), 24.1 dB and 8.6 units; the 32-channel VAE trained 7x longer still decoded flat images 40
# units off (23.0 dB).
VAE_DDCONFIG: dict[str, Any] = {
    "double_z": True, "z_channels": 4, "resolution": 128, "in_channels": 3, "out_ch": 3,
    "ch": 64, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 0, "attn_resolutions": [], "dropout": 0.0,
}

# SD1-family UNet (conv proj_in/out, 8 heads, SD1.5's discrete schedule), narrow: 3 levels,
# 32/64/64 channels, one res block per level, cross attention at every level, context 64.
UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 16, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "in_channels": 4, "model_channels": 32, "use_temporal_attention": False,
    "use_temporal_resblock": False, "adm_in_channels": None, "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 2], "transformer_depth": [1, 1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1], "use_linear_in_transformer": False, "context_dim": 64,
}

# ComfyUI's SD1 CLIP-L text model, overridden to 3 layers of width 64 (the real 49408-token vocabulary
# and 77 positions so the bundled tokenizer's ids embed). Frozen random weights.
CLIP_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 3,
    "vocab_size": 49408, "max_position_embeddings": 77,
}


@dataclass(frozen=True)
class WorldConfig:
    """Architectures, data and training settings; :meth:`key` hashes all of it (the checkpoints carry it)."""

    vae: dict[str, Any] = field(default_factory=lambda: dict(VAE_DDCONFIG))
    unet: dict[str, Any] = field(default_factory=lambda: dict(UNET_CONFIG))
    clip: dict[str, Any] = field(default_factory=lambda: dict(CLIP_TEXT_CONFIG))
    # Heads of 32 channels (1 at the top level, 2 below) instead of SD1's 8 heads: 8 heads of 4 channels
    # made CPU attention 5x slower for the same arithmetic.
    unet_heads: dict[str, Any] = field(default_factory=lambda: {"num_heads": -1, "num_head_channels": 32})
    seed: int = 0
    clip_seed: int = 1
    # VAE: L1 + MSE of the posterior mean's reconstruction on ``vae_crop`` px crops of a pool of
    # ``vae_pool`` pre-rendered scenes (see train_vae), then the latents are rescaled exactly (folded into
    # quant_conv / post_quant_conv) to unit variance after SD1.5's 0.18215.
    vae_pool: int = 8000
    vae_steps: int = 8000
    vae_batch: int = 32
    vae_crop: int = 128  # training crops (pixels); 128 = whole images
    vae_lr: float = 1e-3
    vae_kl: float = 1e-4  # weight of the latent mean's square (keeps its scale bounded)
    # Decoder fine-tuning (encoder frozen) on noisy latents of the pool, so that decoding tolerates the
    # UNets' residual error.
    decoder_steps: int = 3000
    decoder_batch: int = 32
    decoder_lr: float = 3e-4
    # UNets: eps objective on SD1.5's alphas_cumprod, AdamW, warm-up then cosine decay; the weights kept
    # are an exponential moving average (``ema_decay``).
    dataset_scenes: int = 20000
    unet_steps: int = 10000
    unet_batch: int = 128
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    ema_warmup: bool = True  # min(ema_decay, (1 + step) / (10 + step)): see schedule.ema_decay_at
    caption_dropout: float = 0.1
    offset_noise: float = 0.4  # std of a per-(image, channel) constant added to the training noise: see train_unet
    ip2p_steps: int = 10000
    ip2p_dropout: float = 0.05  # text, image and both dropped with this probability each (the IP2P paper)
    data_version: int = 2
    # What the UNets predict: "v" (v-prediction, SD2's objective: Salimans & Ho 2022, Sec. 4 and App. D; the
    # committed files since session 13) or "eps" (SD1.5's; sessions 5-12). At the CPU recipe's 6 000 steps, v
    # read back 64.6% of the t2i gate's attributes against eps's 50.0%, and carried out 37.5% of the IP2P
    # gate's instructions against 25.0% (see train_unet.training_target and shapes_world_models/README.md).
    # The checkpoints say which (models.V_PRED_KEY), so both hosts sample them right.
    prediction: str = "v"
    # Rounds of UNet training (warm restarts, Loshchilov & Hutter 2017, "SGDR"): round r > 1 starts from round
    # r - 1's EMA weights with a fresh AdamW, the same warm-up and cosine decay over ``unet_steps`` /
    # ``ip2p_steps`` and its own seed; round 1 is the single run of the files before. Round r's stage file is
    # the file of this config with ``unet_rounds = r``, so a config with more rounds resumes from a cached one.
    unet_rounds: int = 1
    # Weight of the text-to-image UNet's token-grounding loss on its cross-attention (grounding.py, after
    # TokenCompose's L_token): each object's shape and colour words attend to the object, the background's name
    # to the background, as SD's word maps do and P2P, SpecRef and StyleDiffusion read them. 0: the denoising
    # loss alone (the files before session 18, whose word maps marked no object). 0.1 (session 17): the word-region
    # IoU of the 16x16 layers rose from 0.04-0.06 to 0.38-0.47 at the same denoising loss (2 000 steps).
    token_grounding: float = 0.1
    # Edit grounding of the InstructPix2Pix UNet (grounding.edit_grounding_targets, the same L_token): a fine-tuning
    # stage after the IP2P rounds (``edit_grounding_steps`` steps, the loss at weight ``edit_grounding``) draws the
    # start token's attention outside the region the edit changes and the instruction's end-of-text position's inside
    # it: the maps ZONE's rough mask M_b = (A^1 - A^L) < T reads (ZONE, Sec. 4.2, Eq. 4), which the world's IP2P UNet,
    # trained on the denoising loss alone, never learnt (M_b's median IoU with the edit region 0.04). Session 20, from
    # session 18's round 4 (full IP2P gate set; M_b's median IoU over 30 ZONE tasks at T 0.21): 3 000 steps at 1.0,
    # gate 77.5% (60.0% before), IoU 0.052; at 0.3, 70.0% and 0.044; at 0.1, 70.0% and 0.125 (2 000 steps: 70.0%,
    # 0.088). The recipe takes 1.0, the best gate, and (session 21) 6 000 steps: 82.5%. M_b read from the empty-text
    # branches, as the official code reads it, localises at no weight: without the instruction that branch cannot
    # know where the edit goes. Read from the instruction branch (the IP2P Edit Mask's mask_rows, as the world's ZONE
    # tasks do) it does: median IoU 0.46 after 3 000 steps, 0.40 after 6 000, against 0.09 on session 18's file
    # (shapes_world_models/README.md). 0 steps: no such stage (the files before session 20).
    edit_grounding: float = 1.0
    edit_grounding_steps: int = 6000

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"RealEdit: WorldConfig.prediction '{self.prediction}' is not one of {PREDICTIONS}")
        if not isinstance(self.unet_rounds, int) or self.unet_rounds < 1:
            raise ValueError(f"RealEdit: WorldConfig.unet_rounds must be a whole number >= 1, not {self.unet_rounds!r}")
        if not self.token_grounding >= 0:
            raise ValueError(f"RealEdit: WorldConfig.token_grounding must be >= 0 (0: off), not "
                             f"{self.token_grounding!r}")
        if not self.edit_grounding >= 0:
            raise ValueError(f"RealEdit: WorldConfig.edit_grounding must be >= 0 (0: off), not {self.edit_grounding!r}")
        if not isinstance(self.edit_grounding_steps, int) or self.edit_grounding_steps < 0:
            raise ValueError(f"RealEdit: WorldConfig.edit_grounding_steps must be a whole number >= 0 (0: no edit "
                             f"grounding stage), not {self.edit_grounding_steps!r}")

    def hashed_settings(self) -> dict[str, Any]:
        """Every setting, less those added later while they keep the value the files before them were trained
        with (:data:`LATER_SETTINGS`): an older file's recorded hash stays its config's."""
        values = dataclasses.asdict(self)
        return {k: v for k, v in values.items() if k not in LATER_SETTINGS or v != LATER_SETTINGS[k]}

    def key(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def to_json(self) -> str:
        """The hashed settings (what the checkpoints record); :meth:`from_json` restores the rest."""
        return json.dumps(self.hashed_settings(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorldConfig:
        """The config :meth:`to_json` wrote: a later setting it leaves out has the value older files had."""
        return cls(**{**LATER_SETTINGS, **json.loads(text)})


# Settings added after the first checkpoints were trained, with the value those were trained with: left out
# of the hash at that value, so the stage files and checkpoints of such a config keep their names and hash.
LATER_SETTINGS: dict[str, Any] = {"prediction": "eps", "unet_rounds": 1, "token_grounding": 0.0,
                                  "edit_grounding": 0.0, "edit_grounding_steps": 0}
PREDICTIONS = ("eps", "v")

DEFAULT_CONFIG = WorldConfig()

# The recipe for two CPU cores (about 5 h in all here, see shapes_world_models/README.md): the same
# models and data streams, fewer samples. VAE on batches of 16 crops of 64 px (more steps for the same
# pixels; SD's VAE too trains on crops smaller than it is used at), a decoder fine-tuning of 2 400 steps of 8
# whole images (session 15: 600 steps read back 82.5% of the IP2P gate's expected images through the VAE, 2 400
# steps 85.0%; small stars and squares came back as circles), batches of 32 for the UNets (4x the steps of the
# GPU's 128 for the same compute), 12 000 training scenes (rendering and encoding 20 000 of them and their edit
# pairs would take a quarter of the budget), and four rounds of 6 000 UNet steps (sessions 14-15: the t2i gate
# read back 64.6%, 83.6% and 93.3% of attributes after rounds 1, 2 and 3; the IP2P gate 37.5%, 42.5%, 60.0%
# and, with the longer decoder, 65.0% after round 3 and 67.5% after round 4). The VAE trains 3 600 steps (sessions
# 7-15: 1 200. Session 16: the IP2P gate's expected images read back 85.0% through the 1 200-step VAE with its
# fine-tuned decoder, 97.5% through the 3 600-step VAE before any: the encoder, not the decoder, was the limit;
# session 18's files, on it: the t2i gate 97.1%, the IP2P gate 60.0%, its ceiling 90.0% after the decoder's tuning).
CPU_RECIPE: dict[str, Any] = {
    "vae_crop": 64, "vae_batch": 16, "vae_steps": 3600, "decoder_batch": 8, "decoder_steps": 2400,
    "dataset_scenes": 12000, "unet_batch": 32, "unet_steps": 6000, "ip2p_steps": 6000, "unet_rounds": 4,
}
RECIPES: dict[str, WorldConfig] = {"gpu": DEFAULT_CONFIG, "cpu": dataclasses.replace(DEFAULT_CONFIG, **CPU_RECIPE)}

"""A tiny *trained* text-conditioned latent diffusion model, built from ComfyUI's own classes.

Why: random-weight UNets say nothing about how fast TTIS and null-text inversion converge. BARET's
argument needs a model that actually follows its text: when the photo does not match the target
sentence, CFG 7.5 with that sentence pushes the reconstruction away from the photo, and null-text
inversion must undo that push through the unconditional embedding, whereas TTIS tunes the target
embedding itself. SD weights cannot be downloaded here, so this module trains a toy that has the
mechanism: 8x8x4 "latents" of one coloured shape at one position on a plain background, captioned
"a red square on the left", learnt in a few CPU minutes.

* Text: the frozen tiny CLIP of :func:`.comfy_models.make_tiny_clip` (ComfyUI's real tokenizer,
  random weights). Different words give clearly different token embeddings, so the UNet's cross
  attention can learn to read them. Captions are encoded once; 10% are dropped to ``""`` so CFG works.
* UNet: ComfyUI's ``UNetModel`` through ``comfy.supported_models.SD15`` (SD1.5's discrete eps
  schedule, latent scale 0.18215), 3 levels with attention at each, in a ``ModelPatcher``: everything
  that runs on a checkpoint (``ttis_invert``, ``null_text_invert``, ``comfy.sample``) runs on it unchanged.
* Training: eps objective on ComfyUI's own ``alphas_cumprod``, uniform timesteps, AdamW, seeded; the
  weights are cached under ``$REALEDIT_CACHE`` (else ``~/.cache/realedit``), keyed by a hash of the
  config, so callers train once.
* Check: :func:`text_check` samples captions with CFG through ``comfy.sample.sample`` and reads the
  generated shape's colour and position back with the same code that renders the data.

``bench/bench_baret.py --only toy`` trains (or loads) it, prints the check and runs the benchmark.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.sd
import comfy.supported_models
import torch
import torch.nn.functional as F

from .comfy_models import TINY_UNET_CONFIGS, make_tiny_clip, seeded_model

LATENT_SIZE = 8
# Colour codes in the 4 latent channels: rows of a Hadamard matrix, orthogonal to each other except
# red/yellow (opposite) and to the background's all-ones direction.
COLOURS: dict[str, tuple[float, ...]] = {
    "red": (1.0, -1.0, 1.0, -1.0),
    "green": (1.0, 1.0, -1.0, -1.0),
    "blue": (1.0, -1.0, -1.0, 1.0),
    "yellow": (-1.0, 1.0, -1.0, 1.0),
}
BACKGROUND = (-0.5, -0.5, -0.5, -0.5)
SHAPES = ("square", "circle", "triangle")
# Shape centres (row, column) on the 8x8 grid.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (3.5, 1.75), "right": (3.5, 5.25), "top": (1.75, 3.5), "bottom": (5.25, 3.5),
}
RADIUS = 1.6
EDGE_SOFTNESS = 0.25  # pixels: anti-aliased edges keep the data smooth in position


@dataclass(frozen=True)
class Caption:
    """One scene: a ``colour`` ``shape`` at ``position``; ``text`` is its caption."""

    colour: str
    shape: str
    position: str

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} on the {self.position}"


ALL_CAPTIONS: tuple[Caption, ...] = tuple(
    Caption(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS)


@dataclass(frozen=True)
class ToyConfig:
    """Everything that decides the trained weights (the cache key hashes all of it)."""

    unet: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(
        TINY_UNET_CONFIGS["sd1"], num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2],
        transformer_depth=[1, 1, 1, 1], transformer_depth_output=[1, 1, 1, 1, 1, 1]))
    train_steps: int = 2000
    batch: int = 32
    lr: float = 1.5e-3
    warmup: int = 50
    caption_dropout: float = 0.1
    jitter: float = 0.5  # pixels of random centre shift; the radius varies by +-15%
    noise: float = 0.03  # per-pixel texture on the rendered latents
    seed: int = 0
    clip_seed: int = 1
    data_version: int = 1  # bump when the renderer changes

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


DEFAULT_CONFIG = ToyConfig()


# ---------------------------------------------------------------------------------------------------
# Data: caption -> latent, and the inverse reading used by the text check.
# ---------------------------------------------------------------------------------------------------

def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.meshgrid(torch.arange(LATENT_SIZE, dtype=torch.float32),
                                torch.arange(LATENT_SIZE, dtype=torch.float32), indexing="ij")
    return rows, cols


def shape_mask(shape: str, centre: tuple[float, float], radius: float = RADIUS) -> torch.Tensor:
    """Soft (anti-aliased) 8x8 mask of one shape: a margin inside the outline, through a sigmoid."""
    rows, cols = _grid()
    dy, dx = rows - centre[0], cols - centre[1]
    if shape == "square":
        margin = radius - torch.maximum(dx.abs(), dy.abs())
    elif shape == "circle":
        margin = 1.15 * radius - torch.sqrt(dx**2 + dy**2)
    elif shape == "triangle":  # apex up: the half width grows from 0 at the top to the radius at the bottom
        margin = torch.minimum(radius - dy.abs(), (dy + radius) / 2 - dx.abs())
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
    return torch.sigmoid(margin / EDGE_SOFTNESS)


def _render_raw(caption: Caption, rng: random.Random | None, config: ToyConfig) -> torch.Tensor:
    centre, radius = POSITIONS[caption.position], RADIUS
    if rng is not None:
        centre = (centre[0] + rng.uniform(-config.jitter, config.jitter),
                  centre[1] + rng.uniform(-config.jitter, config.jitter))
        radius *= rng.uniform(0.85, 1.15)
    mask = shape_mask(caption.shape, centre, radius)
    background, colour = torch.tensor(BACKGROUND), torch.tensor(COLOURS[caption.colour])
    latent = background[:, None, None] + mask * (colour - background)[:, None, None]
    if rng is not None:
        texture = torch.Generator().manual_seed(rng.getrandbits(31))
        latent = latent + config.noise * torch.randn(latent.shape, generator=texture)
    return latent


@lru_cache(maxsize=1)
def _normalisation() -> tuple[float, float]:
    """Scalar mean and std of the clean renders of every caption: latents are standardised with them."""
    stacked = torch.stack([_render_raw(c, None, DEFAULT_CONFIG) for c in ALL_CAPTIONS])
    return stacked.mean().item(), stacked.std().item()


def render(captions: list[Caption], rng: random.Random | None = None,
           config: ToyConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """Model-space latents ``(B, 4, 8, 8)`` of roughly unit variance; jittered when ``rng`` is given."""
    mean, std = _normalisation()
    return (torch.stack([_render_raw(c, rng, config) for c in captions]) - mean) / std


def _codes() -> tuple[torch.Tensor, torch.Tensor]:
    """Background and colour codes in model space (standardised as the latents)."""
    mean, std = _normalisation()
    return (torch.tensor(BACKGROUND) - mean) / std, (torch.tensor(list(COLOURS.values())) - mean) / std


LATENT_FORMAT = comfy.latent_formats.SD15()


def toy_latent(caption: Caption) -> torch.Tensor:
    """The clean user-space LATENT of ``caption`` ``(1, 4, 8, 8)``: what VAEEncode of its "photo" would give
    (model space / 0.18215, as ComfyUI's samplers expect)."""
    return LATENT_FORMAT.process_out(render([caption]))


def read_latent(latent: torch.Tensor) -> tuple[str, str]:
    """(colour, position) of a model-space latent ``(4, 8, 8)``: the position whose disc holds the most
    foreground (distance from the background code); the colour code nearest that foreground's mean."""
    background, colours = _codes()
    foreground = (latent - background[:, None, None]).pow(2).sum(0)
    discs = {p: shape_mask("circle", centre) for p, centre in POSITIONS.items()}
    scores = {p: (disc * foreground).sum() / disc.sum() for p, disc in discs.items()}
    position = max(scores, key=lambda p: scores[p])
    weights = discs[position] * foreground
    mean = (latent * weights).sum((1, 2)) / weights.sum().clamp_min(1e-8)
    colour = list(COLOURS)[int(torch.cdist(mean[None], colours).argmin())]
    return colour, position


# ---------------------------------------------------------------------------------------------------
# Text: the frozen tiny CLIP, as CLIPTextEncode runs it.
# ---------------------------------------------------------------------------------------------------

def conditioning(clip: comfy.sd.CLIP, text: str) -> list:
    """CLIPTextEncode's CONDITIONING for ``text`` (``encode_from_tokens_scheduled`` of its tokens)."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def encode(clip: comfy.sd.CLIP, text: str) -> torch.Tensor:
    """The ``(1, 77, 64)`` cross-attention embedding of ``text``."""
    return conditioning(clip, text)[0][0]


def caption_embeddings(clip: comfy.sd.CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption's embedding ``(48, 77, 64)`` in :data:`ALL_CAPTIONS` order, and the empty prompt's."""
    with torch.no_grad():
        return torch.cat([encode(clip, c.text) for c in ALL_CAPTIONS]), encode(clip, "")


# ---------------------------------------------------------------------------------------------------
# UNet and training.
# ---------------------------------------------------------------------------------------------------

def make_toy_unet(config: ToyConfig = DEFAULT_CONFIG) -> comfy.model_patcher.ModelPatcher:
    """An untrained SD1.5-family ComfyUI MODEL of the toy's shape (fp32, CPU), output conv zeroed so
    training starts from eps = 0."""
    return seeded_model(comfy.supported_models.SD15(dict(config.unet, dtype=torch.float32)), config.seed,
                        output_scale=0.0)


@dataclass(frozen=True)
class TrainingLog:
    """Mean eps-MSE per logging window, the final window's loss and the wall time."""

    losses: tuple[tuple[int, float], ...]
    final_loss: float
    seconds: float


def _lr_at(step: int, config: ToyConfig) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.train_steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _batch(rng: random.Random, embeddings: torch.Tensor, empty: torch.Tensor,
           config: ToyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scenes and their caption embeddings (dropped to the empty prompt's with probability 10%)."""
    indices = [rng.randrange(len(ALL_CAPTIONS)) for _ in range(config.batch)]
    latents = render([ALL_CAPTIONS[i] for i in indices], rng, config)
    context = torch.stack([empty[0] if rng.random() < config.caption_dropout else embeddings[i] for i in indices])
    return latents, context


def eps_loss(unet: torch.nn.Module, alphas_cumprod: torch.Tensor, x0: torch.Tensor, context: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
    """DDPM's eps objective at uniform integer timesteps on ComfyUI's ``alphas_cumprod``: the UNet sees
    ``sqrt(a) x0 + sqrt(1 - a) eps`` and timestep t, exactly what ``BaseModel.apply_model`` feeds it."""
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alphas_cumprod[t][:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(unet(x_t, timesteps=t.float(), context=context), noise)


def alphas_cumprod(model: comfy.model_patcher.ModelPatcher) -> torch.Tensor:
    """ComfyUI's discrete schedule as alphas_cumprod (``model_sampling.sigmas`` = sqrt((1 - a) / a))."""
    sigmas = model.model.model_sampling.sigmas.float().cpu()
    return 1.0 / (1.0 + sigmas**2)


def train(model: comfy.model_patcher.ModelPatcher, clip: comfy.sd.CLIP, config: ToyConfig = DEFAULT_CONFIG,
          steps: int | None = None, log_every: int = 100,
          log: Callable[[str], None] | None = print) -> TrainingLog:
    """Train ``model``'s UNet in place (``steps`` overrides ``config.train_steps``, e.g. for tests)."""
    steps = config.train_steps if steps is None else steps
    unet = model.model.diffusion_model
    embeddings, empty = caption_embeddings(clip)
    schedule = alphas_cumprod(model)
    rng, generator = random.Random(config.seed), torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.01)
    schedule_config = dataclasses.replace(config, train_steps=steps)  # the lr schedule spans ``steps``
    window, history, start = [], [], time.perf_counter()
    unet.train()
    unet.requires_grad_(True)  # ComfyUI 0.31 and later build the diffusion model with gradients off
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(steps):
            for group in optimiser.param_groups:
                group["lr"] = _lr_at(step, schedule_config)
            loss = eps_loss(unet, schedule, *_batch(rng, embeddings, empty, config), generator)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            window.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                history.append((step + 1, sum(window) / len(window)))
                window = []
                if log is not None:
                    log(f"  step {step + 1:5d}  loss {history[-1][1]:.4f}  ({time.perf_counter() - start:.0f} s)")
    unet.eval()
    for param in unet.parameters():
        param.requires_grad_(False)
    return TrainingLog(tuple(history), history[-1][1] if history else math.nan, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------
# Cache and the public entry point.
# ---------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$REALEDIT_CACHE``, else ``~/.cache/realedit``."""
    return Path(os.environ.get("REALEDIT_CACHE") or Path.home() / ".cache" / "realedit")


def cache_path(config: ToyConfig = DEFAULT_CONFIG) -> Path:
    return cache_dir() / f"toy_diffusion-{config.key()}.safetensors"


def _save(model: comfy.model_patcher.ModelPatcher, path: Path, log: TrainingLog) -> None:
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.model.diffusion_model.state_dict().items()}
    metadata = {"final_loss": str(log.final_loss), "seconds": str(log.seconds), "losses": json.dumps(log.losses)}
    temporary = path.with_suffix(".tmp")
    safetensors.torch.save_file(state, str(temporary), metadata=metadata)
    temporary.replace(path)  # atomic: a concurrent reader never sees half a file


def _load(model: comfy.model_patcher.ModelPatcher, path: Path) -> TrainingLog:
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as file:
        state = {k: file.get_tensor(k) for k in file.keys()}
        metadata = file.metadata() or {}
    model.model.diffusion_model.load_state_dict(state)
    for param in model.model.diffusion_model.parameters():
        param.requires_grad_(False)
    losses = tuple(tuple(x) for x in json.loads(metadata.get("losses", "[]")))
    return TrainingLog(losses, float(metadata.get("final_loss", "nan")), float(metadata.get("seconds", "nan")))


def toy_model(config: ToyConfig = DEFAULT_CONFIG, log: Callable[[str], None] | None = print,
              ) -> tuple[comfy.model_patcher.ModelPatcher, comfy.sd.CLIP, TrainingLog]:
    """The trained toy ``(MODEL, CLIP, training log)``: loaded from the cache, or trained (minutes on one
    CPU thread) and cached. The CLIP is the frozen tiny one the captions were encoded with."""
    clip = make_tiny_clip(config.clip_seed)
    model = make_toy_unet(config)
    path = cache_path(config)
    if path.is_file():
        training = _load(model, path)
        if log is not None:
            log(f"toy diffusion model loaded from {path} (trained {training.seconds:.0f} s, "
                f"final loss {training.final_loss:.4f})")
        return model, clip, training
    if log is not None:
        log(f"training the toy diffusion model ({config.train_steps} steps, batch {config.batch}); cache {path}")
    training = train(model, clip, config, log=log)
    _save(model, path, training)
    return model, clip, training


# ---------------------------------------------------------------------------------------------------
# Did it learn the text?
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextCheck:
    """Fractions of samples whose read-back colour / position / both match their caption."""

    cfg: float
    samples: int
    colour: float
    position: float
    both: float

    def line(self) -> str:
        return (f"CFG {self.cfg:g}, {self.samples} samples: colour {self.colour:.0%}, position {self.position:.0%}, "
                f"both {self.both:.0%} (chance {1 / len(COLOURS):.0%}, {1 / len(POSITIONS):.0%}, "
                f"{1 / (len(COLOURS) * len(POSITIONS)):.1%})")


def _score(captions: list[Caption], latents: list[torch.Tensor], cfg: float) -> TextCheck:
    reads = [read_latent(x) for x in latents]
    colour = [r[0] == c.colour for r, c in zip(reads, captions)]
    position = [r[1] == c.position for r, c in zip(reads, captions)]
    n = len(captions)
    return TextCheck(cfg, n, sum(colour) / n, sum(position) / n, sum(a and b for a, b in zip(colour, position)) / n)


def sample(model: comfy.model_patcher.ModelPatcher, clip: comfy.sd.CLIP, caption: Caption, *, cfg: float,
           seed: int, steps: int = 20) -> torch.Tensor:
    """One model-space sample of ``caption`` through ComfyUI's own KSampler entry point (euler, normal)."""
    empty_latent = torch.zeros(1, 4, LATENT_SIZE, LATENT_SIZE)
    noise = comfy.sample.prepare_noise(empty_latent, seed)
    out = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", conditioning(clip, caption.text),
                              conditioning(clip, ""), empty_latent, seed=seed, disable_pbar=True)
    return LATENT_FORMAT.process_in(out)[0]


def text_check(model: comfy.model_patcher.ModelPatcher, clip: comfy.sd.CLIP, cfg: float = 7.5,
               samples: int = 48) -> TextCheck:
    """Sample ``samples`` captions (every caption once for 48) and read the colour and position back."""
    captions = [ALL_CAPTIONS[i % len(ALL_CAPTIONS)] for i in range(samples)]
    return _score(captions, [sample(model, clip, c, cfg=cfg, seed=i) for i, c in enumerate(captions)], cfg)


def renderer_check() -> TextCheck:
    """The reading on clean renders (should be 100%): the check's own ceiling."""
    return _score(list(ALL_CAPTIONS), list(render(list(ALL_CAPTIONS))), cfg=0.0)

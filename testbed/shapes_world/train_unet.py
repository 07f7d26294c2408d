"""Training the text-to-image and InstructPix2Pix UNets on the trained VAE's latents.

Data (:func:`build_dataset`): seeded scenes encoded once by the VAE (posterior mode, as ``VAEEncode``),
in SD1.5's model space (x 0.18215); captions and instructions encoded once by the frozen CLIP, as
``CLIPTextEncode`` does. Objective: DDPM's eps loss at uniform integer timesteps on SD1.5's
``alphas_cumprod`` (what ``BaseModel.apply_model`` feeds the UNet). Caption dropout (10%) to the empty
prompt's embedding makes CFG work. IP2P (Brooks et al. 2023, Sec. 3.2): the source latent is
concatenated to the noisy latent (8 input channels, ComfyUI's ``concat`` order); text, image and both
are dropped with 5% each, for classifier-free guidance over either.
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable

import comfy.model_patcher
import comfy.sd
import torch
import torch.nn.functional as F

from .config import WorldConfig
from .edits import IP2P_KINDS, ground_truth, random_edit
from .scene import Scene, random_scene, render_batch
from .train_vae import SD15_SCALE, to_vae_input


def t2i_scene(rng: random.Random) -> Scene:
    """Text-to-image training scenes: 40% two objects, 15% unnamed appearances (no colour word)."""
    return random_scene(rng, two_objects=0.4, unnamed=0.15, textured=0.25)


def ip2p_scene(rng: random.Random) -> Scene:
    return random_scene(rng, two_objects=0.4, unnamed=0.0, textured=0.25)


@torch.no_grad()
def encode_images(vae: comfy.sd.VAE, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """IMAGEs ``(B, H, W, 3)`` -> model-space latents ``(B, 4, H/8, W/8)`` (posterior mode x 0.18215)."""
    ae = vae.first_stage_model
    out = []
    for i in range(0, len(images), batch):
        x = to_vae_input(images[i:i + batch]).to(next(ae.parameters()).dtype)
        mean, _ = ae.quant_conv(ae.encoder(x)).chunk(2, dim=1)
        out.append(mean.float() * SD15_SCALE)
    return torch.cat(out)


@torch.no_grad()
def encode_texts(clip: comfy.sd.CLIP, texts: list[str]) -> torch.Tensor:
    """``(len(texts), 77, 64)``: CLIPTextEncode's cross-attention embedding of each text."""
    return torch.cat([clip.encode_from_tokens_scheduled(clip.tokenize(t))[0][0] for t in texts])


def build_dataset(vae: comfy.sd.VAE, clip: comfy.sd.CLIP, config: WorldConfig,
                  log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """The t2i and IP2P training tensors (see module doc); texts are indices into ``*_texts``."""
    start = time.perf_counter()
    rng = random.Random(config.seed + 1)
    scenes = [t2i_scene(rng) for _ in range(config.dataset_scenes)]
    captions = sorted({s.caption() for s in scenes} | {""})
    index = {c: i for i, c in enumerate(captions)}
    data = {"t2i_latents": torch.cat([encode_images(vae, render_batch(scenes[i:i + 256]))
                                      for i in range(0, len(scenes), 256)]),
            "t2i_text": torch.tensor([index[s.caption()] for s in scenes]),
            "t2i_texts": encode_texts(clip, captions).half(),
            "t2i_empty": torch.tensor(index[""])}
    log(f"  t2i data: {len(scenes)} scenes, {len(captions)} captions ({time.perf_counter() - start:.0f} s)")
    rng = random.Random(config.seed + 2)
    sources, targets, instructions = [], [], []
    for _ in range(config.dataset_scenes):
        scene = ip2p_scene(rng)
        truth = ground_truth(scene, random_edit(scene, rng, IP2P_KINDS))
        sources.append(truth.source)
        targets.append(truth.expected)
        instructions.append(truth.instruction)
    texts = sorted(set(instructions) | {""})
    index = {c: i for i, c in enumerate(texts)}
    data.update({"ip2p_source": encode_images(vae, torch.stack(sources)),
                 "ip2p_target": encode_images(vae, torch.stack(targets)),
                 "ip2p_text": torch.tensor([index[t] for t in instructions]),
                 "ip2p_texts": encode_texts(clip, texts).half(),
                 "ip2p_empty": torch.tensor(index[""])})
    log(f"  ip2p data: {len(instructions)} pairs, {len(texts)} instructions ({time.perf_counter() - start:.0f} s)")
    return data


def alphas_cumprod(model: comfy.model_patcher.ModelPatcher) -> torch.Tensor:
    """ComfyUI's discrete schedule as alphas_cumprod (``sigmas = sqrt((1 - a) / a)``)."""
    sigmas = model.model.model_sampling.sigmas.float().cpu()
    return 1.0 / (1.0 + sigmas**2)


def _lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _drop(keep: torch.Tensor, rows: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """``rows`` where ``keep``, else ``replacement`` (broadcast)."""
    shape = (-1,) + (1,) * (rows.ndim - 1)
    return torch.where(keep.view(shape), rows, replacement.expand_as(rows))


def train_unet(model: comfy.model_patcher.ModelPatcher, data: dict[str, torch.Tensor], config: WorldConfig,
               kind: str, log: Callable[[str], None] = print, log_every: int = 100) -> float:
    """Train ``model``'s UNet in place for ``kind`` ``"t2i"`` or ``"ip2p"``; returns seconds."""
    unet = model.model.diffusion_model
    device = next(unet.parameters()).device
    steps = config.unet_steps if kind == "t2i" else config.ip2p_steps
    schedule = alphas_cumprod(model).to(device)
    texts = data[f"{kind}_texts"].float().to(device)
    empty = texts[int(data[f"{kind}_empty"])]
    generator = torch.Generator().manual_seed(config.seed + (3 if kind == "t2i" else 4))
    optimiser = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.01)
    n = len(data[f"{kind}_text"])
    start, window = time.perf_counter(), []
    unet.train()
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(steps):
            for group in optimiser.param_groups:
                group["lr"] = _lr(step, steps, config.unet_lr)
            rows = torch.randint(0, n, (config.unet_batch,), generator=generator)
            context = texts[data[f"{kind}_text"][rows]]
            u = torch.rand(config.unet_batch, generator=generator)
            if kind == "t2i":
                x0 = data["t2i_latents"][rows].to(device)
                context = _drop((u >= config.caption_dropout).to(device), context, empty)
                concat = None
            else:
                x0 = data["ip2p_target"][rows].to(device)
                p = config.ip2p_dropout  # u in [0, p): text dropped; [p, 2p): both; [2p, 3p): image
                drop_text, drop_image = u < 2 * p, (u >= p) & (u < 3 * p)
                context = _drop((~drop_text).to(device), context, empty)
                concat = _drop((~drop_image).to(device), data["ip2p_source"][rows].to(device),
                               torch.zeros(1, device=device))
            t = torch.randint(0, len(schedule), (config.unet_batch,), generator=generator).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            a = schedule[t][:, None, None, None]
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            if concat is not None:
                x_t = torch.cat([x_t, concat], 1)  # (B, 8, h, w): ComfyUI's c_concat order
            loss = F.mse_loss(unet(x_t, timesteps=t.float(), context=context), noise)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            window.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log(f"  {kind} step {step + 1:5d}  loss {sum(window) / len(window):.4f}  "
                    f"({time.perf_counter() - start:.0f} s)")
                window = []
    unet.eval()
    for param in unet.parameters():
        param.requires_grad_(False)
    return time.perf_counter() - start

"""Training the world's VAE (ComfyUI AutoencoderKL) on 128 px renders, and folding its latent scale.

Loss: L1 + MSE on the reconstruction of the posterior *mean* (plus 0.01 noise), plus ``vae_kl`` x the
mean's square. Not SD's sampled-KL recipe: a first run that sampled the posterior (log-variance
starting at 0, KL weight 1e-6) spent its short CPU budget decoding noise and gave colourless blobs
(19.8 dB); ComfyUI encodes with the posterior mode anyway. No perceptual or adversarial terms:
flat-coloured scenes need neither. Afterwards the
latents are standardised exactly: per-channel mean removed and the scale set so that SD1.5's factor
0.18215 gives unit variance, folded into ``quant_conv`` (mean rows and log-variance bias) and
``post_quant_conv`` (inverse), so the UNets see SD-like latents.
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .config import WorldConfig
from .scene import SIZE, Scene, random_scene, render_batch

SD15_SCALE = 0.18215


def vae_training_scene(rng: random.Random) -> Scene:
    """The VAE sees every appearance, the texture and one- and two-object scenes."""
    return random_scene(rng, two_objects=0.5, unnamed=0.35, textured=0.3)


def held_out_scenes(n: int, seed: int = 10_000) -> list[Scene]:
    """Scenes never drawn in training (their own seed stream)."""
    rng = random.Random(seed)
    return [vae_training_scene(rng) for _ in range(n)]


def to_vae_input(images: torch.Tensor) -> torch.Tensor:
    """IMAGE ``(B, H, W, 3)`` in [0, 1] -> ``(B, 3, H, W)`` in [-1, 1] (``comfy.sd.VAE.process_input``)."""
    return images.movedim(-1, 1) * 2 - 1


def _posterior(ae: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, logvar = ae.quant_conv(ae.encoder(x)).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def round_trip_psnr(ae: torch.nn.Module, scenes: list[Scene]) -> float:
    """Mean over ``scenes`` of the PSNR of decode(mean latent) against the render."""
    values = []
    for scene in scenes:
        x = to_vae_input(render_batch([scene]))
        mean, _ = _posterior(ae, x)
        out = ((ae.decode(mean) + 1) / 2).clamp(0, 1)
        values.append(psnr(out, (x + 1) / 2))
    return sum(values) / len(values)


def crops(x: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    """A random ``size`` x ``size`` crop of each image ``(B, 3, H, W)``, on the 8-pixel latent grid.

    Fully convolutional training on crops, as SD's VAE (trained at 256 px, used at 512 px and more):
    4x cheaper per sample here; the group norms see crop statistics, which the held-out full-image
    PSNR check covers."""
    if size >= x.shape[-1]:
        return x
    cells = (x.shape[-1] - size) // 8 + 1
    out = []
    for image in x:
        top, left = 8 * rng.randrange(cells), 8 * rng.randrange(cells)
        out.append(image[:, top:top + size, left:left + size])
    return torch.stack(out)


def _lr(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def train_vae(ae: torch.nn.Module, config: WorldConfig, log: Callable[[str], None] = print,
              log_every: int = 50) -> float:
    """Train ``ae`` (a ComfyUI ``AutoencoderKL``) in place; returns the seconds it took."""
    rng, generator = random.Random(config.seed), torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.Adam(ae.parameters(), lr=config.vae_lr)
    check = held_out_scenes(8)
    start, window = time.perf_counter(), []
    ae.train()
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(config.vae_steps):
            for group in optimiser.param_groups:
                group["lr"] = _lr(step, config.vae_steps, config.vae_lr)
            x = crops(to_vae_input(render_batch([vae_training_scene(rng) for _ in range(config.vae_batch)])),
                      config.vae_crop, rng)
            mean, _ = _posterior(ae, x)
            out = ae.decode(mean + 0.01 * torch.randn(mean.shape, generator=generator))
            loss = F.l1_loss(out, x) + F.mse_loss(out, x) + config.vae_kl * mean.pow(2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            window.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == config.vae_steps:
                ae.eval()
                value = round_trip_psnr(ae, check)
                ae.train()
                log(f"  vae step {step + 1:5d}  loss {sum(window) / len(window):.4f}  held-out PSNR {value:.2f} dB "
                    f"({time.perf_counter() - start:.0f} s)")
                window = []
    ae.eval()
    for param in ae.parameters():
        param.requires_grad_(False)
    return time.perf_counter() - start


def train_decoder(ae: torch.nn.Module, latents: torch.Tensor, config: WorldConfig,
                  log: Callable[[str], None] = print, log_every: int = 100) -> float:
    """Fine-tune ``post_quant_conv`` and the decoder on whole 128 px images: ``latents`` are the model-space
    latents of the t2i training scenes (:func:`.train_unet.t2i_scene`, seed + 1 stream, in order), the
    targets their renders. Small latent noise (0.05 in model space) makes it tolerant of the UNets'
    residual error."""
    from .train_unet import t2i_scene

    rng = random.Random(config.seed + 1)
    scenes = [t2i_scene(rng) for _ in range(len(latents))]
    generator = torch.Generator().manual_seed(config.seed + 5)
    parameters = list(ae.decoder.parameters()) + list(ae.post_quant_conv.parameters())
    for param in parameters:
        param.requires_grad_(True)
    optimiser = torch.optim.Adam(parameters, lr=config.decoder_lr)
    check = held_out_scenes(8)
    start, window = time.perf_counter(), []
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(config.decoder_steps):
            for group in optimiser.param_groups:
                group["lr"] = _lr(step, config.decoder_steps, config.decoder_lr, warmup=20)
            rows = torch.randint(0, len(latents), (config.decoder_batch,), generator=generator)
            x = to_vae_input(render_batch([scenes[i] for i in rows.tolist()]))
            z = latents[rows] + 0.05 * torch.randn(latents[rows].shape, generator=generator)
            out = ae.decode(z / SD15_SCALE)
            loss = F.l1_loss(out, x) + F.mse_loss(out, x)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            window.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == config.decoder_steps:
                log(f"  decoder step {step + 1:5d}  loss {sum(window) / len(window):.4f}  held-out PSNR "
                    f"{round_trip_psnr(ae, check):.2f} dB ({time.perf_counter() - start:.0f} s)")
                window = []
    for param in ae.parameters():
        param.requires_grad_(False)
    return time.perf_counter() - start


@torch.no_grad()
def standardise_latents(ae: torch.nn.Module, scenes: list[Scene]) -> tuple[list[float], float]:
    """Fold a per-channel shift and one scale into ``quant_conv``/``post_quant_conv`` so that the mean
    latents of ``scenes`` have zero channel means and standard deviation 1 / 0.18215 (SD1.5's latent
    format then gives unit variance). Decoding is unchanged up to float rounding. Returns the old
    channel means and scale factor."""
    x = to_vae_input(render_batch(scenes))
    mean, _ = _posterior(ae, x)
    shift = mean.mean((0, 2, 3))  # (4,)
    k = (1 / SD15_SCALE) / (mean - shift[None, :, None, None]).std().item()
    q, p = ae.quant_conv, ae.post_quant_conv
    c = shift.numel()
    q.weight[:c] *= k  # mean' = k (mean - shift)
    q.bias[:c] = k * (q.bias[:c] - shift)
    q.bias[c:] += 2 * math.log(k)  # var' = k^2 var
    p.bias += (p.weight[:, :, 0, 0] @ shift)  # z = z' / k + shift
    p.weight /= k
    return shift.tolist(), k


def image_size() -> int:
    return SIZE

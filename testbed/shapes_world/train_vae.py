"""Training the world's VAE (ComfyUI AutoencoderKL) on 128 px renders, and folding its latent scale.

Loss: L1 + MSE on the reconstruction of the posterior *mean* (plus 0.01 noise), plus ``vae_kl`` x the
mean's square, on batches drawn from a pool of pre-rendered scenes (``vae_pool``; rendering is the CPU's
work, so it is done once, in parallel). Not SD's sampled-KL recipe: a first run that sampled the posterior (log-variance
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
from .scene import SIZE, Scene, random_scene, render_batch, render_pool
from .schedule import StepPlan, cosine_lr

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
    values, device = [], _device(ae)
    for scene in scenes:
        x = to_vae_input(render_batch([scene])).to(device)
        mean, _ = _posterior(ae, x)
        out = ((ae.decode(mean) + 1) / 2).clamp(0, 1)
        values.append(psnr(out, (x + 1) / 2))
    return sum(values) / len(values)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def crops(x: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    """A random ``size`` x ``size`` crop of each image ``(B, 3, H, W)``, on the 8-pixel latent grid.

    Fully convolutional training on crops, as SD's VAE (trained at 256 px, used at 512 px and more);
    the group norms see crop statistics, which the held-out full-image PSNR check covers."""
    if size >= x.shape[-1]:
        return x
    cells = (x.shape[-1] - size) // 8 + 1
    out = []
    for image in x:
        top, left = 8 * rng.randrange(cells), 8 * rng.randrange(cells)
        out.append(image[:, top:top + size, left:left + size])
    return torch.stack(out)


def vae_pool(config: WorldConfig, workers: int = 1) -> torch.Tensor:
    """The VAE's training images: ``config.vae_pool`` scenes of the seed stream, uint8 ``(N, H, W, 3)``."""
    rng = random.Random(config.seed)
    return render_pool([vae_training_scene(rng) for _ in range(config.vae_pool)], workers)


def _batch(pool: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random pool images as VAE input ``(B, 3, H, W)`` in [-1, 1], on the pool's device."""
    rows = torch.randint(0, len(pool), (batch,), generator=generator).to(pool.device)
    return to_vae_input(pool[rows].float() / 255)


def _synchroniser(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _fit(ae: torch.nn.Module, parameters: list[torch.nn.Parameter], loss: Callable[[], torch.Tensor], *, name: str,
         lr: float, steps: int, seconds: float | None, log: Callable[[str], None],
         log_every: int) -> tuple[float, int]:
    """Adam on ``parameters`` of ``ae`` with the warm-up + cosine schedule for ``steps`` (capped to ``seconds``,
    :class:`.schedule.StepPlan`), minimising ``loss()`` (one batch each call); logs the mean loss and the
    held-out round trip; leaves ``ae`` frozen in eval mode. Returns (seconds, steps run)."""
    for param in parameters:
        param.requires_grad_(True)
    optimiser = torch.optim.Adam(parameters, lr=lr)
    plan, check, synchronise = StepPlan(steps, seconds), held_out_scenes(8), _synchroniser(_device(ae))
    start, window, step = time.perf_counter(), [], 0
    ae.train()
    with torch.inference_mode(False), torch.enable_grad():
        while step < plan.total:
            for group in optimiser.param_groups:
                group["lr"] = cosine_lr(step, plan.total, lr, warmup=50, floor=0.05)
            value = loss()
            optimiser.zero_grad(set_to_none=True)
            value.backward()
            optimiser.step()
            window.append(value.detach())
            plan.after(step, synchronise)
            step += 1
            if step % log_every == 0 or step == plan.total:
                ae.eval()
                log(f"  {name} step {step:5d}/{plan.total}  loss {torch.stack(window).mean().item():.4f}  "
                    f"held-out PSNR {round_trip_psnr(ae, check):.2f} dB ({time.perf_counter() - start:.0f} s)")
                ae.train()
                window = []
    ae.eval()
    for param in ae.parameters():
        param.requires_grad_(False)
    return time.perf_counter() - start, plan.total


def train_vae(ae: torch.nn.Module, config: WorldConfig, pool: torch.Tensor, log: Callable[[str], None] = print,
              seconds: float | None = None, log_every: int = 500) -> tuple[float, int]:
    """Train ``ae`` (a ComfyUI ``AutoencoderKL``, on its training device) in place on ``pool`` (uint8
    renders on the same device); returns (seconds, steps run: ``config.vae_steps`` unless ``seconds``
    cut it short, see :class:`.schedule.StepPlan`)."""
    rng, generator = random.Random(config.seed), torch.Generator().manual_seed(config.seed)
    device = _device(ae)

    def loss() -> torch.Tensor:
        x = crops(_batch(pool, config.vae_batch, generator), config.vae_crop, rng)
        mean, _ = _posterior(ae, x)
        out = ae.decode(mean + 0.01 * torch.randn(mean.shape, generator=generator).to(device))
        return F.l1_loss(out, x) + F.mse_loss(out, x) + config.vae_kl * mean.pow(2).mean()

    return _fit(ae, list(ae.parameters()), loss, name="vae", lr=config.vae_lr, steps=config.vae_steps,
                seconds=seconds, log=log, log_every=log_every)


def train_decoder(ae: torch.nn.Module, config: WorldConfig, pool: torch.Tensor, log: Callable[[str], None] = print,
                  seconds: float | None = None, log_every: int = 500) -> tuple[float, int]:
    """Fine-tune ``post_quant_conv`` and the decoder on whole images of ``pool``, decoding the frozen
    encoder's model-space latents plus noise (0.05, in model space), so decoding tolerates the UNets'
    residual error; returns (seconds, steps run)."""
    generator = torch.Generator().manual_seed(config.seed + 5)
    device = _device(ae)

    def loss() -> torch.Tensor:
        x = _batch(pool, config.decoder_batch, generator)
        with torch.no_grad():
            z = _posterior(ae, x)[0] * SD15_SCALE
        z = z + 0.05 * torch.randn(z.shape, generator=generator).to(device)
        out = ae.decode(z / SD15_SCALE)
        return F.l1_loss(out, x) + F.mse_loss(out, x)

    parameters = list(ae.decoder.parameters()) + list(ae.post_quant_conv.parameters())
    return _fit(ae, parameters, loss, name="decoder", lr=config.decoder_lr, steps=config.decoder_steps,
                seconds=seconds, log=log, log_every=log_every)


@torch.no_grad()
def standardise_latents(ae: torch.nn.Module, scenes: list[Scene]) -> tuple[list[float], float]:
    """Fold a per-channel shift and one scale into ``quant_conv``/``post_quant_conv`` so that the mean
    latents of ``scenes`` have zero channel means and standard deviation 1 / 0.18215 (SD1.5's latent
    format then gives unit variance). Decoding is unchanged up to float rounding. Returns the old
    channel means and scale factor."""
    x = to_vae_input(render_batch(scenes)).to(_device(ae))
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

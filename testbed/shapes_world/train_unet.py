"""Training the text-to-image and InstructPix2Pix UNets on the trained VAE's latents.

Data (:func:`build_dataset`): seeded scenes encoded once by the VAE (posterior mode, as ``VAEEncode``),
in SD1.5's model space (x 0.18215); captions and instructions encoded once by the frozen CLIP, as
``CLIPTextEncode`` does. Objective: v-prediction's loss (or DDPM's eps loss; ``WorldConfig.prediction``,
:func:`training_target`) at uniform integer timesteps on SD1.5's ``alphas_cumprod`` (what
``BaseModel.apply_model`` feeds the UNet), with offset noise (:func:`training_noise`). Caption dropout
(10%) to the empty prompt's embedding makes CFG work. IP2P (Brooks et al. 2023, Sec. 3.2): the source
latent is concatenated to the noisy latent (8 input channels, ComfyUI's ``concat`` order), unscaled as
the hosts feed it (:func:`ip2p_concat`); text, image and both are dropped with 5% each, for
classifier-free guidance over either. The weights kept are an exponential
moving average of the trained ones (``ema_decay``), as in SD's training. With ``token_grounding`` > 0 the
text-to-image loss adds that weight times TokenCompose's token loss on the cross-attention (:mod:`.grounding`);
the IP2P UNet's edit-grounding stage (kind ``"ip2p_grounding"``: ``edit_grounding_steps`` more steps from the last
IP2P round) adds ``edit_grounding`` times the same loss on the keys ZONE's rough mask reads.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import torch
import torch.nn.functional as F

from ...attention.tokens import from_hf_tokenizer
from .config import PREDICTIONS, WorldConfig
from .edits import IP2P_KINDS, Edit, edit_regions, instruction, random_edit, render_edit_pairs
from .grounding import CrossAttentionProbs, edit_grounding_targets, grounding_loss, grounding_targets
from .scene import Scene, map_chunks, random_scene, render_pool
from .schedule import StepPlan, cosine_lr, ema_decay_at
from .train_vae import SD15_SCALE, to_vae_input


def t2i_scene(rng: random.Random) -> Scene:
    """Text-to-image training scenes: 40% two objects, 15% unnamed appearances (no colour word)."""
    return random_scene(rng, two_objects=0.4, unnamed=0.15, textured=0.25)


def t2i_scenes(config: WorldConfig) -> tuple[list[Scene], list[str]]:
    """The text-to-image training set's scenes (seeded) and its sorted captions (with the empty one)."""
    rng = random.Random(config.seed + 1)
    scenes = [t2i_scene(rng) for _ in range(config.dataset_scenes)]
    return scenes, sorted({s.caption() for s in scenes} | {""})


def ip2p_scene(rng: random.Random) -> Scene:
    return random_scene(rng, two_objects=0.4, unnamed=0.0, textured=0.25)


def ip2p_pairs(config: WorldConfig) -> tuple[list[tuple[Scene, Edit]], list[str], list[str]]:
    """The IP2P training set's (scene, edit) pairs (seeded), their instructions and the sorted instruction texts
    (with the empty one)."""
    rng = random.Random(config.seed + 2)
    pairs = []
    for _ in range(config.dataset_scenes):
        scene = ip2p_scene(rng)
        pairs.append((scene, random_edit(scene, rng, IP2P_KINDS)))
    instructions = [instruction(scene, edit) for scene, edit in pairs]
    return pairs, instructions, sorted(set(instructions) | {""})


@torch.no_grad()
def encode_images(vae: comfy.sd.VAE, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """IMAGEs ``(B, H, W, 3)`` (float in [0, 1] or uint8) -> model-space latents ``(B, 4, H/8, W/8)`` on the CPU
    (posterior mode x 0.18215), encoded where the VAE's weights are."""
    ae = vae.first_stage_model
    weight = next(ae.parameters())
    out = []
    for i in range(0, len(images), batch):
        part = images[i:i + batch].to(weight.device)
        part = part.float() / 255 if part.dtype == torch.uint8 else part
        mean, _ = ae.quant_conv(ae.encoder(to_vae_input(part).to(weight.dtype))).chunk(2, dim=1)
        out.append(mean.float().cpu() * SD15_SCALE)
    return torch.cat(out)


@torch.no_grad()
def encode_texts(clip: comfy.sd.CLIP, texts: list[str], batch: int = 256) -> torch.Tensor:
    """``(len(texts), 77, 64)``: CLIPTextEncode's cross-attention embedding of each text.

    ``batch`` texts go through the encoder at once, as the 77-token sections of one prompt: ComfyUI
    encodes a prompt's sections side by side (a batch) and joins them along the sequence, so each
    text's rows are what encoding it alone gives (all weights are 1)."""
    out = []
    for i in range(0, len(texts), batch):
        tokens = [clip.tokenize(t) for t in texts[i:i + batch]]
        if any(len(sections) != 1 for t in tokens for sections in t.values()):
            raise ValueError("encode_texts: every text must fit in one 77-token section")
        merged = {key: [t[key][0] for t in tokens] for key in tokens[0]}
        cond = clip.encode_from_tokens(merged)  # (1, 77 * n, 64)
        out.append(cond.view(len(tokens), -1, cond.shape[-1]).cpu())
    return torch.cat(out)


def build_dataset(vae: comfy.sd.VAE, clip: comfy.sd.CLIP, config: WorldConfig, log: Callable[[str], None] = print,
                  workers: int = 1) -> dict[str, torch.Tensor]:
    """The t2i and IP2P training tensors (see module doc); texts are indices into ``*_texts``. Renders in
    ``workers`` processes (same pixels whatever their number)."""
    start = time.perf_counter()
    scenes, captions = t2i_scenes(config)
    index = {c: i for i, c in enumerate(captions)}
    data = {"t2i_latents": encode_images(vae, render_pool(scenes, workers)),
            "t2i_text": torch.tensor([index[s.caption()] for s in scenes]),
            "t2i_texts": encode_texts(clip, captions).half(),
            "t2i_empty": torch.tensor(index[""])}
    log(f"  t2i data: {len(scenes)} scenes, {len(captions)} captions ({time.perf_counter() - start:.0f} s)")
    pairs, instructions, texts = ip2p_pairs(config)
    chunks = map_chunks(render_edit_pairs, pairs, workers, 200)
    index = {c: i for i, c in enumerate(texts)}
    data.update({"ip2p_source": encode_images(vae, torch.cat([c[0] for c in chunks])),
                 "ip2p_target": encode_images(vae, torch.cat([c[1] for c in chunks])),
                 "ip2p_text": torch.tensor([index[t] for t in instructions]),
                 "ip2p_texts": encode_texts(clip, texts).half(),
                 "ip2p_empty": torch.tensor(index[""])})
    log(f"  ip2p data: {len(instructions)} pairs, {len(texts)} instructions ({time.perf_counter() - start:.0f} s)")
    return data


def add_grounding_targets(data: dict[str, torch.Tensor], clip: comfy.sd.CLIP, config: WorldConfig) -> None:
    """Add the t2i set's token-grounding targets to ``data`` (:mod:`.grounding`): ``t2i_ground_positions``
    (scenes, words) and ``t2i_ground_regions`` (scenes, words, h, w), from the same seeded scenes as the data
    stage's latents (checked against their caption indices)."""
    scenes, captions = t2i_scenes(config)
    index = {c: i for i, c in enumerate(captions)}
    if not torch.equal(torch.tensor([index[s.caption()] for s in scenes]), data["t2i_text"]):
        raise RuntimeError("RealEdit: the data stage's file does not hold this config's text-to-image scenes; "
                           "delete it (REALEDIT_CACHE) and train again")
    tokenize = from_hf_tokenizer(clip.tokenizer.clip_l.tokenizer)
    positions, regions = grounding_targets(scenes, tokenize, tuple(data["t2i_latents"].shape[-2:]))
    data.update({"t2i_ground_positions": positions, "t2i_ground_regions": regions})


def add_edit_grounding_targets(data: dict[str, torch.Tensor], clip: comfy.sd.CLIP, config: WorldConfig,
                               workers: int = 1) -> None:
    """Add the IP2P set's edit-grounding targets to ``data`` (:func:`.grounding.edit_grounding_targets`):
    ``ip2p_ground_positions`` (pairs, 2) and ``ip2p_ground_regions`` (pairs, 2, h, w), from the same seeded pairs as
    the data stage's latents (checked against their instruction indices); the regions are rendered in ``workers``
    processes."""
    pairs, instructions, texts = ip2p_pairs(config)
    index = {c: i for i, c in enumerate(texts)}
    if not torch.equal(torch.tensor([index[t] for t in instructions]), data["ip2p_text"]):
        raise RuntimeError("RealEdit: the data stage's file does not hold this config's IP2P pairs; "
                           "delete it (REALEDIT_CACHE) and train again")
    regions = torch.cat(map_chunks(edit_regions, pairs, workers, 200))
    tokenize = from_hf_tokenizer(clip.tokenizer.clip_l.tokenizer)
    positions, regions = edit_grounding_targets(instructions, regions, tokenize, tuple(data["ip2p_source"].shape[-2:]))
    data.update({"ip2p_ground_positions": positions, "ip2p_ground_regions": regions})


def training_noise(shape: torch.Size, offset: float, generator: torch.Generator) -> torch.Tensor:
    """eps for the loss: standard normal plus ``offset`` x one standard normal constant per (image, channel)
    ("offset noise", Guttenberg 2023; why it is needed: Lin et al. 2024, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed").

    SD1.5's schedule keeps some signal at its last timestep (sqrt(alpha_bar) = 0.068), and the spatial mean of
    a 16x16 latent's noise is only 1/16 standard deviation: an eps model learns to read an image's mean
    colour off ``x_t`` itself, not off the text. Sampled from pure noise it then keeps the mean it is given
    (zero: a mid-grey image), and the world's white and black backgrounds, which set most of the image's
    mean, came out grey: 600 steps of fine-tuning session 8's 12 000-step t2i UNet with an offset of 0.4
    lifted its text-to-image read-back from 13% to 45% (full gate set), 0.1 to 16%. Sampling is unchanged
    (KSampler starts from plain noise). ``offset`` 0 draws exactly ``torch.randn``."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def training_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output for ``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise``: ``"eps"``, the
    noise (DDPM, Ho et al. 2020, Eq. 14; SD1.5), or ``"v"``, ``v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0``
    (Salimans & Ho 2022, Sec. 4 and App. D; SD2), from which ``x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v``.

    Why the world trains v (``WorldConfig.prediction``'s default since session 13): an eps model's clean estimate is
    ``(x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)``, 7.9x its eps error at t = 900 and 15x at the last step,
    while v's is at most its v error. At t = 900 session 12's IP2P UNet (eps) predicted the kept latent cells with
    error 0.26, worse than copying c_I (0.055); a v-prediction UNet trained 3 000 steps on the same data, 0.036.
    At 6 000 steps, v lifted the t2i gate from 50.0% to 64.6% and the IP2P gate from 25.0% to 37.5%
    (shapes_world_models/README.md)."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    raise ValueError(f"RealEdit: prediction '{prediction}' is not one of {PREDICTIONS}")


def ip2p_concat(source: torch.Tensor) -> torch.Tensor:
    """IP2P's image conditioning c_I from a model-space source latent: the *unscaled* posterior mode.
    The IP2P paper's code concatenates ``encode_first_stage(image).mode()``, and both hosts feed that:
    ComfyUI's ``SD15_instructpix2pix.process_ip2p_image_in`` is the identity on ``VAEEncode``'s latent,
    diffusers' pipeline concatenates ``vae.encode(image).latent_dist.mode()``."""
    return source / SD15_SCALE


def alphas_cumprod(model: comfy.model_patcher.ModelPatcher) -> torch.Tensor:
    """ComfyUI's discrete schedule as alphas_cumprod (``sigmas = sqrt((1 - a) / a)``)."""
    sigmas = model.model.model_sampling.sigmas.float().cpu()
    return 1.0 / (1.0 + sigmas**2)


# What each kind of UNet training reads and runs: its data set's prefix, its steps and its grounding loss's weight
# (config fields), and its seed's offset.
_KINDS: dict[str, tuple[str, str, str, int]] = {
    "t2i": ("t2i", "unet_steps", "token_grounding", 3),
    "ip2p": ("ip2p", "ip2p_steps", "", 4),
    "ip2p_grounding": ("ip2p", "edit_grounding_steps", "edit_grounding", 5),
}


def unet_seed(config: WorldConfig, kind: str) -> int:
    """The seed of ``kind``'s batches, noise and timesteps in round ``config.unet_rounds`` (round 1's is the
    files' before rounds existed; the edit-grounding stage runs after the last round)."""
    return config.seed + _KINDS[kind][3] + 100 * (config.unet_rounds - 1)


def _drop(keep: torch.Tensor, rows: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """``rows`` where ``keep``, else ``replacement`` (broadcast)."""
    shape = (-1,) + (1,) * (rows.ndim - 1)
    return torch.where(keep.view(shape), rows, replacement.expand_as(rows))


def _save_progress(path: Path, step: int, seconds: float, params: list[torch.Tensor], ema: list[torch.Tensor],
                   optimiser: torch.optim.Optimizer, generator: torch.Generator) -> None:
    """Everything a run needs to go on from ``step`` as if it had not stopped (written whole, then renamed)."""
    state = {"step": step, "seconds": seconds, "params": [p.detach().cpu() for p in params],
             "ema": [e.cpu() for e in ema], "optimiser": optimiser.state_dict(), "generator": generator.get_state()}
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def _resume(path: Path, params: list[torch.Tensor], ema: list[torch.Tensor], optimiser: torch.optim.Optimizer,
            generator: torch.Generator) -> tuple[int, float]:
    """Load what :func:`_save_progress` wrote into the run's tensors; (its step, its seconds)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for tensor, saved in zip(params + ema, state["params"] + state["ema"]):
            tensor.copy_(saved)
    optimiser.load_state_dict(state["optimiser"])
    generator.set_state(state["generator"])
    return state["step"], state["seconds"]


def train_unet(model: comfy.model_patcher.ModelPatcher, data: dict[str, torch.Tensor], config: WorldConfig,
               kind: str, log: Callable[[str], None] = print, seconds: float | None = None,
               log_every: int = 500, progress: Path | None = None) -> tuple[float, int]:
    """Train ``model``'s UNet for ``kind`` ``"t2i"``, ``"ip2p"`` or ``"ip2p_grounding"`` (the IP2P UNet's edit-grounding
    fine-tuning) on ComfyUI's torch device, from the weights it holds (random, or a previous round's:
    ``WorldConfig.unet_rounds``); the UNet is left holding the EMA weights,
    on that device. Returns (seconds, steps run: the config's unless
    ``seconds`` cut it short, see :class:`.schedule.StepPlan`).

    ``progress``: a file where the run keeps its state (weights, EMA, AdamW's moments, the random generator)
    every ``log_every`` steps, and goes on from when it exists: a run stopped and started again trains the same
    weights, to the bit, as one that never stopped. Not with ``seconds`` (its plan is timed per run)."""
    if progress is not None and seconds is not None:
        raise ValueError("RealEdit: train_unet keeps its progress only without a time cap (seconds=None)")
    unet = model.model.diffusion_model
    device = comfy.model_management.get_torch_device()
    unet.to(device)
    prefix, steps_field, weight_field, _ = _KINDS[kind]
    planned = getattr(config, steps_field)
    schedule = alphas_cumprod(model).to(device)
    texts = data[f"{prefix}_texts"].float().to(device)
    empty = texts[int(data[f"{prefix}_empty"])]
    text_rows = data[f"{prefix}_text"].to(device)
    if kind == "t2i":
        targets, sources = data["t2i_latents"].to(device), None
    else:
        targets, sources = data["ip2p_target"].to(device), data["ip2p_source"].to(device)
    grounding = getattr(config, weight_field) if weight_field else 0.0
    if grounding:
        if f"{prefix}_ground_positions" not in data:
            adder = "add_grounding_targets" if kind == "t2i" else "add_edit_grounding_targets"
            raise ValueError(f"RealEdit: {weight_field} needs the {prefix} set's targets: {adder}(data, ...)")
        recorder = CrossAttentionProbs(unet)
        ground_positions = data[f"{prefix}_ground_positions"].to(device)
        ground_regions = data[f"{prefix}_ground_regions"].to(device)
    generator = torch.Generator().manual_seed(unet_seed(config, kind))
    params = [p.requires_grad_(True) for p in unet.parameters()]  # ComfyUI 0.31+ builds it with grads off
    ema = [p.detach().clone() for p in params]
    optimiser = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.01, fused=device.type == "cuda")
    plan, batch, n = StepPlan(planned, seconds, probe=(60, 190)), config.unet_batch, len(text_rows)
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start, window, ground_window, step = time.perf_counter(), [], [], 0
    if progress is not None and progress.is_file():
        step, seconds_before = _resume(progress, params, ema, optimiser, generator)
        start -= seconds_before
        log(f"  {kind}: going on from step {step} ({progress})")
    unet.train()
    with torch.inference_mode(False), torch.enable_grad():
        while step < plan.total:
            for group in optimiser.param_groups:
                group["lr"] = cosine_lr(step, plan.total, config.unet_lr, warmup=200)
            rows = torch.randint(0, n, (batch,), generator=generator).to(device)
            u = torch.rand(batch, generator=generator).to(device)
            t = torch.randint(0, len(schedule), (batch,), generator=generator).to(device)
            noise = training_noise(targets[:batch].shape, config.offset_noise, generator).to(device)
            context, x0 = texts[text_rows[rows]], targets[rows]
            if sources is None:
                grounded = u >= config.caption_dropout  # a dropped caption grounds nothing
                context = _drop(grounded, context, empty)
                concat = None
            else:
                p = config.ip2p_dropout  # u in [0, p): text dropped; [p, 2p): both; [2p, 3p): image
                drop_text, drop_image = u < 2 * p, (u >= p) & (u < 3 * p)
                grounded = ~drop_image  # the edit region is the image's: without it, nothing to ground
                context = _drop(~drop_text, context, empty)
                concat = _drop(~drop_image, ip2p_concat(sources[rows]), torch.zeros(1, device=device))
            a = schedule[t][:, None, None, None]
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            if concat is not None:
                x_t = torch.cat([x_t, concat], 1)  # (B, 8, h, w): ComfyUI's c_concat order
            target = training_target(config.prediction, x0, noise, a)
            options = recorder.options() if grounding else {}
            loss = F.mse_loss(unet(x_t, timesteps=t.float(), context=context, transformer_options=options), target)
            window.append(loss.detach())  # the denoising loss alone
            if grounding:
                positions = torch.where(grounded[:, None], ground_positions[rows], -1)
                token_loss = grounding_loss(recorder.probs, positions, ground_regions[rows])
                recorder.probs.clear()
                ground_window.append(token_loss.detach())
                loss = loss + grounding * token_loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1.0 - ema_decay_at(step, config.ema_decay, config.ema_warmup))
            plan.after(step, synchronise)
            step += 1
            if progress is not None and step % log_every == 0 and step < plan.total:
                _save_progress(progress, step, time.perf_counter() - start, params, ema, optimiser, generator)
            if step % log_every == 0 or step == plan.total:
                token = (f"  {weight_field.replace('_', ' ')} {torch.stack(ground_window).mean().item():.4f}"
                         if ground_window else "")
                log(f"  {kind} step {step:5d}/{plan.total}  loss {torch.stack(window).mean().item():.4f}{token}  "
                    f"({time.perf_counter() - start:.0f} s)")
                window, ground_window = [], []
    unet.eval()
    with torch.no_grad():
        for param, average in zip(params, ema):
            param.copy_(average)
            param.requires_grad_(False)
    return time.perf_counter() - start, plan.total

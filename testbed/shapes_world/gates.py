"""The quality gates, measured on ComfyUI objects (MODEL, CLIP, VAE) as a loader returns them.

* ``t2i``: held-out captions sampled at CFG 7.5 (euler, 20 steps, ``comfy.sample.sample`` as KSampler),
  decoded, read back; the score is the fraction of (object, attribute) pairs right over shape,
  colour and position (a missed or extra object counts all its attributes wrong); whole-scene
  exactness is reported too. Target 90%.
* ``vae``: VAEEncode -> VAEDecode PSNR on held-out scenes. Target 30 dB. Reported beside it, without a
  target: the t2i gate's scenes as photos through the VAE, read back as that gate reads (its ceiling).
* ``ip2p``: held-out (scene, instruction) pairs through IP2P's conditioning (the source latent in both
  conditionings, as ComfyUI's InstructPixToPixConditioning); carried out when the output reads back
  as the edited scene (every object's shape, colour, position and the background). Target 80%. Reported
  beside it, without a target: the expected images through the VAE alone, read back as that gate reads
  (its ceiling).
* ``ddim``: a held-out photo DDIM-inverted with its caption and reconstructed (CFG 1, 50 steps).
  Target 25 dB.
Held-out sets use their own seed streams (30 000 and up), never drawn in training.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.sd
import node_helpers
import torch
import torch.nn.functional as F

from .edits import IP2P_KINDS, Edit, GroundTruth, ground_truth, random_edit
from .reader import ATTRIBUTES, attribute_accuracy, attributes_right, read, scene_matches
from .scene import SIZE, Scene, random_scene, render_batch
from .train_vae import psnr

TARGETS = {"t2i": 0.90, "vae": 30.0, "ip2p": 0.80, "ddim": 25.0}


def gate_scenes(n: int, seed: int = 30_000) -> list[Scene]:
    """Held-out text-to-image scenes with named appearances (so every attribute has a word)."""
    rng = random.Random(seed)
    return [random_scene(rng, two_objects=0.4, unnamed=0.0, textured=0.25) for _ in range(n)]


def gate_pairs(n: int, seed: int = 31_000) -> list[tuple[Scene, Edit]]:
    """Held-out IP2P (scene, edit) pairs: every kind the IP2P UNet trains on."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        scene = random_scene(rng, two_objects=0.4, unnamed=0.0, textured=0.25)
        pairs.append((scene, random_edit(scene, rng, IP2P_KINDS)))
    return pairs


def gate_edits(n: int, seed: int = 31_000) -> list[GroundTruth]:
    return [ground_truth(scene, edit) for scene, edit in gate_pairs(n, seed)]


def conditioning(clip: comfy.sd.CLIP, text: str) -> list:
    """CLIPTextEncode's CONDITIONING."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _latent(batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, 4, SIZE // 8, SIZE // 8)


@torch.inference_mode()
def sample(model: comfy.model_patcher.ModelPatcher, positive: list, negative: list, *, cfg: float, seed: int,
           steps: int = 20, latent: torch.Tensor | None = None) -> torch.Tensor:
    """KSampler (euler, normal, denoise 1) on an empty latent; returns the user-space LATENT samples."""
    latent = _latent() if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed,
                               disable_pbar=True)


@dataclass(frozen=True)
class T2IGate:
    attributes: float
    scenes: float
    samples: int
    objects: int = 0  # the scenes' objects
    # Of those objects, how many read back with the right position, colour and shape (reader.ATTRIBUTES).
    objects_right: dict[str, int] = field(default_factory=dict)


def read_back(images: torch.Tensor, scenes: list[Scene]) -> T2IGate:
    """The t2i gate's score of IMAGEs ``(B, H, W, 3)`` against the scenes they should show."""
    right = total = exact = 0
    per_attribute: Counter[str] = Counter(dict.fromkeys(ATTRIBUTES, 0))
    for image, scene in zip(images, scenes):
        reading = read(image)
        r, t = attribute_accuracy(reading, scene)
        right, total = right + r, total + t
        per_attribute.update(attributes_right(reading, scene))
        exact += scene_matches(reading, scene, background=False)
    return T2IGate(right / total, exact / len(scenes), len(scenes), sum(len(s.objects) for s in scenes),
                   dict(per_attribute))


@torch.inference_mode()
def t2i_gate(model: comfy.model_patcher.ModelPatcher, clip: comfy.sd.CLIP, vae: comfy.sd.VAE, n: int = 32,
             cfg: float = 7.5, steps: int = 20) -> T2IGate:
    negative = conditioning(clip, "")
    scenes = gate_scenes(n)
    images = [vae.decode(sample(model, conditioning(clip, scene.caption()), negative, cfg=cfg, seed=i, steps=steps))
              for i, scene in enumerate(scenes)]
    return read_back(torch.cat(images), scenes)


@torch.inference_mode()
def vae_read_back(vae: comfy.sd.VAE, n: int = 32) -> T2IGate:
    """The t2i gate's scenes as photos through VAEEncode -> VAEDecode, read back as that gate reads its
    samples: what a UNet that reproduced the encoder's latents exactly would score (the gate's ceiling unless
    a UNet finds latents that decode sharper than the encoder's; no target of its own)."""
    scenes = gate_scenes(n)
    return read_back(vae.decode(vae.encode(render_batch(scenes))), scenes)


@torch.inference_mode()
def vae_gate(vae: comfy.sd.VAE, n: int = 16, seed: int = 32_000) -> float:
    """Mean PSNR (dB) of VAEDecode(VAEEncode(x)) over held-out scenes (all appearances, textures)."""
    from .train_vae import vae_training_scene

    rng = random.Random(seed)
    scenes = [vae_training_scene(rng) for _ in range(n)]
    images = render_batch(scenes)
    out = vae.decode(vae.encode(images))
    return sum(psnr(out[i], images[i]) for i in range(n)) / n


def ip2p_conditioning(clip: comfy.sd.CLIP, vae: comfy.sd.VAE, source: torch.Tensor,
                      text: str) -> tuple[list, list, torch.Tensor]:
    """As InstructPixToPixConditioning: the source latent in both conditionings; returns
    (positive, negative, source LATENT)."""
    latent = vae.encode(source[None])
    values = {"concat_latent_image": latent}
    return (node_helpers.conditioning_set_values(conditioning(clip, text), values),
            node_helpers.conditioning_set_values(conditioning(clip, ""), values), latent)


@torch.inference_mode()
def ip2p_outcomes(model: comfy.model_patcher.ModelPatcher, clip: comfy.sd.CLIP, vae: comfy.sd.VAE, n: int = 24,
                  cfg: float = 5.0, steps: int = 20) -> list[tuple[str, bool]]:
    """For each held-out instruction: (its edit's kind, whether it was carried out: the output reads back as the
    edited scene)."""
    outcomes = []
    for i, (scene, edit) in enumerate(gate_pairs(n)):
        case = ground_truth(scene, edit)
        positive, negative, latent = ip2p_conditioning(clip, vae, case.source, case.instruction)
        image = vae.decode(sample(model, positive, negative, cfg=cfg, seed=i, steps=steps,
                                  latent=torch.zeros_like(latent)))
        outcomes.append((edit.kind, scene_matches(read(image[0]), case.edited)))
    return outcomes


def ip2p_gate(model: comfy.model_patcher.ModelPatcher, clip: comfy.sd.CLIP, vae: comfy.sd.VAE, n: int = 24,
              cfg: float = 5.0, steps: int = 20) -> float:
    """Fraction of held-out instructions carried out (the output reads back as the edited scene)."""
    return _success(ip2p_outcomes(model, clip, vae, n, cfg, steps))


def _success(outcomes: list[tuple[str, bool]]) -> float:
    return sum(done for _, done in outcomes) / len(outcomes)


def by_kind(outcomes: list[tuple[str, bool]]) -> dict[str, list[int]]:
    """``{kind: [carried out, instructions]}`` in :data:`.edits.IP2P_KINDS`' order."""
    counts = {kind: [0, 0] for kind in IP2P_KINDS}
    for kind, done in outcomes:
        counts[kind][0] += done
        counts[kind][1] += 1
    return counts


@torch.inference_mode()
def ip2p_read_back(vae: comfy.sd.VAE, n: int = 24) -> float:
    """The IP2P gate's expected images through VAEEncode -> VAEDecode, read back as that gate reads its outputs:
    what an IP2P UNet that reproduced the encoder's latents of every expected image would score (the gate's
    ceiling, as :func:`vae_read_back` is the t2i gate's; no target of its own)."""
    cases = gate_edits(n)
    images = vae.decode(vae.encode(torch.stack([case.expected for case in cases])))
    return sum(scene_matches(read(image), case.edited) for image, case in zip(images, cases)) / n


@torch.inference_mode()
def ip2p_kept_x0_errors(ip2p: tuple, t2i_model: comfy.model_patcher.ModelPatcher, timesteps: tuple[int, ...],
                        n: int = 40) -> dict[int, dict[str, float]]:
    """Whether the IP2P UNet reproduces c_I where the instruction keeps the image. For each timestep t: the one-step
    x0 prediction's squared error (model space, per latent element) over the latent cells with no changed pixel,
    averaged over the IP2P gate's first ``n`` edits less the background changes (their kept cells are the objects'
    own, whose latents the new background around them changes). Predictions, from the same noise:

    * ``"ip2p"``: ``ip2p`` = (MODEL, CLIP, VAE) given c_I and the instruction;
    * ``"ip2p_no_image"``: the same with c_I zero (training's dropped image);
    * ``"t2i"``: ``t2i_model`` given the edited scene's caption, no image;
    * ``"copy"``: c_I itself."""
    model, clip, vae = ip2p
    base = model.model
    cases = [case for case in gate_edits(n) if "background" not in case.instruction]
    sources = torch.cat([vae.encode(case.source[None]) for case in cases])  # (N, 4, h, w): c_I as the hosts feed it
    clean = base.process_latent_in(torch.cat([vae.encode(case.expected[None]) for case in cases]))
    cell = SIZE // clean.shape[-1]
    kept = [F.max_pool2d(case.region[None, None].float(), cell)[0] == 0 for case in cases]  # each (1, h, w)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    copied = base.process_latent_in(sources)
    instructions = [conditioning(clip, case.instruction)[0][0] for case in cases]  # encoded once, used at every t
    captions = [conditioning(clip, case.target_caption)[0][0] for case in cases]

    def predictions(i: int, noisy: torch.Tensor, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
        source = sources[i:i + 1]
        return {"ip2p": base.apply_model(noisy, sigma, c_concat=source, c_crossattn=instructions[i]),
                "ip2p_no_image": base.apply_model(noisy, sigma, c_concat=torch.zeros_like(source),
                                                  c_crossattn=instructions[i]),
                "t2i": t2i_model.model.apply_model(noisy, sigma, c_crossattn=captions[i]),
                "copy": copied[i:i + 1]}

    errors: dict[int, dict[str, float]] = {}
    for t in timesteps:
        sigma = base.model_sampling.sigma(torch.tensor(float(t))).view(1)
        sums: dict[str, float] = {}
        for i in range(len(cases)):
            target = clean[i:i + 1]
            for name, prediction in predictions(i, target + sigma * noise[i:i + 1], sigma).items():
                squared = (prediction - target) ** 2 * kept[i]
                sums[name] = sums.get(name, 0.0) + squared.sum().item() / (kept[i].sum().item() * squared.shape[1])
        errors[t] = {name: total / len(cases) for name, total in sums.items()}
    return errors


@torch.inference_mode()
def ddim_reconstruction(model: comfy.model_patcher.ModelPatcher, clip: comfy.sd.CLIP, vae: comfy.sd.VAE,
                        scene: Scene, steps: int = 50) -> tuple[float, torch.Tensor]:
    """DDIM inversion (Song et al. 2021, Eq. 13 run backwards; Euler on the probability-flow ODE in
    ComfyUI's ``x = x0 + sigma eps`` form, which is DDIM) of the scene's photo with its caption at
    CFG 1, then DDIM sampling back; (PSNR in dB, reconstructed IMAGE)."""
    comfy.model_management.load_models_gpu([model])
    base = model.model
    device = comfy.model_management.get_torch_device()
    sigmas = comfy.samplers.calculate_sigmas(base.model_sampling, "ddim_uniform", steps).float().to(device)
    context = conditioning(clip, scene.caption())[0][0].to(device)
    photo = render_batch([scene])
    x = base.process_latent_in(vae.encode(photo)).to(device)  # model space

    def eps(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        denoised = base.apply_model(x, sigma.view(1), c_crossattn=context)
        return (x - denoised) / sigma

    up = sigmas.flip(0)  # 0, sigma_min, ..., sigma_max
    for i in range(len(up) - 1):
        x = x + (up[i + 1] - up[i]) * eps(x, up[max(i, 1)])
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * eps(x, sigmas[i])
    image = vae.decode(base.process_latent_out(x).cpu())
    return psnr(image[0], photo[0]), image[0]


def ddim_gate(model: comfy.model_patcher.ModelPatcher, clip: comfy.sd.CLIP, vae: comfy.sd.VAE,
              seed: int = 33_000) -> float:
    return ddim_reconstruction(model, clip, vae, gate_scenes(1, seed)[0])[0]


# Sample counts: the full measurement (training command, README) and the CI subset the tests repeat.
FULL_SIZES = {"t2i": 48, "vae": 32, "ip2p": 40}
CI_SIZES = {"t2i": 16, "vae": 8, "ip2p": 16}


def measure(t2i: tuple, ip2p: tuple, sizes: dict[str, int]) -> dict[str, Any]:
    """Every gate on ``(MODEL, CLIP, VAE)`` of the t2i and IP2P checkpoints, with ``sizes`` samples, and what each
    UNet gate misses: the t2i gate's objects right per attribute, the IP2P gate's instructions by kind."""
    model, clip, vae = t2i
    text = t2i_gate(model, clip, vae, n=sizes["t2i"])
    ceiling = vae_read_back(vae, n=sizes["t2i"])
    edits = ip2p_outcomes(ip2p[0], ip2p[1], ip2p[2], n=sizes["ip2p"])
    return {
        "vae_psnr_db": vae_gate(vae, n=sizes["vae"]),
        "t2i_attributes": text.attributes,
        "t2i_scenes": text.scenes,
        "t2i_objects_right": {"objects": text.objects, **text.objects_right},  # diagnosis, no target
        "vae_read_back_attributes": ceiling.attributes,
        "vae_read_back_scenes": ceiling.scenes,
        "ip2p_success": _success(edits),
        "ip2p_by_kind": by_kind(edits),  # diagnosis, no target
        "vae_read_back_ip2p": ip2p_read_back(vae, n=sizes["ip2p"]),
        "ddim_psnr_db": ddim_gate(model, clip, vae),
    }

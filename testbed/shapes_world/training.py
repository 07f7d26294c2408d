"""Training stages of the shapes world (``python -m realedit.testbed.shapes_world train``).

Each stage saves fp32 weights under ``$REALEDIT_CACHE/shapes_world/`` (else ``~/.cache/realedit``),
in files named by a hash of the settings the stage depends on, so a stage reruns only when those
change. ``pack`` measures the gates on the fp16 checkpoints as ``CheckpointLoaderSimple`` loads them and
writes ``testbed/shapes_world_models/`` (checkpoints and ``gates.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch

from .config import CHECKPOINT_DIR, DEFAULT_CONFIG, GATES_FILE, IP2P_FILE, T2I_FILE, WorldConfig
from .models import load_checkpoint, make_clip, make_unet, make_vae, save_checkpoint
from .train_unet import build_dataset, train_unet
from .train_vae import held_out_scenes, round_trip_psnr, standardise_latents, train_vae

_VAE_FIELDS = ("vae", "seed", "vae_steps", "vae_batch", "vae_crop", "vae_lr", "vae_kl", "data_version")
_DATA_FIELDS = _VAE_FIELDS + ("clip", "clip_seed", "dataset_scenes")
_DECODER_FIELDS = _DATA_FIELDS + ("decoder_steps", "decoder_batch", "decoder_lr")
_UNET_FIELDS = _DATA_FIELDS + ("unet", "unet_heads", "unet_steps", "unet_batch", "unet_lr", "caption_dropout")
_IP2P_FIELDS = _DATA_FIELDS + ("unet", "unet_heads", "ip2p_steps", "unet_batch", "unet_lr", "ip2p_dropout")


def stage_key(config: WorldConfig, fields: tuple[str, ...]) -> str:
    values = {k: v for k, v in dataclasses.asdict(config).items() if k in fields}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def work_path(config: WorldConfig, name: str, fields: tuple[str, ...]) -> Path:
    root = Path(os.environ.get("REALEDIT_CACHE") or Path.home() / ".cache" / "realedit") / "shapes_world"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{name}-{stage_key(config, fields)}.safetensors"


def _save(path: Path, state: dict[str, torch.Tensor], numbers: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(temporary),
                                metadata={k: json.dumps(v) for k, v in numbers.items()})
    temporary.replace(path)


def _numbers(path: Path) -> dict[str, Any]:
    with safetensors.safe_open(str(path), framework="pt") as file:
        return {k: json.loads(v) for k, v in (file.metadata() or {}).items()}


def stage_vae(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the VAE, standardise its latents, save it."""
    path = work_path(config, "vae", _VAE_FIELDS)
    if path.is_file():
        log(f"VAE: done before ({path})")
        return _numbers(path)
    vae = make_vae(config)
    ae = vae.first_stage_model.float()
    log(f"VAE: {sum(p.numel() for p in ae.parameters()) / 1e6:.3f} M parameters, {config.vae_steps} steps "
        f"of batch {config.vae_batch} ({config.vae_crop} px crops)")
    seconds = train_vae(ae, config, log=log)
    shift, scale = standardise_latents(ae, held_out_scenes(64, seed=20_000))
    value = round_trip_psnr(ae, held_out_scenes(32))
    log(f"VAE trained in {seconds:.0f} s; latent shift {[round(s, 3) for s in shift]}, scale x{scale:.3f}; "
        f"held-out round trip {value:.2f} dB")
    numbers = {"vae_seconds": seconds, "vae_psnr_training_check": value}
    _save(path, ae.state_dict(), numbers)
    return numbers


def trained_vae(config: WorldConfig = DEFAULT_CONFIG, decoder: bool = True):
    """The trained VAE; with the fine-tuned decoder when ``decoder`` and that stage ran."""
    state = safetensors.torch.load_file(str(work_path(config, "vae", _VAE_FIELDS)))
    tuned = work_path(config, "decoder", _DECODER_FIELDS)
    if decoder and tuned.is_file():
        state.update(safetensors.torch.load_file(str(tuned)))
    return make_vae(config, state)


def stage_decoder(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune the VAE decoder alone at full resolution on the t2i data's latents (the encoder, hence
    the latents the UNets learn, stay as they are)."""
    from .train_vae import train_decoder

    path = work_path(config, "decoder", _DECODER_FIELDS)
    if path.is_file():
        log(f"decoder: done before ({path})")
        return _numbers(path)
    vae = trained_vae(config, decoder=False)
    ae = vae.first_stage_model.float()
    data = safetensors.torch.load_file(str(work_path(config, "data", _DATA_FIELDS)))
    log(f"decoder: {config.decoder_steps} steps of batch {config.decoder_batch} at full resolution")
    seconds = train_decoder(ae, data["t2i_latents"], config, log=log)
    state = {k: v for k, v in ae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    numbers = {"decoder_seconds": seconds}
    _save(path, state, numbers)
    return numbers


def stage_data(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print) -> dict[str, Any]:
    path = work_path(config, "data", _DATA_FIELDS)
    if path.is_file():
        log(f"data: done before ({path})")
        return _numbers(path)
    start = time.perf_counter()
    data = build_dataset(trained_vae(config), make_clip(config), config, log=log)
    numbers = {"data_seconds": time.perf_counter() - start}
    _save(path, data, numbers)
    return numbers


def _train(config: WorldConfig, kind: str, log: Callable[[str], None]) -> dict[str, Any]:
    fields, in_channels = (_UNET_FIELDS, 4) if kind == "t2i" else (_IP2P_FIELDS, 8)
    path = work_path(config, kind, fields)
    if path.is_file():
        log(f"{kind}: done before ({path})")
        return _numbers(path)
    data = safetensors.torch.load_file(str(work_path(config, "data", _DATA_FIELDS)))
    model = make_unet(config, in_channels)
    unet = model.model.diffusion_model
    steps = config.unet_steps if kind == "t2i" else config.ip2p_steps
    log(f"{kind}: {sum(p.numel() for p in unet.parameters()) / 1e6:.3f} M parameters, {steps} steps of batch "
        f"{config.unet_batch}")
    seconds = train_unet(model, data, config, kind, log=log)
    numbers = {f"{kind}_seconds": seconds}
    _save(path, unet.state_dict(), numbers)
    return numbers


def stage_t2i(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print) -> dict[str, Any]:
    return _train(config, "t2i", log)


def stage_ip2p(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print) -> dict[str, Any]:
    return _train(config, "ip2p", log)


def trained_unet(config: WorldConfig, kind: str):
    fields, in_channels = (_UNET_FIELDS, 4) if kind == "t2i" else (_IP2P_FIELDS, 8)
    model = make_unet(config, in_channels)
    model.model.diffusion_model.load_state_dict(safetensors.torch.load_file(str(work_path(config, kind, fields))))
    return model


def stage_pack(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print,
               out: Path = CHECKPOINT_DIR) -> dict[str, Any]:
    """Write the fp16 checkpoints, reload them as CheckpointLoaderSimple does, measure and print the gates."""
    from . import gates

    seconds: dict[str, Any] = {}
    for name, fields in (("vae", _VAE_FIELDS), ("data", _DATA_FIELDS), ("t2i", _UNET_FIELDS), ("ip2p", _IP2P_FIELDS),
                         ("decoder", _DECODER_FIELDS)):
        seconds.update({k: v for k, v in _numbers(work_path(config, name, fields)).items() if k.endswith("seconds")})
    clip, vae = make_clip(config), trained_vae(config)
    out.mkdir(parents=True, exist_ok=True)
    for kind, file in (("t2i", T2I_FILE), ("ip2p", IP2P_FILE)):
        save_checkpoint(out / file, trained_unet(config, kind), clip, vae, config, {"training_seconds": seconds})
    t2i, ip2p = load_checkpoint(out / T2I_FILE), load_checkpoint(out / IP2P_FILE)
    start = time.perf_counter()
    measured = gates.measure(t2i, ip2p, gates.FULL_SIZES)
    ci = gates.measure(t2i, ip2p, gates.CI_SIZES)
    report = {"config_hash": config.key(), "measured": measured, "sizes": gates.FULL_SIZES,
              "measured_ci": ci, "sizes_ci": gates.CI_SIZES, "targets": gates.TARGETS,
              "training_seconds": seconds, "gate_seconds": time.perf_counter() - start,
              "files": {f: (out / f).stat().st_size for f in (T2I_FILE, IP2P_FILE)}}
    (out / GATES_FILE).write_text(json.dumps(report, indent=2) + "\n")
    for line in gate_lines(measured):
        log(line)
    return report


def gate_lines(measured: dict[str, float]) -> list[str]:
    from .gates import TARGETS

    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    return [
        f"gate VAE round trip: {measured['vae_psnr_db']:.2f} dB (target >= {TARGETS['vae']:.0f}) "
        f"{mark(measured['vae_psnr_db'] >= TARGETS['vae'])}",
        f"gate text-to-image read-back at CFG 7.5: {measured['t2i_attributes']:.1%} of attributes, "
        f"{measured['t2i_scenes']:.1%} of scenes exact (target >= {TARGETS['t2i']:.0%}) "
        f"{mark(measured['t2i_attributes'] >= TARGETS['t2i'])}",
        f"gate IP2P instructions carried out: {measured['ip2p_success']:.1%} (target >= {TARGETS['ip2p']:.0%}) "
        f"{mark(measured['ip2p_success'] >= TARGETS['ip2p'])}",
        f"gate DDIM inversion + reconstruction: {measured['ddim_psnr_db']:.2f} dB (target >= {TARGETS['ddim']:.0f}) "
        f"{mark(measured['ddim_psnr_db'] >= TARGETS['ddim'])}",
    ]


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)

"""Training stages of the shapes world (``python -m realedit.testbed.shapes_world train``).

Each stage saves fp32 weights under ``$REALEDIT_CACHE/shapes_world/`` (else ``~/.cache/realedit``),
in files named by a hash of the settings the stage depends on, so a stage reruns only when those
change. The UNet stages train in rounds (``WorldConfig.unet_rounds``), each in a file of its own: a config
with more rounds than the cache holds trains only the rounds it lacks, and an uncapped round keeps its progress
every :data:`PROGRESS_EVERY` steps, so a stopped run goes on where it was. Training runs on ComfyUI's torch
device (CUDA when there is one). ``seconds`` caps each stage's (each round's) steps to what fits in that
time (:class:`.schedule.StepPlan`; the steps run are recorded in the file); ``workers`` renders the
training sets in that many processes (same pixels). ``pack`` measures the gates on the fp16 checkpoints
as ``CheckpointLoaderSimple`` loads them and writes ``testbed/shapes_world_models/`` (checkpoints and
``gates.json``).
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
from .train_unet import add_edit_grounding_targets, add_grounding_targets, build_dataset, train_unet
from .train_vae import held_out_scenes, round_trip_psnr, standardise_latents, train_vae

_VAE_FIELDS = ("vae", "seed", "vae_pool", "vae_steps", "vae_batch", "vae_crop", "vae_lr", "vae_kl", "data_version")
_DATA_FIELDS = _VAE_FIELDS + ("clip", "clip_seed", "dataset_scenes")
_DECODER_FIELDS = _VAE_FIELDS + ("decoder_steps", "decoder_batch", "decoder_lr")
_UNET_FIELDS = _DATA_FIELDS + ("unet", "unet_heads", "unet_steps", "unet_batch", "unet_lr", "ema_decay",
                               "ema_warmup", "caption_dropout", "offset_noise", "prediction", "unet_rounds",
                               "token_grounding")
_IP2P_FIELDS = _DATA_FIELDS + ("unet", "unet_heads", "ip2p_steps", "unet_batch", "unet_lr", "ema_decay",
                               "ema_warmup", "ip2p_dropout", "offset_noise", "prediction", "unet_rounds")
_GROUNDING_FIELDS = _IP2P_FIELDS + ("edit_grounding", "edit_grounding_steps")
# The settings each stage's file depends on; the data stage's file is the only one that is not weights.
_STAGE_FIELDS = {"vae": _VAE_FIELDS, "data": _DATA_FIELDS, "decoder": _DECODER_FIELDS, "t2i": _UNET_FIELDS,
                 "ip2p": _IP2P_FIELDS, "ip2p_grounding": _GROUNDING_FIELDS}
_IN_CHANNELS = {"t2i": 4, "ip2p": 8, "ip2p_grounding": 8}
# A UNet round logs and keeps its progress every this many steps (about 4 minutes on a CPU core), so a stopped
# run loses at most that much: the same command goes on from there (train_unet's ``progress``).
PROGRESS_EVERY = 500


def stage_key(config: WorldConfig, fields: tuple[str, ...]) -> str:
    values = {k: v for k, v in config.hashed_settings().items() if k in fields}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def work_path(config: WorldConfig, name: str, fields: tuple[str, ...]) -> Path:
    root = Path(os.environ.get("REALEDIT_CACHE") or Path.home() / ".cache" / "realedit") / "shapes_world"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{name}-{stage_key(config, fields)}.safetensors"


def progress_file(stage_file: Path) -> Path:
    """Where an uncapped UNet round keeps its progress until its stage file is written."""
    return stage_file.with_suffix(".progress.pt")


def _save(path: Path, state: dict[str, torch.Tensor], numbers: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(temporary),
                                metadata={k: json.dumps(v) for k, v in numbers.items()})
    temporary.replace(path)


def _numbers(path: Path) -> dict[str, Any]:
    with safetensors.safe_open(str(path), framework="pt") as file:
        return {k: json.loads(v) for k, v in (file.metadata() or {}).items()}


def _torch_device() -> torch.device:
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def stage_vae(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print, *, workers: int = 1,
              seconds: float | None = None) -> dict[str, Any]:
    """Train the VAE, standardise its latents, save it."""
    from .train_vae import vae_pool

    path = work_path(config, "vae", _VAE_FIELDS)
    if path.is_file():
        log(f"VAE: done before ({path})")
        return _numbers(path)
    device = _torch_device()
    ae = make_vae(config).first_stage_model.float().to(device)
    start = time.perf_counter()
    pool = vae_pool(config, workers).to(device)
    log(f"VAE: {sum(p.numel() for p in ae.parameters()) / 1e6:.3f} M parameters; {len(pool)} scenes rendered in "
        f"{time.perf_counter() - start:.0f} s; {config.vae_steps} steps of batch {config.vae_batch} "
        f"({config.vae_crop} px crops) on {device}")
    seconds_run, steps = train_vae(ae, config, pool, log=log, seconds=seconds)
    shift, scale = standardise_latents(ae, held_out_scenes(64, seed=20_000))
    value = round_trip_psnr(ae, held_out_scenes(32))
    log(f"VAE trained in {seconds_run:.0f} s ({steps} steps); latent shift {[round(s, 3) for s in shift]}, "
        f"scale x{scale:.3f}; held-out round trip {value:.2f} dB")
    numbers = {"vae_seconds": seconds_run, "vae_steps_run": steps, "vae_psnr_training_check": value}
    _save(path, ae.state_dict(), numbers)
    return numbers


def trained_vae(config: WorldConfig = DEFAULT_CONFIG, decoder: bool = True):
    """The trained VAE; with the fine-tuned decoder when ``decoder`` and that stage ran."""
    state = safetensors.torch.load_file(str(work_path(config, "vae", _VAE_FIELDS)))
    tuned = work_path(config, "decoder", _DECODER_FIELDS)
    if decoder and tuned.is_file():
        state.update(safetensors.torch.load_file(str(tuned)))
    return make_vae(config, state)


def stage_decoder(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print, *, workers: int = 1,
                  seconds: float | None = None) -> dict[str, Any]:
    """Fine-tune the VAE decoder alone (the encoder, hence the latents the UNets learn, stay as they are);
    independent of the data and UNet stages, so it may run beside them."""
    from .train_vae import train_decoder, vae_pool

    path = work_path(config, "decoder", _DECODER_FIELDS)
    if path.is_file():
        log(f"decoder: done before ({path})")
        return _numbers(path)
    device = _torch_device()
    ae = trained_vae(config, decoder=False).first_stage_model.float().to(device)
    pool = vae_pool(config, workers).to(device)
    log(f"decoder: {config.decoder_steps} steps of batch {config.decoder_batch} at full resolution on {device}")
    seconds_run, steps = train_decoder(ae, config, pool, log=log, seconds=seconds)
    state = {k: v for k, v in ae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    numbers = {"decoder_seconds": seconds_run, "decoder_steps_run": steps}
    _save(path, state, numbers)
    return numbers


def stage_data(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print, *, workers: int = 1,
               seconds: float | None = None) -> dict[str, Any]:
    """Render, encode and save the UNets' training sets (the encoder alone is used: no wait for the decoder)."""
    path = work_path(config, "data", _DATA_FIELDS)
    if path.is_file():
        log(f"data: done before ({path})")
        return _numbers(path)
    start = time.perf_counter()
    vae = trained_vae(config, decoder=False)
    vae.first_stage_model.to(_torch_device())
    data = build_dataset(vae, make_clip(config), config, log=log, workers=workers)
    numbers = {"data_seconds": time.perf_counter() - start}
    _save(path, data, numbers)
    return numbers


def _train(config: WorldConfig, kind: str, log: Callable[[str], None], seconds: float | None) -> dict[str, Any]:
    """Train (or find in the cache) ``kind``'s UNet: rounds 1 to ``config.unet_rounds``, each saved as its own
    stage file (the config with ``unet_rounds = r``), so only the rounds the cache lacks are trained. Round r
    starts from round r - 1's (EMA) weights; the data set is loaded once for all of them."""
    fields, in_channels = _STAGE_FIELDS[kind], _IN_CHANNELS[kind]
    rounds = [dataclasses.replace(config, unet_rounds=r) for r in range(1, config.unet_rounds + 1)]
    done = [work_path(each, kind, fields).is_file() for each in rounds]
    if done[-1]:
        path = work_path(config, kind, fields)
        log(f"{kind}: done before ({path})")
        return _numbers(path)
    first = max((r for r, found in enumerate(done) if found), default=-1) + 1  # the first round to train
    model = make_unet(config, in_channels)
    unet = model.model.diffusion_model
    numbers: dict[str, Any] = {f"{kind}_seconds": 0.0, f"{kind}_steps_run": 0}  # totals over the rounds
    if first > 0:
        found = work_path(rounds[first - 1], kind, fields)
        log(f"{kind}: rounds up to {first} done before ({found})")
        unet.load_state_dict(safetensors.torch.load_file(str(found)))
        numbers.update({k: _numbers(found)[k] for k in numbers})
    data = safetensors.torch.load_file(str(work_path(config, "data", _DATA_FIELDS)))
    if kind == "t2i" and config.token_grounding:
        begun = time.perf_counter()
        add_grounding_targets(data, make_clip(config), config)
        log(f"{kind}: token-grounding targets of {len(data['t2i_text'])} scenes ({time.perf_counter() - begun:.0f} s)")
    steps = config.unet_steps if kind == "t2i" else config.ip2p_steps
    for this in rounds[first:]:
        log(f"{kind}: {sum(p.numel() for p in unet.parameters()) / 1e6:.3f} M parameters, round {this.unet_rounds}: "
            f"{steps} steps of batch {config.unet_batch}")
        numbers = _train_stage_file(model, data, this, kind, work_path(this, kind, fields), numbers, log, seconds)
    return numbers


def _train_stage_file(model, data: dict[str, torch.Tensor], config: WorldConfig, kind: str, stage_file: Path,
                      totals: dict[str, Any], log: Callable[[str], None], seconds: float | None) -> dict[str, Any]:
    """Train ``model`` for ``kind`` (keeping its progress next to ``stage_file`` when uncapped, see train_unet), add
    the seconds and steps run to ``totals``' ``{kind}_seconds`` and ``{kind}_steps_run``, save the UNet with those
    numbers as ``stage_file`` and return them."""
    progress = progress_file(stage_file) if seconds is None else None
    seconds_run, steps_run = train_unet(model, data, config, kind, log=log, seconds=seconds,
                                        log_every=PROGRESS_EVERY, progress=progress)
    totals = {**totals, f"{kind}_seconds": totals.get(f"{kind}_seconds", 0.0) + seconds_run,
              f"{kind}_steps_run": totals.get(f"{kind}_steps_run", 0) + steps_run}
    _save(stage_file, model.model.diffusion_model.state_dict(), totals)
    if progress is not None:
        progress.unlink(missing_ok=True)
    return totals


def stage_t2i(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print, *, workers: int = 1,
              seconds: float | None = None) -> dict[str, Any]:
    return _train(config, "t2i", log, seconds)


def stage_ip2p(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print, *, workers: int = 1,
               seconds: float | None = None) -> dict[str, Any]:
    return _train(config, "ip2p", log, seconds)


def stage_ip2p_grounding(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print, *,
                         workers: int = 1, seconds: float | None = None) -> dict[str, Any]:
    """Fine-tune the last IP2P round's weights ``config.edit_grounding_steps`` steps with the edit-grounding loss
    (``config.edit_grounding``; :func:`.grounding.edit_grounding_targets`), like the decoder's fine-tuning after
    the VAE: the rounds before keep their files, so adding this stage retrains nothing else. Its file is the IP2P
    UNet the checkpoint packs (:func:`ip2p_stage`); its progress is kept as a round's is."""
    fields = _STAGE_FIELDS["ip2p_grounding"]
    if not config.edit_grounding_steps:
        log("ip2p_grounding: none in this config (edit_grounding_steps = 0)")
        return {}
    path = work_path(config, "ip2p_grounding", fields)
    if path.is_file():
        log(f"ip2p_grounding: done before ({path})")
        return _numbers(path)
    start = work_path(config, "ip2p", _IP2P_FIELDS)
    if not start.is_file():
        raise FileNotFoundError(f"RealEdit: edit grounding fine-tunes the IP2P UNet's last round, {start.name}, which "
                                f"is not in the cache: run `train --stage ip2p` first")
    model = make_unet(config, _IN_CHANNELS["ip2p"])
    model.model.diffusion_model.load_state_dict(safetensors.torch.load_file(str(start)))
    data = safetensors.torch.load_file(str(work_path(config, "data", _DATA_FIELDS)))
    begun = time.perf_counter()
    add_edit_grounding_targets(data, make_clip(config), config, workers)
    log(f"ip2p_grounding: edit-grounding targets of {len(data['ip2p_text'])} pairs "
        f"({time.perf_counter() - begun:.0f} s); {config.edit_grounding_steps} steps of batch {config.unet_batch} from "
        f"{start.name}, loss weight {config.edit_grounding}")
    return _train_stage_file(model, data, config, "ip2p_grounding", path, {}, log, seconds)


def ip2p_stage(config: WorldConfig) -> str:
    """The stage whose IP2P UNet the config's checkpoint holds: the edit-grounding fine-tuning when it has one."""
    return "ip2p_grounding" if config.edit_grounding_steps else "ip2p"


def trained_unet(config: WorldConfig, kind: str):
    fields, in_channels = _STAGE_FIELDS[kind], _IN_CHANNELS[kind]
    model = make_unet(config, in_channels)
    model.model.diffusion_model.load_state_dict(safetensors.torch.load_file(str(work_path(config, kind, fields))))
    return model


def training_record(config: WorldConfig) -> dict[str, Any]:
    """Seconds and steps run of every stage whose file is here (the data stage's file may not be: it is
    large and only training needs it)."""
    record: dict[str, Any] = {}
    for name, fields in _STAGE_FIELDS.items():
        path = work_path(config, name, fields)
        if path.is_file():
            record.update({k: v for k, v in _numbers(path).items()
                           if k.endswith(("seconds", "steps_run", "from_checkpoint"))})
    return record


def export_stages(config: WorldConfig, out: Path, names: tuple[str, ...]) -> list[Path]:
    """Copy the trained stage files ``names`` (weights only: not the large data set) to ``out`` in fp16,
    under their cache names: what comes back from a GPU lease. Dropped into another cache folder they
    resume there (``pack`` packs fp16 anyway)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        if name not in _STAGE_FIELDS or name == "data":
            continue
        path = work_path(config, name, _STAGE_FIELDS[name])
        target = out / path.name
        if path.is_file():
            state = safetensors.torch.load_file(str(path))
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
            _save(target, state, _numbers(path))
            written.append(target)
    return written


def stage_committed(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print, *,
                    folder: Path = CHECKPOINT_DIR, **_: Any) -> dict[str, Any]:
    """Write the committed checkpoints' weights into the cache as the stage files they were packed from (the VAE
    with its tuned decoder, the t2i UNet, the IP2P UNet; fp16 values in fp32), so that a stage added after them (a
    fine-tuning such as :func:`stage_ip2p_grounding`) starts from the committed files instead of hours of training
    again. Each stage's settings must be ``config``'s (its file name says so); a file already in the cache is kept.
    The data stage is rendered and encoded again (by the fp16 encoder: latents within fp16 rounding of a full run's).
    The VAE stage's file holds the tuned decoder (only the encoder is read from it, by the data stage)."""
    from .models import CONFIG_METADATA_KEY, GATES_METADATA_KEY

    with safetensors.safe_open(str(folder / T2I_FILE), framework="pt") as file:
        metadata = file.metadata() or {}
    recorded = WorldConfig.from_json(metadata[CONFIG_METADATA_KEY])
    record = json.loads(metadata.get(GATES_METADATA_KEY, "{}")).get("training", {})
    sources = {"vae": (T2I_FILE, "first_stage_model."), "decoder": (T2I_FILE, "first_stage_model."),
               "t2i": (T2I_FILE, "model.diffusion_model."), ip2p_stage(recorded): (IP2P_FILE, "model.diffusion_model.")}
    loaded: dict[str, dict[str, torch.Tensor]] = {}  # each file read once, when a stage needs it
    written: dict[str, Any] = {}
    for stage, (file_name, prefix) in sources.items():
        fields = _STAGE_FIELDS[stage]
        if stage_key(recorded, fields) != stage_key(config, fields):
            raise ValueError(f"RealEdit: the committed files' {stage} stage ({recorded.key()}) was trained with other "
                             f"settings than this config's; train that stage instead")
        path = work_path(config, stage, fields)
        if path.is_file():
            log(f"{stage}: in the cache already ({path})")
            continue
        if file_name not in loaded:
            loaded[file_name] = safetensors.torch.load_file(str(folder / file_name))
        state = {k[len(prefix):]: v.float() for k, v in loaded[file_name].items() if k.startswith(prefix)}
        if stage == "decoder":
            state = {k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))}
        numbers = {k: v for k, v in record.items() if k in (f"{stage}_seconds", f"{stage}_steps_run")}
        _save(path, state, {**numbers, f"{stage}_from_checkpoint": recorded.key()})
        written[stage] = str(path)
        log(f"{stage}: from {file_name} ({recorded.key()}) -> {path}")
    return written


def stage_measure(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print, *, workers: int = 1,
                  seconds: float | None = None) -> dict[str, Any]:
    """The gates on the trained weights as they are (fp32, nothing packed): a quick check where training
    ran (a GPU lease). ``pack`` measures the committed fp16 files."""
    from . import gates

    clip, vae = make_clip(config), trained_vae(config)
    start = time.perf_counter()
    t2i, ip2p = trained_unet(config, "t2i"), trained_unet(config, ip2p_stage(config))
    measured = gates.measure((t2i, clip, vae), (ip2p, clip, vae), gates.FULL_SIZES)
    for line in gate_lines(measured):
        log(line)
    return {"config_hash": config.key(), "measured": measured, "training": training_record(config),
            "gate_seconds": time.perf_counter() - start}


def stage_pack(config: WorldConfig = DEFAULT_CONFIG, log: Callable[[str], None] = print,
               out: Path = CHECKPOINT_DIR, **_: Any) -> dict[str, Any]:
    """Write the fp16 checkpoints, reload them as CheckpointLoaderSimple does, measure and print the gates."""
    from . import gates

    record = training_record(config)
    clip, vae = make_clip(config), trained_vae(config)
    out.mkdir(parents=True, exist_ok=True)
    for kind, file in (("t2i", T2I_FILE), (ip2p_stage(config), IP2P_FILE)):
        save_checkpoint(out / file, trained_unet(config, kind), clip, vae, config, {"training": record})
    t2i, ip2p = load_checkpoint(out / T2I_FILE), load_checkpoint(out / IP2P_FILE)
    start = time.perf_counter()
    measured = gates.measure(t2i, ip2p, gates.FULL_SIZES)
    ci = gates.measure(t2i, ip2p, gates.CI_SIZES)
    report = {"config_hash": config.key(), "measured": measured, "sizes": gates.FULL_SIZES,
              "measured_ci": ci, "sizes_ci": gates.CI_SIZES, "targets": gates.TARGETS,
              "training": record, "gate_seconds": time.perf_counter() - start,
              "files": {f: (out / f).stat().st_size for f in (T2I_FILE, IP2P_FILE)}}
    (out / GATES_FILE).write_text(json.dumps(report, indent=2) + "\n")
    for line in gate_lines(measured):
        log(line)
    return report


def gate_lines(measured: dict[str, Any]) -> list[str]:
    from .gates import TARGETS

    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    return [
        f"gate VAE round trip: {measured['vae_psnr_db']:.2f} dB (target >= {TARGETS['vae']:.0f}) "
        f"{mark(measured['vae_psnr_db'] >= TARGETS['vae'])}",
        f"gate text-to-image read-back at CFG 7.5: {measured['t2i_attributes']:.1%} of attributes, "
        f"{measured['t2i_scenes']:.1%} of scenes exact (target >= {TARGETS['t2i']:.0%}) "
        f"{mark(measured['t2i_attributes'] >= TARGETS['t2i'])}",
        "  (objects read back right, of {objects}: position {position}, colour {colour}, shape {shape})".format(
            **measured["t2i_objects_right"]),
        f"  (its ceiling through the VAE: the same scenes' photos round-tripped read back "
        f"{measured['vae_read_back_attributes']:.1%} of attributes, {measured['vae_read_back_scenes']:.1%} of scenes)",
        f"gate IP2P instructions carried out: {measured['ip2p_success']:.1%} (target >= {TARGETS['ip2p']:.0%}) "
        f"{mark(measured['ip2p_success'] >= TARGETS['ip2p'])}",
        "  (carried out by kind: " + ", ".join(f"{kind} {done}/{total}" for kind, (done, total)
                                               in measured["ip2p_by_kind"].items()) + ")",
        f"  (its ceiling through the VAE: the expected images round-tripped read back as the edited scene "
        f"{measured['vae_read_back_ip2p']:.1%})",
        f"gate DDIM inversion + reconstruction: {measured['ddim_psnr_db']:.2f} dB (target >= {TARGETS['ddim']:.0f}) "
        f"{mark(measured['ddim_psnr_db'] >= TARGETS['ddim'])}",
    ]


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)

"""One manifest row on the diffusers host: photos in, the method's Python API, images and masks out.

:func:`run_row` takes a loaded model (``batching.models.EditModel``: UNet, VAE, scheduler, tokenizer,
prompt encoder) and a validated row and calls the same functions the README's Python API shows:

* ``specref``: DDIM inversion of the photo with the source prompt, ``reference_features`` of the reference,
  ``specref_edit`` (P2P Replace/Refine between the prompts, M_t from ``word``, M_s from ``reference_mask``);
* ``baret``: ``ttis_invert`` then ``baret_edit`` (edit, transition, reconstruction);
* ``nulltext-p2p``: ``null_text_invert`` then ``specref_edit`` without a reference, the two-path P2P edit whose
  unconditional rows take the per-step null-text embeddings (Mokady et al. 2023 Sec. 3.2; the ComfyUI
  host does the same with ``comfy_edit.with_null_text``);
* ``zone``: ``diffusers_ip2p.ip2p_edit`` with an :class:`~..masks.IP2PMaskRecorder` (the IP2P edit and M_b,
  ZONE Sec. 4.2) unless the row gives an edit and its M_b, then ``masks.local_edit`` (Region-IoU over the row's
  segments, else M_b itself; the FFT smoother; the exact composite). No MagicBrush fusion, no SAM here;
* ``keep-pixels``: ``masks.keep_unedited`` on another editor's output.

Images are (H, W, 3) float in [0, 1] on the CPU, masks (H, W) float in [0, 1].
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..attention.edit_loop import EditResult
from ..attention.hooks import ChainHook
from ..attention.local_blend import LocalBlend
from ..attention.p2p import cross_edit
from ..attention.specref import SpecRefControls
from ..attention.tokens import Tokenizer, TokenLookupError, check_prompt_length, word_positions
from ..inversion.embedding_opt import OptimisedInversion, null_text_lr
from ..masks import IP2PMaskRecorder, classify_action, local_edit
from ..masks.ip2p_mask import instruction_eot_position
from ..masks.settings import MASK_LAYER_CHOICES, MASK_ROW_CHOICES
from .diffusers import DiffusersHost
from .diffusers_bank import reference_features
from .diffusers_baret import baret_edit, null_text_invert, ttis_invert
from .diffusers_edit import specref_edit
from .diffusers_ip2p import ip2p_edit
from .diffusers_sampling import ddim_invert
from .image_files import load_image, load_mask, quantise


class BatchModel(Protocol):
    """What a row needs of a loaded model (``batching.models.EditModel`` is one)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: Any
    tokenize: Tokenizer
    encode: Callable[[str], torch.Tensor]  # prompt -> (1, 77, width)

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...


Row = Any  # batching.manifest.Row (hosts do not import the batching layer)
Run = Any  # the method's settings object from batching.methods


@dataclass
class RowResult:
    """What a row produced: ``images["edit"]`` is the result; other images and masks are by-products."""

    images: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class _Timer:
    """Named wall-clock phases of one row (seconds)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


# -- pixels <-> latents ---------------------------------------------------------------------------------------
@torch.no_grad()
def vae_encode(vae: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """IMAGEs ``(B, H, W, 3)`` in [0, 1] -> a diffusers VAE's scaled latents ``(B, 4, H/8, W/8)``, the posterior
    mode, on the VAE's device, computed in ``dtype`` (else the VAE's)."""
    weight = next(vae.parameters())
    pixels = (images.permute(0, 3, 1, 2) * 2 - 1).to(weight.device, dtype or weight.dtype)  # (B, 3, H, W) in [-1, 1]
    return vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor


@torch.no_grad()
def vae_decode(vae: torch.nn.Module, latents: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Scaled latents ``(B, 4, h, w)`` -> IMAGEs ``(B, H, W, 3)`` float on the CPU, unclamped."""
    weight = next(vae.parameters())
    pixels = vae.decode(latents.to(weight.device, dtype or weight.dtype) / vae.config.scaling_factor).sample
    return (pixels.permute(0, 2, 3, 1).float().cpu() + 1) / 2


def encode_image(model: BatchModel, image: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) in [0, 1] -> the UNet's scaled latent (1, 4, H/8, W/8), the VAE's posterior mode."""
    return vae_encode(model.vae, image[None], model.dtype)


def decode_latent(model: BatchModel, latent: torch.Tensor) -> torch.Tensor:
    """A scaled latent (1, 4, h, w) -> (H, W, 3) float in [0, 1] on the CPU."""
    return vae_decode(model.vae, latent, model.dtype)[0].clamp(0, 1)


def image_size_mask(mask: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor | None:
    """A latent-size (1, h, w) mask at image size (nearest), (H, W)."""
    if mask is None:
        return None
    return F.interpolate(mask.float().reshape(1, 1, *mask.shape[-2:]), size=size, mode="nearest")[0, 0]


# -- Prompt-to-Prompt controls from words ------------------------------------------------------------------------
def _positions(prompt: str, words: str, tokenize: Tokenizer, required: bool) -> list[int]:
    found: set[int] = set()
    for word in words.replace(",", " ").split():
        try:
            found.update(word_positions(prompt, word, tokenize))
        except TokenLookupError:
            if required:
                raise
    return sorted(found)


def p2p_controls(run: Run, tokenize: Tokenizer, source: str, target: str, *, word: str | None = None,
                 blend_words: str | None = None, ref_mask: torch.Tensor | None = None) -> SpecRefControls:
    """SpecRefControls for a row: Replace/Refine between the prompts, M_t from ``word`` (target prompt),
    LocalBlend on ``blend_words`` (positions in each prompt where they occur), M_s = ``ref_mask``."""
    src_tokens, tgt_tokens = tokenize(source), tokenize(target)
    check_prompt_length(f"the prompt {source!r}", src_tokens)
    check_prompt_length(f"the target {target!r}", tgt_tokens)
    blend = None
    if blend_words:
        blend = LocalBlend([_positions(source, blend_words, tokenize, False),
                            _positions(target, blend_words, tokenize, True)],
                           threshold=run.settings.p2p.blend_threshold, start=run.settings.p2p.blend_start)
    positions = _positions(target, word, tokenize, True) if word else None
    return SpecRefControls(settings=run.settings, cross_edit=cross_edit(run.edit_mode, src_tokens, tgt_tokens),
                           local_blend=blend, target_positions=positions, ref_mask=ref_mask,
                           sr_uncond_shared_kv=run.sr_uncond_shared_kv, self_replace_uncond=run.self_replace_uncond)


# -- the methods ------------------------------------------------------------------------------------------------
def _source(model: BatchModel, row: Row, timer: _Timer) -> tuple[torch.Tensor, torch.Tensor]:
    image = load_image(row.image)
    return image, timer("encode", lambda: encode_image(model, image))


def _edit_outputs(model: BatchModel, result: EditResult, size: tuple[int, int], timer: _Timer) -> RowResult:
    images = timer("decode", lambda: {"edit": decode_latent(model, result.latent),
                                      "reconstruction": decode_latent(model, result.reconstruction)})
    masks = {name: image_size_mask(m, size) for name, m in (("mt", result.mt_mask), ("blend", result.blend_mask))
             if m is not None}
    return RowResult(images, masks)


def run_specref(model: BatchModel, row: Row, run: Run, timer: _Timer) -> RowResult:
    image, latent = _source(model, row, timer)
    reference = encode_image(model, load_image(row.reference))
    source, target, empty = (model.encode(t) for t in (row.prompt, row.target, ""))
    controls = p2p_controls(run, model.tokenize, row.prompt, row.target, word=row.word, blend_words=row.blend_words,
                            ref_mask=load_mask(row.reference_mask) if row.reference_mask else None)

    def invert():
        with DiffusersHost(model.unet, ChainHook()) as host:
            return ddim_invert(host, model.scheduler, latent, source, steps=run.steps)

    inversion = timer("invert", invert)
    features = timer("reference", lambda: reference_features(model.unet, model.scheduler, reference, empty,
                                                             steps=run.steps))
    result = timer("edit", lambda: specref_edit(model.unet, model.scheduler, inversion, source, target, empty,
                                                cfg=run.cfg, controls=controls, ref_features=features))
    out = _edit_outputs(model, result, tuple(image.shape[:2]), timer)
    out.info["sr_attention"] = asdict(result.stats)
    return out


def run_nulltext(model: BatchModel, row: Row, run: Run, timer: _Timer) -> RowResult:
    image, latent = _source(model, row, timer)
    source, target, empty = (model.encode(t) for t in (row.prompt, row.target, ""))
    controls = p2p_controls(run, model.tokenize, row.prompt, row.target, blend_words=row.blend_words)
    inversion = timer("invert", lambda: null_text_invert(
        model.unet, model.scheduler, latent, source, empty, steps=run.steps, cfg=run.cfg,
        iterations=run.null_text_iterations, lr=null_text_lr(run.null_text_lr), eps=run.early_stop_eps,
        delta=run.early_stop_delta))
    result = timer("edit", lambda: specref_edit(model.unet, model.scheduler, inversion, source, target, empty,
                                                cfg=run.cfg, controls=controls))
    out = _edit_outputs(model, result, tuple(image.shape[:2]), timer)
    out.info["null_text"] = _optimisation_info(inversion)
    return out


def _optimisation_info(inversion: OptimisedInversion) -> dict[str, Any]:
    opt = inversion.optimisation
    return {"iterations": [len(step) for step in opt.losses], "final_losses": [float(x) for x in opt.final_losses]}


def run_baret(model: BatchModel, row: Row, run: Run, timer: _Timer) -> RowResult:
    _, latent = _source(model, row, timer)
    target, empty = model.encode(row.target), model.encode("")
    inversion = timer("invert", lambda: ttis_invert(
        model.unet, model.scheduler, latent, target, empty, steps=run.steps, cfg=run.cfg,
        iterations=run.ttis_iterations, lr=run.ttis_lr, eps=run.early_stop_eps, delta=run.early_stop_delta))
    result = timer("edit", lambda: baret_edit(model.unet, model.scheduler, inversion, target, empty,
                                              controls=run.controls))
    images = timer("decode", lambda: {name: decode_latent(model, getattr(result, name))
                                      for name in ("edit", "transition", "reconstruction")})
    return RowResult(images, info={"ttis": _optimisation_info(inversion), "lambdas": list(result.lambdas)})


def zone_recorder(run: Run, instruction: str, tokenize: Tokenizer) -> IP2PMaskRecorder:
    """M_b's recorder for a zone row (``run``: batching's ZoneRun), as the IP2P Edit Mask node builds it: the
    row's rows and layers, A^L at the instruction's end-of-text token."""
    return IP2PMaskRecorder(MASK_ROW_CHOICES[run.mask_rows], MASK_LAYER_CHOICES[run.mask_layers],
                            eot_position=instruction_eot_position(instruction, tokenize))


def _ip2p_edit_and_rough_mask(ip2p: BatchModel, row: Row, run: Run, original: torch.Tensor,
                              timer: _Timer) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """ZONE Sec. 4.2: the IP2P edit of the photo and M_b from its empty-text (or instruction) cross-attention
    (Eq. 3-4), A^L at the instruction's end-of-text token."""
    photo = encode_image(ip2p, original) / ip2p.vae.config.scaling_factor  # IP2P's c_I: the unscaled mode
    instruction, empty = ip2p.encode(row.instruction), ip2p.encode("")
    recorder = zone_recorder(run, row.instruction, ip2p.tokenize)
    latent = timer("ip2p", lambda: ip2p_edit(ip2p.unet, ip2p.scheduler, photo, instruction, empty, steps=run.steps,
                                             text_cfg=run.text_cfg, image_cfg=run.image_cfg, seed=row.seed,
                                             hook=recorder))
    edited = timer("decode", lambda: decode_latent(ip2p, latent))
    rough = recorder.rough_mask(tuple(latent.shape[-2:]), run.mask_threshold)
    size = tuple(original.shape[:2])
    info = {"ip2p_layers": sorted({layer for layer, _, _ in recorder.recorded})}
    return edited, image_size_mask(rough.mask.float()[None], size), info


def run_zone(model: BatchModel, row: Row, run: Run, timer: _Timer, ip2p: BatchModel | None = None) -> RowResult:
    original = load_image(row.image)
    info: dict[str, Any] = {}
    images: dict[str, torch.Tensor] = {}
    if row.edited:
        edited, rough = load_image(row.edited), load_mask(row.mask)
    else:
        if ip2p is None:
            raise ValueError("RealEdit: this zone row has no edited image; InstructPix2Pix needs --ip2p-model.")
        edited, rough, info = _ip2p_edit_and_rough_mask(ip2p, row, run, original, timer)
        images["ip2p"] = edited
    segments = [load_mask(p) for p in row.segments] or [rough]  # no segmenter output: M_b is the one segment
    result = timer("zone", lambda: local_edit(original, edited, rough, segments, fallback=run.fallback,
                                              d0=run.fft_d0, threshold=run.fft_threshold, blend=run.blend_alpha))
    info.update(segment=result.index, iou=result.iou)
    if row.instruction:
        info["action"] = classify_action(row.instruction)
    return RowResult({"edit": result.image, **images},
                     {"rough": rough, "refined": result.refined_mask.float(), "final": result.final_mask.float()}, info)


def run_keep(model: BatchModel, row: Row, run: Run, timer: _Timer) -> RowResult:
    from ..masks.keep import keep_unedited

    original, edited = load_image(row.image), load_image(row.edited)
    rough = load_mask(row.mask) if row.mask else None
    segments = [load_mask(p) for p in row.segments] or None
    result = timer("keep", lambda: keep_unedited(original, edited, rough, segments, settings=run.settings))
    item = result.items[0]
    return RowResult({"edit": item.image}, {"rough": item.rough_mask.float(), "refined": item.refined_mask.float(),
                                            "final": item.final_mask.float()},
                     {"status": item.status, "report": item.report})


RUNNERS: dict[str, Callable[..., RowResult]] = {
    "specref": run_specref, "baret": run_baret, "nulltext-p2p": run_nulltext, "zone": run_zone,
    "keep-pixels": run_keep,
}


# -- scores ------------------------------------------------------------------------------------------------------
def scores(edit: torch.Tensor, truth: torch.Tensor, original: torch.Tensor | None = None,
           final_mask: torch.Tensor | None = None) -> dict[str, float]:
    """PSNR (dB) and mean absolute error against the ground truth on 8-bit values (what the PNGs hold);
    with a final mask, the fraction of pixels outside it that equal the original exactly."""
    a, b = quantise(edit).float(), quantise(truth).float()
    mse = float(((a - b) ** 2).mean())
    out = {"psnr": 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse), "mae": float((a - b).abs().mean()) / 255}
    if original is not None and final_mask is not None:
        outside = ~(final_mask > 0.5)
        same = (quantise(edit) == quantise(original)).all(-1)
        out["unchanged_outside_mask"] = float(same[outside].float().mean()) if bool(outside.any()) else 1.0
    return out


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def settings_record(run: Any) -> dict[str, Any]:
    """The resolved settings object as plain JSON values."""
    return _plain(run)


def run_row(model: BatchModel, row: Row, run: Run, *, ip2p: BatchModel | None = None) -> RowResult:
    """Run one validated row with its resolved settings ``run``; seeds torch from ``row.seed`` first.
    ``ip2p``: the InstructPix2Pix model (same interface as ``model``) for zone rows without an edit."""
    torch.manual_seed(row.seed)
    timer = _Timer()
    result = RUNNERS[row.method](model, row, run, timer, **({"ip2p": ip2p} if ip2p is not None else {}))
    result.timings = dict(timer.times)
    if row.ground_truth:
        original = load_image(row.image) if "final" in result.masks else None
        result.info["scores"] = scores(result.images["edit"], load_image(row.ground_truth), original,
                                       result.masks.get("final"))
    return result

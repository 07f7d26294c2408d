"""Run the core's samplers (DDIM inversion, later the edit samplers) inside ComfyUI's sampling stack.

Everything goes through ``comfy.samplers.CFGGuider`` with a ``KSAMPLER`` wrapping our loop, so the
user's model patches (LoRA weights, ControlNets, other packs' wrappers and attention patches),
latent scaling (``process_latent_in``), device management and ``sample_sigmas`` all behave exactly
as in a KSampler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import torch

from ..inversion.bank import BankRecorder, BankSettings, ReferenceBank, ReferenceFeatures, select_layers
from ..inversion.ddim import (
    DEFAULT_CONVENTION,
    Convention,
    Inversion,
    check_finite,
    inversion_sigmas,
    invert,
    steps_with_kv,
    trajectory_to,
)
from .comfy import discover_layers, install_hook

# Schedulers uniform in the model's timesteps: DDIM inversion retraces them exactly.
INVERSION_SCHEDULERS = ("ddim_uniform", "normal", "simple", "sgm_uniform")
StepCallback = Callable[[int, torch.Tensor], None]


def check_sd_model(model: Any, latent: torch.Tensor, name: str = "LATENT") -> None:
    """Refuse models DDIM inversion does not apply to, and latents the model cannot take."""
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, (comfy.model_sampling.EPS,)) or isinstance(
        sampling, (comfy.model_sampling.CONST,)
    ):
        raise ValueError(
            f"RealEdit: DDIM inversion needs an epsilon- or v-prediction SD model; this MODEL uses "
            f"{type(sampling).__name__}. Load an SD1.x, SD2.x or SDXL checkpoint."
        )
    if latent.ndim != 4:
        raise ValueError(f"RealEdit: the {name} has shape {tuple(latent.shape)}; an image latent (batch, channels, "
                         "height, width) is expected (VAE Encode the photo).")
    in_channels = getattr(model.model.diffusion_model, "in_channels", latent.shape[1])
    if in_channels != latent.shape[1]:
        hint = (" This is an InstructPix2Pix-style model (8 input channels): it needs the photo as "
                "image conditioning; use a plain SD checkpoint here.") if in_channels == 8 else (
                " Encode the photo with this model's VAE.")
        raise ValueError(
            f"RealEdit: the {name} has {latent.shape[1]} channels but the MODEL expects {in_channels}." + hint
        )


def check_input_latent(model: Any, latent: torch.Tensor, name: str = "LATENT") -> None:
    """:func:`check_sd_model`, and refuse NaN/inf in the latent."""
    check_sd_model(model, latent, name)
    check_finite(latent, name)


def sampling_sigmas(model: Any, scheduler: str, steps: int) -> torch.Tensor:
    """The descending schedule a KSampler with these settings would use."""
    if steps < 2:
        raise ValueError("RealEdit: steps must be at least 2.")
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def schedule_steps(model: Any, scheduler: str, steps: int) -> int:
    """How many steps the schedule of these settings has (some schedulers drop duplicate sigmas)."""
    return len(sampling_sigmas(model, scheduler, steps)) - 1


def model_fingerprint(model: Any) -> str:
    """Identifies the weights: the base model object and its weight patches (LoRAs...).

    Attention patches (ours included) live in ``model_options`` and do not change it, so the
    SR-attention clone of a model matches an inversion made on the model itself. Format
    ``family@weights/patches`` (family: ComfyUI's model config, e.g. SD15, SDXL), which
    ``inversion.ddim.describe_model_difference`` turns into words for messages.
    """
    config = getattr(model.model, "model_config", None)
    family = type(config).__name__ if config is not None else type(model.model).__name__
    return f"{family}@{id(model.model):x}/{model.patches_uuid}"


def cfg_guider(model: Any, positive: list, negative: list | None, cfg: float) -> comfy.samplers.CFGGuider:
    """ComfyUI's CFGGuider for these prompts; no negative is allowed at CFG 1 only."""
    if negative is None:
        if cfg != 1.0:
            raise ValueError("RealEdit: guidance above 1 needs a negative CONDITIONING; connect one or use 1.")
        negative = positive  # never evaluated: ComfyUI skips the uncond pass at cfg 1
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def _invert_batch(model: Any, latent: torch.Tensor, positive: list, negative: list | None, guidance: float,
                  sigmas: torch.Tensor, convention: Convention, callback: StepCallback | None,
                  asked_steps: int) -> Inversion:
    """Invert every image of a user-space latent batch in one sampler run (one UNet batch per step) on the
    ``sigmas`` a node given ``asked_steps`` chose."""
    trajectory: list[torch.Tensor] = []
    on_step = callback  # the sampler function's own ``callback`` parameter shadows it

    @torch.no_grad()
    def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])

        def denoise(x_in: torch.Tensor, label: float) -> torch.Tensor:
            return model_k(x_in, label * s_in, **(extra_args or {}))

        path = invert(denoise, x, sigmas, convention, callback=on_step)
        trajectory.extend(trajectory_to(path, "cpu"))  # stays on the device until the last step
        return path[-1]

    guider = cfg_guider(model, positive, negative, guidance)
    noise = torch.zeros_like(latent)
    guider.sample(noise, latent, comfy.samplers.KSAMPLER(sampler_function), sigmas, disable_pbar=True, seed=0)
    return Inversion(trajectory=tuple(trajectory), sigmas=sigmas, convention=convention,
                     fingerprint=model_fingerprint(model), asked_steps=asked_steps)


def ddim_invert(
    model: Any,
    latent: torch.Tensor,
    positive: list,
    *,
    steps: int = 50,
    scheduler: str = "ddim_uniform",
    guidance: float = 1.0,
    negative: list | None = None,
    convention: Convention = DEFAULT_CONVENTION,
    callback: StepCallback | None = None,
) -> Inversion:
    """DDIM-invert a user-space LATENT on a ComfyUI MODEL; the trajectory is in model space."""
    check_input_latent(model, latent)
    sigmas = inversion_sigmas(sampling_sigmas(model, scheduler, steps), convention)  # ascending
    return _invert_batch(model, latent, positive, negative, guidance, sigmas, convention, callback, steps)


def bank_for(model: Any, settings: BankSettings, total_steps: int) -> tuple[list[int], range]:
    """The layer indices and edit steps a bank keeps on this model; refuses an empty layer window."""
    return select_layers(settings.layers, discover_layers(model)), settings.steps.select(total_steps)


def _recording_model(model: Any, settings: BankSettings, total: int, convention: Convention, slot: int = 0
                     ) -> tuple[Any, list[int], range, ReferenceBank | None]:
    """The model to invert the reference on: a clone recording K/V of row ``slot`` (stored mode), or
    the model itself (live mode); with the chosen layers, edit steps and the bank."""
    layers, window = bank_for(model, settings, total)
    edit_steps = steps_with_kv(window, convention)
    if settings.mode != "stored":
        return model, layers, edit_steps, None
    device = settings.device or model.offload_device
    bank = ReferenceBank(layers, edit_steps, total, settings.dtype, device)
    return install_hook(model, BankRecorder(bank, slot), cross_attention=False), layers, edit_steps, bank


def reference_features(
    model: Any,
    latent: torch.Tensor,
    conditioning: list,
    settings: BankSettings | None = None,
    *,
    steps: int = 50,
    scheduler: str = "ddim_uniform",
    convention: Convention = DEFAULT_CONVENTION,
    callback: StepCallback | None = None,
) -> ReferenceFeatures:
    """Invert the reference and keep its self-attention K/V inside the windows (SpecRef stage 1).

    In ``live`` mode only the trajectory is kept; the edit sampler recomputes K/V on the fly.
    """
    settings = settings or BankSettings()
    check_input_latent(model, latent, "reference LATENT")
    total = schedule_steps(model, scheduler, steps)
    inverting, layers, edit_steps, bank = _recording_model(model, settings, total, convention)
    inversion = ddim_invert(inverting, latent, conditioning, steps=steps, scheduler=scheduler,
                            convention=convention, callback=callback)
    return ReferenceFeatures(settings.mode, inversion, bank, tuple(layers), edit_steps, conditioning)


# -- source and reference in one batch --------------------------------------------------------------
# SpecRef inverts two photos with the same model, steps and guidance 1: when they share a size, one
# sampler run with a batch of two (row 0 source, row 1 reference, each with its own prompt) does both.

@dataclass(frozen=True)
class SourceAndReference:
    """The source INVERSION and the REF_FEATURES, and whether they were inverted in one batch
    (``note`` says why not, when not)."""

    source: Inversion
    reference: ReferenceFeatures
    batched: bool
    note: str = ""


def _single_prompt(cond: Any, name: str) -> tuple[torch.Tensor, dict] | str:
    """The one (tensor, options) entry of a CONDITIONING, or why it cannot be one row of a batch."""
    if not isinstance(cond, list) or len(cond) != 1 or len(cond[0]) != 2:
        count = len(cond) if isinstance(cond, list) else type(cond).__name__
        return f"the {name} CONDITIONING holds {count} entries (combined or regional prompts)"
    tensor, options = cond[0]
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3 or tensor.shape[0] != 1:
        return f"the {name} CONDITIONING is not one prompt of shape (1, tokens, width)"
    return tensor, options


def _same_option(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and bool(torch.equal(a.cpu(), b.cpu())))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable == are not the same option
        return False


def batched_conditioning(conds: list[Any], names: list[str]) -> list | str:
    """One CONDITIONING with one row per latent of the batch (ComfyUI gives row i of a batch row i of
    the prompt tensor), or the reason the prompts cannot share a batch.

    Prompts of different token counts are repeated to their common multiple, as ComfyUI does when it
    batches conds (attention is unchanged by it). Options other than SDXL's ``pooled_output`` (stacked)
    must be the same (a ControlNet on one prompt only cannot share the batch).
    """
    entries = []
    for cond, name in zip(conds, names):
        entry = _single_prompt(cond, name)
        if isinstance(entry, str):
            return entry
        entries.append(entry)
    if len({t.shape[2] for t, _ in entries}) != 1:
        return "the prompts' conditioning widths differ"
    options = [{k: v for k, v in o.items() if k != "pooled_output"} for _, o in entries]
    first = options[0]
    if any(o.keys() != first.keys() or not all(_same_option(first[k], o[k]) for k in first) for o in options[1:]):
        return "the prompts carry different options (e.g. a ControlNet or area on one of them)"
    pooled = [o.get("pooled_output") for _, o in entries]
    merged = dict(entries[0][1])
    if all(p is not None for p in pooled):
        merged["pooled_output"] = torch.cat(pooled)
    elif any(p is not None for p in pooled):
        return "only one of the prompts has a pooled output"
    return [[torch.cat(repeat_to_common_length([t for t, _ in entries])), merged]]


def repeat_to_common_length(contexts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each (1, tokens, width) context repeated to the common multiple of their lengths: what ComfyUI does
    to batch conds (attention is unchanged by it; the map store folds repeats back onto 77 tokens)."""
    length = math.lcm(*(t.shape[1] for t in contexts))
    return [t.repeat(1, length // t.shape[1], 1) for t in contexts]


def _batch_plan(source: torch.Tensor, reference: torch.Tensor, source_cond: list, reference_cond: list
                ) -> list | str:
    """The CONDITIONING of source and reference as one batch, or why they cannot share one."""
    if tuple(source.shape) != tuple(reference.shape):
        return (f"the source latent is {tuple(source.shape[-2:])} and the reference "
                f"{tuple(reference.shape[-2:])}")
    return batched_conditioning([source_cond, reference_cond], ["source", "reference"])


def batch_obstacle(source: torch.Tensor, reference: torch.Tensor, source_cond: list, reference_cond: list
                   ) -> str | None:
    """Why source and reference cannot be inverted in one batch (None: they can)."""
    plan = _batch_plan(source, reference, source_cond, reference_cond)
    return plan if isinstance(plan, str) else None


def invert_source_and_reference(
    model: Any,
    source: torch.Tensor,
    source_cond: list,
    reference: torch.Tensor,
    reference_cond: list,
    settings: BankSettings | None = None,
    *,
    steps: int = 50,
    scheduler: str = "ddim_uniform",
    convention: Convention = DEFAULT_CONVENTION,
    batched: bool = True,
    callback: StepCallback | None = None,
) -> SourceAndReference:
    """SpecRef stage 1 for both photos: the source's DDIM inversion and the reference features.

    With ``batched`` (default) and latents of one size, both run as one batch of two (row 0 source,
    row 1 reference; the bank records row 1 only): the same numbers as two separate runs, up to float
    rounding of batched kernels, in fewer UNet calls. Otherwise (or when the prompts cannot share a
    batch) they run one after the other; ``callback`` then counts steps 0 .. 2N-1.
    """
    settings = settings or BankSettings()
    check_input_latent(model, source, "source LATENT")
    check_input_latent(model, reference, "reference LATENT")
    positive = _batch_plan(source, reference, source_cond, reference_cond) if batched else "batching is off"
    if isinstance(positive, str):
        return _invert_separately(model, source, source_cond, reference, reference_cond, settings, steps, scheduler,
                                  convention, callback, positive)
    descending = sampling_sigmas(model, scheduler, steps)
    total = len(descending) - 1
    inverting, layers, edit_steps, bank = _recording_model(model, settings, total, convention, slot=1)
    latent = torch.cat([source, reference.to(source)])
    both = _invert_batch(inverting, latent, positive, None, 1.0, inversion_sigmas(descending, convention),
                         convention, callback, steps)
    features = ReferenceFeatures(settings.mode, both.row(1), bank, tuple(layers), edit_steps, reference_cond)
    return SourceAndReference(both.row(0), features, batched=True)


def _invert_separately(model: Any, source: torch.Tensor, source_cond: list, reference: torch.Tensor,
                       reference_cond: list, settings: BankSettings, steps: int, scheduler: str,
                       convention: Convention, callback: StepCallback | None, why: str) -> SourceAndReference:
    def shifted(i: int, x: torch.Tensor) -> None:
        if callback is not None:
            callback(i + steps_done, x)

    steps_done = 0
    inversion = ddim_invert(model, source, source_cond, steps=steps, scheduler=scheduler, convention=convention,
                            callback=callback)
    steps_done = inversion.steps
    features = reference_features(model, reference, reference_cond, settings, steps=steps, scheduler=scheduler,
                                  convention=convention, callback=shifted)
    return SourceAndReference(inversion, features, batched=False, note=f"inverted separately: {why}")

"""Run the core's samplers (DDIM inversion, later the edit samplers) inside ComfyUI's sampling stack.

Everything goes through ``comfy.samplers.CFGGuider`` with a ``KSAMPLER`` wrapping our loop, so the
user's model patches (LoRA weights, ControlNets, other packs' wrappers and attention patches),
latent scaling (``process_latent_in``), device management and ``sample_sigmas`` all behave exactly
as in a KSampler.
"""

from __future__ import annotations

from typing import Any, Callable

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import torch

from ..inversion.bank import BankRecorder, BankSettings, ReferenceBank, ReferenceFeatures
from ..inversion.ddim import (
    DEFAULT_CONVENTION,
    Convention,
    Inversion,
    check_finite,
    inversion_sigmas,
    invert,
)
from .comfy import discover_layers, install_hook

# Schedulers uniform in the model's timesteps: DDIM inversion retraces them exactly.
INVERSION_SCHEDULERS = ("ddim_uniform", "normal", "simple", "sgm_uniform")
StepCallback = Callable[[int, torch.Tensor], None]


def check_sd_model(model: Any, latent: torch.Tensor) -> None:
    """Refuse models DDIM inversion does not apply to, and latents the model cannot take."""
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, (comfy.model_sampling.EPS,)) or isinstance(
        sampling, (comfy.model_sampling.CONST,)
    ):
        raise ValueError(
            f"RealEdit: DDIM inversion needs an epsilon- or v-prediction SD model; this MODEL uses "
            f"{type(sampling).__name__}. Load an SD1.x, SD2.x or SDXL checkpoint."
        )
    in_channels = getattr(model.model.diffusion_model, "in_channels", latent.shape[1])
    if in_channels != latent.shape[1]:
        hint = (" This is an InstructPix2Pix-style model (8 input channels): it needs the photo as "
                "image conditioning; use a plain SD checkpoint here.") if in_channels == 8 else ""
        raise ValueError(
            f"RealEdit: the LATENT has {latent.shape[1]} channels but the MODEL expects {in_channels}."
            + hint
        )


def sampling_sigmas(model: Any, scheduler: str, steps: int) -> torch.Tensor:
    """The descending schedule a KSampler with these settings would use."""
    if steps < 2:
        raise ValueError("RealEdit: steps must be at least 2.")
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def model_fingerprint(model: Any) -> str:
    """Identifies the weights: the base model object and its weight patches (LoRAs...).

    Attention patches (ours included) live in ``model_options`` and do not change it, so the
    SR-attention clone of a model matches an inversion made on the model itself.
    """
    return f"{type(model.model).__name__}@{id(model.model):x}/{model.patches_uuid}"


def _guider(model: Any, positive: list, negative: list | None, cfg: float) -> comfy.samplers.CFGGuider:
    if negative is None:
        if cfg != 1.0:
            raise ValueError("RealEdit: guidance above 1 needs a negative CONDITIONING; connect one or use 1.")
        negative = positive  # never evaluated: ComfyUI skips the uncond pass at cfg 1
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


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
    check_sd_model(model, latent)
    check_finite(latent, "LATENT")
    sigmas = inversion_sigmas(sampling_sigmas(model, scheduler, steps), convention)  # ascending
    trajectory: list[torch.Tensor] = []

    @torch.no_grad()
    def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])

        def denoise(x_in: torch.Tensor, label: float) -> torch.Tensor:
            return model_k(x_in, label * s_in, **(extra_args or {}))

        path = invert(denoise, x, sigmas, convention, callback=step_callback)
        trajectory.extend(t.detach().cpu() for t in path)
        return path[-1]

    def step_callback(i: int, x: torch.Tensor) -> None:
        if callback is not None:
            callback(i, x)

    guider = _guider(model, positive, negative, guidance)
    noise = torch.zeros_like(latent)
    guider.sample(noise, latent, comfy.samplers.KSAMPLER(sampler_function), sigmas, disable_pbar=True, seed=0)
    return Inversion(
        trajectory=tuple(trajectory),
        sigmas=sigmas,
        convention=convention,
        fingerprint=model_fingerprint(model),
    )


def bank_for(model: Any, settings: BankSettings, total_steps: int) -> tuple[list[int], range]:
    """The layer indices and edit steps a bank keeps on this model; refuses an empty layer window."""
    layers = discover_layers(model)
    chosen = settings.layers.select(layers)
    if not chosen:
        levels = sorted({layer.downscale for layer in layers})
        raise ValueError(
            f"RealEdit: the layer window (stage '{settings.layers.stage}', {settings.layers.finest} finest "
            f"resolutions) selects no attention layer of this model (its attention downscales: {levels}); "
            "use stage 'up' or 'any' and finest >= 1."
        )
    return chosen, settings.steps.select(total_steps)


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
    total = len(sampling_sigmas(model, scheduler, steps)) - 1
    layers, edit_steps = bank_for(model, settings, total)
    bank = None
    inverting = model
    if settings.mode == "stored":
        device = settings.device or model.offload_device
        bank = ReferenceBank(layers, edit_steps, total, settings.dtype, device)
        inverting = install_hook(model, BankRecorder(bank), cross_attention=False)
    inversion = ddim_invert(inverting, latent, conditioning, steps=steps, scheduler=scheduler,
                            convention=convention, callback=callback)
    return ReferenceFeatures(settings.mode, inversion, bank, tuple(layers), edit_steps, conditioning)

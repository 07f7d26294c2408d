"""Shared node plumbing: progress with cancellation, custom socket types, validation helpers."""

from __future__ import annotations

from typing import Callable

import comfy.model_management
import comfy.utils
import torch
from comfy_api.v0_0_2 import io

from ..hosts.comfy_sampling import INVERSION_SCHEDULERS
from ..inversion.ddim import CONVENTIONS, DEFAULT_CONVENTION

Inversion = io.Custom("REALEDIT_INVERSION")
RefFeatures = io.Custom("REALEDIT_REF_FEATURES")

CONVENTION_TOOLTIP = (
    "Where the inversion predicts noise. 'next' (default): at the current latent labelled with the next "
    "timestep, as diffusers' DDIMInverseScheduler and the official P2P / null-text / SpecRef code; every "
    "edit step then has a matching reference entry. 'current': at the current latent and its own timestep, "
    "SpecRef Eq. 1 as written (ComfyUI's FlipSigmas + euler)."
)


def scheduler_input() -> io.Combo.Input:
    return io.Combo.Input(
        "scheduler", options=list(INVERSION_SCHEDULERS), default="ddim_uniform",
        tooltip="Schedules uniform in the model's timesteps, which DDIM inversion retraces exactly.",
    )


def convention_input() -> io.Combo.Input:
    return io.Combo.Input("convention", options=list(CONVENTIONS), default=DEFAULT_CONVENTION,
                          tooltip=CONVENTION_TOOLTIP)


def progress(total: int) -> Callable[[int, object], None]:
    """A per-step callback: advances ComfyUI's progress bar and honours the Cancel button."""
    bar = comfy.utils.ProgressBar(total)

    def step(i: int, _latent: object = None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(i + 1, total)

    return step


def latent_samples(latent: dict, name: str = "latent") -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise ValueError(f"RealEdit: the {name} input is not an image LATENT (VAE Encode the photo first).")
    return samples


def latent_output(model, z: torch.Tensor, like: torch.Tensor) -> dict:
    """A user LATENT dict of the model-space latent ``z`` (e.g. an inversion's z_T): ``process_latent_out``,
    on the device and in the dtype of ``like`` (the latent the user connected)."""
    return {"samples": model.model.process_latent_out(z.to(like.device)).to(like.dtype)}


def single_image(samples: torch.Tensor, name: str) -> torch.Tensor:
    if samples.shape[0] != 1:
        raise ValueError(
            f"RealEdit: the {name} holds a batch of {samples.shape[0]}; inversion edits one image at a time "
            "(use 'Latent From Batch' to pick one)."
        )
    return samples

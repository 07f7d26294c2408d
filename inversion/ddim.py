"""Deterministic DDIM inversion (eta 0) in sigma space.

Host-neutral formulation: latents live in the "sigma space" of k-diffusion samplers, where a latent
at noise level sigma is ``x = x0 + sigma * eps`` (the DDPM latent is ``x / sqrt(1 + sigma^2)``). In
that space a DDIM step with eta 0 is an Euler step, in both directions:

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * eps                         (SpecRef Eq. 1)

The two conventions differ only in *where* eps is predicted:

* ``"current"``: at x_i with its own level sigma_i. SpecRef Eq. 1 as written, and what ComfyUI's
  FlipSigmas + euler computes at cfg 1.
* ``"next"``: the UNet sees the same DDPM latent x_i / sqrt(1 + sigma_i^2) but labelled with the next
  timestep sigma_{i+1}. diffusers' DDIMInverseScheduler and the official P2P / null-text / SpecRef
  code do this. It is our default: every edit step s then evaluates the UNet at exactly the timestep
  an inversion call used, so a reference bank has an entry for every edit step (with ``"current"``
  the first edit step, at sigma_max, has none).

A ``Denoiser`` is the host's model call in k-diffusion form: ``denoised = model(x, sigma)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Sequence

import torch

Convention = Literal["current", "next"]
CONVENTIONS: tuple[Convention, ...] = ("next", "current")
DEFAULT_CONVENTION: Convention = "next"
# sigma 0 cannot be a model input in sigma space (eps = (x - denoised) / sigma); FlipSigmas uses this.
ZERO_SIGMA_STAND_IN = 1e-4

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor], None]


def inversion_sigmas(sampling_sigmas: torch.Tensor, convention: Convention = DEFAULT_CONVENTION) -> torch.Tensor:
    """The ascending schedule that inverts a descending sampling schedule ``sigma_max .. 0``.

    With ``"current"`` the UNet is evaluated at the clean end, where sigma 0 cannot be used; it
    becomes ``ZERO_SIGMA_STAND_IN`` there (as ComfyUI's FlipSigmas does). ``"next"`` never
    evaluates it and keeps the exact 0 (alpha-bar 1, as DDIMInverseScheduler with set_alpha_to_one).
    """
    if sampling_sigmas.ndim != 1 or len(sampling_sigmas) < 3:
        raise ValueError("RealEdit: inversion needs a schedule of at least 2 steps (steps >= 2).")
    ascending = sampling_sigmas.flip(0).clone()
    if convention == "current" and ascending[0] == 0:
        ascending[0] = ZERO_SIGMA_STAND_IN
    return ascending


def model_input(x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], i: int,
                convention: Convention) -> tuple[torch.Tensor, float]:
    """What the UNet is given at inversion step i (x_i -> x_{i+1}): the input latent and its label.

    For ``"next"`` the latent is rescaled so that the host's input scaling (1 / sqrt(1 + sigma^2))
    at the *next* label still hands the UNet the DDPM latent of level sigma_i. Live reference
    features reuse this function, so they see exactly what the inversion saw. ``sigmas`` may be a
    tensor or a list of floats (the loop passes floats: no device sync per step).
    """
    if convention == "current":
        return x, float(sigmas[i])
    s_i, s_next = float(sigmas[i]), float(sigmas[i + 1])
    return x * math.sqrt((1 + s_next**2) / (1 + s_i**2)), s_next


def eps_from_denoised(x_in: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """k-diffusion's ``to_d``: the noise implied by a denoised prediction at level sigma."""
    return (x_in - denoised) / sigma


def invert(
    model: Denoiser,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    convention: Convention = DEFAULT_CONVENTION,
    callback: StepCallback | None = None,
) -> list[torch.Tensor]:
    """DDIM-invert ``x0`` along the ascending ``sigmas``; returns the trajectory x_0 .. x_N.

    ``callback(i, x_{i+1})`` runs after every step (progress, cancellation).
    """
    check_finite(x0, "latent")
    # The schedule as Python floats, read once: indexing a device tensor per step would sync the
    # device two or three times a step (the host's sampler never does), stalling its kernel queue.
    levels = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    trajectory = [x0]
    x = x0
    for i in range(len(levels) - 1):
        x_in, label = model_input(x, levels, i, convention)
        eps = eps_from_denoised(x_in, model(x_in, label), label)
        x = x + (levels[i + 1] - levels[i]) * eps  # Eq. 1 in sigma space
        trajectory.append(x)
        if callback is not None:
            callback(i, x)
    return trajectory


def trajectory_to(trajectory: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Move a trajectory (kept on the compute device while inverting) with one copy, not one per step.

    Per-latent ``.cpu()`` calls each block until the device is idle; one stacked copy blocks once.
    """
    stacked = torch.stack([t.detach() for t in trajectory]).to(device)  # (N + 1, batch, C, H, W)
    return tuple(stacked.unbind(0))


def steps_with_kv(window: range, convention: Convention) -> range:
    """The edit steps of ``window`` whose timestep an inversion call evaluated, so a reference has
    K/V for them: all under ``"next"``; all but step 0 (sigma_max) under ``"current"``."""
    if convention == "current":
        return range(max(window.start, 1), max(window.stop, 1))
    return window


def check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(
            f"RealEdit: the {name} contains NaN or inf values; re-encode the image (check the VAE and "
            "its dtype) before inverting."
        )


@dataclass(frozen=True)
class Inversion:
    """The result of a DDIM inversion: everything an editing sampler needs, and a fingerprint.

    ``trajectory[j]`` is the latent at ``sigmas[j]`` (ascending, j = 0 clean .. N noisiest), in the
    host model's internal latent space. Edit step s (descending) sits at level ``sigmas[N - s]``.
    """

    trajectory: tuple[torch.Tensor, ...]
    sigmas: torch.Tensor
    convention: Convention
    fingerprint: str
    # The steps the inverting node was given, where its schedule runs another number: ComfyUI's ddim_uniform
    # runs one more for a count that does not divide its 1000 timesteps evenly (31 for 30), as its KSampler
    # does. None: as many as it ran.
    asked_steps: int | None = field(default=None, kw_only=True)

    def __deepcopy__(self, memo: dict) -> Inversion:
        return self

    @property
    def steps(self) -> int:
        """The steps of its schedule (the edit runs as many)."""
        return len(self.sigmas) - 1

    @property
    def steps_asked(self) -> int:
        """The steps a node must be given to run this inversion's schedule: the inverting node's."""
        return self.steps if self.asked_steps is None else self.asked_steps

    def check_node_steps(self, steps: int, error: type[ValueError] = ValueError) -> None:
        """Refuse a node's ``steps`` input that differs from the inverting node's."""
        if steps != self.steps_asked:
            raise error(_steps_refusal("INVERSION", self.steps_asked, steps))

    @property
    def sampling_sigmas(self) -> torch.Tensor:
        """The descending schedule this inversion retraces (the clean end's stand-in back to 0)."""
        sigmas = self.sigmas.flip(0).clone()
        if float(sigmas[-1]) == ZERO_SIGMA_STAND_IN:
            sigmas[-1] = 0.0
        return sigmas

    @property
    def z_T(self) -> torch.Tensor:
        return self.trajectory[-1]

    def latent_for_edit_step(self, s: int) -> torch.Tensor:
        """The inverted latent at the level edit step s starts from (the pinned reconstruction)."""
        return self.trajectory[self.steps - s]

    def pinned_model_input(self, s: int) -> tuple[torch.Tensor, float]:
        """What the inversion fed the UNet at the timestep edit step s evaluates: (input, sigma).

        Live reference features run the reference through the edit step with exactly this input,
        so they reproduce the K/V a stored bank would hold for step s. Under ``"current"`` no inversion
        call used sigma_max (edit step 0): the reference row then gets z_T at sigma_max, the latent edit
        step 0 starts from, and no bank or live window includes step 0 (``steps_with_kv``).
        """
        if not 0 <= s < self.steps:
            raise ValueError(f"RealEdit: edit step {s} is outside the {self.steps} steps of this inversion.")
        if self.convention == "current" and s == 0:
            return self.z_T, float(self.sigmas[-1])
        i = self.steps - 1 - s if self.convention == "next" else self.steps - s
        return model_input(self.trajectory[i], self.sigmas, i, self.convention)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(batch, channels, height, width) of the inverted latent, in the model's latent space."""
        return tuple(self.z_T.shape)

    def row(self, index: int) -> Inversion:
        """The inversion of one image of a batched inversion (its own copy of the trajectory)."""
        if not 0 <= index < self.z_T.shape[0]:
            raise IndexError(f"RealEdit: row {index} of an inversion of {self.z_T.shape[0]} images.")
        return replace(self, trajectory=tuple(t[index : index + 1].clone() for t in self.trajectory))

    def check_compatible(self, fingerprint: str, steps: int, what: str = "INVERSION") -> None:
        """Refuse an inversion made with another model, schedule or step count."""
        check_made_with(what, self.fingerprint, self.steps, fingerprint, steps)


def _steps_refusal(what: str, made_steps: int, steps: int) -> str:
    """The message refusing a node whose ``steps`` differ from the ``made_steps`` its ``what`` was made with."""
    return (f"RealEdit: the {what} was made with {made_steps} steps but this node uses {steps}; "
            "set the same steps on both nodes (or re-run the inversion).")


def check_made_with(what: str, made_fingerprint: str, made_steps: int, fingerprint: str, steps: int) -> None:
    """The error an INVERSION or REF_FEATURES made with another step count or model gets."""
    if steps != made_steps:
        raise ValueError(_steps_refusal(what, made_steps, steps))
    if fingerprint != made_fingerprint:
        raise ValueError(
            f"RealEdit: the {what} was made with a different model than this node's: "
            f"{describe_model_difference(made_fingerprint, fingerprint)}. Connect the same MODEL (with the same "
            f"LoRAs) to both nodes, or re-run the node that made the {what}."
        )


def _fingerprint_parts(fingerprint: str) -> tuple[str, str, str]:
    """(family, weights, patches) of a host's model fingerprint ``family@weights/patches``."""
    family, _, rest = fingerprint.partition("@")
    weights, _, patches = rest.partition("/")
    return family, weights, patches


def describe_model_difference(made: str, now: str) -> str:
    """What differs between the model an input was made with and this one, in words a user knows (never the
    internal ids): the model family, the weights (another checkpoint, or the same file loaded again), or
    the weight patches on the same checkpoint (a LoRA added, removed or at another strength)."""
    (family_a, weights_a, patches_a), (family_b, weights_b, patches_b) = map(_fingerprint_parts, (made, now))
    if family_a != family_b:
        return f"another model family ({family_a} then, {family_b} now)"
    if weights_a != weights_b:
        return (f"other {family_b} weights (another checkpoint, or the same one loaded again since; a model loaded "
                "anew counts as another one)")
    if patches_a != patches_b:
        return (f"the same {family_b} checkpoint with other weight patches (a LoRA or other weight patch added, "
                "removed or at another strength)")
    return "other model settings"

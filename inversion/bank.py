"""The reference feature bank: self-attention K and V of the reference image, per layer and step.

SpecRef (Algorithm 1, stage 1) keeps the reference's self-attention keys and values from its DDIM
inversion and lets the edit path attend to them (Eq. 2). Storing every layer and step costs about
4.6 GB in fp32 at 512x512; the edit only reads the decoder's finest layers in steps 4-49 of 50, so
only that window is kept (METHODS.md), in fp16 by default. ``live`` mode stores nothing but the
reference's latent trajectory and recomputes K/V as one extra row of each edit step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..attention.hooks import AttentionContext, LayerInfo, layer_grid
from ..attention.settings import window_steps
from .ddim import Inversion, check_made_with

BankMode = Literal["stored", "live"]


@dataclass(frozen=True)
class LayerWindow:
    """Which attention layers, by position and resolution rather than list index.

    ``finest`` counts the model's attention resolutions from the finest: 2 selects the 64x64 and
    32x32 layers of SD1.x at 512 px (layers 10-15 of the decoder), and the same two finest levels
    on SD2.x and SDXL.
    """

    stage: Literal["down", "mid", "up", "any"] = "up"
    finest: int = 2

    def select(self, layers: list[LayerInfo]) -> list[int]:
        levels = sorted({layer.downscale for layer in layers})[: max(self.finest, 0)]
        return [
            layer.index
            for layer in layers
            if (self.stage == "any" or layer.stage == self.stage) and layer.downscale in levels
        ]


@dataclass(frozen=True)
class StepWindow:
    """Edit steps ``int(start * N) .. int(end * N) - 1`` (P2P-style fractions of the steps)."""

    start: float = 0.08  # step 4 of 50
    end: float = 1.0

    def select(self, total_steps: int) -> range:
        return range(*window_steps((self.start, self.end), total_steps))


@dataclass(frozen=True)
class BankSettings:
    """What a reference bank keeps; one object for the ComfyUI nodes and both hosts' Python API."""

    layers: LayerWindow = field(default_factory=LayerWindow)
    steps: StepWindow = field(default_factory=StepWindow)
    dtype: torch.dtype = torch.float16
    device: torch.device | None = None  # None: where the K/V were computed
    mode: BankMode = "stored"


def select_layers(window: LayerWindow, layers: list[LayerInfo]) -> list[int]:
    """The window's layer indices on a model; refuses a window that selects none (names the fix)."""
    chosen = window.select(layers)
    if not chosen:
        levels = sorted({layer.downscale for layer in layers})
        stages = sorted({layer.stage for layer in layers})
        raise ValueError(
            f"RealEdit: the layer window (stage '{window.stage}', {window.finest} finest resolutions) selects no "
            f"attention layer of this model (its attention stages: {stages}, downscales: {levels}); use stage "
            "'up' (decoder) or 'any' and finest_resolutions >= 1."
        )
    return chosen


class ReferenceBank:
    """K/V per (layer index, edit step), each (tokens, heads*dim) for the one reference row.

    Edit step s reads what was saved at the timestep edit step s evaluates (see
    ``inversion.ddim``: label index ``N - s`` of the ascending schedule).
    """

    def __init__(self, layers: list[int], steps: range, total_steps: int, dtype: torch.dtype,
                 device: torch.device | None) -> None:
        self.layers, self.steps, self.total_steps = frozenset(layers), steps, total_steps
        self.dtype, self.device = dtype, device
        self.entries: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __deepcopy__(self, memo: dict) -> ReferenceBank:
        return self  # never copied by ModelPatcher.clone()

    def wants(self, layer: int, step: int) -> bool:
        return layer in self.layers and step in self.steps

    def put(self, layer: int, step: int, k: torch.Tensor, v: torch.Tensor) -> None:
        device = self.device or k.device
        self.entries[(layer, step)] = (k.to(device, self.dtype), v.to(device, self.dtype))

    def get(self, layer: int, step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.entries.get((layer, step))

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.entries.values())

    def describe(self) -> str:
        layers = sorted(self.layers)
        steps = f"{self.steps.start}-{self.steps.stop - 1}" if len(self.steps) else "none"
        return (f"RealEdit reference bank: {len(self.entries)} entries, layers {layers}, edit steps {steps} "
                f"of {self.total_steps}, {self.dtype}, {self.nbytes / 2**20:.1f} MiB")


class BankRecorder:
    """Attention hook used while inverting the reference: saves its self-attention K/V, declines.

    ``slot`` is the reference's row slot in the batch (0 when inverted alone; 1 when inverted in one
    batch after the source). Only conditional rows are read: with guidance 1 they are the only rows.
    """

    def __init__(self, bank: ReferenceBank, slot: int = 0) -> None:
        self.bank, self.slot = bank, slot

    def __deepcopy__(self, memo: dict) -> BankRecorder:
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> None:
        if ctx.kind != "self" or ctx.step is None or ctx.total_steps is None:
            return None
        step = ctx.total_steps - ctx.step  # label index j of the ascending schedule -> edit step N - j
        if self.bank.wants(ctx.layer.index, step):
            rows = ctx.rows.rows(kind="cond", slot=self.slot)
            if rows:
                self.bank.put(ctx.layer.index, step, k[rows[0]], v[rows[0]])
        return None


def bank_nbytes(layers: list[LayerInfo], grid_of_latent: tuple[int, int], width_of: dict[int, int],
                steps: int, bytes_per_value: int) -> int:
    """Bytes a bank of K and V takes, computed from shapes (for benchmarks on big models)."""
    total = 0
    for layer in layers:
        h, w = layer_grid(grid_of_latent, layer.downscale)
        total += 2 * h * w * width_of[layer.index] * steps * bytes_per_value
    return total


@dataclass(frozen=True)
class ReferenceFeatures:
    """What the SR-attention needs from the reference: a stored bank, or (live) its trajectory.

    ``inversion`` is the reference's DDIM inversion (its trajectory is kept in both modes: a few MB);
    ``conditioning`` the prompt it was inverted with (live mode runs it again as an extra row; on the
    diffusers host the embedding tensor, with SDXL's ``added_cond`` beside it).

    ``fingerprint``, ``total_steps`` and ``latent_shape`` (the reference latent's (1, C, H, W) in the
    model's latent space) say what the features were made with: the inversion's.
    An edit sampler calls :meth:`check_compatible` before using them.
    """

    mode: BankMode
    inversion: Inversion
    bank: ReferenceBank | None
    layers: tuple[int, ...]
    steps: range
    conditioning: object = None
    added_cond: Mapping[str, torch.Tensor] | None = None

    def __deepcopy__(self, memo: dict) -> ReferenceFeatures:
        return self

    @property
    def fingerprint(self) -> str:
        return self.inversion.fingerprint

    @property
    def total_steps(self) -> int:
        return self.inversion.steps

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.inversion.latent_shape

    @property
    def sigmas(self) -> torch.Tensor:
        """The ascending schedule the reference was inverted along."""
        return self.inversion.sigmas

    @property
    def nbytes(self) -> int:
        """What the features hold: the bank's K/V (stored) or the latent trajectory (live)."""
        if self.bank is not None:
            return self.bank.nbytes
        return sum(t.numel() * t.element_size() for t in self.inversion.trajectory)

    def check_compatible(self, fingerprint: str, steps: int, source: Inversion | None = None,
                         what: str = "REF_FEATURES") -> None:
        """Refuse features made with another model (or weight patches) or step count.

        With the ``source`` INVERSION the edit runs on, also refuse another schedule, another latent
        channel count, and (live mode, where the reference is one more row of the edit's batch) another
        latent size. Stored features may come from a reference of another size (SR-attention attends to
        the reference's own token grid).
        """
        check_made_with(what, self.fingerprint, self.total_steps, fingerprint, steps)
        if source is not None:
            check_reference(self.inversion, source, what, same_size=self.mode == "live")

    def describe(self) -> str:
        size = f"reference latent {self.latent_shape[-2]}x{self.latent_shape[-1]}, {self.total_steps} steps"
        if self.bank is not None:
            return f"{self.bank.describe()}; {size}"
        latents = len(self.inversion.trajectory)
        return (f"RealEdit reference (live): trajectory of {latents} latents, {self.nbytes / 2**20:.2f} MiB; "
                f"K/V recomputed each edit step for layers {list(self.layers)}; {size}")


def check_reference(reference: Inversion, source: Inversion, what: str, *, same_size: bool,
                    error: type[ValueError] = ValueError) -> None:
    """Refuse a reference inversion (``what`` in the messages) for an edit of the ``source`` INVERSION: another
    step count, model (or weight patches), schedule or latent channel count, and with ``same_size`` (live
    features: the reference is one more row of the edit's batch) another latent size."""
    if source.steps != reference.steps:
        raise error(f"RealEdit: the {what} was made with {reference.steps} steps but the source INVERSION "
                    f"with {source.steps}; invert both with the same steps.")
    if source.fingerprint != reference.fingerprint:
        raise error(f"RealEdit: the {what} and the source INVERSION were made with different models or "
                    "weight patches; make both with the same MODEL.")
    if source.sigmas.shape != reference.sigmas.shape or not torch.allclose(source.sigmas.cpu(),
                                                                           reference.sigmas.cpu()):
        raise error(f"RealEdit: the {what} and the source INVERSION use different schedules; use the same "
                    "scheduler on the inversion and reference nodes.")
    src, ref = source.latent_shape, reference.latent_shape
    if src[1] != ref[1]:
        raise error(f"RealEdit: the {what} come from a latent with {ref[1]} channels but the source "
                    f"INVERSION's has {src[1]}; encode both photos with the same VAE.")
    if same_size and src[-2:] != ref[-2:]:
        raise error(
            f"RealEdit: live {what} need a reference latent of the source's size ({src[-2]}x{src[-1]}), got "
            f"{ref[-2]}x{ref[-1]}; resize the reference photo to the source's size or use mode 'stored'.")

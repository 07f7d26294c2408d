"""The core's view of a UNet: one hook per attention call, with a context saying where it is.

Host adapters (``hosts/comfy.py``, ``hosts/diffusers.py``) call an :class:`AttentionHook` from every
self- and cross-attention layer with the *projected* q, k, v (``(batch, tokens, heads * dim)``, heads
not yet split) and an :class:`AttentionContext`. The hook returns the attention output in the same
layout (before the output projection), or ``None`` to decline, in which case the host's own attention
runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, Sequence

import torch

from .math import attention

AttentionKind = Literal["self", "cross"]
RowKind = Literal["cond", "uncond"]
COND: RowKind = "cond"
UNCOND: RowKind = "uncond"


@dataclass(frozen=True)
class LayerInfo:
    """A transformer block of the UNet, in forward call order.

    ``index`` counts transformer blocks (one self- and one cross-attention each) in the order the
    UNet runs them: on SD1.x, 0-5 encoder, 6 middle, 7-15 decoder (METHODS.md numbering).
    ``stage`` is "down", "mid" or "up"; ``downscale`` the factor between the latent and this
    layer's token grid (1, 2, 4, 8); ``host_key`` the host's own name for the block.
    """

    index: int
    stage: Literal["down", "mid", "up"]
    downscale: int
    host_key: tuple


@dataclass(frozen=True)
class RowInfo:
    """What each batch row of one attention call is.

    ``kind[i]`` is "cond" or "uncond"; ``slot[i]`` is the row's prompt slot: its index inside its
    cond/uncond chunk, i.e. which latent of the user's batch (and so which prompt of a multi-prompt
    edit) the row belongs to.
    """

    kind: tuple[RowKind, ...]
    slot: tuple[int, ...]

    @staticmethod
    def from_chunks(chunk_kinds: Sequence[RowKind], rows_per_chunk: int) -> RowInfo:
        """Rows of a batch made of equal chunks, each all-cond or all-uncond (ComfyUI's layout)."""
        kind = tuple(k for k in chunk_kinds for _ in range(rows_per_chunk))
        slot = tuple(s for _ in chunk_kinds for s in range(rows_per_chunk))
        return RowInfo(kind, slot)

    def rows(self, kind: RowKind | None = None, slot: int | None = None) -> list[int]:
        """Indices of the rows matching ``kind`` and/or ``slot``."""
        return [
            i
            for i, (k, s) in enumerate(zip(self.kind, self.slot))
            if (kind is None or k == kind) and (slot is None or s == slot)
        ]

    @property
    def cond_rows(self) -> list[int]:
        return self.rows(COND)

    @property
    def uncond_rows(self) -> list[int]:
        return self.rows(UNCOND)

    def __len__(self) -> int:
        return len(self.kind)


@dataclass(frozen=True)
class AttentionContext:
    """Where an attention call happens and what its rows are."""

    layer: LayerInfo
    kind: AttentionKind
    grid: tuple[int, int]  # token grid (height, width) of the queries
    heads: int
    dim_head: int
    rows: RowInfo
    step: int | None  # index of the current sampling step, None when unknown (e.g. outside sampling)
    total_steps: int | None
    # What would run without this pack; hooks call it for the "plain" part of their output. ComfyUI:
    # another pack's replace patch if one was there (IPAdapter-style), else ComfyUI's backend.
    # diffusers: the UNet's own SDPA (other processors have no q/k/v-level form).
    host_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = field(
        default=None, compare=False, repr=False
    )

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def schedule_index(value: float, schedule: Sequence[float]) -> int | None:
    """Index of the schedule entry a model call at noise level (or timestep) ``value`` belongs to.

    An exact (rtol 1e-4) match with an entry gives that entry's index; a value between two entries
    (the intermediate evaluations of heun or dpmpp_2s) belongs to the interval that contains it, in
    either direction (sampling or inversion). None when it lies outside the schedule.
    """
    for i, s in enumerate(schedule):
        if abs(s - value) <= 1e-4 * max(abs(s), 1e-8):
            return i
    for i in range(len(schedule) - 1):
        lo, hi = sorted(schedule[i : i + 2])
        if lo <= value <= hi:
            return i
    return None


class AttentionHook(Protocol):
    """Called for every attention call; returns ``(batch, q_tokens, heads*dim)`` or ``None``.

    A hook may also define ``begin_run()``: hosts call it when a sampling run starts (ComfyUI: an
    outer-sample wrapper; diffusers: on install, or when the caller says so), so per-run state such
    as running-mean maps is reset and a re-queued graph repeats itself exactly. On ComfyUI a hook may
    define ``begin_sampling(sigmas)`` too, called with the run's schedule at the same moment. Calls that
    carry an attention mask of the host's own are not routed to hooks.
    """

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor | None: ...


class HookShapeError(RuntimeError):
    """A hook returned something the host cannot use in place of attention."""


def check_hook_output(out: object, q: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """Validate a hook's return value, naming the layer when it is wrong."""
    expected = (q.shape[0], q.shape[1], v.shape[2])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise HookShapeError(
            f"RealEdit: the attention hook on layer {ctx.layer.index} ({ctx.kind}-attention, "
            f"{ctx.layer.stage} block {ctx.layer.host_key}, {ctx.grid[0]}x{ctx.grid[1]} tokens) returned "
            f"{got}; it must return a tensor of shape {expected} (batch, tokens, heads*dim) or None."
        )
    return out


def host_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """The host's own attention output for the call (the core's SDPA when the host gives none)."""
    if ctx.host_attention is not None:
        return ctx.host_attention(q, k, v)
    return attention(q, k, v, ctx.heads)


def layer_grid(latent_hw: tuple[int, int], downscale: int) -> tuple[int, int]:
    """Token grid of a layer that sees a ``latent_hw`` latent downsampled ``downscale`` times.

    Stride-2 convolutions round up, so halve with ceiling as many times as needed.
    """
    h, w = latent_hw
    factor = 1
    while factor < downscale:
        h, w, factor = (h + 1) // 2, (w + 1) // 2, factor * 2
    return h, w


def grid_for(latent_hw: tuple[int, int], downscale: int, tokens: int) -> tuple[int, int]:
    """Token grid of a layer that sees the latent downsampled ``downscale`` times (:func:`layer_grid`).

    Falls back to a square/aspect-ratio guess when the count does not match (e.g. a host that resized).
    """
    h, w = layer_grid(latent_hw, downscale)
    if h * w == tokens:
        return h, w
    ratio = latent_hw[1] / max(latent_hw[0], 1)
    h = max(1, round((tokens / max(ratio, 1e-6)) ** 0.5))
    return (h, tokens // h) if tokens % h == 0 else (tokens, 1)


class ChainHook:
    """Run hooks in order; the first one that returns an output wins (recorders that always decline
    go first). ``begin_run`` reaches every member that has one."""

    def __init__(self, *hooks: AttentionHook) -> None:
        self.hooks = hooks

    def __deepcopy__(self, memo: dict) -> ChainHook:
        return self

    def begin_run(self) -> None:
        for hook in self.hooks:
            begin_run = getattr(hook, "begin_run", None)
            if begin_run is not None:
                begin_run()

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor | None:
        for hook in self.hooks:
            out = hook(q, k, v, ctx)
            if out is not None:
                return out
        return None


# Which input a (row kind, prompt slot) gets at a step; None keeps the row's own. Hosts use it for text
# contexts (BARET, null-text inversion) and for StyleDiffusion's value inputs.
RowSchedule = Callable[[str, int, "int | None"], "torch.Tensor | None"]


def substitute_rows(base: torch.Tensor, rows: RowInfo, step: int | None, schedule: RowSchedule) -> torch.Tensor:
    """``base`` ((batch, tokens, width), a cross-attention context or value input) with the rows ``schedule``
    names replaced; ``base`` itself (the same object) when it names none. A (1, tokens, width) replacement is
    repeated to the batch's token count (:func:`fit_tokens`)."""
    out = None
    for i, (kind, slot) in enumerate(zip(rows.kind, rows.slot)):
        embedding = schedule(kind, slot, step)
        if embedding is None:
            continue
        if out is None:
            out = base.clone()
        out[i] = fit_tokens(embedding, base.shape[1:]).to(base)
    return base if out is None else out


def fit_tokens(embedding: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A (1, tokens, width) embedding repeated to the batch's context length (ComfyUI repeats contexts
    to a common multiple of their lengths to batch them; attention is unchanged by the repetition)."""
    tokens, width = embedding.shape[-2:]
    if width != shape[1] or shape[0] % tokens:
        raise ValueError(f"RealEdit: a scheduled text embedding of {tokens} tokens x {width} cannot stand in for "
                         f"a context of {shape[0]} x {shape[1]}; encode every prompt with the same CLIP.")
    return embedding.reshape(tokens, width).repeat(shape[0] // tokens, 1)

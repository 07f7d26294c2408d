"""Cross-attention maps: per-token probabilities recorded from chosen layers, as a running mean.

P2P (Hertz et al. 2022) reads a word's region from the 16x16 cross-attention probabilities averaged
over heads, layers and steps; SpecRef's target mask M_t (Eq. 3) and P2P's LocalBlend (SpecRef Eq. 5)
both come from such maps. Host backends never return probabilities, so the store records them from
the chunks :func:`~.math.map_attention_chunks` hands to its ``fn`` and never holds a whole score
matrix: what it keeps is one (query tokens, 77) sum per recorded row. :class:`MapRecorder` records
without changing any output (RealEdit Attention Map Recorder), and :func:`word_mask` reads a word's map
as a mask (RealEdit Word Attention Map).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from .hooks import AttentionContext, RowKind
from .math import DEFAULT_MAX_ELEMENTS, attention_probs, map_attention_chunks, query_chunk_size
from .settings import CLIP_CHUNK, StepFraction, in_window

ProbsFn = Callable[[torch.Tensor, slice], torch.Tensor]
Key = tuple[RowKind, int]  # (row kind, prompt slot)


class MapStoreError(RuntimeError):
    """Maps that cannot be combined (different grids) or that were never recorded."""


class CrossAttentionStore:
    """Running mean of head-averaged cross-attention probabilities per (row kind, slot).

    Records the cross-attention calls of layers whose ``downscale`` is in ``downscales`` (None: every
    layer), for rows whose kind is in ``kinds`` (and slot in ``slots``), optionally only inside the step
    window ``steps``. Every recorded call (one layer at one step) counts once in the mean. Key lengths
    that are multiples of 77 (ComfyUI repeats a 77-token context to batch it with a longer one) are
    folded back onto 77 columns by summing the repeats.

    A step index lower than the last recorded one starts a new run (the same patched model queued
    again); call :meth:`reset` to start one explicitly.
    """

    def __init__(
        self,
        downscales: Collection[int] | None = (4,),
        kinds: Collection[RowKind] = ("cond",),
        slots: Collection[int] | None = None,
        steps: StepFraction | None = None,
        *,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        self.downscales, self.kinds, self.slots = downscales, kinds, slots
        self.steps, self.max_elements = steps, max_elements
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded (start of a run)."""
        self._sum: dict[Key, torch.Tensor] = {}  # (q_tokens, key_tokens) fp32 per row
        self._count: dict[Key, int] = {}
        self.grid: tuple[int, int] | None = None
        self._last_step: int | None = None

    # -- recording -------------------------------------------------------------------------------
    def _layer_selected(self, ctx: AttentionContext) -> bool:
        return self.downscales is None or ctx.layer.downscale in self.downscales

    def _row_keys(self, ctx: AttentionContext) -> list[tuple[int, Key]]:
        return [
            (i, (kind, slot))
            for i, (kind, slot) in enumerate(zip(ctx.rows.kind, ctx.rows.slot))
            if kind in self.kinds and (self.slots is None or slot in self.slots)
        ]

    def _wanted_keys(self, ctx: AttentionContext) -> list[tuple[int, Key]]:
        """The (batch row, key) pairs this call records, [] when the store does not record it."""
        if ctx.kind != "cross" or not self._layer_selected(ctx):
            return []
        if self.steps is not None and not in_window(ctx.step, self.steps, ctx.total_steps):
            return []
        return self._row_keys(ctx)

    def wants(self, ctx: AttentionContext) -> bool:
        """Whether this call is one the store records."""
        return bool(self._wanted_keys(ctx))

    def _start_call(self, ctx: AttentionContext) -> None:
        if ctx.step is not None and self._last_step is not None and ctx.step < self._last_step:
            self.reset()
        self._last_step = ctx.step if ctx.step is not None else self._last_step
        if self.grid is None:
            self.grid = ctx.grid
        elif self.grid != ctx.grid:
            raise MapStoreError(
                f"RealEdit: cross-attention maps of {self.grid[0]}x{self.grid[1]} and "
                f"{ctx.grid[0]}x{ctx.grid[1]} tokens cannot be averaged (layer {ctx.layer.index}); select "
                "layers of one resolution, or reset the store when the image size changes."
            )

    def _begin_call(self, ctx: AttentionContext) -> list[tuple[int, Key]]:
        """Count this call once for each recorded row; returns those rows ([]: not recorded)."""
        keys = self._wanted_keys(ctx)
        if not keys:
            return keys
        self._start_call(ctx)
        for _, key in keys:
            self._count[key] = self._count.get(key, 0) + 1
        return keys

    def _add(self, keys: list[tuple[int, Key]], probs: torch.Tensor, rows: slice, q_tokens: int) -> None:
        """Add the recorded rows' probabilities (len(keys), heads, chunk, k) to the sums' query ``rows``."""
        chunk = self._fold(probs.float().mean(dim=1))  # (rows, chunk, tokens)
        for j, (_, key) in enumerate(keys):
            self._buffer(key, q_tokens, chunk)[rows] += chunk[j]

    def recorder(self, ctx: AttentionContext) -> ProbsFn | None:
        """A ``fn(probs, query_slice)`` for :func:`map_attention_chunks` recording this call, or None.

        Creating it counts the call once; the chunks then fill disjoint query rows of the sums.
        """
        keys = self._begin_call(ctx)
        if not keys:
            return None
        index = [i for i, _ in keys]

        def record(probs: torch.Tensor, rows: slice) -> torch.Tensor:  # probs: (batch, heads, chunk, k)
            self._add(keys, probs[index], rows, ctx.tokens)
            return probs

        return record

    def _fold(self, maps: torch.Tensor) -> torch.Tensor:
        """(rows, q, m*77) -> (rows, q, 77) by summing repeated context chunks."""
        n, q, k = maps.shape
        if k > CLIP_CHUNK and k % CLIP_CHUNK == 0:
            return maps.view(n, q, k // CLIP_CHUNK, CLIP_CHUNK).sum(dim=2)
        return maps

    def _buffer(self, key: Key, q_tokens: int, chunk: torch.Tensor) -> torch.Tensor:
        buf = self._sum.get(key)
        if buf is None:
            buf = self._sum[key] = torch.zeros(q_tokens, chunk.shape[-1], device=chunk.device)
        elif buf.shape[-1] != chunk.shape[-1]:
            raise MapStoreError(f"RealEdit: rows {key} gave {chunk.shape[-1]} key tokens after "
                                f"{buf.shape[-1]} before; the prompt changed during a run.")
        return buf

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        """As an :class:`~.hooks.AttentionHook`: record the calls it wants, decline the others."""
        fn = self.recorder(ctx)
        if fn is None:
            return None
        return map_attention_chunks(q, k, v, ctx.heads, fn, max_elements=self.max_elements)

    def observe(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> bool:
        """Record this call's probabilities without computing its output; False when not wanted.

        For hooks that must leave the host's attention untouched (they decline afterwards, so the host's
        own kernel computes the output bit for bit): the probabilities are computed a second time here,
        chunked over queries, which costs little in the small map layers (16x16 x 77 keys at 512 px).
        """
        keys = self._begin_call(ctx)
        if not keys:
            return False
        nq = q.shape[1]
        # chunks as for the whole batch (the same query chunks, so the same sums, as recording its output)
        step = query_chunk_size(q.shape[0], ctx.heads, nq, k.shape[1], self.max_elements)
        if len(keys) < q.shape[0]:  # only the recorded rows' probabilities
            index = torch.tensor([i for i, _ in keys], device=q.device)
            q, k = q.index_select(0, index), k.index_select(0, index)
        for start in range(0, nq, step):
            rows = slice(start, min(nq, start + step))
            self._add(keys, attention_probs(q[:, rows], k, ctx.heads), rows, ctx.tokens)  # (rows, heads, chunk, k)
        return True

    # -- reading ---------------------------------------------------------------------------------
    def recorded_slots(self, kind: RowKind = "cond") -> list[int]:
        """Slots of ``kind`` with at least one recorded call, sorted."""
        return sorted(slot for (k, slot), n in self._count.items() if k == kind and n and (k, slot) in self._sum)

    def count(self, kind: RowKind, slot: int) -> int:
        """How many calls were averaged into the map of this row."""
        return self._count.get((kind, slot), 0)

    def maps(self, kind: RowKind = "cond", slots: Sequence[int] | None = None) -> torch.Tensor:
        """Mean maps as (slots, tokens, h, w), fp32, on the device they were recorded on."""
        slots = self.recorded_slots(kind) if slots is None else list(slots)
        missing = [s for s in slots if (kind, s) not in self._sum]
        if not slots or missing:
            raise MapStoreError(f"RealEdit: no cross-attention maps recorded for {kind} rows {missing or ''}"
                                "; the store's layers or steps never ran.")
        assert self.grid is not None
        h, w = self.grid
        means = [self._sum[(kind, s)] / self._count[(kind, s)] for s in slots]  # (q, tokens) each
        return torch.stack([m.t().reshape(m.shape[1], h, w) for m in means])

    def word_map(self, slot: int, positions: Sequence[int], kind: RowKind = "cond") -> torch.Tensor:
        """Min-max normalised (h, w) map of the token ``positions`` of one slot (see :func:`word_map`)."""
        return word_map(self.maps(kind, [slot])[0], positions)


def token_sum(maps: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """Sum of the maps of ``positions``: (tokens, h, w) -> (h, w)."""
    if not positions:
        raise ValueError("RealEdit: no token positions given for the word map.")
    bad = [p for p in positions if not 0 <= p < maps.shape[0]]
    if bad:
        raise ValueError(f"RealEdit: token positions {bad} outside the {maps.shape[0]} recorded key tokens.")
    return maps[list(positions)].sum(0)  # (n, h, w) -> (h, w)


def normalize_minmax(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(x - min) / (max - min); all zeros when x is flat (a word with no attention anywhere)."""
    lo, hi = x.min(), x.max()
    if float(hi - lo) <= eps:
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def normalize_max(x: torch.Tensor) -> torch.Tensor:
    """x / max(x); all zeros when the max is not positive (a word with no attention anywhere)."""
    peak = x.max()
    return x / peak if float(peak) > 0 else torch.zeros_like(x)


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, c, h, w) maps resized bilinearly to ``size`` (H, W), antialiased when either side shrinks."""
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def word_map(maps: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """A word's attention map, min-max normalised to [0, 1]: (tokens, h, w) -> (h, w).

    This is SpecRef's M_t before resizing and thresholding (Eq. 3). A flat map gives all zeros, which
    callers should treat as "the word drew no attention".
    """
    return normalize_minmax(token_sum(maps, positions))


class MapRecorder:
    """An :class:`~.hooks.AttentionHook` that records cross-attention maps and always declines.

    The host's own attention computes every output, so a model with only this hook samples exactly as
    without it; ``begin_run`` (called by the host when a sampling run starts) resets the store, so the
    maps are the running mean of the last run.
    """

    def __init__(self, store: CrossAttentionStore) -> None:
        self.store = store

    def __deepcopy__(self, memo: dict) -> MapRecorder:
        return self

    def begin_run(self) -> None:
        self.store.reset()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> None:
        self.store.observe(q, k, ctx)
        return None


Normalize = Literal["minmax", "max", "none"]


def word_mask(maps: torch.Tensor, positions: Sequence[int], size: tuple[int, int], *,
              normalize: Normalize = "minmax", threshold: float | None = None) -> torch.Tensor:
    """A word's attention map as a mask: (slots, tokens, h, w) maps -> (slots, H, W) float.

    Per slot: the sum of the maps of the token ``positions`` (P2P's word map), normalised
    (``minmax``: to [0, 1] as SpecRef's M_t; ``max``: divided by the peak, as P2P's LocalBlend; ``none``:
    raw probabilities), resized bilinearly to ``size`` (antialiased when shrinking), then, when
    ``threshold`` is given, 1 where the value exceeds it and 0 elsewhere. A flat map (the word drew no
    attention) gives zeros under ``minmax`` and ``max``.
    """
    out = []
    for slot_maps in maps:
        m = token_sum(slot_maps, positions).float()  # (h, w)
        if normalize == "minmax":
            m = normalize_minmax(m)
        elif normalize == "max":
            m = normalize_max(m)
        elif normalize != "none":
            raise ValueError(f"RealEdit: normalize must be 'minmax', 'max' or 'none', got {normalize!r}.")
        out.append(m)
    resized = resize_bilinear(torch.stack(out)[:, None], size)[:, 0]  # (slots, 1, h, w) -> (slots, H, W)
    if threshold is not None:
        return (resized > threshold).float()
    return resized

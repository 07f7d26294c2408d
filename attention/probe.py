"""A pass-through hook that records what it saw: proves the path, and helps debug other packs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from .hooks import AttentionContext


@dataclass(frozen=True)
class ProbeRecord:
    layer: int
    stage: str
    kind: str
    grid: tuple[int, int]
    heads: int
    dim_head: int
    rows: tuple[str, ...]
    slots: tuple[int, ...]
    step: int | None
    total_steps: int | None


class ProbeHook:
    """Records one :class:`ProbeRecord` per attention call and always declines.

    ``begin_run`` (called by the host adapter when a sampling run starts) clears the records, so a
    re-queued graph reports only its own run.
    """

    def __init__(self) -> None:
        self.records: list[ProbeRecord] = []

    def __deepcopy__(self, memo: dict) -> ProbeHook:
        return self

    def begin_run(self) -> None:
        self.records.clear()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> None:
        self.records.append(
            ProbeRecord(
                ctx.layer.index, ctx.layer.stage, ctx.kind, ctx.grid, ctx.heads, ctx.dim_head,
                ctx.rows.kind, ctx.rows.slot, ctx.step, ctx.total_steps,
            )
        )
        return None

    def summary(self) -> str:
        """A human-readable table: one line per layer, then the steps and row layouts seen."""
        if not self.records:
            return "RealEdit probe: no attention calls recorded (was the probed MODEL used by a sampler?)"
        layers: dict[int, ProbeRecord] = {}
        calls: Counter[tuple[int, str]] = Counter()
        for r in self.records:
            layers.setdefault(r.layer, r)
            calls[(r.layer, r.kind)] += 1
        steps = sorted({r.step for r in self.records if r.step is not None})
        totals = sorted({r.total_steps for r in self.records if r.total_steps is not None})
        layouts = Counter(",".join(r.rows) for r in self.records if r.kind == "self")
        lines = [f"RealEdit probe: {len(self.records)} attention calls in {len(layers)} layers"]
        for index, r in sorted(layers.items()):
            lines.append(
                f"  layer {index:2d} {r.stage:4s} {r.grid[0]}x{r.grid[1]} tokens, {r.heads} heads x {r.dim_head}"
                f" | self calls {calls[(index, 'self')]}, cross calls {calls[(index, 'cross')]}"
            )
        lines.append(f"steps seen: {steps} of {totals}")
        lines.append("row layouts (per self-attention call): "
                     + "; ".join(f"[{k}] x{n}" for k, n in layouts.most_common()))
        return "\n".join(lines)

"""Learning-rate schedule and step plans shared by the world's training loops (plain PyTorch)."""

from __future__ import annotations

import math
import time
from typing import Callable


def cosine_lr(step: int, steps: int, peak: float, warmup: int, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``peak`` to ``floor * peak``.

    During the warm-up the value does not depend on ``steps``, so :class:`StepPlan` may shorten a run
    while it is still warming up without changing any step already taken."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay_at(step: int, peak: float, warmup: bool = True) -> float:
    """The EMA decay for the update after ``step`` (0-based): ``min(peak, (1 + step) / (10 + step))`` with
    ``warmup``, as diffusers' ``EMAModel`` does by default, else ``peak``.

    Without the warm-up a short run keeps ``peak ** steps`` of the random initial weights in the average
    (9% after 2 400 steps at 0.999): the world's CPU checkpoints of session 7 generated noisy blobs, and
    removing that share alone tripled their read-back."""
    return min(peak, (1 + step) / (10 + step)) if warmup else peak


class StepPlan:
    """The number of steps of one training run: ``steps``, or fewer when ``seconds`` is given and the
    run would not fit in it (a GPU lease is short).

    The rate is timed over steps ``probe`` = ``[first, last)`` (after the first ones, which pay for
    CUDA's start-up; inside the warm-up, so no learning rate already used changes), and ``total`` is
    fixed from then on: it is what the stage records. Should the run still overrun (other processes
    started sharing the GPU after the probe), it stops at 1.25 x ``seconds`` whatever the plan."""

    def __init__(self, steps: int, seconds: float | None = None, probe: tuple[int, int] = (5, 35)) -> None:
        self.total, self.seconds, self.probe = steps, seconds, probe
        self._started = time.perf_counter()
        self._probe_start = 0.0

    def after(self, step: int, synchronise: Callable[[], None] = lambda: None) -> None:
        """Call after each step (0-based) finishes."""
        if self.seconds is None:
            return
        first, last = self.probe
        if step + 1 == first:
            synchronise()
            self._probe_start = time.perf_counter()
        elif step + 1 == last:
            synchronise()
            rate = (time.perf_counter() - self._probe_start) / (last - first)
            self.total = max(step + 1, min(self.total, int(self.seconds / rate)))
        elif step % 100 == 0 and time.perf_counter() - self._started > 1.25 * self.seconds:
            self.total = step + 1

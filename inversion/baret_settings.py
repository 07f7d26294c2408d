"""BARET defaults in one place (papers/baret.txt; our reading of its open points in shared METHODS.md).

Nodes read their default values *and* the tooltip text saying where each value comes from from here,
so a default changes in exactly one line: ``origin("ttis_lr")`` returns that text. The null-text
inversion defaults (Mokady et al. 2023, the baseline BARET compares with) live here too: the two
share one optimisation loop (:mod:`.embedding_opt`).

Step windows are fractions of the sampling steps counted from the first denoising step, P2P style
(``int(frac * N)`` steps), as in :mod:`realedit.attention.settings`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..attention.settings import check_unit, field_origin
from ..attention.settings import with_origin as _d


@dataclass(frozen=True)
class BaretSettings:
    """Every BARET (and null-text baseline) default, with its origin in the field metadata."""

    # Sec. 4.1 "Implementations": sampling.
    steps: int = _d(50, "BARET Sec. 4.1: DDIM sampling with 50 steps on SD v1.5")
    cfg: float = _d(7.5, "BARET Sec. 4.1: guidance scale 7.5 (also the CFG of the TTIS denoising step, Eq. 1-2)")
    inversion_guidance: float = _d(1.0, "METHODS.md: DDIM inversion with the target prompt, no CFG")
    # Sec. 3.1 TTIS (Eq. 1-2, Algorithm 1) and Sec. 4.1.
    ttis_iterations: int = _d(5, "BARET Sec. 4.1: 5 tuning iterations per step (250 in total over 50 steps)")
    ttis_lr: float = _d(1e-3, "BARET Sec. 4.1: Adam, learning rate 0.001 (constant)")
    early_stop_eps: float = _d(
        1e-5, "BARET Sec. 4.1 'progressive loss value' = null-text inversion's early stop: loss < eps + t * delta"
    )
    early_stop_delta: float = _d(
        2e-5, "null-text inversion's threshold growth per denoising step (BARET: low early, raised later)"
    )
    # Null-text inversion (Mokady et al. 2023; official code null_optimization).
    null_text_iterations: int = _d(10, "null-text inversion: num_inner_steps = 10")
    null_text_lr: float = _d(1e-2, "null-text inversion: Adam lr 1e-2 * (1 - t / 100) at denoising step t")
    null_text_lr_horizon: int = _d(100, "null-text inversion: the lr reaches 0 after 100 steps (1 - t / 100)")
    # Sec. 3.2 progressive transition (Eq. 3) and Sec. 4.3 ablation.
    lambda_start: float = _d(0.8, "BARET Sec. 4.3 / Fig. 9-10: lambda 0.8 -> 0.1 is the best trade-off")
    lambda_end: float = _d(0.1, "BARET Sec. 4.3 / Fig. 9-10: lambda 0.8 -> 0.1 is the best trade-off")
    # Sec. 3.3 Balanced Attention Module (Eq. 4-5) and Sec. 4.3 ablation.
    self_attention_fraction: float = _d(
        0.3, "BARET Sec. 4.3: SA injection 0.2-0.3 balances content and change, suggested 0.2-0.4; 0.1 loses "
        "the original, 0.4-0.5 blocks non-rigid changes"
    )
    cross_attention_fraction: float = _d(
        0.6, "BARET Sec. 4.3: CA injection 0.4-0.8 has almost no effect (below 0.4 the change fades); the "
        "middle of the suggested range"
    )
    attention_max_tokens: int = _d(32 * 32, "METHODS.md: self-attention maps only in layers of <= 32x32 tokens")

    def __post_init__(self) -> None:
        for name in ("steps", "ttis_iterations", "null_text_iterations", "null_text_lr_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"RealEdit: {name} must be >= 1, got {getattr(self, name)}.")
        for name in ("ttis_lr", "null_text_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RealEdit: {name} must be > 0, got {getattr(self, name)}.")
        check_fractions(self, ValueError)
        if self.early_stop_eps < 0 or self.early_stop_delta < 0:
            raise ValueError("RealEdit: the early-stop epsilon and delta must be >= 0.")


FRACTIONS = ("lambda_start", "lambda_end", "self_attention_fraction", "cross_attention_fraction")


def check_fractions(settings: object, error: type[Exception]) -> None:
    """Raise ``error`` unless every field of :data:`FRACTIONS` that ``settings`` has lies in [0, 1]."""
    for name in FRACTIONS:
        value = getattr(settings, name, None)
        if value is not None:
            check_unit(name, value, error)


def transition_lambda(start: float, end: float, step: int, total: int, rigid: bool = False) -> float:
    """BARET Eq. 3's lambda_t: linear from ``start`` (first step) to ``end`` (last); 1 for rigid edits."""
    if rigid:
        return 1.0
    if total <= 1:
        return start
    return start + (end - start) * step / (total - 1)


BARET_DEFAULTS = BaretSettings()


def origin(name: str) -> str:
    """Where a BARET default comes from (tooltip text)."""
    return field_origin(BaretSettings, name)

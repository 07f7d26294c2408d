"""ZONE's rough edit mask M_b from InstructPix2Pix cross-attention (papers/zone.txt Sec. 4.2, Eq. 3-4).

Host-neutral: :class:`IP2PMaskRecorder` is an :class:`~..attention.hooks.AttentionHook` that never
changes the attention output (it declines every call). In each cross-attention layer of at most 32x32
tokens at 512 px (``downscale >= 2``; encoder and decoder, never the middle block) it computes
M = softmax(QK^T / sqrt(d)) (Eq. 3) for the **empty-text rows** of IP2P's three-way batch only -- the
paper's finding is that those maps mark the edit region -- and keeps running sums of the first-token
map A^1 and the last-token map A^L, averaged over steps, heads and rows per layer, then over layers.

Which rows are the empty-text branches is the host's business: the host presents them as ``uncond``
rows (``hosts/comfy_ip2p.py`` does) and the instruction row as ``cond``. :func:`rough_mask` then applies
Eq. 4: M_b = (A^1 - A^L) < T, with A^1 and A^L each scaled to [0, 1] by its max.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention.hooks import UNCOND, AttentionContext, RowKind
from ..attention.maps import normalize_max
from ..attention.math import attention_probs
from .settings import ZONE_DEFAULTS

MIN_DOWNSCALE = 2  # 64x64 latent at 512 px -> layers of <= 32x32 tokens


@dataclass(frozen=True)
class RoughMask:
    """Eq. 4's output: ``mask`` M_b (H, W) bool and the difference map ``difference`` = A^1 - A^L (float)."""

    mask: torch.Tensor
    difference: torch.Tensor


def rough_mask(first_map: torch.Tensor, last_map: torch.Tensor,
               threshold: float = ZONE_DEFAULTS.mask_threshold) -> RoughMask:
    """Eq. 4: M_b(m, n) = 1 where A^1(m, n) - A^L(m, n) < T, each map first scaled to [0, 1] by its max.

    Args:
        first_map: A^1, the averaged map of the first (start-of-text) token, (H, W).
        last_map: A^L, the averaged map of the last token, (H, W), same size.
        threshold: T in [0, 1] units (the paper's 128 of 255 by default).
    """
    if first_map.shape != last_map.shape or first_map.ndim != 2:
        raise ValueError(
            f"rough_mask: A^1 and A^L must be two (H, W) maps of one size, got {tuple(first_map.shape)} "
            f"and {tuple(last_map.shape)}."
        )
    difference = normalize_max(first_map.float()) - normalize_max(last_map.float())
    return RoughMask(mask=difference < threshold, difference=difference)


class IP2PMaskRecorder:
    """Attention hook: averages A^1 and A^L of the empty-text rows over steps, heads and layers.

    Args:
        row_kind: the row kind the host gives the empty-text branches ("uncond").
        min_downscale: only layers at least this much coarser than the latent (2: <= 32x32 at 512 px).
        last_token: key index of A^L (default -1, the last of the context's tokens).

    ``recorded`` lists ``(layer index, step, rows)`` for every call that contributed, so tests (and
    users) can check which rows and layers the mask came from.
    """

    def __init__(self, row_kind: RowKind = UNCOND, min_downscale: int = MIN_DOWNSCALE, last_token: int = -1) -> None:
        self.row_kind, self.min_downscale, self.last_token = row_kind, min_downscale, last_token
        self.begin_run()

    def __deepcopy__(self, memo: dict) -> IP2PMaskRecorder:
        return self  # shared through ModelPatcher.clone()

    def begin_run(self) -> None:
        """Forget everything recorded (a new sampling run starts)."""
        # layer index -> (2, h, w) sum of [A^1, A^L], on the attention's device (no sync per call)
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.recorded: list[tuple[int, int | None, tuple[int, ...]]] = []

    def wants(self, ctx: AttentionContext) -> bool:
        """Cross-attention of an encoder or decoder layer of at most 32x32 tokens (at 512 px)."""
        return ctx.kind == "cross" and ctx.layer.stage != "mid" and ctx.layer.downscale >= self.min_downscale

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> None:
        if not self.wants(ctx):
            return None
        rows = ctx.rows.rows(self.row_kind)
        if not rows:
            return None
        index = torch.tensor(rows, device=q.device)
        probs = attention_probs(q.index_select(0, index), k.index_select(0, index), ctx.heads)  # Eq. 3
        tokens = probs[..., [0, self.last_token]].mean(dim=(0, 1))  # (q_tokens, 2): mean over rows, heads
        maps = tokens.transpose(0, 1).reshape(2, *ctx.grid).detach()
        layer = ctx.layer.index
        self.sums[layer] = self.sums[layer] + maps if layer in self.sums else maps
        self.counts[layer] = self.counts.get(layer, 0) + 1
        self.recorded.append((layer, ctx.step, tuple(rows)))
        return None

    @property
    def empty(self) -> bool:
        return not self.sums

    def maps(self, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The averaged (A^1, A^L), each (H, W): per layer the mean over calls, resized bilinearly to
        ``size`` (default: the finest recorded grid), then the mean over layers; on the CPU."""
        if self.empty:
            raise RuntimeError(
                "IP2P mask: no cross-attention of the empty-text rows was recorded. The model must be an "
                "InstructPix2Pix UNet sampled with three-way guidance (text + image CFG)."
            )
        means = [self.sums[i].cpu() / self.counts[i] for i in sorted(self.sums)]
        if size is None:
            size = max((tuple(m.shape[-2:]) for m in means), key=lambda hw: hw[0] * hw[1])
        resized = [F.interpolate(m[None], size=size, mode="bilinear", align_corners=False)[0] for m in means]
        stacked = torch.stack(resized).mean(dim=0)
        return stacked[0], stacked[1]

    def rough_mask(self, size: tuple[int, int] | None = None,
                   threshold: float = ZONE_DEFAULTS.mask_threshold) -> RoughMask:
        """Eq. 4 on the recorded maps, at ``size``."""
        first, last = self.maps(size)
        return rough_mask(first, last, threshold)

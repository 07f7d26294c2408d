"""ZONE's rough edit mask M_b from InstructPix2Pix cross-attention (papers/zone.txt Sec. 4.2, Eq. 3-4).

Host-neutral: :class:`IP2PMaskRecorder` is an :class:`~..attention.hooks.AttentionHook` that never
changes the attention output (it declines every call). In the encoder and decoder cross-attention
layers at 1/32 of the image size (16x16 at 512 px, a downscale of 4 from the latent: the official
code's choice; ``downscales=(2, 4)`` adds the 32x32 layers) it computes M = softmax(QK^T / sqrt(d))
(Eq. 3) for one kind of rows of IP2P's three-way batch -- by default the **empty-text rows**, as the
official code (its Prompt-to-Prompt attention store keeps the second half of every batch, which in IP2P's
[instruction, empty text + photo, empty text] batch falls on the empty-text branches; the paper's text names
no branch) -- and keeps running sums of the first-token map A^1 and the last-token map A^L, averaged over steps,
heads and rows per layer, then over layers. ``row_kind="cond"`` reads the instruction row instead: the one
branch that knows the edit (on the Shapes world its maps mark the edit region best, README.md).

A^L is the map at the instruction's end-of-text token (the paper: "the L tokens include the
start-of-text and end-of-text tokens"; the official code indexes it so), i.e. key position
``len(instruction tokens) + 1``: :func:`instruction_eot_position`. Not key 76, the last padding token.

Which rows are the empty-text branches is the host's business: the host presents them as ``uncond``
rows (``hosts/comfy_ip2p.py`` does) and the instruction row as ``cond``. :func:`rough_mask` then applies
Eq. 4: M_b = (A^1 - A^L) < T, with A^1 and A^L each scaled to [0, 1] by its max.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention.hooks import COND, UNCOND, AttentionContext, RowKind
from ..attention.maps import normalize_max
from ..attention.math import attention_probs
from ..attention.settings import CLIP_CHUNK
from ..attention.tokens import Tokenizer
from .settings import ZONE_DEFAULTS

log = logging.getLogger("realedit")
LAST_KEY = -1  # the context's last key token: only when the instruction is unknown
ROW_NAMES: dict[RowKind, str] = {UNCOND: "empty-text", COND: "instruction"}  # IP2P's branches by the hosts' row kind


def instruction_eot_position(instruction: str, tokenize: Tokenizer) -> int:
    """Key position of the instruction's end-of-text token: BOS at 0, its tokens at 1..n, EOT at n + 1.

    ``tokenize`` gives the BPE tokens without BOS/EOS (:data:`~..attention.tokens.Tokenizer`). An
    instruction longer than one 77-token CLIP chunk has its EOT in a later chunk; A^L is then read at the
    first chunk's last position (76), with a warning.
    """
    position = len(tokenize(instruction)) + 1
    if position >= CLIP_CHUNK:
        log.warning("RealEdit: the instruction has %d tokens, more than one CLIP chunk of %d; A^L is read at key "
                    "%d. Shorten the instruction for the paper's end-of-text map.", position - 1, CLIP_CHUNK - 2,
                    CLIP_CHUNK - 1)
        return CLIP_CHUNK - 1
    return position


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
        last_map: A^L, the averaged map of the instruction's end-of-text token, (H, W), same size.
        threshold: T in [0, 1] units (default: the official code's effective ~54/255, see
            ``masks.settings``; the paper prints 128/255, ``PAPER_MASK_THRESHOLD``).
    """
    if first_map.shape != last_map.shape or first_map.ndim != 2:
        raise ValueError(
            f"rough_mask: A^1 and A^L must be two (H, W) maps of one size, got {tuple(first_map.shape)} "
            f"and {tuple(last_map.shape)}."
        )
    difference = normalize_max(first_map.float()) - normalize_max(last_map.float())
    return RoughMask(mask=difference < threshold, difference=difference)


class IP2PMaskRecorder:
    """Attention hook: averages A^1 and A^L of one kind of IP2P rows over steps, heads and layers.

    Args:
        row_kind: the rows read: "uncond", the kind the host gives the empty-text branches (the official
            code's; default), or "cond", the instruction row (``masks.settings.MASK_ROW_CHOICES``).
        downscales: the layers averaged, by downscale from the latent (default (4,): 1/32 of the image
            size, 16x16 at 512 px, as the official code; (2, 4) adds the 32x32 layers).
        eot_position: key index of A^L, the instruction's end-of-text token
            (:func:`instruction_eot_position`). None: the context's last key (a padding token, not the
            paper's A^L), only for when the instruction is unknown.

    ``recorded`` lists ``(layer index, step, rows)`` for every call that contributed, so tests (and
    users) can check which rows and layers the mask came from.
    """

    def __init__(self, row_kind: RowKind = ZONE_DEFAULTS.mask_rows,
                 downscales: Collection[int] = ZONE_DEFAULTS.mask_downscales, eot_position: int | None = None) -> None:
        if row_kind not in ROW_NAMES:
            raise ValueError(f"RealEdit: the IP2P mask reads 'cond' (instruction) or 'uncond' (empty-text) rows, not "
                             f"{row_kind!r}.")
        if not downscales:
            raise ValueError("RealEdit: the IP2P mask needs at least one layer downscale (4: 16x16 at 512 px).")
        self.row_kind, self.downscales = row_kind, frozenset(downscales)
        self.last_token = LAST_KEY if eot_position is None else eot_position
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
        """Cross-attention of an encoder or decoder layer at one of the chosen downscales."""
        return ctx.kind == "cross" and ctx.layer.stage != "mid" and ctx.layer.downscale in self.downscales

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
                f"IP2P mask: no cross-attention of the {ROW_NAMES[self.row_kind]} rows was recorded. The model must "
                "be an InstructPix2Pix UNet sampled with three-way guidance (text + image CFG)."
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

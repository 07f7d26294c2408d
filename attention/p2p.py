"""Prompt-to-Prompt attention control (Hertz et al. 2022) for a two-path batch.

The edit sampler runs a source path (reconstruction, slot 0) and an edit path (slot 1) in one batch.
In the conditional rows, for the first ``cross_replace`` of the steps, the edit's cross-attention
probabilities are replaced by the source's, mapped onto the target prompt's tokens (Replace), aligned
with the edit's own probabilities on new tokens (Refine), or scaled per token (Reweight). For the
first ``self_replace`` of the steps, in layers of at most 32x32 query tokens, the edit rows use the
source rows' self-attention maps. SpecRef (Sec. II, "Based on the structure of P2P") runs its
SR-attention (Eq. 2-3) and LocalBlend (Eq. 5) on top of these controls.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

import torch

from .hooks import AttentionContext, RowInfo, RowKind, host_attention
from .maps import CrossAttentionStore
from .math import DEFAULT_MAX_ELEMENTS, map_attention_chunks
from .settings import P2PSettings, in_window
from .tokens import Token, refine_alignment, replace_mapper, word_units


class CrossEdit(Protocol):
    """Replaces an edit row's cross-attention probabilities given the source row's.

    ``src`` and ``edit`` are (rows, heads, q, k); the key length ``k`` may be a multiple of the
    77-token chunk (a context repeated for batching), handled block by block.
    """

    def __call__(self, src: torch.Tensor, edit: torch.Tensor) -> torch.Tensor: ...


def _blocks(k: int, chunk: int) -> int:
    if k % chunk:
        raise ValueError(f"RealEdit: cross-attention over {k} key tokens does not split into "
                         f"{chunk}-token prompt chunks; P2P edits need one-chunk prompts.")
    return k // chunk


def _cached(cache: dict[tuple, torch.Tensor], key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``cache[key]``, made on first use (a control's constants per device, dtype and key length)."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
    return value


class Replace:
    """Word swap: A_edit = A_src @ M with the (77, 77) mapper of :func:`~.tokens.replace_mapper`."""

    def __init__(self, mapper: torch.Tensor) -> None:
        self.mapper = mapper  # (src_tokens, tgt_tokens)
        self._cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_tokens(cls, src_tokens: list[Token], tgt_tokens: list[Token]) -> Replace:
        return cls(replace_mapper(src_tokens, tgt_tokens))

    def __call__(self, src: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        n, h, q, k = src.shape
        chunk = self.mapper.shape[0]
        m = _cached(self._cache, (src.device, src.dtype), lambda: self.mapper.to(src.device, src.dtype))
        blocks = src.reshape(n, h, q, _blocks(k, chunk), chunk)  # (n, h, q, blocks, 77)
        return (blocks @ m).reshape(n, h, q, k)


class Refine:
    """Added words: A_edit = A_src[..., mapper] * alphas + A_edit * (1 - alphas) (P2P Sec. 3.2)."""

    def __init__(self, mapper: torch.Tensor, alphas: torch.Tensor) -> None:
        self.mapper, self.alphas = mapper, alphas  # (77,) long, (77,) float
        self._cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_tokens(cls, src_tokens: list[Token], tgt_tokens: list[Token]) -> Refine:
        return cls(*refine_alignment(src_tokens, tgt_tokens))

    def __call__(self, src: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        k, chunk = src.shape[-1], self.mapper.shape[0]
        blocks = _blocks(k, chunk)
        index = _cached(self._cache, ("index", src.device, k), lambda: (
            torch.arange(blocks, device=src.device)[:, None] * chunk + self.mapper.to(src.device)[None]
        ).reshape(-1))  # (k,)
        alphas = _cached(self._cache, ("alphas", src.device, src.dtype, k),
                         lambda: self.alphas.to(src.device, src.dtype).repeat(blocks))  # (k,)
        return src[..., index] * alphas + edit * (1 - alphas)


class Reweight:
    """Scale tokens' attention: A_edit = base(A_src, A_edit) * scale (P2P's equalizer, unnormalised).

    Without a ``base`` edit the source probabilities are scaled, as in P2P (same prompt twice).
    """

    def __init__(self, scale: torch.Tensor, base: CrossEdit | None = None) -> None:
        self.scale, self.base = scale, base  # (77,)
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, src: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        mapped = src if self.base is None else self.base(src, edit)
        k, chunk = src.shape[-1], self.scale.shape[0]
        blocks = _blocks(k, chunk)
        return mapped * _cached(self._cache, (src.device, src.dtype, k),
                                lambda: self.scale.to(src.device, src.dtype).repeat(blocks))


def resolve_mode(mode: str, src_tokens: list[Token], tgt_tokens: list[Token]) -> str:
    """``auto``: Replace for prompts of equally many words, else Refine (P2P Sec. 3.2); any other mode as given."""
    if mode != "auto":
        return mode
    return "replace" if len(word_units(src_tokens)) == len(word_units(tgt_tokens)) else "refine"


def cross_edit(mode: str, src_tokens: list[Token], tgt_tokens: list[Token],
               scale: torch.Tensor | None = None) -> Replace | Refine | Reweight | None:
    """The P2P cross-attention control for ``mode`` (auto / none / replace / refine / reweight; ``reweight``
    scales by ``scale`` on top of the ``auto`` base)."""
    mode = resolve_mode(mode, src_tokens, tgt_tokens)
    if mode == "none":
        return None
    if mode == "reweight":
        base = resolve_mode("auto", src_tokens, tgt_tokens)
        return Reweight(scale, cross_edit(base, src_tokens, tgt_tokens))
    if mode == "replace":
        return Replace.from_tokens(src_tokens, tgt_tokens)
    return Refine.from_tokens(src_tokens, tgt_tokens)


def row_pairs(rows: RowInfo, kinds: Collection[RowKind], src_slot: int, edit_slot: int) -> tuple[list[int], list[int]]:
    """Source and edit row indices, paired by kind; an edit row without its source row is an error."""
    src_rows: list[int] = []
    edit_rows: list[int] = []
    for kind in kinds:
        src, edit = rows.rows(kind, src_slot), rows.rows(kind, edit_slot)
        if edit and len(src) != len(edit):
            raise ValueError(
                f"RealEdit: the attention call has {len(edit)} {kind} edit row(s) (slot {edit_slot}) but "
                f"{len(src)} source row(s) (slot {src_slot}); P2P needs both paths in one batch."
            )
        src_rows += src
        edit_rows += edit
    return src_rows, edit_rows


class P2PHook:
    """An :class:`~.hooks.AttentionHook` applying P2P controls to the edit rows of a two-path batch.

    ``edit`` is the cross-attention control (None: self-attention replacement only). ``store``, when
    given, records the cross-attention maps *after* they are edited, i.e. the maps the edit row actually
    used (e.g. for LocalBlend and SpecRef's M_t): inside the cross-replace window a swapped word's map
    is the source word's. That is what the official P2P and SpecRef code read: their AttentionStore
    keeps a reference to the probability tensor that the edit then overwrites in place. Calls outside
    every window decline (return None) so the host's own attention runs. Cross-attention edits act on
    conditional rows only (P2P); set ``self_replace_uncond`` to also replace the unconditional rows'
    self-attention maps.
    """

    def __init__(
        self,
        edit: CrossEdit | None = None,
        settings: P2PSettings | None = None,
        *,
        store: CrossAttentionStore | None = None,
        src_slot: int = 0,
        edit_slot: int = 1,
        self_replace_uncond: bool = False,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        self.edit, self.settings, self.store = edit, settings or P2PSettings(), store
        self.src_slot, self.edit_slot = src_slot, edit_slot
        self.self_kinds: tuple[RowKind, ...] = ("cond", "uncond") if self_replace_uncond else ("cond",)
        self.max_elements = max_elements

    def cross_active(self, ctx: AttentionContext) -> bool:
        """Cross-attention replacement applies at this step (P2P: step < int(cross_replace * N))."""
        return self.edit is not None and in_window(ctx.step, self.settings.cross_replace, ctx.total_steps)

    def self_active(self, ctx: AttentionContext) -> bool:
        """Self-attention map replacement applies: step window and at most 32x32 query tokens."""
        return ctx.tokens <= self.settings.self_replace_max_tokens and in_window(
            ctx.step, self.settings.self_replace, ctx.total_steps
        )

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        if ctx.kind == "cross":
            return self.cross_attention(q, k, v, ctx)
        return self.self_attention(q, k, v, ctx)

    def cross_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        ctx: AttentionContext) -> torch.Tensor | None:
        """Cross-attention with explicit probabilities: edit the edit rows, then record what they used."""
        src_rows, edit_rows = row_pairs(ctx.rows, ("cond",), self.src_slot, self.edit_slot)
        editing = bool(edit_rows) and self.cross_active(ctx)
        record = self.store.recorder(ctx) if self.store is not None else None
        if not editing and record is None:
            return None
        edit = self.edit if editing else None

        def fn(probs: torch.Tensor, rows: slice) -> torch.Tensor:  # (batch, heads, chunk, k)
            if edit is not None:
                probs[edit_rows] = edit(probs[src_rows], probs[edit_rows]).to(probs.dtype)
            if record is not None:  # after the edit: the maps the edit row used (official P2P / SpecRef)
                probs = record(probs, rows)
            return probs

        return map_attention_chunks(q, k, v, ctx.heads, fn, max_elements=self.max_elements)

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
                       keep: Collection[int] = ()) -> torch.Tensor | None:
        """Edit rows attend with the source rows' maps: softmax(Q_src K_src^T / sqrt(d)) V_edit.

        The maps never materialise: swapping Q and K of the edit rows for the source's gives the same
        probabilities inside the fused kernel, which is the host's own (``ctx.host_attention``) when
        the host provides it, so the untouched rows come out exactly as without the hook. Edit rows in
        ``keep`` keep their own maps (SpecRef: the rows SR-attention mixes, whose O_self is their own).
        """
        if not self.self_active(ctx):
            return None
        src_rows, edit_rows = row_pairs(ctx.rows, self.self_kinds, self.src_slot, self.edit_slot)
        pairs = [(s, e) for s, e in zip(src_rows, edit_rows) if e not in keep]
        if not pairs:
            return None
        src_rows, edit_rows = [s for s, _ in pairs], [e for _, e in pairs]
        q2, k2 = q.clone(), k.clone()  # (batch, tokens, heads*dim)
        q2[edit_rows], k2[edit_rows] = q[src_rows], k[src_rows]
        return host_attention(q2, k2, v, ctx)

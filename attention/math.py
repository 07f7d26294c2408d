"""Plain attention math: outputs and explicit probabilities, chunked over queries.

Host backends (SDPA, xformers, flash) never return probabilities, and a 64x64 layer's full
(heads, 4096, 4096) matrix is 1 GiB in fp32 per batch row, so both helpers process queries in chunks
whose score matrix stays under ``max_elements`` entries.
"""

from __future__ import annotations

from typing import Callable

import torch

DEFAULT_MAX_ELEMENTS = 2**26  # 64 Mi scores (256 MiB in fp32) per chunk


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads*dim) -> (batch, heads, tokens, dim)."""
    b, n, hd = x.shape
    return x.view(b, n, heads, hd // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, dim) -> (batch, tokens, heads*dim)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def query_chunk_size(batch: int, heads: int, q_tokens: int, k_tokens: int, max_elements: int) -> int:
    """Queries per chunk so that a (batch, heads, chunk, k_tokens) score matrix stays under ``max_elements``."""
    per_query = max(1, batch * heads * k_tokens)
    return max(1, min(q_tokens, max_elements // per_query))


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) as (batch, heads, q_tokens, k_tokens), computed in ``dtype``.

    Allocates the whole matrix: use it for the small layers maps are read from (e.g. 16x16 cross
    attention), and :func:`attention` or :func:`map_attention_chunks` for anything large.
    ``mask`` is additive and broadcast to (batch, heads, q_tokens, k_tokens).
    """
    qh, kh = split_heads(q, heads).to(dtype), split_heads(k, heads).to(dtype)
    scores = qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1)


def map_attention_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    fn: Callable[[torch.Tensor, slice], torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention output, computed over query chunks with explicit probabilities.

    ``fn(probs, query_slice)`` may read or replace each chunk's probabilities
    ((batch, heads, chunk, k_tokens)) before they multiply V, e.g. to record or inject maps.
    Returns (batch, q_tokens, heads*dim) in q's dtype.
    """
    qh, kh, vh = (split_heads(t, heads).to(dtype) for t in (q, k, v))
    b, h, nq, d = qh.shape
    step = query_chunk_size(b, h, nq, kh.shape[2], max_elements)
    out = torch.empty(b, h, nq, vh.shape[-1], dtype=dtype, device=q.device)
    for start in range(0, nq, step):
        rows = slice(start, min(nq, start + step))
        scores = qh[:, :, rows] @ kh.transpose(-1, -2) * d**-0.5
        if mask is not None:
            scores = scores + _mask_rows(mask, rows)
        probs = scores.softmax(dim=-1)
        if fn is not None:
            probs = fn(probs, rows)
        out[:, :, rows] = probs @ vh
    return merge_heads(out).to(q.dtype)


def _mask_rows(mask: torch.Tensor, rows: slice) -> torch.Tensor:
    """The query rows ``rows`` of an additive mask broadcastable to (b, h, q, k)."""
    return mask if mask.shape[-2] == 1 else mask[..., rows, :]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain softmax attention (batch, tokens, heads*dim) -> same, via PyTorch's fused kernel.

    ``scaled_dot_product_attention`` never materialises the score matrix, so this is the memory-safe
    default; ``mask`` is additive (or boolean, True = keep) and broadcast to (b, h, q, k).
    """
    qh, kh, vh = (split_heads(t, heads) for t in (q, k, v))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return merge_heads(out)

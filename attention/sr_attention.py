"""SpecRef's Specific Reference Attention (SR-attention), Eq. 2-3 of the paper.

For the edit path's self-attention at layer l and step t:

    O_ref = softmax(Q K_ref^T / sqrt(d) + M_s^inf) V_ref          (Eq. 2-3)
    O     = M_t * O_ref + (1 - M_t) * softmax(Q K^T / sqrt(d)) V  (Eq. 3, second line)

M_s^inf is 0 on the reference object (M_s, on the reference's token grid) and -inf elsewhere; M_t is
the target word's cross-attention map on the query grid. Both are resized to the layer's grid
bilinearly and thresholded. Everything runs through the fused SDPA kernel with a boolean mask, so a
64x64 layer never materialises its (4096, 4096) score matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .maps import resize_bilinear
from .math import attention
from .settings import SpecRefSettings

_MS_DEFAULT = SpecRefSettings().ms_threshold


class SRResult(NamedTuple):
    """SR-attention output (batch, q_tokens, heads*dim) and the rows that fell back to O_self.

    ``fallback`` is a (batch, q_tokens) bool tensor of the query rows that M_t selected but M_s left
    without any allowed key (their output is O_self), or None when there were none.
    """

    output: torch.Tensor
    fallback: torch.Tensor | None

    @property
    def fallback_count(self) -> int:
        return 0 if self.fallback is None else int(self.fallback.sum())


def resize_mask_to_grid(mask: torch.Tensor, grid: tuple[int, int], threshold: float = _MS_DEFAULT,
                        keep_nonempty: bool = True, mode: str = "bilinear") -> torch.Tensor:
    """A mask (..., H, W) resized to ``grid`` and thresholded: bilinearly (antialiased when shrinking; our
    default) or by ``mode="nearest"`` (an option of the official SpecRef code).

    Returns (..., h*w) bool, True where the resized value exceeds ``threshold``. ``keep_nonempty``: when
    the mask has some positive pixel but nothing survives the threshold at this grid (a small object on
    a coarse layer), keep the cells of the resized maximum instead of returning an empty mask.
    """
    if mask.dim() < 2:
        raise ValueError(f"RealEdit: a mask must be (..., H, W), got shape {tuple(mask.shape)}.")
    lead, (H, W) = mask.shape[:-2], mask.shape[-2:]
    flat = mask.float().reshape(-1, 1, H, W)
    x = F.interpolate(flat, size=grid, mode="nearest") if mode == "nearest" else resize_bilinear(flat, grid)
    x = x.reshape(x.shape[0], -1)  # (n, h*w)
    out = x > threshold
    if keep_nonempty:
        lost = ~out.any(dim=-1) & (mask.reshape(-1, H * W) > 0).any(dim=-1)  # (n,)
        if bool(lost.any()):
            peak = x >= x.amax(dim=-1, keepdim=True)
            out = torch.where(lost[:, None], peak & (x > 0), out)
    return out.reshape(*lead, grid[0] * grid[1])


def _key_mask(m_s: torch.Tensor, batch: int, q_tokens: int, k_tokens: int, check_empty: bool = True) -> torch.Tensor:
    """M_s as a bool (batch|1, q|1, k) mask, True = allowed key (Eq. 2's 0 entries of M_s^inf).

    ``check_empty=False`` skips the (device-syncing) check that some key is allowed, for a caller that
    knows it already."""
    m = m_s.to(torch.bool) if m_s.dtype == torch.bool else m_s > 0.5
    if m.shape[-1] != k_tokens:
        raise ValueError(f"RealEdit: M_s has {m.shape[-1]} entries but the reference has {k_tokens} tokens; "
                         "resize it to the reference's token grid (resize_mask_to_grid).")
    if m.dim() == 1:
        m = m[None, None]  # (1, 1, k)
    elif m.dim() == 2:
        m = m[:, None]  # (b, 1, k)
    if m.dim() != 3 or m.shape[0] not in (1, batch) or m.shape[1] not in (1, q_tokens):
        raise ValueError(f"RealEdit: M_s of shape {tuple(m_s.shape)} does not fit batch {batch} and "
                         f"{q_tokens} queries; use (k,), (batch, k) or (batch, q, k).")
    if check_empty and not bool(m.any()):
        raise ValueError("RealEdit: the reference mask M_s is empty everywhere: SR-attention has no "
                         "reference token to attend to. Draw or segment the reference object.")
    return m


def _query_weights(m_t: torch.Tensor, batch: int, q_tokens: int, like: torch.Tensor) -> torch.Tensor:
    """M_t as (batch|1, q, 1) in ``like``'s dtype, bool masks kept as 0/1."""
    w = m_t.to(like.device)
    if w.shape[-1] != q_tokens or w.dim() not in (1, 2) or (w.dim() == 2 and w.shape[0] not in (1, batch)):
        raise ValueError(f"RealEdit: M_t of shape {tuple(m_t.shape)} does not fit {q_tokens} query tokens "
                         f"and batch {batch}; use (q,) or (batch, q).")
    w = w.reshape(-1, q_tokens, 1)
    return w.to(like.dtype)


def _expand_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    if x.shape[0] == batch:
        return x
    if x.shape[0] != 1:
        raise ValueError(f"RealEdit: reference K/V have batch {x.shape[0]}; expected 1 or {batch}.")
    return x.expand(batch, *x.shape[1:])


def sr_attention(
    q: torch.Tensor,
    k_self: torch.Tensor | None,
    v_self: torch.Tensor | None,
    k_ref: torch.Tensor,
    v_ref: torch.Tensor,
    heads: int,
    m_s: torch.Tensor,
    m_t: torch.Tensor,
    o_self: torch.Tensor | None = None,
    *,
    masks_nonempty: bool = False,
) -> SRResult:
    """SR-attention (SpecRef Eq. 2-3) before the output projection.

    q, k_self, v_self: (batch, tokens, heads*dim); k_ref, v_ref: (batch or 1, ref_tokens, heads*dim).
    m_s: bool (ref_tokens,), (batch, ref_tokens) or (batch, q_tokens, ref_tokens), True on the
    reference object. m_t: (q_tokens,) or (batch, q_tokens), float in [0, 1] or bool. ``o_self`` is the
    edit path's own attention output when already computed (e.g. after P2P self-attention replacement);
    then ``k_self`` and ``v_self`` are not read and may be None.

    Where M_t is 0 the output is O_self exactly; query rows that M_s leaves without any allowed key fall
    back to O_self and are reported in :attr:`SRResult.fallback`. An M_s empty everywhere is an error.
    ``masks_nonempty``: the caller knows M_s allows some key and M_t is nonzero somewhere, so those
    checks (each a device sync) are skipped; with a (ref_tokens,) M_s no query row can lack a key then.
    """
    b, nq, _ = q.shape
    if o_self is None:
        if k_self is None or v_self is None:
            raise ValueError("RealEdit: sr_attention needs k_self and v_self when o_self is not given.")
        o_self = attention(q, k_self, v_self, heads)  # (b, q, heads*dim)
    mt = _query_weights(m_t, b, nq, o_self)  # (b|1, q, 1)
    allowed = _key_mask(m_s.to(q.device), b, nq, k_ref.shape[1], check_empty=not masks_nonempty)  # (b|1, q|1, k)
    if not masks_nonempty and not bool(mt.any()):
        return SRResult(o_self, None)
    empty: torch.Tensor | None = None  # (b|1, q|1): rows with no allowed key, None when there are none
    if not (masks_nonempty and m_s.dim() == 1):
        rows_empty = ~allowed.any(dim=-1)
        if bool(rows_empty.any()):
            empty = rows_empty
            allowed = allowed | empty[..., None]  # any finite softmax; those rows are replaced below
    o_ref = attention(q, _expand_batch(k_ref, b), _expand_batch(v_ref, b), heads,
                      mask=allowed[:, None])  # (b, q, heads*dim); mask (b|1, 1, q|1, k)
    out = torch.lerp(o_self, o_ref.to(o_self.dtype), mt)  # exact at M_t = 0 and M_t = 1
    return SRResult(out, None) if empty is None else _fall_back(out, o_self, empty, mt)


def _fall_back(out: torch.Tensor, o_self: torch.Tensor, empty: torch.Tensor, mt: torch.Tensor) -> SRResult:
    """Rows with no allowed reference key (``empty``, some True) take O_self; report those M_t selected."""
    b, nq = out.shape[:2]
    empty = empty.expand(b, nq)  # from (b|1, q|1)
    out = torch.where(empty[..., None], o_self, out)
    return SRResult(out, empty & (mt[..., 0] > 0).expand(b, nq))

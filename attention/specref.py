"""SpecRef's edit-time attention control (Sec. II-D2, Eq. 2-3 and 5, Algorithm 1 stage 2).

One :class:`SpecRefHook` serves the two-path edit batch: slot 0 is the reconstruction (source prompt,
pinned to the inversion trajectory), slot 1 the edit (target prompt) and, in live mode, slot 2 the
reference row whose own self-attention K/V are the reference features. Per attention call it

* records the conditional cross-attention maps of the ``map_downscale`` layers (16x16 at 512 px) of
  slots 0 and 1 into a :class:`~.maps.CrossAttentionStore` (LocalBlend, Eq. 5, and M_t), *after* the
  P2P cross edit: the maps the edit row used, as the official SpecRef and P2P code read them;
* applies Prompt-to-Prompt between slot 0 and slot 1 (cross-attention Replace / Refine / Reweight,
  self-attention map replacement) through a :class:`~.p2p.P2PHook`, except self-attention
  replacement on the rows SR-attention mixes, in its layers and steps (their O_self is their own
  attention, Eq. 3, as in the official code);
* applies SR-attention (Eq. 2-3) to the edit path's conditional rows (optionally also the
  unconditional ones) inside the reference's layer and step windows:
  ``O = M_t * softmax(Q K_ref^T / sqrt(d) + M_s^inf) V_ref + (1 - M_t) * O_self``.

:class:`SRAttentionHook` is SR-attention alone for any sampler (RealEdit Apply SR-Attention): every
conditional row is an edit row, M_t comes from its own prompt slot's map, and the sampler's steps are
mapped onto the stored features' edit steps by sigma (:func:`schedule_offset`). Both hooks share the
:class:`SRMixer` (masks, reference K/V, statistics).

M_t at step s is the target word's map averaged over every call recorded since the first step of the
run (running mean, reset by ``begin_run``), min-max normalised, resized bilinearly to the layer's grid
and thresholded; it is computed once per step, at the step's first SR call (on SD1.x the step's own
16x16 layers have all run by then, as they precede the decoder's finest layers). M_s is the reference
MASK resized bilinearly to the reference's token grid and thresholded. A call in which no control is
active returns ``None``, so the host's own attention runs bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..inversion.bank import ReferenceBank
from .hooks import AttentionContext, RowKind, host_attention, layer_grid
from .local_blend import LocalBlend
from .maps import CrossAttentionStore, word_map
from .math import DEFAULT_MAX_ELEMENTS
from .p2p import CrossEdit, P2PHook
from .settings import SpecRefSettings
from .sr_attention import SRResult, resize_mask_to_grid, sr_attention

log = logging.getLogger("realedit")

SOURCE_SLOT, EDIT_SLOT, LIVE_REFERENCE_SLOT = 0, 1, 2
KV = tuple[torch.Tensor, torch.Tensor]


class SpecRefError(ValueError):
    """Settings or inputs SpecRef editing cannot run with."""


# -- inputs -------------------------------------------------------------------------------------------
def as_mask(mask: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """A MASK ((H, W) or (1, H, W)) as a float (H, W) tensor on the CPU; refuses empty or batched masks."""
    if mask is None:
        return None
    m = mask.detach()
    if m.dim() == 3 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise SpecRefError(f"RealEdit: the {name} must be one mask (H, W) or (1, H, W), got shape "
                           f"{tuple(mask.shape)}.")
    m = m.float().cpu()
    if not torch.isfinite(m).all():
        raise SpecRefError(f"RealEdit: the {name} contains NaN or inf values.")
    if not bool((m > 0).any()):
        raise SpecRefError(f"RealEdit: the {name} is empty (all zero); draw or segment the region it marks.")
    return m


@dataclass(frozen=True, eq=False)
class SpecRefControls:
    """What the edit does besides the reference features themselves (host-neutral settings object).

    ``cross_edit``: P2P cross-attention control (Replace / Refine / Reweight) or None; its window is
    ``settings.p2p.cross_replace``. Self-attention map replacement follows ``settings.p2p.self_replace``
    (0 disables it). ``local_blend``: LocalBlend (Eq. 5) on the blend words' token positions per path.
    ``sr_layers``: SR-attention only in these layers (a subset of the reference's; None: all of them), as
    the official code's explicit layer lists (its examples use three decoder layers).
    ``target_positions``: token positions (BOS = 0) of the target word(s) in the target prompt, whose
    running-mean map is M_t; ``target_mask`` replaces that map by a fixed MASK (user-drawn M_t).
    ``ref_mask``: M_s, the reference object in the reference image (None: the whole reference).
    ``sr_uncond_shared_kv``: SR-attention also on the edit path's unconditional rows, with the same reference
    K/V as the conditional rows (the reference is inverted once, without guidance). Not the official code's
    unconditional option, which pairs those rows with K/V from a CFG inversion of the reference.
    """

    settings: SpecRefSettings = field(default_factory=SpecRefSettings)
    cross_edit: CrossEdit | None = None
    local_blend: LocalBlend | None = None
    target_positions: Sequence[int] | None = None
    target_mask: torch.Tensor | None = None
    ref_mask: torch.Tensor | None = None
    sr_uncond_shared_kv: bool = False
    self_replace_uncond: bool = False
    sr_layers: Collection[int] | None = None

    def __post_init__(self) -> None:
        if self.sr_layers is not None:
            object.__setattr__(self, "sr_layers", frozenset(int(i) for i in self.sr_layers))
        object.__setattr__(self, "target_mask", as_mask(self.target_mask, "target mask (M_t)"))
        object.__setattr__(self, "ref_mask", as_mask(self.ref_mask, "reference mask (M_s)"))
        if self.target_positions is not None:
            positions = tuple(int(p) for p in self.target_positions)
            if not positions or min(positions) < 0:
                raise SpecRefError(f"RealEdit: target word positions must be token indices >= 0, got "
                                   f"{self.target_positions!r}.")
            object.__setattr__(self, "target_positions", positions)

    @property
    def records_maps(self) -> bool:
        """Whether cross-attention maps are recorded (LocalBlend, or M_t from target words)."""
        return self.local_blend is not None or self.target_positions is not None


def parse_layers(text: str | None) -> frozenset[int] | None:
    """Layer indices from text: "14, 15", a range "13-15", or both ("10, 13-15"); empty: None (all).

    Layers are numbered in call order as in METHODS.md (SD1.x: 0-5 encoder, 6 middle, 7-15 decoder)."""
    if text is None or not text.strip():
        return None
    layers: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        bounds = [b.strip() for b in part.split("-")]
        if not part or len(bounds) > 2 or not all(b.isdigit() for b in bounds):
            raise SpecRefError(f"RealEdit: sr_layers {text!r}: give layer indices like '13, 15' or a range '13-15' "
                               "(0-15 on SD1.x in call order, METHODS.md).")
        lo, hi = int(bounds[0]), int(bounds[-1])
        if lo > hi:
            raise SpecRefError(f"RealEdit: sr_layers {text!r}: the range {part!r} runs backwards; write it low-high.")
        layers.update(range(lo, hi + 1))
    return frozenset(layers)


# -- reference features --------------------------------------------------------------------------------
class ReferenceSource(Protocol):
    """Where SR-attention takes K_ref / V_ref from (Eq. 2-3), with its layer and step windows."""

    layers: frozenset[int]
    steps: range
    latent_hw: tuple[int, int] | None  # the reference latent's size when known (exact M_s grids)

    def kv(self, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> KV | None:
        """(1, ref_tokens, heads*dim) K and V for this call, or None when unavailable."""
        ...


class StoredReference:
    """Stored mode: edit step s reads the bank entry saved at the same timestep, ``(layer, s)``.

    ``latent_hw``: the reference latent's size, when known, gives each layer's reference token grid
    exactly (for M_s); without it the grid is inferred (:func:`reference_grid`).
    """

    def __init__(self, bank: ReferenceBank, latent_hw: tuple[int, int] | None = None) -> None:
        self.bank, self.latent_hw = bank, latent_hw
        self.layers, self.steps = frozenset(bank.layers), bank.steps

    def __deepcopy__(self, memo: dict) -> StoredReference:
        return self

    def kv(self, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> KV | None:
        entry = self.bank.get(ctx.layer.index, ctx.step) if ctx.step is not None else None
        if entry is None:
            return None
        k_ref, v_ref = entry
        return k_ref[None].to(k.device, k.dtype), v_ref[None].to(v.device, v.dtype)


class LiveReference:
    """Live mode: the reference is an extra conditional row of the batch (``slot``); its own K/V in
    this very call are K_ref / V_ref. The sampler feeds it the reference inversion's latents.
    ``latent_hw``: the reference latent's size when known (the source's: the reference row shares its grid)."""

    def __init__(self, layers: Collection[int], steps: range, slot: int = LIVE_REFERENCE_SLOT,
                 latent_hw: tuple[int, int] | None = None) -> None:
        self.layers, self.steps, self.slot, self.latent_hw = frozenset(layers), steps, slot, latent_hw

    def __deepcopy__(self, memo: dict) -> LiveReference:
        return self

    def kv(self, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> KV | None:
        rows = ctx.rows.rows("cond", self.slot)
        if not rows:
            return None
        r = rows[0]
        return k[r : r + 1], v[r : r + 1]


def reference_grid(tokens: int, query_grid: tuple[int, int], mask_hw: tuple[int, int] | None,
                   latent_hw: tuple[int, int] | None = None, downscale: int = 1) -> tuple[int, int]:
    """The reference's token grid: the query grid when the token counts match (a reference latent of the
    source's size), else the factorisation of ``tokens`` whose aspect is closest to the reference mask's
    (else the query grid's). With the reference latent's size ``latent_hw`` known, the grid the UNet gave
    it at this layer's ``downscale`` (exact for any size)."""
    if latent_hw is not None:
        h, w = layer_grid(latent_hw, downscale)
        if h * w == tokens:
            return h, w
    if tokens == query_grid[0] * query_grid[1]:
        return query_grid
    aspect = (mask_hw[0] / mask_hw[1]) if mask_hw is not None else query_grid[0] / query_grid[1]
    pairs = [(h, tokens // h) for h in range(1, tokens + 1) if tokens % h == 0]
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - math.log(aspect)))


ASPECT_TOLERANCE = 0.03  # relative: a mask of the photo's own shape at any resolution passes


def warn_if_mask_aspect_differs(mask: torch.Tensor | None, latent_hw: tuple[int, int] | None) -> bool:
    """Warn when the reference mask M_s has another aspect ratio than the reference photo (latent ``latent_hw``):
    it would be stretched onto the photo without a word, and is almost always the wrong mask connected (e.g.
    the source photo's). Returns whether it warned."""
    if mask is None or latent_hw is None:
        return False
    (mh, mw), (lh, lw) = mask.shape[-2:], latent_hw
    if abs((mh / mw) / (lh / lw) - 1.0) <= ASPECT_TOLERANCE:
        return False
    log.warning("RealEdit: the reference mask is %dx%d (aspect %.2f) but the reference photo is %dx%d latent pixels "
                "(aspect %.2f); the mask is stretched onto the photo. This is almost always the wrong mask connected: "
                "connect the mask drawn on (or segmented from) the reference photo.", mw, mh, mw / mh, lw, lh, lw / lh)
    return True


# -- SR-attention ---------------------------------------------------------------------------------------
@dataclass
class SRStats:
    """What SR-attention did during a run (for node messages and tests)."""

    applied: int = 0  # SR calls that mixed in the reference (layer, step, rows)
    empty_mt: int = 0  # SR calls skipped because M_t was empty (word drew no attention / threshold)
    missing_reference: int = 0  # SR calls without reference K/V (no bank entry, no live row)
    fallback_queries: int = 0  # queries M_t selected but M_s left without a key (took O_self)


class SRMixer:
    """SR-attention (Eq. 2-3) on chosen rows of a self-attention call, with its masks and statistics.

    M_t of a row comes from its prompt slot: the fixed target mask, or the target word's map in the
    ``store`` (running mean of that slot's conditional cross-attention since the run began), min-max
    normalised, resized bilinearly to the layer's grid and thresholded; it is computed once per step, at
    the step's first SR call (on SD1.x the step's own 16x16 layers have all run by then, as they precede
    the decoder's finest layers). M_s is the reference MASK resized bilinearly to the reference's token
    grid and thresholded. Shared by the two-path edit hook and the plain-sampler hook.
    """

    def __init__(self, controls: SpecRefControls, reference: ReferenceSource,
                 store: CrossAttentionStore | None) -> None:
        if controls.target_positions is None and controls.target_mask is None:
            raise SpecRefError("RealEdit: SR-attention needs M_t: give the target word(s) of the target "
                               "prompt (or a fixed target mask).")
        if controls.target_mask is None and store is None:
            raise SpecRefError("RealEdit: M_t from target words needs a cross-attention map store.")
        self.controls, self.reference, self.store = controls, reference, store
        self.layers = reference.layers if controls.sr_layers is None else reference.layers & controls.sr_layers
        if controls.sr_layers is not None and not controls.sr_layers <= reference.layers:
            raise SpecRefError(f"RealEdit: SR-attention layers {sorted(controls.sr_layers - reference.layers)} are not "
                               f"among the layers the reference features hold ({sorted(reference.layers)}); choose "
                               "from those, or widen the Reference Features layer window.")
        warn_if_mask_aspect_differs(controls.ref_mask, reference.latent_hw)
        self.begin_run()

    def begin_run(self) -> None:
        """Forget per-run state: M_t maps, resized masks, statistics, warnings."""
        self._mt_step: int | None = None
        self._mt_maps: dict[int, torch.Tensor | None] = {}
        # resized masks on the device they are used on, with whether they are nonempty (checked once)
        self._mt_cache: dict[tuple, tuple[torch.Tensor, bool]] = {}
        self._ms_cache: dict[tuple, tuple[torch.Tensor, bool]] = {}
        self.stats = SRStats()
        self._warned: set[str] = set()

    def active(self, ctx: AttentionContext) -> bool:
        """SR-attention's windows: a self-attention call in the reference's layers and steps."""
        return (ctx.kind == "self" and ctx.step is not None and ctx.layer.index in self.layers
                and ctx.step in self.reference.steps)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, rows: list[int],
            base: torch.Tensor | None) -> torch.Tensor | None:
        """``base`` (the call's output so far, None: not computed) with SR-attention on ``rows``, or None
        when SR-attention does not apply (empty M_t, no reference K/V): the caller keeps its output."""
        m_t = self._row_weights(ctx, rows, q.device)
        if m_t is None:
            self.stats.empty_mt += 1
            return None
        kv = self.reference.kv(k, v, ctx)
        if kv is None:
            self.stats.missing_reference += 1
            self._warn_once("ref", f"RealEdit: no reference K/V for layer {ctx.layer.index} at step {ctx.step}; "
                            "SR-attention skipped there (bank window, or the live reference row was not "
                            "in this batch).")
            return None
        k_ref, v_ref = kv
        if base is None:
            base = host_attention(q, k, v, ctx)
        m_s, ms_nonempty = self._m_s_entry(k_ref.shape[1], ctx, q.device)
        # M_t is nonzero in some row (_row_weights); o_self is given, so the rows' own K/V are not read
        result = sr_attention(q[rows], None, None, k_ref, v_ref, ctx.heads, m_s, m_t.to(q.device, q.dtype),
                              o_self=base[rows], masks_nonempty=ms_nonempty)
        base[rows] = result.output.to(base.dtype)
        self._note(result, ctx)
        return base

    def _note(self, result: SRResult, ctx: AttentionContext) -> None:
        self.stats.applied += 1
        if result.fallback_count:
            self.stats.fallback_queries += result.fallback_count
            self._warn_once("fallback", f"RealEdit: the reference mask leaves some queries of layer "
                            f"{ctx.layer.index} without a reference key; they keep their own attention.")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # -- masks ----------------------------------------------------------------------------------------
    def _m_s_entry(self, ref_tokens: int, ctx: AttentionContext,
                   device: torch.device) -> tuple[torch.Tensor, bool]:
        """M_s on the reference's token grid: (ref_tokens,) bool (Eq. 2) on ``device``, all True without a
        mask, and whether it allows some key."""
        key = (ref_tokens, ctx.grid, device)
        if key not in self._ms_cache:
            mask = self.controls.ref_mask
            if mask is None:
                m_s = torch.ones(ref_tokens, dtype=torch.bool)
            else:
                grid = reference_grid(ref_tokens, ctx.grid, tuple(mask.shape), self.reference.latent_hw,
                                      ctx.layer.downscale)
                settings = self.controls.settings
                m_s = resize_mask_to_grid(mask, grid, settings.ms_threshold, mode=settings.mask_resize)
            self._ms_cache[key] = (m_s.to(device), bool(m_s.any()))  # checked on the CPU
        return self._ms_cache[key]

    def target_map(self, slot: int) -> torch.Tensor | None:
        """The (h, w) map M_t of ``slot`` is thresholded from (:func:`target_map`)."""
        return target_map(self.controls, self.store, slot)

    def m_t(self, ctx: AttentionContext, slot: int, device: torch.device | None = None) -> torch.Tensor | None:
        """M_t of ``slot`` on the query grid: (q_tokens,) float 0/1 (Eq. 3), computed once per step, on
        ``device`` (None: where its map is)."""
        entry = self._mt_entry(ctx, slot, device)
        return None if entry is None else entry[0]

    def _mt_entry(self, ctx: AttentionContext, slot: int,
                  device: torch.device | None) -> tuple[torch.Tensor, bool] | None:
        """:meth:`m_t` and whether it is nonzero anywhere (checked once per step, slot, grid and device)."""
        if ctx.step != self._mt_step:
            self._mt_maps.clear()
            self._mt_step = ctx.step
            self._mt_cache.clear()
        if slot not in self._mt_maps:
            self._mt_maps[slot] = self.target_map(slot)
        m = self._mt_maps[slot]
        if m is None:
            return None
        key = (slot, ctx.grid, device)
        if key not in self._mt_cache:
            settings = self.controls.settings
            m_t = resize_mask_to_grid(m, ctx.grid, settings.mt_threshold, keep_nonempty=False,
                                      mode=settings.mask_resize).float()
            if device is not None:
                m_t = m_t.to(device)
            self._mt_cache[key] = (m_t, bool(m_t.any()))
        return self._mt_cache[key]

    def _row_weights(self, ctx: AttentionContext, rows: list[int], device: torch.device) -> torch.Tensor | None:
        """M_t per row, (rows, q_tokens) on ``device``, or None when it is empty for every row."""
        per_slot = {slot: self._mt_entry(ctx, slot, device) for slot in {ctx.rows.slot[r] for r in rows}}
        if not any(entry is not None and entry[1] for entry in per_slot.values()):
            return None
        zeros = torch.zeros(ctx.tokens, device=device)
        return torch.stack([_or(per_slot[ctx.rows.slot[r]], zeros) for r in rows])


def target_map(controls: SpecRefControls, store: CrossAttentionStore | None, slot: int) -> torch.Tensor | None:
    """The (h, w) map M_t of ``slot`` is thresholded from: the fixed target mask, or the target word's
    running-mean map over every call recorded so far, min-max normalised (None before any map)."""
    if controls.target_mask is not None:
        return controls.target_mask
    positions = controls.target_positions
    if store is None or positions is None or slot not in store.recorded_slots("cond"):
        return None
    maps = store.maps("cond", [slot])[0]  # (tokens, h, w)
    bad = [p for p in positions if p >= maps.shape[0]]
    if bad:
        raise SpecRefError(f"RealEdit: target word positions {bad} lie outside the {maps.shape[0]} prompt tokens.")
    return word_map(maps, positions)


def _or(entry: tuple[torch.Tensor, bool] | None, default: torch.Tensor) -> torch.Tensor:
    return default if entry is None else entry[0]


# -- the two-path hook -----------------------------------------------------------------------------------
class SpecRefHook:
    """SpecRef's attention hook: maps, P2P and SR-attention for a two-path batch (see module doc).

    ``reference`` is a :class:`StoredReference` or :class:`LiveReference` (None: no SR-attention,
    i.e. P2P with LocalBlend maps only).
    """

    def __init__(self, controls: SpecRefControls, reference: ReferenceSource | None = None, *,
                 max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
        self.controls, self.reference = controls, reference
        s = controls.settings
        self.store = CrossAttentionStore(downscales=(s.map_downscale,), kinds=("cond",),
                                         slots=(SOURCE_SLOT, EDIT_SLOT), max_elements=max_elements) \
            if controls.records_maps else None
        self.p2p = P2PHook(controls.cross_edit, s.p2p, store=self.store, src_slot=SOURCE_SLOT,
                           edit_slot=EDIT_SLOT, self_replace_uncond=controls.self_replace_uncond,
                           max_elements=max_elements)
        self.sr = SRMixer(controls, reference, self.store) if reference is not None else None
        self.begin_run()

    def __deepcopy__(self, memo: dict) -> SpecRefHook:
        return self

    def begin_run(self) -> None:
        """Start of a sampling run: forget maps, masks and statistics (re-queued graphs repeat)."""
        if self.store is not None:
            self.store.reset()
        if self.sr is not None:
            self.sr.begin_run()
        self.last_blend_mask: torch.Tensor | None = None

    @property
    def stats(self) -> SRStats:
        """What SR-attention did in this run (all zero without a reference)."""
        return self.sr.stats if self.sr is not None else SRStats()

    # -- attention ------------------------------------------------------------------------------------
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        if ctx.kind == "cross":
            return self.p2p.cross_attention(q, k, v, ctx)
        return self.self_attention(q, k, v, ctx)

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       ctx: AttentionContext) -> torch.Tensor | None:
        """P2P self-attention replacement, or, in SR-attention's layers and steps, SR-attention (Eq. 2-3)
        on the edit rows with O_self = Attn(Q~, K~) V~, the rows' *own* attention: the official code skips
        P2P's self-replacement there. Other rows (e.g. unconditional edit rows without ``sr_uncond_shared_kv``)
        keep P2P's replacement."""
        rows = self.sr_rows(ctx)
        if self.sr is None or not rows or not self.sr.active(ctx):
            return self.p2p.self_attention(q, k, v, ctx)
        out = self.p2p.self_attention(q, k, v, ctx, keep=rows)
        mixed = self.sr.mix(q, k, v, ctx, rows, out)
        return out if mixed is None else mixed

    def sr_rows(self, ctx: AttentionContext) -> list[int]:
        """The rows SR-attention edits: the edit path's conditional (and optionally unconditional) rows."""
        rows = ctx.rows.rows("cond", EDIT_SLOT)
        if self.controls.sr_uncond_shared_kv:
            rows += ctx.rows.rows("uncond", EDIT_SLOT)
        return sorted(rows)

    def target_map(self) -> torch.Tensor | None:
        """The (h, w) map the edit path's M_t is thresholded from (see :func:`target_map`)."""
        return target_map(self.controls, self.store, EDIT_SLOT)

    # -- LocalBlend and previews ----------------------------------------------------------------------
    def blend(self, x_src: torch.Tensor, x_edit: torch.Tensor, step: int, total: int) -> torch.Tensor:
        """LocalBlend after step ``step`` (Eq. 5): the edit latent outside the mask := x_src exactly."""
        lb = self.controls.local_blend
        if lb is None or self.store is None:
            return x_edit
        out, mask = lb(x_src, x_edit, self.store, step, total)
        if mask is not None:
            self.last_blend_mask = mask
        return out

    def mt_mask(self, latent_hw: tuple[int, int]) -> torch.Tensor | None:
        """The final M_t (the map the next step would use) at latent size, (H, W) float 0/1, for preview."""
        return _preview(self.target_map(), latent_hw, self.controls.settings)

    def blend_mask(self) -> torch.Tensor | None:
        """The last LocalBlend mask used, (H, W) float 0/1, or None when LocalBlend never ran."""
        return None if self.last_blend_mask is None else self.last_blend_mask.float()


def _preview(m: torch.Tensor | None, latent_hw: tuple[int, int], settings: SpecRefSettings) -> torch.Tensor | None:
    """A map resized to latent size as M_t is (``settings.mask_resize``) and thresholded, (H, W) float 0/1."""
    if m is None:
        return None
    return resize_mask_to_grid(m, latent_hw, settings.mt_threshold, keep_nonempty=False,
                               mode=settings.mask_resize).reshape(latent_hw).float()


# -- SR-attention in any sampler ---------------------------------------------------------------------------
class ScheduleMismatchError(SpecRefError):
    """A sampler's sigmas are not (a slice of) the schedule the reference features were made with."""


def schedule_offset(sampler_sigmas: torch.Tensor, edit_sigmas: torch.Tensor, rtol: float = 1e-4) -> int | None:
    """The edit step at which a sampler's schedule starts, or None when it is not part of ``edit_sigmas``.

    ``edit_sigmas`` is the descending schedule the features were made for (N + 1 entries, edit step s
    evaluates ``edit_sigmas[s]``). The sampler matches when the sigmas it evaluates (all but its last) are
    consecutive entries of it: the same steps and scheduler, or a start/end-step slice of them
    (KSamplerAdvanced). Its last sigma is free (``force_full_denoise`` sets it to 0).
    """
    evaluated = sampler_sigmas.detach().double().cpu()[:-1]
    schedule = edit_sigmas.detach().double().cpu()
    n = len(evaluated)
    if n == 0:
        return None
    for offset in range(len(schedule) - n):
        window = schedule[offset : offset + n]
        if torch.allclose(evaluated, window, rtol=rtol, atol=1e-6):
            return offset
    return None


class SRAttentionHook:
    """SR-attention (Eq. 2-3) for any sampler (RealEdit Apply SR-Attention): no two-path batch, no P2P.

    Every conditional row (each latent of the user's batch, its prompt slot) is an edit row. The hook
    records those rows' cross-attention in the ``map_downscale`` layers itself (the maps are computed a
    second time beside the host's attention, which then runs unchanged), so M_t is the target word's
    running mean since the first step of this run; ``begin_run`` resets it per run. Stored reference
    features are keyed by edit step: :meth:`begin_sampling` maps the sampler's steps onto them by sigma
    and refuses a sampler whose schedule is not the one the features were made with. A call SR-attention
    does not change declines, so with M_t empty everywhere the model samples bit for bit as without it.
    """

    def __init__(self, controls: SpecRefControls, reference: StoredReference, edit_sigmas: torch.Tensor, *,
                 max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
        s = controls.settings
        self.store = CrossAttentionStore(downscales=(s.map_downscale,), kinds=("cond",), slots=None,
                                         max_elements=max_elements) \
            if controls.target_mask is None else None
        self.controls, self.reference, self.edit_sigmas = controls, reference, edit_sigmas
        self.sr = SRMixer(controls, reference, self.store)
        self.offset: int | None = None
        self.begin_run()

    def __deepcopy__(self, memo: dict) -> SRAttentionHook:
        return self

    @property
    def stats(self) -> SRStats:
        return self.sr.stats

    def begin_run(self) -> None:
        """Start of a sampling run: forget the maps (M_t is a running mean per run) and statistics."""
        if self.store is not None:
            self.store.reset()
        self.sr.begin_run()

    def begin_sampling(self, sigmas: torch.Tensor) -> None:
        """Map the sampler's step indices onto edit steps by sigma; refuse a schedule the features lack."""
        offset = schedule_offset(sigmas, self.edit_sigmas)
        if offset is None:
            raise ScheduleMismatchError(
                f"RealEdit Apply SR-Attention: the sampler runs {len(sigmas) - 1} steps from sigma "
                f"{float(sigmas[0]):.4g} to {float(sigmas[-1]):.4g}, but the REF_FEATURES hold K/V for the "
                f"{len(self.edit_sigmas) - 1}-step schedule from {float(self.edit_sigmas[0]):.4g} they were "
                "inverted with. Set the sampler to the same steps and scheduler as RealEdit Reference Features "
                "(denoise 1; start/end steps of that schedule are fine), or re-run it with this sampler's steps.")
        self.offset = offset

    def _edit_ctx(self, ctx: AttentionContext) -> AttentionContext | None:
        if ctx.step is None or self.offset is None:
            return None
        return dataclasses.replace(ctx, step=ctx.step + self.offset)

    def rows(self, ctx: AttentionContext) -> list[int]:
        kinds: tuple[RowKind, ...] = ("cond", "uncond") if self.controls.sr_uncond_shared_kv else ("cond",)
        return sorted(r for kind in kinds for r in ctx.rows.rows(kind))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        if ctx.kind == "cross":
            if self.store is not None:
                self.store.observe(q, k, ctx)
            return None
        edit_ctx = self._edit_ctx(ctx)
        if edit_ctx is None or not self.sr.active(edit_ctx):
            return None
        rows = self.rows(ctx)
        return self.sr.mix(q, k, v, edit_ctx, rows, None) if rows else None

    def mt_mask(self, slot: int, latent_hw: tuple[int, int]) -> torch.Tensor | None:
        """M_t of ``slot`` as of the last step, at latent size (H, W) float 0/1 (None before any map)."""
        return _preview(self.sr.target_map(slot), latent_hw, self.controls.settings)

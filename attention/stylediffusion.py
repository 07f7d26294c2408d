"""StyleDiffusion's attention side (Li et al. 2023; official code sen-mao/StyleDiffusion, ``sd:N`` lines).

* :class:`CrossMapRecorder`: the per-head cross-attention maps softmax(Q K^T / sqrt(d)) of the conditional
  rows in the "16x16-class" layers (latent / 4: input 7-8 and output 3-5 of SD1.x at 512 px, sd:731-733),
  kept *with* their autograd graph: the inversion's attention regularisation (sd:795-814) differentiates
  through them. It never changes a call (always declines).
* :func:`attention_loss`: the sum over those layers of the per-head map MSE.
* :class:`LiveValue`: the value input the optimisation is evaluating, read by the host's value patch for
  the conditional rows (ComfyUI ``ScheduledValue``; diffusers ``DiffusersHost(value_input=...)``).
* P2Plus editing: :class:`P2PlusControls` (the settings object both hosts take), :class:`P2PlusValues`
  (the edit's value schedule: source row ``c_src * A_s + B_s`` at every step, target row
  ``c_tgt * A_s + B_s`` while s < int(tau_v N), sd:466-476, 923-925) and :class:`P2PlusHook` (P2P cross
  and self replacement plus the unconditional branch's self-attention replacement, tau_u, sd:209-260).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..settings.stylediffusion import SD_DEFAULTS
from .hooks import AttentionContext, RowInfo, RowKind
from .local_blend import LocalBlend
from .math import attention_probs
from .p2p import CrossEdit, P2PHook
from .settings import CLIP_CHUNK, P2PSettings, SpecRefSettings, check_unit, in_window
from .specref import SpecRefControls, SpecRefHook

log = logging.getLogger("realedit")
SOURCE_SLOT, TARGET_SLOT = 0, 1
# layer index -> (rows, heads, q_tokens, k_tokens) maps of one UNet call
LayerMaps = dict[int, torch.Tensor]


class StyleDiffusionError(ValueError):
    """Inputs or settings StyleDiffusion cannot run with."""


# -- the inversion's attention regularisation -----------------------------------------------------------
class CrossMapRecorder:
    """Records the conditional rows' per-head cross-attention maps of the layers at ``downscale`` (16x16 on
    a 64x64 latent), one map per layer per UNet call, with grad; declines every call (the host's attention
    runs unchanged). Only while ``active``; :meth:`take` hands the current call's maps over."""

    def __init__(self, downscale: int = SD_DEFAULTS.map_downscale) -> None:
        self.downscale = downscale
        self.active = False
        self._maps: LayerMaps = {}

    def __deepcopy__(self, memo: dict) -> CrossMapRecorder:
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> None:
        if self.active and ctx.kind == "cross" and ctx.layer.downscale == self.downscale:
            rows = ctx.rows.cond_rows
            if rows:
                self._maps[ctx.layer.index] = attention_probs(q[rows], k[rows], ctx.heads)  # (rows, heads, q, k)
        return None

    def take(self) -> LayerMaps:
        """The maps recorded since the last take (and forget them)."""
        maps, self._maps = self._maps, {}
        return maps


def map_target_call(step: int, steps: int) -> int:
    """The DDIM-inversion call whose maps are edit step s's target: the call with the same *input* latent
    z_{N-s}, i.e. call N - s; step 0 (input z_N, never an inversion input) uses call N - 1. The official
    code pairs them this way (sd:746, 809); pairing by timestep label would take call N - 1 - s."""
    return min(steps - step, steps - 1)


def attention_loss(maps: LayerMaps, targets: LayerMaps) -> torch.Tensor:
    """sum over the recorded layers of MSE(per-head map, the inversion's map) (sd:795-814)."""
    if not targets:
        raise StyleDiffusionError("RealEdit: no cross-attention maps were recorded at the map layers (latent / 4); "
                                  "StyleDiffusion's attention regularisation needs an SD-family UNet.")
    if set(maps) != set(targets):
        raise StyleDiffusionError(f"RealEdit: the optimisation recorded cross-attention maps of layers "
                                  f"{sorted(maps)} but the inversion of layers {sorted(targets)}.")
    losses = [F.mse_loss(maps[layer].float(), targets[layer].to(maps[layer].device).float()) for layer in
              sorted(targets)]
    return torch.stack(losses).sum()


class LiveValue:
    """The value input being evaluated, for every conditional row (a :data:`~.hooks.RowSchedule`)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> LiveValue:
        return self

    def __call__(self, kind: str, slot: int, step: int | None) -> torch.Tensor | None:
        return self.value if kind == "cond" else None


# -- P2Plus editing ---------------------------------------------------------------------------------------
class LearnedValues(Protocol):
    """What the edit needs of a StyleDiffusion inversion (:class:`~..inversion.value_inversion.ValueInversion`)."""

    source_embedding: torch.Tensor
    steps: int

    def value(self, embedding: torch.Tensor, step: int) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class P2PlusControls:
    """P2Plus editing settings (both hosts). Defaults and their origins: :mod:`realedit.settings.stylediffusion`.

    ``cross_edit``: the P2P cross-attention control (Replace / Refine / Reweight; None: off), active while
    s < int(tau_c N). ``local_blend``: LocalBlend on the blend words' positions per path. ``use_values``
    False leaves every value input the text embedding (plain P2P; for comparisons and tests).
    """

    tau_v: float = SD_DEFAULTS.tau_v
    tau_c: float = SD_DEFAULTS.tau_c
    tau_s: float = SD_DEFAULTS.tau_s
    tau_u: float = SD_DEFAULTS.tau_u
    pin_source: bool = SD_DEFAULTS.pin_source
    use_values: bool = True
    cross_edit: CrossEdit | None = None
    local_blend: LocalBlend | None = None
    self_replace_max_tokens: int = SD_DEFAULTS.self_replace_max_tokens
    blend_threshold: float = SD_DEFAULTS.blend_threshold
    blend_start: float = SD_DEFAULTS.blend_start
    map_downscale: int = SD_DEFAULTS.map_downscale

    def __post_init__(self) -> None:
        for name in ("tau_v", "tau_c", "tau_s", "tau_u", "blend_threshold", "blend_start"):
            check_unit(name, getattr(self, name), StyleDiffusionError)

    def specref_controls(self) -> SpecRefControls:
        """The P2P part as the two-path sampler's controls (no reference, no SR-attention)."""
        p2p = P2PSettings(cross_replace=self.tau_c, self_replace=self.tau_s,
                          self_replace_max_tokens=self.self_replace_max_tokens,
                          blend_threshold=self.blend_threshold, blend_start=self.blend_start)
        return SpecRefControls(settings=SpecRefSettings(p2p=p2p, map_downscale=self.map_downscale),
                               cross_edit=self.cross_edit, local_blend=self.local_blend)


class P2PlusValues:
    """The edit's value schedule (a :data:`~.hooks.RowSchedule`): conditional source row ``c_src * A_s + B_s``
    at every step; conditional target row ``c_tgt * A_s + B_s`` while s < int(tau_v N), then its own text
    embedding (sd:466-476, 923-925); unconditional rows never change."""

    def __init__(self, inversion: LearnedValues, target: torch.Tensor, tau_v: float) -> None:
        steps = inversion.steps
        self.source = [inversion.value(inversion.source_embedding, s) for s in range(steps)]
        self.target = [inversion.value(target, s) for s in range(steps) if in_window(s, tau_v, steps)]

    def __deepcopy__(self, memo: dict) -> P2PlusValues:
        return self

    def __call__(self, kind: str, slot: int, step: int | None) -> torch.Tensor | None:
        if kind != "cond" or step is None or not 0 <= step < len(self.source):
            return None
        if slot == SOURCE_SLOT:
            return self.source[step]
        if slot == TARGET_SLOT and step < len(self.target):
            return self.target[step]
        return None


class P2PlusHook(SpecRefHook):
    """P2P for the two-path batch (cross-attention in the conditional rows while s < int(tau_c N); LocalBlend
    maps), with self-attention map replacement in layers of at most 32x32 queries: the conditional target
    row takes the source's maps while s < int(tau_s N), the *unconditional* target row the unconditional
    source row's while s < int(tau_u N) (P2Plus, sd:209-260). tau_u 0 is plain P2P."""

    def __init__(self, controls: P2PlusControls) -> None:
        super().__init__(controls.specref_controls())
        self.p2plus = controls
        # one P2P self-replacement over both kinds, told per call which kinds are in their window
        every_step = P2PSettings(self_replace=1.0, self_replace_max_tokens=controls.self_replace_max_tokens)
        self.self_replace = P2PHook(None, every_step, src_slot=SOURCE_SLOT, edit_slot=TARGET_SLOT,
                                    self_replace_uncond=True)

    def self_kinds(self, ctx: AttentionContext) -> tuple[RowKind, ...]:
        """The row kinds whose target rows take the source's self-attention maps at this call's step."""
        windows: tuple[tuple[RowKind, float], ...] = (("cond", self.p2plus.tau_s), ("uncond", self.p2plus.tau_u))
        return tuple(kind for kind, frac in windows if in_window(ctx.step, frac, ctx.total_steps))

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       ctx: AttentionContext) -> torch.Tensor | None:
        kinds = self.self_kinds(ctx)
        if not kinds:
            return None
        # rows of the other kind get no slot: the replacement pairs (kind, slot 0) with (kind, slot 1) only
        slots = tuple(s if kind in kinds else -1 for kind, s in zip(ctx.rows.kind, ctx.rows.slot))
        return self.self_replace.self_attention(q, k, v, dataclasses.replace(ctx, rows=RowInfo(ctx.rows.kind, slots)))


def check_one_chunk(name: str, embedding: torch.Tensor) -> None:
    """A prompt embedding over one 77-token CLIP chunk is refused: A_s, B_s are learned per token of one chunk."""
    if embedding.ndim == 3 and embedding.shape[1] > CLIP_CHUNK:
        raise StyleDiffusionError(f"RealEdit: the {name} has {embedding.shape[1]} tokens, more than one "
                                  f"{CLIP_CHUNK}-token CLIP chunk; StyleDiffusion learns one value input per token "
                                  "of one chunk. Shorten the prompt.")


def check_edit_prompts(inversion: LearnedValues, prompts: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Each prompt embedding must have the inversion's token count and width (A_s, B_s multiply it)."""
    shape = tuple(inversion.source_embedding.shape[-2:])
    for name, embedding in prompts:
        check_one_chunk(name, embedding)
        if embedding.ndim != 3 or embedding.shape[0] != 1:
            raise StyleDiffusionError(f"RealEdit: the {name} is {tuple(embedding.shape)}; one prompt (1, tokens, "
                                      "width) is expected.")
        if tuple(embedding.shape[-2:]) != shape:
            raise StyleDiffusionError(
                f"RealEdit: the {name} has {embedding.shape[-2]} tokens x {embedding.shape[-1]}, but the "
                f"StyleDiffusion INVERSION learned A_s, B_s for {shape[0]} x {shape[1]} (its source prompt); keep "
                "every prompt within one 77-token chunk and encode it with the same CLIP.")


def edit_warnings(inversion: LearnedValues, source: torch.Tensor, cfg: float, inversion_cfg: float) -> list[str]:
    """What makes the source row drift from the inversion's reconstruction (logged, not refused): another CFG
    than the values were learned for, or another source prompt than the inversion's (its keys differ)."""
    warnings = []
    if cfg != inversion_cfg:
        warnings.append(f"RealEdit: the value inputs were learned at CFG {inversion_cfg} but the edit uses {cfg}; the "
                        "source row reconstructs the photo only at the same CFG.")
    if not torch.allclose(source.detach().float().cpu(), inversion.source_embedding, atol=1e-5):
        warnings.append("RealEdit: the source prompt differs from the one the INVERSION learned its values for; "
                        "connect the same caption to both nodes.")
    for warning in warnings:
        log.warning(warning)
    return warnings

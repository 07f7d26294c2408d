"""diffusers host: run an :class:`~..attention.hooks.AttentionHook` as the attention processors of a
``UNet2DConditionModel``.

Every transformer block's ``attn1`` (self) and ``attn2`` (cross) gets a :class:`HookedAttnProcessor`
that computes q, k, v exactly as diffusers' ``AttnProcessor2_0`` does, hands them to the hook, and
runs ``AttnProcessor2_0``'s own SDPA when the hook declines, so a declining hook leaves the UNet's
output bit-identical. A processor that was not ``AttnProcessor2_0`` (IP-Adapter, xformers, ...) is
kept and runs whenever the hook declines.

Per-call context (rows, step, latent size) is read once per UNet forward by a forward pre-hook, so a
layer never syncs the device. Typical use::

    with DiffusersHost(unet, hook, schedule=scheduler.timesteps) as host:
        host.rows = RowInfo.from_chunks(["uncond", "cond"], batch)
        for t in scheduler.timesteps:
            noise = unet(torch.cat([x, x]), t, context).sample
            ...
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from typing_extensions import Self

from ..attention.hooks import (
    AttentionContext,
    AttentionHook,
    AttentionKind,
    LayerInfo,
    RowInfo,
    RowSchedule,
    check_hook_output,
    grid_for,
    schedule_index,
    substitute_rows,
)
from ..attention.math import attention, split_heads

Schedule = Sequence[float] | torch.Tensor


class UnsupportedModelError(ValueError):
    """The module is not a UNet with transformer blocks this pack knows how to patch."""


# --------------------------------------------------------------------------------------------------
# Layer discovery


def _transformer_blocks(block: torch.nn.Module, path: tuple) -> Iterator[tuple[tuple, torch.nn.Module]]:
    """(host_key, transformer block) of one UNet block's ``attentions``, in call order."""
    for j, transformer in enumerate(getattr(block, "attentions", None) or ()):
        for t, tb in enumerate(getattr(transformer, "transformer_blocks", ())):
            yield (*path, "attentions", j, "transformer_blocks", t), tb


def _walk(unet: torch.nn.Module) -> Iterator[tuple[str, int, tuple, torch.nn.Module]]:
    """(stage, downscale, host_key, transformer block) for every block, in forward call order."""
    downscale = 1
    for i, block in enumerate(unet.down_blocks):
        for key, tb in _transformer_blocks(block, ("down_blocks", i)):
            yield "down", downscale, key, tb
        if getattr(block, "downsamplers", None):
            downscale *= 2
    if getattr(unet, "mid_block", None) is not None:
        for key, tb in _transformer_blocks(unet.mid_block, ("mid_block",)):
            yield "mid", downscale, key, tb
    for i, block in enumerate(getattr(unet, "up_blocks", ())):
        for key, tb in _transformer_blocks(block, ("up_blocks", i)):
            yield "up", downscale, key, tb
        if getattr(block, "upsamplers", None):
            downscale //= 2


def _layers_and_blocks(unet: torch.nn.Module) -> list[tuple[LayerInfo, torch.nn.Module]]:
    if not hasattr(unet, "down_blocks"):
        raise UnsupportedModelError(
            f"RealEdit: {type(unet).__name__} is not a diffusers UNet (no down_blocks); pass the "
            "pipeline's UNet2DConditionModel (pipe.unet)."
        )
    found = [
        (LayerInfo(index, stage, downscale, key), tb)  # type: ignore[arg-type]
        for index, (stage, downscale, key, tb) in enumerate(_walk(unet))
    ]
    if not found:
        raise UnsupportedModelError(
            f"RealEdit: found no transformer blocks in {type(unet).__name__}; attention editing needs a "
            "UNet with cross-attention."
        )
    return found


def discover_layers(unet: torch.nn.Module) -> list[LayerInfo]:
    """The UNet's transformer blocks in forward call order (SD1.x: 0-5 down, 6 mid, 7-15 up).

    ``host_key`` is the block's module path as a tuple, e.g.
    ``("down_blocks", 0, "attentions", 0, "transformer_blocks", 0)``.
    """
    return [layer for layer, _ in _layers_and_blocks(unet)]


# --------------------------------------------------------------------------------------------------
# Step lookup


def timestep_to_step(timestep: float | None, schedule: Sequence[float] | None) -> tuple[int | None, int | None]:
    """Index of the sampling step a UNet call at ``timestep`` belongs to, and the number of steps.

    ``schedule`` holds one timestep per step (diffusers' ``scheduler.timesteps``). An exact (rtol
    1e-4) match wins; a timestep between two entries (a second-order scheduler's intermediate call)
    belongs to the step whose interval contains it. Works for descending (sampling) and ascending
    (inversion) schedules.
    """
    if timestep is None or not schedule:
        return None, None
    return schedule_index(timestep, schedule), len(schedule)


def _as_float(timestep: Any) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])  # the one device sync of a forward
    return float(timestep)


def _square_grid(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else (tokens, 1)


@dataclass(frozen=True)
class _CallState:
    """What the hook needs to know about the current UNet forward."""

    rows: RowInfo
    step: int | None
    total_steps: int | None
    latent_hw: tuple[int, int] | None


# --------------------------------------------------------------------------------------------------
# The processor


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``AttnProcessor2_0``'s attention on head-split tensors, merged back as it does it."""
    batch_size, heads, _, head_dim = query.shape
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)


def _project(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
             value_states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of (batch, tokens, channels) input, projected as ``AttnProcessor2_0`` does (group norm,
    then the encoder states' norm for cross-attention). ``value_states``: a separate value input for
    cross-attention (StyleDiffusion; ComfyUI's ``attn2`` takes one too), normalised like the context."""
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
        if value_states is not None:
            value_states = attn.norm_encoder_hidden_states(value_states)
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context if value_states is None else value_states)


def _split_and_norm(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple:
    """Head-split q, k, v with ``norm_q``/``norm_k`` applied as ``AttnProcessor2_0`` does, plus the
    merged q and k the hook sees (the projections themselves when there is no q/k norm)."""
    qh, kh, vh = (split_heads(x, attn.heads) for x in (query, key, value))  # as AttnProcessor2_0 views them
    if attn.norm_q is not None:
        qh = attn.norm_q(qh)
        query = qh.transpose(1, 2).reshape(query.shape)
    if attn.norm_k is not None:
        kh = attn.norm_k(kh)
        key = kh.transpose(1, 2).reshape(key.shape)
    return query, key, qh, kh, vh


class HookedAttnProcessor:
    """The attention processor of one (transformer block, self/cross) pair.

    Mirrors ``AttnProcessor2_0.__call__`` line for line around the attention itself.
    """

    def __init__(self, host: DiffusersHost, layer: LayerInfo, kind: AttentionKind, previous: Any) -> None:
        self.host, self.layer, self.kind, self.previous = host, layer, kind, previous
        self.plain = type(previous) is AttnProcessor2_0
        self._ctx_cache: tuple[_CallState | None, int, AttentionContext] | None = None

    def context(self, attn: Attention, q: torch.Tensor, grid: tuple[int, int] | None) -> AttentionContext:
        """The hook's context for this call; built once per UNet forward and reused."""
        state, tokens = self.host.call_state, q.shape[1]
        cached = self._ctx_cache
        if cached is not None and state is not None and cached[0] is state and cached[1] == tokens:
            return cached[2]
        if grid is None:
            hw = state.latent_hw if state is not None else None
            grid = grid_for(hw, self.layer.downscale, tokens) if hw else _square_grid(tokens)
        rows = state.rows if state is not None else self.host.default_rows(q.shape[0])
        ctx = AttentionContext(
            layer=self.layer, kind=self.kind, grid=grid, heads=attn.heads,
            dim_head=attn.inner_dim // attn.heads, rows=rows,
            step=state.step if state is not None else None,
            total_steps=state.total_steps if state is not None else None,
            host_attention=functools.partial(attention, heads=attn.heads),  # the UNet's own unmasked SDPA
        )
        self._ctx_cache = (state, tokens, ctx)
        return ctx

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self.plain:
            if self.kind == "cross" and self.host.value_input is not None:
                raise ValueError(f"RealEdit: the cross-attention of layer {self.layer.index} runs "
                                 f"{type(self.previous).__name__}; StyleDiffusion's value input needs diffusers' "
                                 "AttnProcessor2_0 there (unet.set_attn_processor(AttnProcessor2_0())).")
            return self._call_previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                       args, kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        grid = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            grid = (height, width)

        hidden_states = self._attention(attn, hidden_states, encoder_hidden_states, attention_mask, grid)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attention(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                   attention_mask: torch.Tensor | None, grid: tuple[int, int] | None) -> torch.Tensor:
        """q/k/v projection, hook or SDPA, and ``to_out``, on (batch, tokens, channels) input."""
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = _project(attn, hidden_states, encoder_hidden_states,
                                     self._value_input(encoder_hidden_states))
        out = self._hook_or_sdpa(attn, query, key, value, attention_mask, grid)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _value_input(self, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor | None:
        """The host's scheduled value input for this cross-attention call (rows it names replaced), or None."""
        schedule = self.host.value_input
        if schedule is None or self.kind != "cross" or encoder_hidden_states is None:
            return None
        state = self.host.call_state
        rows = state.rows if state is not None else self.host.default_rows(encoder_hidden_states.shape[0])
        value = substitute_rows(encoder_hidden_states, rows, state.step if state is not None else None, schedule)
        return None if value is encoder_hidden_states else value

    def _hook_or_sdpa(self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: torch.Tensor | None, grid: tuple[int, int] | None) -> torch.Tensor:
        query, key, qh, kh, vh = _split_and_norm(attn, query, key, value)
        if mask is None:
            out = self._run_hook(attn, query, key, value, grid)
            if out is not None:
                return out
        else:
            self.host.warn_mask_once()
        return _sdpa(qh, kh, vh, mask)

    def _run_hook(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  grid: tuple[int, int] | None) -> torch.Tensor | None:
        ctx = self.context(attn, q, grid)
        out = self.host.hook(q, k, v, ctx)
        if out is None:
            return None
        return check_hook_output(out, q, v, ctx).to(q.dtype)

    def _call_previous(self, attn: Attention, hidden_states: torch.Tensor,
                       encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None,
                       temb: torch.Tensor | None, args: tuple, kwargs: dict) -> torch.Tensor:
        """A foreign processor: let the hook answer first, else the processor runs as before.

        The hook sees q, k, v projected like ``AttnProcessor2_0``; when it answers, its output goes
        through ``to_out`` and the foreign processor's extras (e.g. IP-Adapter's image tokens) are
        skipped, and ``ctx.host_attention`` is plain SDPA. Keyword arguments only the foreign
        processor declares (``ip_adapter_masks``) are dropped by ``Attention.forward`` before they
        reach us.
        """
        if hidden_states.ndim == 3 and attention_mask is None and attn.spatial_norm is None:
            out = self._hook_only(attn, hidden_states, encoder_hidden_states)
            if out is not None:
                if attn.residual_connection:
                    out = out + hidden_states
                return out / attn.rescale_output_factor
        if args:
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if temb is not None:  # not every processor takes temb
            kwargs = {**kwargs, "temb": temb}
        return self.previous(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)

    def _hook_only(self, attn: Attention, hidden_states: torch.Tensor,
                   encoder_hidden_states: torch.Tensor | None) -> torch.Tensor | None:
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        q, k, *_ = _split_and_norm(attn, q, k, v)
        out = self._run_hook(attn, q, k, v, None)
        return None if out is None else attn.to_out[1](attn.to_out[0](out))


# --------------------------------------------------------------------------------------------------
# The host


class DiffusersHost:
    """Installs a hook as the attention processors of a diffusers UNet, and carries its call context.

    Set before (or between) UNet calls:

    * ``rows``: a :class:`RowInfo` for the batch the UNet is called with (e.g.
      ``RowInfo.from_chunks(["uncond", "cond"], n)`` for a classifier-free-guidance batch);
      ``None`` (the default) means every row is cond, slot = row index.
    * ``step`` / ``total_steps``: the current step; when ``step`` is ``None`` it is looked up from
      the timestep the UNet is called with in ``schedule`` (the sampler's timesteps).

    ``install()`` / ``uninstall()`` or ``with host:`` put the processors on and take them off again
    (the original processor objects are restored). Hosts on one UNet must be uninstalled in the
    reverse order of installation.

    ``value_input``: StyleDiffusion's value schedule, ``(kind, slot, step) -> (1, tokens, width) | None``;
    the rows it names project their cross-attention *value* from it instead of the text context (keys keep
    the context), the twin of ComfyUI's ``ScheduledValue`` patch. None (default): nothing changes.
    """

    def __init__(self, unet: torch.nn.Module, hook: AttentionHook, *, schedule: Schedule | None = None,
                 self_attention: bool = True, cross_attention: bool = True,
                 value_input: RowSchedule | None = None) -> None:
        self.unet, self.hook, self.value_input = unet, hook, value_input
        self._blocks = _layers_and_blocks(unet)
        self.layers = [layer for layer, _ in self._blocks]
        self.kinds: tuple[AttentionKind, ...] = ("self",) * self_attention + ("cross",) * cross_attention
        self.rows: RowInfo | None = None
        self.step: int | None = None
        self.total_steps: int | None = None
        self.schedule = schedule
        self.call_state: _CallState | None = None
        self._originals: list[tuple[Attention, Any, HookedAttnProcessor]] | None = None
        self._pre_hook: Any = None
        self._default_rows: RowInfo | None = None
        self._mask_warned = False

    # -- schedule -----------------------------------------------------------------------------------

    @property
    def schedule(self) -> list[float] | None:
        return self._schedule

    @schedule.setter
    def schedule(self, value: Schedule | None) -> None:
        """Stored as floats on the CPU once, so step lookups never touch the device."""
        if value is None:
            self._schedule = None
        elif isinstance(value, torch.Tensor):
            self._schedule = value.detach().float().cpu().reshape(-1).tolist()
        else:
            self._schedule = [float(t) for t in value]

    # -- install / uninstall ------------------------------------------------------------------------

    @property
    def installed(self) -> bool:
        return self._originals is not None

    def install(self) -> DiffusersHost:
        if self.installed:
            raise RuntimeError("RealEdit: this DiffusersHost is already installed.")
        originals = []
        for layer, block in self._blocks:
            for kind in self.kinds:
                attn = block.attn1 if kind == "self" else block.attn2
                if attn is None:
                    continue
                processor = HookedAttnProcessor(self, layer, kind, attn.processor)
                originals.append((attn, attn.processor, processor))
                attn.set_processor(processor)
        self._originals = originals
        self._pre_hook = self.unet.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self.begin_run()
        return self

    def begin_run(self) -> None:
        """Tell the hook a sampling run begins (its ``begin_run``, if any, resets per-run state).

        ComfyUI's host calls it once per sampler run; here ``install()`` calls it, and a caller that
        runs several loops (e.g. inversion, then sampling) under one install calls it before each.
        """
        begin_run = getattr(self.hook, "begin_run", None)
        if begin_run is not None:
            begin_run()

    def uninstall(self) -> None:
        """Put the original processors back (no-op when not installed)."""
        if self._originals is None:
            return
        if any(attn.processor is not ours for attn, _, ours in self._originals):
            raise RuntimeError(
                "RealEdit: an attention processor installed by this host was replaced since; uninstall "
                "hosts in the reverse order of installation (and do not call set_attn_processor meanwhile)."
            )
        for attn, original, _ in self._originals:
            attn.set_processor(original)
        self._pre_hook.remove()
        self._originals, self._pre_hook, self.call_state = None, None, None

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    # -- per-forward context ------------------------------------------------------------------------

    def default_rows(self, batch: int) -> RowInfo:
        """All rows cond, slot = row index (a call with no ``rows`` set)."""
        if self._default_rows is None or len(self._default_rows) != batch:
            self._default_rows = RowInfo.from_chunks(["cond"], batch)
        return self._default_rows

    def _rows_for(self, batch: int) -> RowInfo:
        if self.rows is None:
            return self.default_rows(batch)
        if len(self.rows) != batch:
            raise ValueError(
                f"RealEdit: host.rows describes {len(self.rows)} rows but the UNet was called with a batch "
                f"of {batch}; set host.rows for this call (or None for all-cond)."
            )
        return self.rows

    def _step_for(self, timestep: Any) -> tuple[int | None, int | None]:
        """Explicit ``step``/``total_steps`` win; else both come from ``schedule`` (one sync)."""
        step, total = self.step, self.total_steps
        if self._schedule:
            if step is None:
                step, _ = timestep_to_step(_as_float(timestep), self._schedule)
            if total is None:
                total = len(self._schedule)
        return step, total

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        step, total = self._step_for(timestep)
        self.call_state = _CallState(
            rows=self._rows_for(sample.shape[0]),
            step=step,
            total_steps=total,
            latent_hw=(int(sample.shape[-2]), int(sample.shape[-1])),
        )

    def warn_mask_once(self) -> None:
        if not self._mask_warned:
            self._mask_warned = True
            warnings.warn(
                "RealEdit: an attention call came with an attention mask; the hook is skipped for masked "
                "calls (the UNet's own attention runs).",
                stacklevel=3,
            )

    # -- convenience --------------------------------------------------------------------------------

    def predict_noise(self, x: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                      rows: RowInfo | None = None, step: int | None = None, total_steps: int | None = None,
                      *, unet_kwargs: Mapping[str, Any] | None = None, **added_cond: torch.Tensor) -> torch.Tensor:
        """One UNet call with the given context; returns ``.sample``.

        ``added_cond`` goes to ``added_cond_kwargs`` (SDXL: ``text_embeds``, ``time_ids``);
        ``unet_kwargs`` to the UNet's other forward arguments. ``rows``/``step``/``total_steps``
        override the host's for this call only.
        """
        if not self.installed:
            raise RuntimeError("RealEdit: install the host first (host.install() or `with host:`).")
        saved = self.rows, self.step, self.total_steps
        self.rows = rows if rows is not None else self.rows
        self.step = step if step is not None else self.step
        self.total_steps = total_steps if total_steps is not None else self.total_steps
        try:
            extra = dict(unet_kwargs or {})
            if added_cond:
                extra["added_cond_kwargs"] = dict(added_cond)
            return self.unet(x, timestep, encoder_hidden_states, **extra).sample
        finally:
            self.rows, self.step, self.total_steps = saved


def install_hook(unet: torch.nn.Module, hook: AttentionHook, *, schedule: Schedule | None = None,
                 self_attention: bool = True, cross_attention: bool = True) -> DiffusersHost:
    """Install ``hook`` on ``unet`` in place; call ``.uninstall()`` on the result to take it off."""
    host = DiffusersHost(unet, hook, schedule=schedule, self_attention=self_attention,
                         cross_attention=cross_attention)
    return host.install()

"""ComfyUI host: install an :class:`~..attention.hooks.AttentionHook` on a ``ModelPatcher`` clone.

Every transformer block of the UNet gets an ``attn1`` and an ``attn2`` replace patch (discovered from
the model, so SD1.x, SD2.x and SDXL all work). A patch already present on a block (IPAdapter-style
packs) is wrapped: it runs whenever our hook declines, and hooks can call it through
``ctx.host_attention``. The big state of a hook lives in the hook
object itself; ``model_options`` only holds small closures, and the closure's ``__deepcopy__`` returns
itself so ``ModelPatcher.clone()`` never copies banks or stores.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import comfy.ldm.modules.attention as comfy_attention
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample
from comfy.patcher_extension import WrappersMP

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

WRAPPER_KEY = "realedit"
# ComfyUI's cond_or_uncond uses 0 for the positive and 1 for the negative prompt.
_ROW_KIND = {0: "cond", 1: "uncond"}


class UnsupportedModelError(ValueError):
    """The MODEL has no UNet transformer blocks this pack knows how to patch."""


def _diffusion_model(model_patcher: Any) -> torch.nn.Module:
    model = getattr(model_patcher, "model", None)
    unet = getattr(model, "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        name = type(unet if unet is not None else model).__name__
        raise UnsupportedModelError(
            f"RealEdit: the MODEL input is a {name}, not a Stable Diffusion UNet (SD1.x, SD2.x, SDXL); "
            "connect a model loaded from an SD-family checkpoint."
        )
    return unet


def discover_layers(model_patcher: Any) -> list[LayerInfo]:
    """The UNet's transformer blocks in forward call order, keyed as ComfyUI's replace patches are."""
    unet = _diffusion_model(model_patcher)
    layers: list[LayerInfo] = []
    downscale = 1

    def add_transformers(block: torch.nn.Module, stage: str, host_block: tuple[str, int]) -> None:
        for module in block:
            if isinstance(module, comfy_attention.SpatialTransformer):
                for t in range(len(module.transformer_blocks)):
                    key = (*host_block, t)
                    layers.append(LayerInfo(len(layers), stage, downscale, key))

    def resamples(block: torch.nn.Module, kind: type) -> bool:
        return any(isinstance(m, kind) for m in block.modules())

    for i, block in enumerate(unet.input_blocks):
        if resamples(block, Downsample):
            downscale *= 2
        add_transformers(block, "down", ("input", i))
    add_transformers(unet.middle_block, "mid", ("middle", 0))
    for i, block in enumerate(unet.output_blocks):
        add_transformers(block, "up", ("output", i))
        if resamples(block, Upsample):
            downscale //= 2
    if not layers:
        raise UnsupportedModelError(
            f"RealEdit: found no transformer blocks in {type(unet).__name__} of "
            f"{type(model_patcher.model).__name__}; attention editing needs a UNet with cross-attention."
        )
    return layers


class _SigmaSteps:
    """Maps the sigma of the current model call to its step index in ``sample_sigmas``.

    Patches receive sigmas, not steps. The same ``sigmas`` tensor object is passed to every layer of
    one model call, so the (device-syncing) lookup runs once per call, not once per layer.
    """

    def __init__(self) -> None:
        self._last: tuple[torch.Tensor | None, torch.Tensor | None, int | None, int | None] = (
            None, None, None, None,
        )

    def __call__(self, extra_options: dict) -> tuple[int | None, int | None]:
        sigmas = extra_options.get("sigmas")
        schedule = extra_options.get("sample_sigmas")
        last_sigmas, last_schedule, step, total = self._last
        if sigmas is last_sigmas and schedule is last_schedule:
            return step, total
        step, total = sigma_to_step(sigmas, schedule)
        self._last = (sigmas, schedule, step, total)
        return step, total


def sigma_to_step(sigmas: torch.Tensor | None, schedule: torch.Tensor | None) -> tuple[int | None, int | None]:
    """Index of the schedule entry a model call at ``sigmas`` belongs to, and the number of steps.

    An exact (rtol 1e-4) match with a schedule entry gives that entry's index: the step that starts
    there when sampling; when inverting along an ascending schedule with the "next" convention, the
    label's index (up to ``total``). A sigma between two entries (the intermediate evaluations of
    heun or dpmpp_2s) belongs to the step whose interval contains it.
    """
    if sigmas is None or schedule is None or len(schedule) < 2:
        return None, None
    values = schedule.detach().float().cpu().tolist()
    return schedule_index(float(sigmas.reshape(-1)[0]), values), len(values) - 1


def row_info(cond_or_uncond: tuple[int, ...], batch: int) -> RowInfo:
    """Cond/uncond kind and prompt slot of each row of a model call's batch (``cond_or_uncond`` chunks)."""
    chunks = cond_or_uncond or (0,)
    if batch % len(chunks):
        chunks = (0,)  # called outside a sampler with an unrelated batch: all rows cond
    kinds = [_ROW_KIND.get(c, "cond") for c in chunks]
    return RowInfo.from_chunks(kinds, batch // len(chunks))


class HookedAttention:
    """The replace patch for one (block, self/cross) pair."""

    def __init__(
        self,
        hook: AttentionHook,
        layer: LayerInfo,
        kind: AttentionKind,
        previous: Callable | None,
        steps: _SigmaSteps,
    ) -> None:
        self.hook, self.layer, self.kind, self.previous, self.steps = hook, layer, kind, previous, steps
        self._rows_cache: tuple[tuple, RowInfo] | None = None

    def __deepcopy__(self, memo: dict) -> HookedAttention:
        return self  # ModelPatcher.clone() deep-copies model_options; the hook's state is shared

    def host_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """What would have run without us: the wrapped patch, else ComfyUI's attention backend."""
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return comfy_attention.optimized_attention(
            q, k, v, extra_options["n_heads"],
            attn_precision=extra_options.get("attn_precision"),
            transformer_options=extra_options,
        )

    def _rows(self, extra_options: dict, batch: int) -> RowInfo:
        chunks = tuple(extra_options.get("cond_or_uncond") or (0,))
        key = (chunks, batch)
        if self._rows_cache is None or self._rows_cache[0] != key:
            self._rows_cache = (key, row_info(chunks, batch))
        return self._rows_cache[1]

    def context(self, q: torch.Tensor, extra_options: dict) -> AttentionContext:
        shape = extra_options.get("activations_shape")
        if shape is not None and shape[-2] * shape[-1] == q.shape[1]:
            grid = (int(shape[-2]), int(shape[-1]))
        else:
            original = extra_options.get("original_shape") or [0, 0, q.shape[1], 1]
            grid = grid_for((original[-2], original[-1]), self.layer.downscale, q.shape[1])
        step, total = self.steps(extra_options)
        heads = extra_options["n_heads"]
        return AttentionContext(
            layer=self.layer,
            kind=self.kind,
            grid=grid,
            heads=heads,
            dim_head=extra_options.get("dim_head", q.shape[-1] // heads),
            rows=self._rows(extra_options, q.shape[0]),
            step=step,
            total_steps=total,
            host_attention=functools.partial(self.host_attention, extra_options=extra_options),
        )

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        ctx = self.context(q, extra_options)
        out = self.hook(q, k, v, ctx)
        if out is None:
            return self.host_attention(q, k, v, extra_options)
        return check_hook_output(out, q, v, ctx)


def install_hook(model_patcher: Any, hook: AttentionHook, *, self_attention: bool = True,
                 cross_attention: bool = True) -> Any:
    """Return a clone of ``model_patcher`` whose every attention call goes through ``hook``.

    The input model is never modified. Replace patches already on the model are wrapped and keep
    running whenever the hook declines.
    """
    layers = discover_layers(model_patcher)
    patched = model_patcher.clone()
    replace = patched.model_options.get("transformer_options", {}).get("patches_replace", {})
    steps = _SigmaSteps()
    kinds = [("attn1", "self")] * self_attention + [("attn2", "cross")] * cross_attention
    for layer in layers:
        for slot, kind in kinds:
            existing = replace.get(slot, {})
            previous = existing.get(layer.host_key, existing.get(layer.host_key[:2]))
            patch = HookedAttention(hook, layer, kind, previous, steps)
            patched.set_model_patch_replace(patch, slot, *layer.host_key)
    if hasattr(hook, "begin_run") or hasattr(hook, "begin_sampling"):
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _RunStart(hook))
    return patched


class _RunStart:
    """Outer-sample wrapper: tells a hook that a sampling run begins, before the first model call:
    ``begin_sampling(sigmas)`` gets the run's schedule, ``begin_run()`` resets per-run state."""

    def __init__(self, hook: AttentionHook) -> None:
        self.hook = hook

    def __deepcopy__(self, memo: dict) -> _RunStart:
        return self

    def __call__(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        begin_sampling = getattr(self.hook, "begin_sampling", None)
        if begin_sampling is not None:
            begin_sampling(args[3] if len(args) > 3 else kwargs["sigmas"])  # (noise, latent, sampler, sigmas, ...)
        begin_run = getattr(self.hook, "begin_run", None)
        if begin_run is not None:
            begin_run()
        return executor(*args, **kwargs)


def installed_patches(model_patcher: Any) -> list[HookedAttention]:
    """Our patches on a model (for tests and for nodes that look for an earlier RealEdit node)."""
    replace = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {})
    return [p for slot in replace.values() for p in slot.values() if isinstance(p, HookedAttention)]


# Which text context a (row kind, prompt slot) gets at an edit step; None keeps the prompt's own.
ContextSchedule = RowSchedule


class ScheduledContext:
    """An ``attn2_patch`` giving chosen rows a different text context at every step.

    Per-step embeddings (BARET's e_opt,s and e_trans,s; null-text inversion's per-step unconditional
    embedding) replace the cross-attention context of the rows ``schedule(kind, slot, step)`` names,
    before the block's K/V projections, in every transformer block. The rest of the CONDITIONING
    (pooled outputs, ControlNets) is untouched. ``attn2_patch`` is a list, so other packs' patches
    keep running. One model call passes one context tensor to every block: the substitution is
    computed once per call.
    """

    def __init__(self, schedule: ContextSchedule) -> None:
        self.schedule = schedule
        self.steps = _SigmaSteps()
        self._last: tuple[torch.Tensor | None, int | None, torch.Tensor | None] = (None, None, None)

    def __deepcopy__(self, memo: dict) -> ScheduledContext:
        return self

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor,
                 extra_options: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step, _ = self.steps(extra_options)
        if step is None or context is None:
            return n, context, value
        last_context, last_step, replaced = self._last
        if context is not last_context or step != last_step:
            rows = row_info(tuple(extra_options.get("cond_or_uncond") or (0,)), context.shape[0])
            replaced = self._replace(context, rows, step)
            self._last = (context, step, replaced)
        return n, replaced, replaced if value is context else value

    def _replace(self, context: torch.Tensor, rows: RowInfo, step: int) -> torch.Tensor:
        return substitute_rows(context, rows, step, self.schedule)


class ScheduledValue:
    """An ``attn2_patch`` replacing only the *value input* of chosen rows (StyleDiffusion: the learned
    ``c * A_s + B_s`` of the conditional rows); keys keep the text context.

    ComfyUI passes the value input separately from the context (``BasicTransformerBlock`` hands
    ``(n, context, value)`` through every ``attn2_patch``, then ``attn2.to_v(value)``), so this stacks with
    other packs' patches before or after it: the rows ``schedule(kind, slot, step)`` names get their
    replacement, every other row keeps the value input it arrived with. No caching: the schedule may return
    a new tensor at every call (the optimisation's live value, which requires grad).
    """

    def __init__(self, schedule: ContextSchedule) -> None:
        self.schedule = schedule
        self.steps = _SigmaSteps()

    def __deepcopy__(self, memo: dict) -> ScheduledValue:
        return self

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor | None,
                 extra_options: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        base = context if value is None else value
        if base is None:
            return n, context, value
        step, _ = self.steps(extra_options)
        rows = row_info(tuple(extra_options.get("cond_or_uncond") or (0,)), base.shape[0])
        return n, context, substitute_rows(base, rows, step, self.schedule)


def install_value_schedule(model_patcher: Any, schedule: ContextSchedule) -> Any:
    """Return a clone of ``model_patcher`` whose cross-attention value inputs follow ``schedule``."""
    patched = model_patcher.clone()
    patched.set_model_attn2_patch(ScheduledValue(schedule))
    return patched


def install_context_schedule(model_patcher: Any, schedule: ContextSchedule) -> Any:
    """Return a clone of ``model_patcher`` whose cross-attention contexts follow ``schedule``."""
    patched = model_patcher.clone()
    patched.set_model_attn2_patch(ScheduledContext(schedule))
    return patched

"""SpecRef's edit stage on ComfyUI: the P2P-style two-path sampler (Algorithm 1, stage 2).

One latent batch runs through ``comfy.samplers.CFGGuider`` with a ``KSAMPLER`` wrapping our loop, on a
clone of the MODEL with a :class:`~..attention.specref.SpecRefHook` installed:

* slot 0, reconstruction: source prompt, pinned to the source inversion's trajectory at every step
  (its input at edit step s is ``inversion.latent_for_edit_step(s)``; METHODS.md "FEC-ref");
* slot 1, edit: target prompt, from z_T, one Euler step per schedule entry (DDIM with eta 0 in sigma
  space, Eq. 4), then LocalBlend (Eq. 5) from ``int(blend_start * N)`` on;
* slot 2 (live mode only): the reference, fed what its inversion fed the UNet at each step, so its
  self-attention K/V are the reference features of that timestep.

The schedule is the inversion's own (``Inversion.sampling_sigmas``), so edit step s evaluates the timestep the
inversion's call for bank entry s used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import comfy.samplers
import torch
from comfy.k_diffusion.sampling import to_d

from ..attention.specref import (
    LiveReference,
    ReferenceSource,
    SpecRefControls,
    SpecRefError,
    SpecRefHook,
    SRStats,
    StoredReference,
)
from ..inversion.bank import BankSettings, ReferenceBank
from ..inversion.ddim import Inversion
from .comfy import discover_layers, install_hook
from .comfy_sampling import check_sd_model, model_fingerprint

# Conditioning options that make a prompt regional: they cannot be merged into one per-slot tensor.
_REGIONAL_KEYS = ("area", "mask", "set_area_to_bounds", "hooks")


@dataclass(frozen=True)
class EditStep:
    """State after edit step ``step`` (0-based) of ``total``, for progress, cancellation and tests.

    Latents are in the model's internal space (like the inversion's trajectory), batch 1 each.
    ``blend_mask`` is the (H, W) bool LocalBlend mask applied after this step, or None.
    """

    step: int
    total: int
    reconstruction: torch.Tensor
    edit: torch.Tensor
    blend_mask: torch.Tensor | None


EditCallback = Callable[[EditStep], None]


@dataclass(frozen=True)
class EditResult:
    """The edited LATENT (user space, (1, C, H, W)) and the preview masks at latent size ((1, H, W),
    float 0/1, None when not computed): the final M_t and the last LocalBlend mask."""

    latent: torch.Tensor
    mt_mask: torch.Tensor | None
    blend_mask: torch.Tensor | None
    reconstruction: torch.Tensor
    sigmas: torch.Tensor  # the descending schedule used
    stats: SRStats


# -- conditioning ---------------------------------------------------------------------------------------
def _single_entry(cond: list, name: str) -> tuple[torch.Tensor, dict]:
    if not isinstance(cond, list) or len(cond) != 1 or len(cond[0]) != 2:
        raise SpecRefError(f"RealEdit: the {name} CONDITIONING must hold exactly one prompt (got "
                           f"{len(cond) if isinstance(cond, list) else type(cond).__name__} entries); "
                           "combined or concatenated conditioning cannot be paired token by token.")
    tensor, options = cond[0]
    if tensor.dim() != 3 or tensor.shape[0] != 1:
        raise SpecRefError(f"RealEdit: the {name} CONDITIONING has shape {tuple(tensor.shape)}; one prompt "
                           "(1, tokens, width) is expected.")
    regional = [k for k in _REGIONAL_KEYS if options.get(k) is not None]
    if regional:
        raise SpecRefError(f"RealEdit: the {name} CONDITIONING is regional ({', '.join(regional)}); the edit "
                           "sampler needs plain prompts.")
    return tensor, options


def _pad_tokens(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Repeat each context to the common multiple of their lengths (what ComfyUI does to batch them;
    attention is unchanged by it, and the map store folds repeats back onto 77 tokens)."""
    length = math.lcm(*(t.shape[1] for t in tensors))
    return [t.repeat(1, length // t.shape[1], 1) for t in tensors]


def per_slot_conditioning(conds: Sequence[list], names: Sequence[str]) -> list:
    """One CONDITIONING whose tensor has one row per latent slot: ComfyUI then gives each latent of the
    batch its own prompt. Options come from the last (target) entry; pooled outputs are stacked."""
    entries = [_single_entry(c, n) for c, n in zip(conds, names)]
    widths = {t.shape[2] for t, _ in entries}
    if len(widths) != 1:
        raise SpecRefError(f"RealEdit: the prompts' conditioning widths differ ({sorted(widths)}); encode them "
                           "with the same CLIP.")
    options = dict(entries[-1][1])
    pooled = [o.get("pooled_output") for _, o in entries]
    if all(p is not None for p in pooled):
        options["pooled_output"] = torch.cat(pooled)
    else:
        options.pop("pooled_output", None)
    return [[torch.cat(_pad_tokens([t for t, _ in entries])), options]]


# -- validation -----------------------------------------------------------------------------------------
def _check_reference(model: object, inversion: Inversion, bank: ReferenceBank | None,
                     reference: Inversion | None, reference_cond: list | None) -> None:
    if bank is not None and reference is not None:
        raise SpecRefError("RealEdit: give either a stored reference bank or a live reference inversion, not both.")
    if bank is not None:
        if bank.total_steps != inversion.steps:
            raise SpecRefError(f"RealEdit: the REF_FEATURES were made with {bank.total_steps} steps but the "
                               f"source INVERSION with {inversion.steps}; invert both with the same steps.")
        if not bank.entries:
            raise SpecRefError("RealEdit: the REF_FEATURES hold no K/V (empty layer or step window).")
    if reference is not None:
        reference.check_compatible(model_fingerprint(model), inversion.steps, what="reference INVERSION")
        if not torch.allclose(reference.sigmas, inversion.sigmas):
            raise SpecRefError("RealEdit: the reference and source inversions use different schedules; "
                               "invert both with the same scheduler.")
        if tuple(reference.z_T.shape) != tuple(inversion.z_T.shape):
            raise SpecRefError(f"RealEdit: live reference features need a reference latent of the source's size "
                               f"({tuple(inversion.z_T.shape)}), got {tuple(reference.z_T.shape)}; resize the "
                               "reference image or use stored features.")
        if reference_cond is None:
            raise SpecRefError("RealEdit: live reference features need the reference prompt's CONDITIONING "
                               "(the empty prompt by default).")


def _reference_source(model: object, inversion: Inversion, bank: ReferenceBank | None,
                      reference: Inversion | None, live_window: BankSettings | None) -> ReferenceSource | None:
    if bank is not None:
        return StoredReference(bank)
    if reference is None:
        return None
    window = live_window or BankSettings(mode="live")
    return LiveReference(window.layers.select(discover_layers(model)), window.steps.select(inversion.steps))


# -- the sampler ----------------------------------------------------------------------------------------
class _TwoPathLoop:
    """The KSAMPLER function: pinned reconstruction, Euler edit steps, LocalBlend, live reference row."""

    def __init__(self, hook: SpecRefHook, inversion: Inversion, reference: Inversion | None,
                 callback: EditCallback | None) -> None:
        self.hook, self.inversion, self.reference, self.callback = hook, inversion, reference, callback

    def _pin(self, x: torch.Tensor, step: int) -> None:
        """Slot 0 := the inverted latent edit step ``step`` starts from; slot 2 := the reference input."""
        x[0] = self.inversion.latent_for_edit_step(step)[0].to(x)
        if self.reference is not None and step < self.inversion.steps:
            x[2] = self.reference.pinned_model_input(step)[0][0].to(x)

    @torch.no_grad()
    def __call__(self, model_k: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
        extra_args = extra_args or {}
        total = len(sigmas) - 1
        x = self.inversion.z_T.to(x).expand_as(x).clone()  # z_T in model space, never re-scaled
        s_in = x.new_ones([x.shape[0]])
        self._pin(x, 0)
        for s in range(total):
            denoised = model_k(x, sigmas[s] * s_in, **extra_args)
            if callback is not None:
                callback({"x": x[1:2], "i": s, "sigma": sigmas[s], "sigma_hat": sigmas[s], "denoised": denoised[1:2]})
            x = x + to_d(x, sigmas[s], denoised) * (sigmas[s + 1] - sigmas[s])  # Euler = DDIM(eta 0), Eq. 4
            self._pin(x, s + 1)
            x[1:2] = self.hook.blend(x[0:1], x[1:2], s, total)  # Eq. 5
            self._report(x, s, total)
        return x

    def _report(self, x: torch.Tensor, step: int, total: int) -> None:
        if self.callback is None:
            return
        blend = self.hook.controls.local_blend
        mask = self.hook.last_blend_mask if blend is not None and blend.blends_at(step, total) else None
        self.callback(EditStep(step, total, x[0:1].clone(), x[1:2].clone(), mask))


def specref_edit(
    model: object,
    inversion: Inversion,
    source_cond: list,
    target_cond: list,
    negative: list | None,
    *,
    cfg: float = 7.5,
    controls: SpecRefControls | None = None,
    bank: ReferenceBank | None = None,
    reference: Inversion | None = None,
    reference_cond: list | None = None,
    live_window: BankSettings | None = None,
    steps: int | None = None,
    callback: EditCallback | None = None,
    preview: Callable | None = None,
) -> EditResult:
    """Edit the source (``inversion``) with SpecRef on a ComfyUI MODEL; returns the edited LATENT.

    ``bank``: stored reference features (stored mode); ``reference`` + ``reference_cond``: the reference
    inversion and its prompt (live mode, reference row in slot 2, windows from ``live_window``); neither:
    P2P editing without SR-attention. ``steps`` (default: the inversion's) is checked against the
    inversion. ``callback(EditStep)`` runs after every step (progress; raise to cancel); ``preview`` is
    ComfyUI's ``(i, denoised, x, total)`` latent-preview callback, fed the edit row.
    """
    controls = controls or SpecRefControls()
    if negative is None and cfg != 1.0:
        raise SpecRefError("RealEdit: guidance above 1 needs a negative CONDITIONING; connect one or use cfg 1.")
    check_sd_model(model, inversion.z_T)
    if inversion.z_T.shape[0] != 1:
        raise SpecRefError(f"RealEdit: the INVERSION holds {inversion.z_T.shape[0]} images; SpecRef edits one "
                           "source image at a time.")
    inversion.check_compatible(model_fingerprint(model), inversion.steps if steps is None else steps)
    _check_reference(model, inversion, bank, reference, reference_cond)
    source = _reference_source(model, inversion, bank, reference, live_window)
    hook = SpecRefHook(controls, source)
    patched = install_hook(model, hook)

    live = reference is not None
    conds = [source_cond, target_cond] + ([reference_cond] if live else [])
    positive = per_slot_conditioning(conds, ["source", "target", "reference"][: len(conds)])
    guider = comfy.samplers.CFGGuider(patched)
    guider.set_conds(positive, negative if negative is not None else positive)
    guider.set_cfg(cfg)

    sigmas = inversion.sampling_sigmas
    z_T = inversion.z_T
    latent = patched.model.process_latent_out(z_T.repeat(len(conds), 1, 1, 1))  # shape only: the loop uses z_T
    loop = _TwoPathLoop(hook, inversion, reference, callback)
    out = guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(loop), sigmas,
                        callback=preview, disable_pbar=True, seed=0)
    return _result(out, hook, z_T, sigmas)


def _result(out: torch.Tensor, hook: SpecRefHook, z_T: torch.Tensor, sigmas: torch.Tensor) -> EditResult:
    hw = tuple(z_T.shape[-2:])
    mt = hook.mt_mask(hw)
    blend = hook.blend_mask()
    return EditResult(
        latent=out[1:2].cpu(),
        mt_mask=None if mt is None else mt[None].cpu(),
        blend_mask=None if blend is None else blend[None].cpu(),
        reconstruction=out[0:1].cpu(),
        sigmas=sigmas,
        stats=hook.stats,
    )

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
inversion's call for bank entry s used. The loop itself is host-neutral (``attention.edit_loop``); the diffusers
host runs the same one (``hosts.diffusers_edit``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import comfy.samplers
import torch

from ..attention.edit_loop import (
    EditCallback,
    EditResult,
    EditStep,  # noqa: F401  (re-exported: callers' callback type)
    TwoPathLoop,
    edit_result,
    null_text_inversion,
    prepare_edit,
)
from ..attention.specref import SpecRefControls, SpecRefError
from ..inversion.bank import BankSettings, ReferenceBank, ReferenceFeatures
from ..inversion.ddim import Inversion
from .comfy import discover_layers, install_context_schedule, install_hook
from .comfy_sampling import cfg_guider, check_sd_model, model_fingerprint, repeat_to_common_length

# Conditioning options that make a prompt regional: they cannot be merged into one per-slot tensor.
log = logging.getLogger("realedit")
_REGIONAL_KEYS = ("area", "mask", "set_area_to_bounds", "hooks")


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
    return [[torch.cat(repeat_to_common_length([t for t, _ in entries])), options]]


# -- the sampler ----------------------------------------------------------------------------------------
def with_null_text(model: object, inversion: Inversion, cfg: float) -> object:
    """A null-text INVERSION: every unconditional row of the edit takes the embedding optimised for its
    step (see :func:`~..attention.edit_loop.null_text_inversion`). A plain DDIM inversion leaves ``model``
    as it is; a TTIS inversion belongs to the BARET sampler."""
    null_text = null_text_inversion(inversion, cfg)
    if null_text is None:
        return model
    return install_context_schedule(model, null_text.null_text_context)


def specref_edit(
    model: object,
    inversion: Inversion,
    source_cond: list,
    target_cond: list,
    negative: list | None,
    *,
    cfg: float = 7.5,
    controls: SpecRefControls | None = None,
    ref_features: ReferenceFeatures | None = None,
    bank: ReferenceBank | None = None,
    reference: Inversion | None = None,
    reference_cond: list | None = None,
    live_window: BankSettings | None = None,
    steps: int | None = None,
    callback: EditCallback | None = None,
    preview: Callable | None = None,
) -> EditResult:
    """Edit the source (``inversion``) with SpecRef on a ComfyUI MODEL; returns the edited LATENT.

    ``ref_features``: a REF_FEATURES object (RealEdit Reference Features, either mode), checked against
    the model and the inversion. Lower level, instead of it: ``bank`` (stored features), or ``reference``
    + ``reference_cond``: the reference inversion and its prompt (live mode, reference row in slot 2,
    windows from ``live_window``). None of them: P2P editing without SR-attention. ``steps`` (default:
    the inversion's) is checked against the inversion. ``callback(EditStep)`` runs after every step
    (progress; raise to cancel); ``preview`` is ComfyUI's ``(i, denoised, x, total)`` latent-preview
    callback, fed the edit row.
    """
    check_sd_model(model, inversion.z_T)
    hook, refs = prepare_edit(model_fingerprint(model), inversion, lambda: discover_layers(model), controls=controls,
                              cfg=cfg, has_negative=negative is not None, ref_features=ref_features, bank=bank,
                              reference=reference, reference_cond=reference_cond, live_window=live_window,
                              steps=steps)
    patched = with_null_text(install_hook(model, hook), inversion, cfg)

    conds = [source_cond, target_cond] + ([refs.conditioning] if refs.live else [])
    positive = per_slot_conditioning(conds, ["source", "target", "reference"][: len(conds)])
    guider = cfg_guider(patched, positive, negative, cfg)

    sigmas = inversion.sampling_sigmas
    z_T = inversion.z_T
    latent = patched.model.process_latent_out(z_T.repeat(len(conds), 1, 1, 1))  # shape only: the loop uses z_T
    loop = TwoPathLoop(hook, inversion, refs.inversion, callback)
    out = guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(loop), sigmas,
                        callback=preview, disable_pbar=True, seed=0)
    return edit_result(out, hook, tuple(z_T.shape[-2:]), sigmas)

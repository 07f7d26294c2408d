"""SpecRef's edit stage on the diffusers host: the Python API twin of ``hosts.comfy_edit.specref_edit``.

The same settings object (:class:`~..attention.specref.SpecRefControls`), the same hook
(:class:`~..attention.specref.SpecRefHook`) and the same two-path loop (``attention.edit_loop``: slot 0
reconstruction pinned to the inversion, slot 1 edit from z_T, slot 2 the live reference row) run on a
``UNet2DConditionModel`` through a :class:`~.diffusers.DiffusersHost` installed for the call. Latents are
the UNet's scaled VAE latents (what ``hosts.diffusers_sampling.ddim_invert`` inverts). Typical use::

    inversion = ddim_invert(host, pipe.scheduler, source_latent, source_embeds, steps=50)   # under a host
    features = reference_features(pipe.unet, pipe.scheduler, ref_latent, empty_embeds)       # diffusers_bank
    result = specref_edit(pipe.unet, pipe.scheduler, inversion, source_embeds, target_embeds, negative_embeds,
                          controls=SpecRefControls(target_positions=[5], ref_mask=mask), ref_features=features)
    image = pipe.vae.decode(result.latent / pipe.vae.config.scaling_factor).sample
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..attention.edit_loop import (
    EditCallback,
    EditResult,
    TwoPathLoop,
    edit_result,
    null_text_inversion,
    prepare_edit,
)
from ..attention.hooks import schedule_index
from ..attention.specref import SpecRefControls, SpecRefError
from ..inversion.bank import BankSettings, ReferenceBank, ReferenceFeatures
from ..inversion.ddim import Inversion
from ..inversion.embedding_opt import OptimisedInversion
from .diffusers import DiffusersHost, discover_layers
from .diffusers_sampling import Denoiser, guided_denoiser, prediction_type, unet_fingerprint, use_schedule


def _common_length(contexts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Contexts repeated to the common multiple of their token counts (attention is unchanged by
    repeating keys and values; the map store folds the repeats back onto 77 tokens), as ComfyUI does."""
    for c in contexts:
        if c.ndim != 3 or c.shape[0] != 1:
            raise SpecRefError(f"RealEdit: a prompt embedding has shape {tuple(c.shape)}; one prompt "
                               "(1, tokens, width) is expected.")
    if len({c.shape[-1] for c in contexts}) != 1:
        raise SpecRefError("RealEdit: the prompt embeddings have different widths; encode them with the same "
                           "text encoder.")
    length = math.lcm(*(c.shape[1] for c in contexts))
    return [c.repeat(1, length // c.shape[1], 1) for c in contexts]


def _slot_denoiser(host: DiffusersHost, scheduler, conds: Sequence[torch.Tensor], uncond: torch.Tensor | None,
                   cfg: float, sigmas: torch.Tensor, added_cond: Mapping[str, torch.Tensor],
                   null_text: OptimisedInversion | None = None) -> Denoiser:
    """CFG ``denoised = f(x, sigma)`` for the per-slot batch: row i takes ``conds[i]``; with a null-text
    inversion every unconditional row takes the embedding optimised for the step of ``sigma`` (as ComfyUI's
    context schedule does, ``hosts.comfy_edit.with_null_text``)."""
    contexts = _common_length([*conds, *([uncond] if uncond is not None else [])])
    slots = torch.cat(contexts[: len(conds)])  # (n, tokens, width)
    negative = contexts[-1] if uncond is not None else None
    schedule = [float(s) for s in sigmas]

    def rows(sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor | None]:
        if null_text is None or negative is None:
            return slots, negative
        step = schedule_index(float(sigma), schedule)
        embedding = null_text.null_text_context("uncond", 0, step) if step is not None else None
        if embedding is None:
            return slots, negative
        return slots, _common_length([negative, embedding])[1]  # (1, tokens, width)

    return guided_denoiser(host, scheduler.alphas_cumprod, rows, cfg, total_steps=len(sigmas) - 1,
                           prediction=prediction_type(scheduler), **added_cond)


@torch.no_grad()
def specref_edit(
    unet: torch.nn.Module,
    scheduler,
    inversion: Inversion,
    source_cond: torch.Tensor,
    target_cond: torch.Tensor,
    negative: torch.Tensor | None,
    *,
    cfg: float = 7.5,
    controls: SpecRefControls | None = None,
    ref_features: ReferenceFeatures | None = None,
    bank: ReferenceBank | None = None,
    reference: Inversion | None = None,
    reference_cond: torch.Tensor | None = None,
    live_window: BankSettings | None = None,
    steps: int | None = None,
    callback: EditCallback | None = None,
    **added_cond: torch.Tensor,
) -> EditResult:
    """Edit the source (``inversion``) with SpecRef on a diffusers UNet; returns the edited latent.

    Arguments mirror ``hosts.comfy_edit.specref_edit``: prompts are embeddings (1, tokens, width);
    ``ref_features`` from ``hosts.diffusers_bank.reference_features`` (stored or live), or lower level a
    ``bank`` or a live ``reference`` inversion with its ``reference_cond``; none: P2P editing only.
    ``added_cond`` (SDXL's ``text_embeds`` / ``time_ids``, batch 1) goes to every row. A null-text
    ``inversion`` (``hosts.diffusers_baret.null_text_invert``) gives every unconditional row its step's
    optimised embedding, as on ComfyUI; a TTIS inversion is refused (use ``baret_edit``). ``scheduler`` gives
    the noise schedule (``alphas_cumprod``) the inversion used. The UNet's processors are restored after.
    """
    hook, refs = prepare_edit(unet_fingerprint(unet), inversion, lambda: discover_layers(unet), controls=controls,
                              cfg=cfg, has_negative=negative is not None, ref_features=ref_features, bank=bank,
                              reference=reference, reference_cond=reference_cond, live_window=live_window,
                              steps=steps, negative_name="negative prompt embedding")
    null_text = null_text_inversion(inversion, cfg)
    if refs.live and ref_features is not None and ref_features.added_cond and not added_cond:
        added_cond = dict(ref_features.added_cond)

    conds = [source_cond, target_cond] + ([refs.conditioning] if refs.live else [])
    sigmas = inversion.sampling_sigmas
    param = next(unet.parameters())
    x = torch.zeros(len(conds), *inversion.z_T.shape[1:], device=param.device, dtype=param.dtype)
    with DiffusersHost(unet, hook) as host:
        use_schedule(host, sigmas, scheduler.alphas_cumprod)
        denoise = _slot_denoiser(host, scheduler, conds, negative, cfg, sigmas, added_cond, null_text)
        out = TwoPathLoop(hook, inversion, refs.inversion, callback)(denoise, x, sigmas.to(x.device))
    return edit_result(out, hook, tuple(inversion.z_T.shape[-2:]), sigmas)

"""The reference feature bank on the diffusers host: the Python API twin of
``hosts.comfy_sampling.reference_features`` (SpecRef stage 1), with the same :class:`BankSettings`.

The reference is DDIM-inverted on the UNet with a :class:`~..inversion.bank.BankRecorder` installed as
its self-attention processors for the duration of the call (taken off again afterwards, also on error);
``stored`` keeps its K/V inside the windows, ``live`` only its latent trajectory. Typical use::

    features = reference_features(pipe.unet, pipe.scheduler, ref_latent, empty_prompt_embeds)
    features.bank.get(layer, step)          # (tokens, heads*dim) K and V of the reference
"""

from __future__ import annotations

import torch

from ..attention.hooks import AttentionContext
from ..inversion.bank import BankRecorder, BankSettings, ReferenceBank, ReferenceFeatures, select_layers
from ..inversion.ddim import DEFAULT_CONVENTION, Convention, steps_with_kv
from .diffusers import DiffusersHost, discover_layers
from .diffusers_sampling import StepCallback, check_latent, ddim_invert, sampling_sigmas


def _decline(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> None:
    return None  # live mode: the UNet's own attention, bit-identical


def reference_features(
    unet: torch.nn.Module,
    scheduler,
    latent: torch.Tensor,
    cond: torch.Tensor,
    settings: BankSettings | None = None,
    *,
    steps: int = 50,
    convention: Convention = DEFAULT_CONVENTION,
    callback: StepCallback | None = None,
    **added_cond: torch.Tensor,
) -> ReferenceFeatures:
    """Invert the reference (a scaled VAE latent, batch 1) and keep its self-attention K/V in the windows.

    ``cond`` is the reference prompt's embedding (SpecRef: the empty prompt); ``added_cond`` SDXL's
    ``text_embeds`` / ``time_ids``. ``settings.device`` None keeps the bank where the UNet computed it.
    Any processors already on the UNet (another RealEdit host, IP-Adapter) keep running.
    """
    settings = settings or BankSettings()
    check_latent(unet, latent, "reference latent")
    if latent.shape[0] != 1:
        raise ValueError(f"RealEdit: the reference latent holds a batch of {latent.shape[0]}; pass one image.")
    sampling_sigmas(scheduler, steps)  # refuses steps < 2 before any work
    layers = select_layers(settings.layers, discover_layers(unet))
    edit_steps = steps_with_kv(settings.steps.select(steps), convention)
    bank = None
    hook = _decline
    if settings.mode == "stored":
        bank = ReferenceBank(layers, edit_steps, steps, settings.dtype, settings.device)
        hook = BankRecorder(bank)
    with DiffusersHost(unet, hook, cross_attention=False) as host:
        inversion = ddim_invert(host, scheduler, latent, cond, steps=steps, convention=convention, callback=callback,
                                **added_cond)
    return ReferenceFeatures(settings.mode, inversion, bank, tuple(layers), edit_steps, cond,
                             added_cond=dict(added_cond) or None)

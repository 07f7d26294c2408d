"""SR-attention for ComfyUI's own samplers (RealEdit Apply SR-Attention): a MODEL clone, no edit sampler.

The clone carries an :class:`~..attention.specref.SRAttentionHook` (SpecRef Eq. 2-3 on every conditional
row, M_t from the target word's cross-attention in the same run). The host's outer-sample wrapper hands
each run's sigmas to the hook (``begin_sampling``), which maps them onto the edit steps the stored
reference K/V are keyed by (and refuses a schedule the features were not made with). KSampler,
KSamplerAdvanced, SamplerCustom and SamplerCustomAdvanced all go through ``CFGGuider.outer_sample``,
where the wrapper runs."""

from __future__ import annotations

from typing import Any

from ..attention.edit_loop import check_bank_filled, check_features_type
from ..attention.specref import SpecRefControls, SpecRefError, SRAttentionHook, StoredReference
from ..inversion.bank import ReferenceFeatures
from .comfy import install_hook
from .comfy_sampling import model_fingerprint


def check_stored_features(model: Any, features: ReferenceFeatures) -> None:
    """Refuse REF_FEATURES a plain sampler cannot use: live mode, another model, an empty bank."""
    check_features_type(features)
    if features.mode != "stored" or features.bank is None:
        raise SpecRefError("RealEdit Apply SR-Attention needs stored REF_FEATURES (mode 'stored' on RealEdit "
                           "Reference Features): live features run the reference as an extra batch row, which "
                           "only the RealEdit SpecRef Edit Sampler does.")
    features.check_compatible(model_fingerprint(model), features.total_steps)  # another model: refused
    check_bank_filled(features.bank)


def apply_sr_attention(model: Any, features: ReferenceFeatures,
                       controls: SpecRefControls) -> tuple[Any, SRAttentionHook]:
    """A clone of ``model`` with SR-attention onto the stored reference features, and its hook.

    ``controls`` gives M_t (``target_positions`` in the sampler's positive prompt, or ``target_mask``),
    M_s (``ref_mask``), the thresholds and ``sr_uncond_shared_kv``; its P2P and LocalBlend fields are not used.
    The input model is left unpatched.
    """
    check_stored_features(model, features)
    reference = StoredReference(features.bank, tuple(features.inversion.z_T.shape[-2:]))
    hook = SRAttentionHook(controls, reference, features.inversion.sampling_sigmas)
    return install_hook(model, hook), hook

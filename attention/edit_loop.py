"""SpecRef's edit stage as a host-neutral loop (Algorithm 1, stage 2; Eq. 4-5), in sigma space.

The batch holds one latent per prompt slot: slot 0 the reconstruction (source prompt), pinned to the
source inversion's trajectory at every step (its input at edit step s is ``latent_for_edit_step(s)``,
METHODS.md "FEC-ref"); slot 1 the edit (target prompt) from z_T, one Euler step per schedule entry
(DDIM with eta 0 in sigma space, Eq. 4), then LocalBlend (Eq. 5); slot 2 (live reference features only)
the reference, fed what its inversion fed the UNet at each step, so its self-attention K/V are the
reference features of that timestep.

The loop has the k-diffusion sampler signature ``(model, x, sigmas, extra_args, callback, disable)``
with ``model(x, sigma * ones(batch), **extra_args) -> denoised`` (classifier-free guidance inside), so
ComfyUI runs it as a ``KSAMPLER`` and the diffusers host calls it with its own denoiser.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..inversion.bank import BankSettings, ReferenceBank, ReferenceFeatures, check_reference
from ..inversion.ddim import Inversion
from ..inversion.embedding_opt import OptimisedInversion
from ..inversion.value_inversion import refuse_value_inversion
from .hooks import LayerInfo
from .specref import (
    LiveReference,
    ReferenceSource,
    SpecRefControls,
    SpecRefError,
    SpecRefHook,
    SRStats,
    StoredReference,
)

log = logging.getLogger("realedit")


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
    """The edited latent ((1, C, H, W); ComfyUI: the user's LATENT space, diffusers: the UNet's scaled
    latents) and the preview masks at latent size ((1, H, W), float 0/1, None when not computed): the
    final M_t and the last LocalBlend mask."""

    latent: torch.Tensor
    mt_mask: torch.Tensor | None
    blend_mask: torch.Tensor | None
    reconstruction: torch.Tensor
    sigmas: torch.Tensor  # the descending schedule used
    stats: SRStats


class TwoPathLoop:
    """The sampler: pinned reconstruction, Euler edit steps, LocalBlend, live reference row.

    ``pin_source`` False lets slot 0 run free from z_T like the edit row (StyleDiffusion's P2Plus, as its
    official code samples the source row with its learned value inputs instead of pinning it).
    """

    def __init__(self, hook: SpecRefHook, inversion: Inversion, reference: Inversion | None,
                 callback: EditCallback | None, *, pin_source: bool = True) -> None:
        self.hook, self.inversion, self.reference, self.callback = hook, inversion, reference, callback
        self.pin_source = pin_source

    def _pin(self, x: torch.Tensor, step: int) -> None:
        """Slot 0 := the inverted latent edit step ``step`` starts from; slot 2 := the reference input."""
        if self.pin_source:
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
            eps = (x - denoised) / sigmas[s]
            x = x + eps * (sigmas[s + 1] - sigmas[s])  # Euler = DDIM(eta 0), Eq. 4
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


def edit_result(out: torch.Tensor, hook: SpecRefHook, latent_hw: tuple[int, int], sigmas: torch.Tensor) -> EditResult:
    """The sampled batch (slot 0 reconstruction, slot 1 edit) and the hook's masks as an :class:`EditResult`."""
    mt = hook.mt_mask(latent_hw)
    blend = hook.blend_mask()
    return EditResult(
        latent=out[1:2].cpu(),
        mt_mask=None if mt is None else mt[None].cpu(),
        blend_mask=None if blend is None else blend[None].cpu(),
        reconstruction=out[0:1].cpu(),
        sigmas=sigmas,
        stats=hook.stats,
    )


# -- the reference's inputs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceInputs:
    """Where one edit's SR-attention takes K_ref / V_ref from: a stored ``bank``, or (live) the reference
    ``inversion`` run again as slot 2 with its prompt ``conditioning`` (host-specific) in the ``layers`` and
    ``steps`` windows (None: the caller's default window). All None: P2P editing without SR-attention."""

    bank: ReferenceBank | None = None
    inversion: Inversion | None = None
    conditioning: object = None
    layers: tuple[int, ...] | None = None
    steps: range | None = None
    latent_hw: tuple[int, int] | None = None  # the reference latent's size (stored mode: exact M_s grids)

    @staticmethod
    def from_features(features: ReferenceFeatures) -> ReferenceInputs:
        """The inputs a REF_FEATURES object (RealEdit Reference Features) carries, in either mode."""
        check_features_type(features)
        hw = tuple(features.inversion.z_T.shape[-2:])
        if features.mode == "live":
            return ReferenceInputs(inversion=features.inversion, conditioning=features.conditioning,
                                   layers=tuple(features.layers), steps=features.steps, latent_hw=hw)
        return ReferenceInputs(bank=features.bank, latent_hw=hw)

    @staticmethod
    def resolve(ref_features: ReferenceFeatures | None, bank: ReferenceBank | None = None,
                reference: Inversion | None = None, reference_cond: object = None) -> ReferenceInputs:
        """An edit's reference inputs from REF_FEATURES, or from the lower-level arguments (not both)."""
        if ref_features is None:
            return ReferenceInputs(bank=bank, inversion=reference, conditioning=reference_cond)
        if bank is not None or reference is not None:
            raise SpecRefError("RealEdit: give ref_features, or a bank / reference inversion, not both.")
        return ReferenceInputs.from_features(ref_features)

    @property
    def live(self) -> bool:
        return self.inversion is not None

    def check(self, fingerprint: str, source: Inversion, *, features: ReferenceFeatures | None = None) -> None:
        """Refuse inputs made with another model, step count or schedule than the source ``source``.

        Inputs from REF_FEATURES (``features``) are checked by :func:`check_features`, and here only for what
        that does not cover (the bank's own step count and entries, the live row count and prompt)."""
        if self.bank is not None and self.inversion is not None:
            raise SpecRefError("RealEdit: give either a stored reference bank or a live reference inversion, "
                               "not both.")
        if features is not None:
            check_features(fingerprint, source, features)
        if self.bank is not None:
            _check_bank(self.bank, source)
        if self.inversion is not None:
            if features is None:
                _check_live(fingerprint, self.inversion, source)
            _check_live_row(self.inversion, source, self.conditioning)

    def source(self, default_layers: Callable[[], Sequence[int]], default_steps: range) -> ReferenceSource | None:
        """The hook's :class:`~.specref.ReferenceSource` (live windows default to the callables' values)."""
        if self.bank is not None:
            return StoredReference(self.bank, self.latent_hw)
        if self.inversion is None:
            return None
        layers = self.layers if self.layers is not None else default_layers()
        return LiveReference(layers, self.steps if self.steps is not None else default_steps,
                             latent_hw=self.latent_hw)


def check_features(fingerprint: str, source: Inversion, features: ReferenceFeatures) -> None:
    """Refuse REF_FEATURES made on another model, with another step count, schedule or latent channels
    than the source INVERSION (live features also of another latent size)."""
    features.check_compatible(fingerprint, source.steps, source=source)


def check_features_type(features: object) -> None:
    """Refuse a ref_features input that is not a REF_FEATURES object (RealEdit Reference Features)."""
    if not isinstance(features, ReferenceFeatures):
        raise SpecRefError("RealEdit: the ref_features input is not a RealEdit Reference Features output "
                           f"(got {type(features).__name__}).")


def check_bank_filled(bank: ReferenceBank) -> None:
    """Refuse a bank without K/V (its layer or step window selected nothing)."""
    if not bank.entries:
        raise SpecRefError("RealEdit: the REF_FEATURES hold no K/V (empty layer or step window).")


def _check_bank(bank: ReferenceBank, source: Inversion) -> None:
    if bank.total_steps != source.steps:
        raise SpecRefError(f"RealEdit: the REF_FEATURES were made with {bank.total_steps} steps but the "
                           f"source INVERSION with {source.steps}; invert both with the same steps.")
    check_bank_filled(bank)


def _check_live(fingerprint: str, reference: Inversion, source: Inversion) -> None:
    """A live reference inversion given on its own (not as REF_FEATURES): this model and step count, and the
    source's schedule, channels and size."""
    reference.check_compatible(fingerprint, source.steps, what="reference INVERSION")
    check_reference(reference, source, "reference features", same_size=True, error=SpecRefError)


def _check_live_row(reference: Inversion, source: Inversion, conditioning: object) -> None:
    """The live reference is one more row of the edit's batch: one image per source image, with its prompt."""
    if reference.z_T.shape[0] != source.z_T.shape[0]:
        raise SpecRefError(f"RealEdit: live reference features need as many reference images as source images "
                           f"({source.z_T.shape[0]}), got {reference.z_T.shape[0]}.")
    if conditioning is None:
        raise SpecRefError("RealEdit: live reference features need the reference prompt's CONDITIONING "
                           "(the empty prompt by default).")


def prepare_edit(fingerprint: str, inversion: Inversion, layers: Callable[[], list[LayerInfo]], *,
                 controls: SpecRefControls | None, cfg: float, has_negative: bool,
                 ref_features: ReferenceFeatures | None, bank: ReferenceBank | None, reference: Inversion | None,
                 reference_cond: object, live_window: BankSettings | None, steps: int | None,
                 negative_name: str = "negative CONDITIONING") -> tuple[SpecRefHook, ReferenceInputs]:
    """Both hosts' checks before an edit, and its hook: guidance needs a negative prompt, one source image,
    an inversion (and reference inputs) made with this model (``fingerprint``) and step count. ``layers``
    lists the model's attention layers (live windows default to ``BankSettings(mode="live")``'s)."""
    refuse_value_inversion(inversion, "the SpecRef Edit Sampler", SpecRefError)
    if not has_negative and cfg != 1.0:
        raise SpecRefError(f"RealEdit: guidance above 1 needs a {negative_name}; connect one or use cfg 1.")
    if inversion.z_T.shape[0] != 1:
        raise SpecRefError(f"RealEdit: the INVERSION holds {inversion.z_T.shape[0]} images; SpecRef edits one "
                           "source image at a time.")
    inversion.check_compatible(fingerprint, inversion.steps)
    if steps is not None:
        inversion.check_node_steps(steps, error=SpecRefError)
    refs = ReferenceInputs.resolve(ref_features, bank, reference, reference_cond)
    refs.check(fingerprint, inversion, features=ref_features)
    window = live_window or BankSettings(mode="live")
    source = refs.source(lambda: window.layers.select(layers()), window.steps.select(inversion.steps))
    return SpecRefHook(controls or SpecRefControls(), source), refs


def null_text_inversion(inversion: Inversion, cfg: float) -> OptimisedInversion | None:
    """The null-text INVERSION whose per-step unconditional embeddings every unconditional row of the edit
    takes (Mokady et al.: the classic null-text inversion + Prompt-to-Prompt pipeline), or None for a plain
    DDIM inversion. Both hosts apply it (ComfyUI: a context schedule; diffusers: the per-step negative).
    A TTIS inversion belongs to the BARET sampler and is refused; another CFG than the one the embeddings
    were optimised for is allowed with a warning (the reconstruction is then no longer exact)."""
    if not isinstance(inversion, OptimisedInversion):
        return None
    if inversion.branch != "uncond":
        raise SpecRefError("RealEdit: this INVERSION comes from Target-Text Inversion (TTIS); edit it with the "
                           "RealEdit BARET Edit Sampler. The SpecRef sampler takes DDIM or null-text inversions.")
    if cfg != inversion.cfg:
        log.warning("RealEdit: the null-text embeddings were optimised for CFG %s but the edit uses %s; the "
                    "reconstruction is exact only at the same CFG.", inversion.cfg, cfg)
    return inversion

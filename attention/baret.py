"""BARET's edit stage: progressive transition (Sec. 3.2, Eq. 3) and the Balanced Attention Module
(Sec. 3.3, Eq. 4-5), for a three-process batch.

The edit sampler runs three processes from the same inverted latent z_T, batched in one UNet call per
step (slots of the batch):

* slot 0, **reconstruction**: the TTIS-optimised target embedding e_opt,s of each step s;
* slot 1, **transition**: e_trans,s = lambda_s * e_opt,s + (1 - lambda_s) * e_target (Eq. 3), lambda
  falling linearly from ``lambda_start`` (0.8) to ``lambda_end`` (0.1); lambda = 1 for rigid edits;
* slot 2, **edit**: the target embedding e_target.

BAM (Eq. 4-5) acts on the edit's conditional rows only (P2P's controllers edit the conditional half):

* for the first ``self_attention_fraction`` of the steps, in layers of at most 32x32 query tokens, the
  edit attends with the *reconstruction's* self-attention maps softmax(Q K^T / sqrt(d)) (content kept);
* for the first ``cross_attention_fraction`` of the steps, the edit takes the *transition's*
  cross-attention maps (same tokens, so the maps are copied as they are).

The injected maps are computed within the same call from the rows that produced them, so nothing is
stored between steps. A call outside both windows declines and the host's attention runs bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..inversion.baret_settings import BARET_DEFAULTS, check_fractions, transition_lambda
from ..inversion.embedding_opt import OptimisedInversion
from ..inversion.value_inversion import refuse_value_inversion
from .hooks import AttentionContext, RowKind
from .math import DEFAULT_MAX_ELEMENTS
from .p2p import P2PHook
from .settings import P2PSettings

RECONSTRUCTION_SLOT, TRANSITION_SLOT, EDIT_SLOT = 0, 1, 2


class BaretError(ValueError):
    """Inputs or settings the BARET edit cannot run with."""


@dataclass(frozen=True)
class BaretControls:
    """The knobs of the BARET edit (defaults and their origin: :mod:`realedit.inversion.baret_settings`)."""

    lambda_start: float = BARET_DEFAULTS.lambda_start
    lambda_end: float = BARET_DEFAULTS.lambda_end
    rigid: bool = False
    self_attention_fraction: float = BARET_DEFAULTS.self_attention_fraction
    cross_attention_fraction: float = BARET_DEFAULTS.cross_attention_fraction
    attention_max_tokens: int = BARET_DEFAULTS.attention_max_tokens

    def __post_init__(self) -> None:
        check_fractions(self, BaretError)

    def transition_lambda(self, step: int, total: int) -> float:
        """Eq. 3's lambda at edit step ``step`` (0-based) of ``total``: linear from start to end; 1 if rigid."""
        return transition_lambda(self.lambda_start, self.lambda_end, step, total, self.rigid)


class CopyMaps:
    """A P2P cross edit that gives the edit rows the source rows' maps unchanged (same tokens)."""

    def __call__(self, src: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        return src


@dataclass(frozen=True)
class BaretEmbeddings:
    """The conditional embedding of each process at each edit step s (s = 0 the noisiest)."""

    reconstruction: tuple[torch.Tensor, ...]
    transition: tuple[torch.Tensor, ...]
    target: torch.Tensor
    lambdas: tuple[float, ...]

    def __deepcopy__(self, memo: dict) -> BaretEmbeddings:
        return self

    def for_row(self, kind: RowKind, slot: int, step: int) -> torch.Tensor | None:
        """What replaces a conditional row's text context at ``step`` (None: keep the prompt's own)."""
        if kind != "cond" or not 0 <= step < len(self.reconstruction):
            return None
        if slot == RECONSTRUCTION_SLOT:
            return self.reconstruction[step]
        if slot == TRANSITION_SLOT:
            return self.transition[step]
        return None


def check_ttis_inversion(inversion: object) -> OptimisedInversion:
    """The INVERSION must come from TTIS: per-step optimised *target* embeddings, one image."""
    refuse_value_inversion(inversion, "the BARET Edit Sampler", BaretError)
    if not isinstance(inversion, OptimisedInversion) or inversion.embeddings is None:
        raise BaretError("RealEdit: this INVERSION carries no optimised embeddings; the BARET edit needs the "
                         "output of RealEdit Target-Text Inversion (TTIS), not a plain DDIM inversion.")
    if inversion.branch != "cond":
        raise BaretError("RealEdit: this INVERSION comes from null-text inversion (optimised unconditional "
                         "embeddings); the BARET edit needs RealEdit Target-Text Inversion. Null-text inversions "
                         "go to the SpecRef Edit Sampler.")
    if inversion.z_T.shape[0] != 1:
        raise BaretError(f"RealEdit: the INVERSION holds {inversion.z_T.shape[0]} images; BARET edits one at a time.")
    return inversion


def _same_embedding(given: torch.Tensor, used: torch.Tensor | None) -> bool:
    """Whether ``given`` is the embedding TTIS used (None: not recorded, nothing to compare)."""
    if used is None:
        return True
    a, b = given.detach().float().cpu(), used.detach().float().cpu()
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def check_edit_matches_inversion(inversion: OptimisedInversion, target: torch.Tensor, uncond: torch.Tensor | None,
                                 cfg: float) -> None:
    """Refuse an edit whose target prompt, negative prompt or CFG differ from what TTIS optimised with.

    Eq. 3 mixes the per-step e_opt,s with e_target, the embedding TTIS started from, and e_opt,s
    reconstructs the photo only with TTIS's unconditional prompt and guidance: any other target, negative
    or CFG silently breaks both (the null-text path of the SpecRef sampler only warns on CFG, as a
    reconstruction there is optional; here it is the method).
    """
    if not _same_embedding(target, inversion.initial_embedding):
        raise BaretError("RealEdit: the target prompt of the BARET edit differs from the one Target-Text Inversion "
                         "optimised (e_target of Eq. 3). Connect the same CLIP Text Encode to both nodes' target "
                         "inputs.")
    if uncond is not None and not _same_embedding(uncond, inversion.fixed_embedding):
        raise BaretError("RealEdit: the negative prompt of the BARET edit differs from the one Target-Text Inversion "
                         "used (TTIS's unconditional prompt, usually empty). Connect the same negative CLIP Text "
                         "Encode to both nodes.")
    if cfg != inversion.cfg:
        raise BaretError(f"RealEdit: the BARET edit's cfg is {cfg:g} but Target-Text Inversion optimised its "
                         f"embeddings for cfg {inversion.cfg:g}; set the edit's cfg to {inversion.cfg:g} (or re-run "
                         "the inversion with the cfg you want).")


def transition_embeddings(optimised: Sequence[torch.Tensor], target: torch.Tensor,
                          controls: BaretControls) -> BaretEmbeddings:
    """e_trans,s = lambda_s * e_opt,s + (1 - lambda_s) * e_target for every step (BARET Eq. 3)."""
    if not optimised:
        raise BaretError("RealEdit: the INVERSION carries no optimised embeddings; run RealEdit Target-Text "
                         "Inversion first.")
    target = target.detach().float().cpu()
    for s, e in enumerate(optimised):
        if tuple(e.shape) != tuple(target.shape):
            raise BaretError(
                f"RealEdit: the target CONDITIONING has {target.shape[1]} tokens x {target.shape[2]} but the "
                f"INVERSION's optimised embedding of step {s} has {e.shape[1]} x {e.shape[2]}: the transition "
                "(Eq. 3) interpolates the two token by token. Connect the target prompt you inverted with."
            )
    total = len(optimised)
    lambdas = tuple(controls.transition_lambda(s, total) for s in range(total))
    reconstruction = tuple(e.detach().float().cpu() for e in optimised)
    transition = tuple(lam * e + (1.0 - lam) * target for lam, e in zip(lambdas, reconstruction))
    return BaretEmbeddings(reconstruction, transition, target, lambdas)


@dataclass(frozen=True)
class BaretResult:
    """The three processes' final latents, (1, C, H, W) each, and the lambdas used (both hosts)."""

    edit: torch.Tensor
    transition: torch.Tensor
    reconstruction: torch.Tensor
    lambdas: tuple[float, ...]

    @staticmethod
    def from_batch(out: torch.Tensor, lambdas: tuple[float, ...]) -> BaretResult:
        """The result from a sampled three-process batch (one row per slot: reconstruction, transition, edit)."""
        return BaretResult(edit=out[EDIT_SLOT : EDIT_SLOT + 1], transition=out[TRANSITION_SLOT : TRANSITION_SLOT + 1],
                           reconstruction=out[RECONSTRUCTION_SLOT : RECONSTRUCTION_SLOT + 1], lambdas=lambdas)


class BaretHook:
    """BAM (Eq. 4-5) for the three-process batch: self-attention maps from the reconstruction and
    cross-attention maps from the transition, into the edit's conditional rows, inside their windows."""

    def __init__(self, controls: BaretControls, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
        self.controls = controls
        self.self_maps = P2PHook(
            None, P2PSettings(cross_replace=0.0, self_replace=controls.self_attention_fraction,
                              self_replace_max_tokens=controls.attention_max_tokens),
            src_slot=RECONSTRUCTION_SLOT, edit_slot=EDIT_SLOT, max_elements=max_elements,
        )
        self.cross_maps = P2PHook(
            CopyMaps(), P2PSettings(cross_replace=controls.cross_attention_fraction, self_replace=0.0),
            src_slot=TRANSITION_SLOT, edit_slot=EDIT_SLOT, max_elements=max_elements,
        )

    def __deepcopy__(self, memo: dict) -> BaretHook:
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        if ctx.kind == "self":
            return self.self_maps.self_attention(q, k, v, ctx)  # Eq. 4: reconstruction's SA maps
        return self.cross_maps.cross_attention(q, k, v, ctx)  # Eq. 5: transition's CA maps

"""StyleDiffusion's value-embedding inversion (Li et al. 2023, Sec. 3.1-3.2; official code, ``sd:N`` lines).

After a DDIM inversion with the source prompt c (guidance 1) that records the per-head cross-attention maps
of the 16x16-class layers, each edit step s (s = 0 the noisiest) learns the *value input* of every
cross-attention layer in the conditional rows, v_s = c * A_s + B_s (one for all layers; keys keep c;
unconditional rows untouched, sd:453-477), minimising

    MSE(CFG-7.5 DDIM step from x_s with v_s, z_{N-s-1}) + sum_l MSE(maps_l(x_s, v_s), maps_l of the inversion)

(sd:795-814), with Adam lr 1e-2 (1 - s/100), at most ceil(100 e^(-0.1 s)) iterations, early stop below
1e-5 + 2e-5 s (attention term included), warm start from step s - 1 and a fresh Adam per step, then the
advance with v_s (the shared loop :func:`.embedding_opt.optimise_steps`). Two parameterisations of
(A_s, B_s):

* ``clip`` (official, sd:563-573, 609-614): a per-step mapping network M_s from CLIP image tokens F,
  Conv1d(T->2L, k1), Conv1d(2L->2L, k1), BatchNorm (train mode, batch 1: per-token normalisation over the
  features), LeakyReLU, Conv1d(2L->2L, k1); [A_s; B_s] = M_s(F). Step 0 is PyTorch's random init (seeded).
* ``direct`` (ours, default without CLIP_VISION): A_s, B_s learned directly, starting from A = 1, B = 0,
  i.e. from plain DDIM + CFG. Not equivalent to ``clip`` (M_s ties A, B to F, starts from noise and Adam
  moves weights, not outputs); the benchmark compares them.

Deviations from the official code, all documented in the node tooltips: the early stop is measured before
the update, so the kept value is the one that met it (the shared loop; the official code also updates on
the stopping iteration); the advance reuses the last iteration's step (no second forward); the CLIP
features are encoded once (the official code re-encodes the same image every iteration).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..attention.stylediffusion import (
    CrossMapRecorder,
    LayerMaps,
    LiveValue,
    StyleDiffusionError,
    attention_loss,
    map_target_call,
)
from ..settings.stylediffusion import SD_DEFAULTS, Parameterisation, iteration_cap
from .ddim import Inversion
from .embedding_opt import (
    BranchDenoiser,
    IterationCallback,
    OptimisationSettings,
    Params,
    StepLoss,
    cfg_step_loss,
    edit_levels,
    null_text_lr,
    optimise_steps,
)

LEAKY_SLOPE = 0.01  # nn.LeakyReLU() default (sd:563-573)
BN_EPS = 1e-5  # nn.BatchNorm1d default


# -- parameterisations of (A_s, B_s) ----------------------------------------------------------------------
class ValueParameterisation(Protocol):
    """Maps the optimised parameters to the scale A_s and shift B_s, each (1, tokens, width)."""

    name: Parameterisation

    def start(self) -> Params:
        """Step 0's parameters (later steps warm-start from the previous step's)."""
        ...

    def scale_shift(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]: ...


class DirectValues:
    """A_s and B_s themselves, from A = 1, B = 0 (our deviation: no image encoder needed)."""

    name: Parameterisation = "direct"

    def __init__(self, tokens: int, width: int, device: torch.device | str = "cpu") -> None:
        self.shape, self.device = (1, tokens, width), device

    def start(self) -> Params:
        return torch.ones(self.shape, device=self.device), torch.zeros(self.shape, device=self.device)

    def scale_shift(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        return params[0], params[1]


class MappingNetwork:
    """The official per-step network M_s from image tokens F (1, T, width) to [A_s; B_s] (sd:563-573):
    Conv1d(T->2L, k1), Conv1d(2L->2L, k1), BatchNorm1d (train mode), LeakyReLU, Conv1d(2L->2L, k1).
    Its parameters are plain tensors (so the shared loop optimises them like an embedding); 78,540 of them
    for T = 197, L = 77 (ViT-B/16, as the official code)."""

    name: Parameterisation = "clip"

    def __init__(self, features: torch.Tensor, tokens: int, seed: int = SD_DEFAULTS.seed) -> None:
        if features.ndim != 3 or features.shape[0] != 1:
            raise StyleDiffusionError(f"RealEdit: image features must be (1, tokens, width), got "
                                      f"{tuple(features.shape)}.")
        self.features, self.tokens, self.seed = features.detach().float(), tokens, seed

    def start(self) -> Params:
        """PyTorch's default init of the official modules, seeded (the official step 0 is random)."""
        t, out = self.features.shape[1], 2 * self.tokens
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            convs = [torch.nn.Conv1d(t, out, 1), torch.nn.Conv1d(out, out, 1), torch.nn.Conv1d(out, out, 1)]
        device = self.features.device
        params = [p.detach().to(device) for c in convs[:2] for p in (c.weight, c.bias)]
        params += [torch.ones(out, device=device), torch.zeros(out, device=device)]  # BatchNorm1d affine
        params += [p.detach().to(device) for p in (convs[2].weight, convs[2].bias)]
        return tuple(params)

    def scale_shift(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        w1, b1, w2, b2, gamma, beta, w3, b3 = params
        h = F.conv1d(self.features, w1, b1)  # (1, 2L, width): mixes tokens only
        h = F.conv1d(h, w2, b2)
        h = F.batch_norm(h, None, None, gamma, beta, training=True, eps=BN_EPS)  # batch 1: per token over width
        h = F.conv1d(F.leaky_relu(h, LEAKY_SLOPE), w3, b3)
        return h[:, : self.tokens], h[:, self.tokens :]


# -- the result ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValueInversion(Inversion):
    """A DDIM inversion with StyleDiffusion's learned value inputs: ``scales[s]`` = A_s and ``shifts[s]`` = B_s
    ((1, tokens, width), fp32, CPU) of edit step s, learned for ``source_embedding`` at CFG ``cfg``.

    ``losses[s]``: the loss (latent + attention) of every iteration; ``attention_losses[s]`` its attention
    part; ``final_losses[s]``: the kept value's loss; ``reconstruction``: x_0 reached with the kept values.
    """

    scales: tuple[torch.Tensor, ...]
    shifts: tuple[torch.Tensor, ...]
    source_embedding: torch.Tensor
    parameterisation: Parameterisation
    cfg: float
    losses: tuple[tuple[float, ...], ...]
    attention_losses: tuple[tuple[float, ...], ...]
    final_losses: tuple[float, ...]
    thresholds: tuple[float, ...]
    reconstruction: torch.Tensor
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_result(cls, inversion: Inversion, found: ValueOptimisation, source: torch.Tensor, parameterisation:
                    Parameterisation, cfg: float, fingerprint: str) -> ValueInversion:
        """The DDIM ``inversion`` with what :func:`optimise_values` learned for the ``source`` embedding (all on
        the CPU); ``fingerprint`` names the model."""
        return cls(trajectory=tuple(t.cpu() for t in inversion.trajectory), sigmas=inversion.sigmas.cpu(),
                   convention=inversion.convention, fingerprint=fingerprint, asked_steps=inversion.asked_steps,
                   scales=tuple(a.cpu() for a in found.scales), shifts=tuple(b.cpu() for b in found.shifts),
                   source_embedding=source.detach().float().cpu(), parameterisation=parameterisation, cfg=cfg,
                   losses=found.losses, attention_losses=found.attention_losses, final_losses=found.final_losses,
                   thresholds=found.thresholds, reconstruction=found.reconstruction.cpu(), warnings=found.warnings)

    def value(self, embedding: torch.Tensor, step: int) -> torch.Tensor:
        """embedding * A_s + B_s, the value input of edit step s (sd:466-476)."""
        return embedding.float().cpu() * self.scales[step] + self.shifts[step]

    @property
    def iterations(self) -> tuple[int, ...]:
        return tuple(len(step) for step in self.losses)

    @property
    def total_iterations(self) -> int:
        return sum(self.iterations)

    def report(self) -> str:
        """One line per step (iterations, final loss and its attention part, threshold) and the warnings."""
        lines = [f"step {s}: {len(losses)} it, loss {final:.3g} (attention {att[-1] if att else 0:.3g}; stop < "
                 f"{t:.3g})" for s, (losses, att, final, t) in
                 enumerate(zip(self.losses, self.attention_losses, self.final_losses, self.thresholds))]
        head = f"StyleDiffusion value inversion ({self.parameterisation}): {self.total_iterations} iterations"
        return "\n".join([head, *lines, *self.warnings])


def parameterisation_for(features: torch.Tensor | None, embedding: torch.Tensor, device: torch.device | str,
                         seed: int = SD_DEFAULTS.seed) -> ValueParameterisation:
    """``clip`` with image features F (1, tokens, width) (the official mapping network), else ``direct``
    (A = 1, B = 0); the features must be as wide as the text ``embedding``."""
    tokens, width = embedding.shape[-2:]
    if features is None:
        return DirectValues(tokens, width, device)
    feature_width_check(features, width)
    return MappingNetwork(features.to(device), tokens, seed)


def refuse_value_inversion(inversion: object, sampler: str, error: type[Exception] = StyleDiffusionError) -> None:
    """A StyleDiffusion INVERSION given to another method's sampler: refuse it by name."""
    if isinstance(inversion, ValueInversion):
        raise error(f"RealEdit: this INVERSION comes from RealEdit Value-Embedding Inversion (StyleDiffusion); "
                    f"edit it with the RealEdit StyleDiffusion Edit Sampler, not {sampler}.")


def check_value_inversion(inversion: object) -> ValueInversion:
    """The StyleDiffusion edit needs a StyleDiffusion INVERSION: refuse the others by name."""
    if isinstance(inversion, ValueInversion):
        if inversion.z_T.shape[0] != 1:
            raise StyleDiffusionError(f"RealEdit: the INVERSION holds {inversion.z_T.shape[0]} images; "
                                      "StyleDiffusion edits one at a time.")
        return inversion
    from .embedding_opt import OptimisedInversion  # noqa: PLC0415 - only to name the wrong kind

    if isinstance(inversion, OptimisedInversion):
        which = "Target-Text Inversion (TTIS)" if inversion.branch == "cond" else "Null-Text Inversion"
        sampler = "BARET Edit Sampler" if inversion.branch == "cond" else "SpecRef Edit Sampler"
        raise StyleDiffusionError(f"RealEdit: this INVERSION comes from RealEdit {which}; the StyleDiffusion edit "
                                  f"needs RealEdit Value-Embedding Inversion (edit this one with the RealEdit "
                                  f"{sampler}).")
    if isinstance(inversion, Inversion):
        raise StyleDiffusionError("RealEdit: this INVERSION is a plain DDIM inversion without learned value inputs; "
                                  "the StyleDiffusion edit needs RealEdit Value-Embedding Inversion.")
    raise StyleDiffusionError(f"RealEdit: the inversion input is not a RealEdit INVERSION (got "
                              f"{type(inversion).__name__}).")


# -- settings and the loop -------------------------------------------------------------------------------
def value_settings(cfg: float = SD_DEFAULTS.cfg, lr: float = SD_DEFAULTS.lr,
                   iteration_base: float = SD_DEFAULTS.iteration_base, eps: float = SD_DEFAULTS.early_stop_eps,
                   delta: float = SD_DEFAULTS.early_stop_delta, max_iterations: int | None = None
                   ) -> OptimisationSettings:
    """The official schedule as loop settings: lr 1e-2 (1 - s/100), cap ceil(base e^(-0.1 s)) (at most
    ``max_iterations``, the node's iteration budget per step), threshold eps + s delta."""
    def cap(step: int) -> int:
        c = iteration_cap(step, iteration_base, SD_DEFAULTS.iteration_decay)
        return c if max_iterations is None else max(1, min(c, max_iterations))

    return OptimisationSettings(iterations=cap, lr=null_text_lr(lr, SD_DEFAULTS.lr_horizon), eps=eps, delta=delta,
                                cfg=cfg)


@dataclass(frozen=True)
class ValueOptimisation:
    """What :func:`optimise_values` found (on the trajectory's device, detached)."""

    scales: tuple[torch.Tensor, ...]
    shifts: tuple[torch.Tensor, ...]
    losses: tuple[tuple[float, ...], ...]
    attention_losses: tuple[tuple[float, ...], ...]
    final_losses: tuple[float, ...]
    thresholds: tuple[float, ...]
    reconstruction: torch.Tensor
    warnings: tuple[str, ...]


def optimise_values(denoise: BranchDenoiser, recorder: CrossMapRecorder, live: LiveValue,
                    trajectory: Sequence[torch.Tensor], sigmas: torch.Tensor, cond: torch.Tensor,
                    uncond: torch.Tensor, targets: Sequence[LayerMaps], parameterisation: ValueParameterisation,
                    settings: OptimisationSettings, attention_weight: float = SD_DEFAULTS.attention_weight,
                    callback: IterationCallback | None = None) -> ValueOptimisation:
    """Learn (A_s, B_s) at every edit step (module docstring). ``denoise`` is the host's differentiable branch
    denoiser on a model carrying ``recorder`` (a hook) and ``live`` (its value patch); ``targets[i]`` the maps
    of DDIM-inversion call i. ``callback(step, iteration, loss)`` after every iteration (may raise to cancel).
    """
    steps = len(sigmas) - 1
    settings.validate(steps, "cond")
    _check(trajectory, sigmas, cond, uncond, targets, attention_weight)
    with torch.inference_mode(False), torch.enable_grad():
        path = [t.detach().clone().float() for t in trajectory]
        cond, uncond = cond.detach().clone().float(), uncond.detach().clone().float()
        attention: list[list[float]] = [[] for _ in range(steps)]
        step_loss = _step_losses(denoise, recorder, live, path, sigmas, cond, uncond, targets, parameterisation,
                                 settings.cfg, attention_weight, attention)
        try:
            results = optimise_steps(step_loss, path[-1], parameterisation.start(), steps, settings, callback)
        finally:  # cancelled or not: the patch and the recorder go quiet
            live.value, recorder.active = None, False
            recorder.take()
        with torch.no_grad():
            pairs = [parameterisation.scale_shift(r.params) for r in results]
    return ValueOptimisation(
        scales=tuple(a.detach().clone() for a, _ in pairs), shifts=tuple(b.detach().clone() for _, b in pairs),
        losses=tuple(tuple(r.losses) for r in results),
        attention_losses=tuple(tuple(a[: len(r.losses)]) for a, r in zip(attention, results)),
        final_losses=tuple(r.final_loss for r in results),
        thresholds=tuple(settings.threshold(s) for s in range(steps)),
        reconstruction=results[-1].x_next, warnings=tuple(r.warning for r in results if r.warning))


def _step_losses(denoise: BranchDenoiser, recorder: CrossMapRecorder, live: LiveValue, path: list[torch.Tensor],
                 sigmas: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, targets: Sequence[LayerMaps],
                 parameterisation: ValueParameterisation, cfg: float, attention_weight: float,
                 attention: list[list[float]]) -> Callable[[int, torch.Tensor], StepLoss]:
    steps = len(sigmas) - 1

    def step_loss(s: int, x: torch.Tensor) -> StepLoss:
        sigma = edit_levels(sigmas, s)[0]
        with torch.no_grad():  # the unconditional prediction, once per step (sd:787-789)
            uncond_pred = denoise(x, sigma, uncond, "uncond").float()
        # copies: inference tensors (recorded under ComfyUI's inference mode) cannot be saved for backward
        target = {layer: m.to(x.device).clone() for layer, m in targets[map_target_call(s, steps)].items()}

        def predict(params: Params) -> torch.Tensor:
            scale, shift = parameterisation.scale_shift(params)
            live.value, recorder.active = cond * scale + shift, attention_weight > 0
            try:
                return denoise(x, sigma, cond, "cond")
            finally:
                live.value, recorder.active = None, False

        def extra() -> torch.Tensor:
            loss = attention_loss(recorder.take(), target)
            attention[s].append(loss.item())
            return attention_weight * loss

        return cfg_step_loss(predict, "cond", uncond_pred, x, s, sigmas, path, cfg,
                             extra if attention_weight > 0 else None)

    return step_loss


def _check(trajectory: Sequence[torch.Tensor], sigmas: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
           targets: Sequence[LayerMaps], attention_weight: float) -> None:
    steps = len(sigmas) - 1
    if len(trajectory) != len(sigmas) or steps < 1:
        raise StyleDiffusionError(f"RealEdit: the trajectory has {len(trajectory)} latents for {len(sigmas)} sigmas.")
    for name, t in (("source", cond), ("unconditional", uncond)):
        if t.ndim != 3 or t.shape[0] != 1:
            raise StyleDiffusionError(f"RealEdit: the {name} embedding must be (1, tokens, width), got "
                                      f"{tuple(t.shape)}.")
        if not torch.isfinite(t).all():
            raise StyleDiffusionError(f"RealEdit: the {name} embedding contains NaN or inf values.")
    if attention_weight > 0 and len(targets) != steps:
        raise StyleDiffusionError(f"RealEdit: {len(targets)} recorded inversion calls for {steps} steps.")
    if not math.isfinite(attention_weight) or attention_weight < 0:
        raise StyleDiffusionError(f"RealEdit: the attention weight must be >= 0, got {attention_weight}.")


def feature_width_check(features: torch.Tensor, text_width: int, what: str = "CLIP_VISION") -> None:
    """The mapping network mixes tokens only: F must be as wide as the text embedding."""
    if features.shape[-1] != text_width:
        raise StyleDiffusionError(
            f"RealEdit: the {what} features are {features.shape[-1]} wide but the text embedding is {text_width} "
            f"wide; the mapping network needs equal widths (SD1.x: CLIP ViT-L/14, whose projection is 768 wide).")

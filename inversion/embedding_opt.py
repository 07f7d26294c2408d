"""Per-step embedding optimisation along a DDIM inversion: BARET's TTIS and null-text inversion.

One loop serves both methods; they differ only in which embedding is optimised and in the settings:

* **TTIS** (BARET Sec. 3.1, Eq. 1-2, Algorithm 1): the *target* (conditional) embedding, Adam lr 1e-3,
  at most 5 iterations per step.
* **Null-text inversion** (Mokady et al. 2023): the *unconditional* embedding, Adam lr
  1e-2 * (1 - t / 100), at most 10 iterations per step.

Given the DDIM trajectory x_0 .. x_N (sigma space, ascending; see :mod:`.ddim`), for each edit step s
(s = 0 the noisiest, from level sigma_{N-s} to sigma_{N-s-1}) the loop optimises one embedding e_s so
that the CFG denoising step from the current latent lands on the inverted latent of the next level:

    min_e  MSE( step(x_cur, e), x_{N-s-1} )                         (BARET Eq. 1-2)

warm-starting from e_{s-1}, with a fresh Adam per step (as null-text inversion), stopping early once
the loss is below ``eps + s * delta`` and after at most ``iterations`` iterations; then the current latent
advances with the kept embedding (no grad), so the next step starts on the reconstruction path.

Choices the papers leave open (METHODS.md, BARET):

* The threshold grows with the *denoising step* s, as in the official null-text code
  (``epsilon + i * 2e-5`` with ``i`` the timestep index) and BARET Sec. 4.1 ("a low threshold at the
  early stage of denoising ... gradually raised in the later stage").
* The loss is the MSE of the DDPM-space latents ``x / sqrt(1 + sigma^2)`` (the space of the official
  code, where eps and delta were set); in sigma space it would be ``1 + sigma^2`` times larger.
* An iteration evaluates the loss; when it is under the threshold the step stops *before* updating, so
  the kept embedding is the one that met it. At the cap the last update is checked by the advancing
  forward pass, whose MSE is the step's final loss.
* The embedding not optimised gives the same prediction at every iteration of a step: it is evaluated
  once per step, without grad (null-text's ``noise_pred_cond``). Each iteration is then one forward and
  one backward pass of a single branch.
* Everything runs in fp32 outside inference mode whatever the caller's mode (ComfyUI nodes run under
  ``torch.inference_mode()``; the host must make its weights usable by autograd, see
  :mod:`realedit.hosts.comfy_autograd`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from .baret_settings import BARET_DEFAULTS
from .ddim import Inversion

logger = logging.getLogger(__name__)

Branch = Literal["cond", "uncond"]
BRANCHES: tuple[Branch, ...] = ("cond", "uncond")
# One branch of the model in k-diffusion form: denoised = denoise(x, sigma, embedding, branch).
BranchDenoiser = Callable[[torch.Tensor, float, torch.Tensor, Branch], torch.Tensor]
# The CFG form: denoised = denoise(x, sigma, cond_embedding, uncond_embedding, cfg).
CfgDenoiser = Callable[[torch.Tensor, float, torch.Tensor, torch.Tensor, float], torch.Tensor]
LearningRate = float | Callable[[int], float]
# callback(step, iteration, loss) after every iteration; it may raise to cancel.
IterationCallback = Callable[[int, int, float], None]


class NonFiniteLossError(ValueError):
    """The model gives a non-finite loss even with the embedding the step started from."""


@dataclass(frozen=True)
class OptimisationSettings:
    """The knobs of the loop. ``lr`` is a number or a function of the edit step s (null-text's decay)."""

    iterations: int | Callable[[int], int]  # a number, or the cap at edit step s (StyleDiffusion's decay)
    lr: LearningRate
    eps: float = BARET_DEFAULTS.early_stop_eps
    delta: float = BARET_DEFAULTS.early_stop_delta
    cfg: float = BARET_DEFAULTS.cfg

    def lr_at(self, step: int) -> float:
        return float(self.lr(step) if callable(self.lr) else self.lr)

    def cap_at(self, step: int) -> int:
        """The iteration cap of edit step s."""
        return self.iterations(step) if callable(self.iterations) else self.iterations

    def threshold(self, step: int) -> float:
        """The early-stop threshold at edit step s: eps + s * delta (null-text inversion, BARET Sec. 4.1)."""
        return self.eps + step * self.delta

    def validate(self, steps: int, branch: Branch) -> None:
        """Clear errors for settings the loop cannot run with."""
        for s in range(steps):
            cap = self.cap_at(s)
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise ValueError(f"RealEdit: the iterations per step must be an integer >= 1, got {cap!r}"
                                 + (f" at step {s}." if callable(self.iterations) else "."))
            lr = self.lr_at(s)
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(
                    f"RealEdit: the learning rate must be > 0, got {lr!r} at step {s}"
                    + (" (the schedule reaches 0 there; use fewer steps)." if callable(self.lr) and s else ".")
                )
        if not (math.isfinite(self.eps) and math.isfinite(self.delta)) or self.eps < 0 or self.delta < 0:
            raise ValueError(f"RealEdit: early-stop eps and delta must be >= 0, got {self.eps}, {self.delta}.")
        if branch not in BRANCHES:
            raise ValueError(f"RealEdit: the optimised embedding must be one of {BRANCHES}, got {branch!r}.")
        inert = 1.0 if branch == "uncond" else 0.0  # the CFG weight at which that branch has no effect
        if self.cfg == inert:
            raise ValueError(f"RealEdit: at CFG {self.cfg} the {branch} embedding has no effect; use another CFG.")


def null_text_lr(start: float = BARET_DEFAULTS.null_text_lr,
                 horizon: int = BARET_DEFAULTS.null_text_lr_horizon) -> Callable[[int], float]:
    """Null-text inversion's schedule: ``start * (1 - s / horizon)`` at edit step s."""
    return lambda step: start * (1.0 - step / horizon)


@dataclass(frozen=True)
class EmbeddingOptimisation:
    """What the loop found, per edit step s (s = 0 the noisiest).

    ``losses[s]`` holds the loss of every iteration (before its update); ``iterations[s]`` is their count.
    ``final_losses[s]`` is the MSE of the step taken with the kept embedding ``embeddings[s]``.
    """

    branch: Branch
    embeddings: tuple[torch.Tensor, ...]
    losses: tuple[tuple[float, ...], ...]
    final_losses: tuple[float, ...]
    thresholds: tuple[float, ...]
    reconstruction: torch.Tensor  # x_0 reached by sampling with the kept embeddings
    warnings: tuple[str, ...] = ()

    @property
    def iterations(self) -> tuple[int, ...]:
        return tuple(len(step) for step in self.losses)

    @property
    def converged(self) -> tuple[bool, ...]:
        """Whether each step stopped on the threshold (not at the cap or on a non-finite loss)."""
        return tuple(bool(step) and step[-1] < t for step, t in zip(self.losses, self.thresholds))

    @property
    def total_iterations(self) -> int:
        return sum(self.iterations)

    def report(self) -> str:
        """One line per step (iterations, final loss, threshold) and the warnings, for a node's UI."""
        lines = [f"step {s}: {len(losses)} it, loss {final:.3g} (stop < {t:.3g}){'' if ok else ' capped'}"
                 for s, (losses, final, t, ok) in enumerate(
                     zip(self.losses, self.final_losses, self.thresholds, self.converged))]
        return "\n".join([*lines, *self.warnings])


@dataclass
class StepResult:
    """One edit step of :func:`optimise_steps`: the kept parameters, the latent they step to, the loss of
    every iteration, the kept parameters' loss and a warning (non-finite loss)."""

    params: tuple[torch.Tensor, ...]
    x_next: torch.Tensor
    losses: list[float]
    final_loss: float
    warning: str | None = None


def ddpm_mse(x: torch.Tensor, target: torch.Tensor, sigma: float) -> torch.Tensor:
    """MSE of two sigma-space latents at level sigma, measured in DDPM space (x / sqrt(1 + sigma^2))."""
    return F.mse_loss(x, target) / (1.0 + sigma**2)


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The DDIM (eta 0) denoising step in sigma space: x + (sigma_next - sigma) * eps."""
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance on denoised predictions (linear, so the same as on eps)."""
    return uncond + cfg * (cond - uncond)


def cfg_denoiser(denoise: BranchDenoiser) -> CfgDenoiser:
    """The two-branch CFG form of a branch denoiser (for samplers and benchmarks)."""

    def guided(x: torch.Tensor, sigma: float, cond: torch.Tensor, uncond: torch.Tensor, cfg: float) -> torch.Tensor:
        return cfg_combine(denoise(x, sigma, cond, "cond"), denoise(x, sigma, uncond, "uncond"), cfg)

    return guided


def edit_levels(sigmas: torch.Tensor, s: int) -> tuple[float, float, int]:
    """Edit step s goes from sigmas[N - s] to sigmas[N - s - 1]; returns both and the target index."""
    n = len(sigmas) - 1
    return float(sigmas[n - s]), float(sigmas[n - s - 1]), n - s - 1


def reconstruct(denoise: BranchDenoiser, trajectory: Sequence[torch.Tensor], sigmas: torch.Tensor,
                cond: Sequence[torch.Tensor] | torch.Tensor, uncond: Sequence[torch.Tensor] | torch.Tensor,
                cfg: float) -> tuple[torch.Tensor, list[float]]:
    """Sample from x_N with CFG and per-step (or fixed) embeddings; the per-step DDPM-space MSE to the
    trajectory. With the prompt's own embeddings this is plain DDIM inversion + CFG sampling, the
    reconstruction TTIS and null-text inversion improve on."""
    n = len(sigmas) - 1
    x = trajectory[-1].float()
    errors = []
    with torch.no_grad():
        for s in range(n):
            sigma, sigma_next, j = edit_levels(sigmas, s)
            c = cond[s] if isinstance(cond, Sequence) else cond
            u = uncond[s] if isinstance(uncond, Sequence) else uncond
            denoised = cfg_combine(denoise(x, sigma, c, "cond").float(), denoise(x, sigma, u, "uncond").float(), cfg)
            x = euler_step(x, denoised, sigma, sigma_next)
            errors.append(ddpm_mse(x, trajectory[j].float(), sigma_next).item())
    return x, errors


def optimise_embeddings(
    denoise: BranchDenoiser,
    trajectory: Sequence[torch.Tensor],
    sigmas: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    branch: Branch,
    settings: OptimisationSettings,
    callback: IterationCallback | None = None,
) -> EmbeddingOptimisation:
    """Optimise the ``branch`` embedding at every edit step (TTIS: "cond"; null-text: "uncond").

    ``trajectory`` is x_0 .. x_N at the ascending ``sigmas`` (a DDIM inversion, :func:`.ddim.invert`);
    ``cond`` and ``uncond`` are the starting embeddings. ``callback(step, iteration, loss)`` runs after
    every iteration and may raise to cancel: the loop then leaves nothing requiring grad behind.
    Returned tensors are fp32, detached, on the trajectory's device.
    """
    steps = len(sigmas) - 1
    settings.validate(steps, branch)
    _check_inputs(trajectory, sigmas, cond, uncond)
    with torch.inference_mode(False), torch.enable_grad():
        # Clones made here are normal tensors even when the inputs are inference tensors.
        path = [t.detach().clone().float() for t in trajectory]
        start, fixed = (t.detach().clone().float() for t in optimised_and_fixed(branch, cond, uncond))
        return _run(denoise, path, sigmas, start, fixed, branch, settings, callback)


def _run(denoise: BranchDenoiser, path: list[torch.Tensor], sigmas: torch.Tensor, start: torch.Tensor,
         fixed: torch.Tensor, branch: Branch, settings: OptimisationSettings,
         callback: IterationCallback | None) -> EmbeddingOptimisation:
    def step_loss(s: int, x: torch.Tensor) -> StepLoss:
        with torch.no_grad():
            fixed_pred = denoise(x, edit_levels(sigmas, s)[0], fixed, _other(branch)).float()
        return cfg_step_loss(lambda params: denoise(x, edit_levels(sigmas, s)[0], params[0], branch), branch,
                             fixed_pred, x, s, sigmas, path, settings.cfg)

    results = optimise_steps(step_loss, path[-1], (start,), len(sigmas) - 1, settings, callback)
    return EmbeddingOptimisation(
        branch=branch,
        embeddings=tuple(r.params[0] for r in results),
        losses=tuple(tuple(r.losses) for r in results),
        final_losses=tuple(r.final_loss for r in results),
        thresholds=tuple(settings.threshold(s) for s in range(len(results))),
        reconstruction=results[-1].x_next,
        warnings=tuple(r.warning for r in results if r.warning),
    )


# -- the generic per-step loop: a parameter set, a per-step cap, any loss built on the CFG step ---------------
Params = tuple[torch.Tensor, ...]
# params -> (loss, x_next): the loss of one iteration and the latent the CFG step reached
StepLoss = Callable[[Params], tuple[torch.Tensor, torch.Tensor]]
# (edit step s, current latent) -> that step's loss function (called once per step, before its iterations)
StepLossFactory = Callable[[int, torch.Tensor], StepLoss]


def cfg_step_loss(predict: Callable[[Params], torch.Tensor], branch: Branch, fixed_pred: torch.Tensor,
                  x: torch.Tensor, s: int, sigmas: torch.Tensor, path: Sequence[torch.Tensor], cfg: float,
                  extra: Callable[[], torch.Tensor] | None = None) -> StepLoss:
    """The loss of edit step s: MSE(CFG DDIM step from ``x``, x_{N-s-1}) (BARET Eq. 1-2, null-text inversion),
    plus ``extra()`` when given (StyleDiffusion's attention-map term, read after ``predict`` ran).

    ``predict(params)`` is the optimised ``branch``'s prediction; ``fixed_pred`` the other branch's (no grad).
    """
    sigma, sigma_next, j = edit_levels(sigmas, s)
    target = path[j]

    def evaluate(params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        pred = predict(params).float()
        cond_pred, uncond_pred = (pred, fixed_pred) if branch == "cond" else (fixed_pred, pred)
        x_next = euler_step(x, cfg_combine(cond_pred, uncond_pred, cfg), sigma, sigma_next)
        loss = ddpm_mse(x_next, target, sigma_next)
        return (loss if extra is None else loss + extra()), x_next

    return evaluate


def optimise_steps(step_loss: StepLossFactory, x_start: torch.Tensor, start: Params, steps: int,
                   settings: OptimisationSettings, callback: IterationCallback | None = None) -> list[StepResult]:
    """Per edit step s = 0 .. steps - 1: Adam on a warm-started copy of the parameters (the previous step's
    result; ``start`` at s = 0), a fresh optimiser per step, early stop, then advance to the latent the kept
    parameters step to. Shared by TTIS, null-text inversion and StyleDiffusion's value inversion."""
    x, params = x_start, start
    results: list[StepResult] = []
    for s in range(steps):
        result = optimise_step(step_loss(s, x), params, s, settings, callback)
        if result.warning:
            logger.warning(result.warning)
        results.append(result)
        x, params = result.x_next, result.params
    return results


def optimise_step(evaluate: StepLoss, start: Params, s: int, settings: OptimisationSettings,
                  callback: IterationCallback | None) -> StepResult:
    """One edit step: Adam (lr ``settings.lr_at(s)``) on a copy of ``start``, at most ``settings.cap_at(s)``
    iterations, early stop below ``settings.threshold(s)``."""
    params = tuple(p.clone().requires_grad_(True) for p in start)
    optimizer = torch.optim.Adam(list(params), lr=settings.lr_at(s))
    try:
        return _iterate(evaluate, params, optimizer, s, settings.threshold(s), settings.cap_at(s), callback)
    finally:  # also on cancellation: nothing may keep requiring grad or hold Adam's state
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        optimizer.state.clear()


def _snapshot(params: Params) -> Params:
    return tuple(p.detach().clone() for p in params)


def _iterate(evaluate: StepLoss, params: Params, optimizer: torch.optim.Optimizer, s: int, threshold: float,
             cap: int, callback: IterationCallback | None) -> StepResult:
    losses: list[float] = []
    last: tuple[Params, torch.Tensor, float] | None = None  # last finite (params, x_next, loss)
    for i in range(cap):
        value, x_next, evaluated = _iteration(evaluate, params, optimizer, threshold)
        losses.append(value)
        if callback is not None:
            callback(s, i, value)
        if not math.isfinite(value):
            return _non_finite(s, i, losses, last)
        last = (evaluated, x_next, value)
        if value < threshold:
            return StepResult(evaluated, x_next, losses, value)
    # At the cap the last update is unchecked: the advancing pass measures it (no grad).
    with torch.no_grad():
        final, x_next = evaluate(params)
    if not math.isfinite(final.item()):
        return _non_finite(s, cap, losses, last)
    return StepResult(_snapshot(params), x_next.detach(), losses, final.item())


def _iteration(evaluate: StepLoss, params: Params, optimizer: torch.optim.Optimizer,
               threshold: float) -> tuple[float, torch.Tensor, Params]:
    """Forward; backward and Adam step unless the loss is under the threshold or non-finite.

    Returns the loss, the latent it stepped to and the parameters it was measured at; the autograd
    graph dies with this frame.
    """
    loss, x_next = evaluate(params)
    if not loss.requires_grad:
        raise RuntimeError("RealEdit: the denoiser's output does not depend on the optimised embedding.")
    value = loss.item()
    evaluated = _snapshot(params)
    if math.isfinite(value) and value >= threshold:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return value, x_next.detach(), evaluated


def _non_finite(s: int, i: int, losses: list[float], last: tuple[Params, torch.Tensor, float] | None) -> StepResult:
    """Stop the step and keep the last parameters with a finite loss; fail if there are none."""
    if last is None:
        raise NonFiniteLossError(
            f"RealEdit: the loss is NaN/inf at step {s} even before optimising (the model gives non-finite "
            "predictions: check its dtype, the latent and the conditioning)."
        )
    warning = (f"RealEdit: non-finite loss at step {s}, iteration {i}; kept the last embedding with a finite "
               f"loss ({last[2]:.3g}). Try a lower learning rate.")
    return StepResult(last[0], last[1], losses, last[2], warning)


def optimised_and_fixed(branch: Branch, cond: torch.Tensor, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding ``branch`` names (optimised) and the other one (kept fixed)."""
    return (cond, uncond) if branch == "cond" else (uncond, cond)


def _other(branch: Branch) -> Branch:
    return "uncond" if branch == "cond" else "cond"


def _check_inputs(trajectory: Sequence[torch.Tensor], sigmas: torch.Tensor, cond: torch.Tensor,
                  uncond: torch.Tensor) -> None:
    if len(trajectory) != len(sigmas) or len(sigmas) < 2:
        raise ValueError(f"RealEdit: the trajectory has {len(trajectory)} latents for {len(sigmas)} sigmas; "
                         "they must match (x_0 .. x_N) with at least one step.")
    for name, t in (("cond", cond), ("uncond", uncond)):
        if t.ndim != 3:
            raise ValueError(f"RealEdit: the {name} embedding must be (batch, tokens, width), got {tuple(t.shape)}.")
        if not torch.isfinite(t).all():
            raise ValueError(f"RealEdit: the {name} embedding contains NaN or inf values.")


@dataclass(frozen=True)
class OptimisedInversion(Inversion):
    """A DDIM inversion with per-step optimised embeddings: TTIS (BARET Sec. 3.1) or null-text inversion.

    ``optimisation`` holds what the loop found: per-step losses, iteration counts and the embeddings.
    ``embeddings[s]`` is the embedding of edit step s (s = 0 the noisiest) for the ``branch`` it
    replaces: "cond" (TTIS, the optimised target embedding e_opt,t) or "uncond" (null-text). The other
    branch keeps ``fixed_embedding`` at every step; ``initial_embedding`` is where step 0 started (TTIS:
    the target embedding e_target of Eq. 3).
    """

    optimisation: EmbeddingOptimisation
    cfg: float = 7.5
    initial_embedding: torch.Tensor | None = None
    fixed_embedding: torch.Tensor | None = None

    @classmethod
    def from_result(cls, inversion: Inversion, optimisation: EmbeddingOptimisation, cond: torch.Tensor,
                    uncond: torch.Tensor, cfg: float, *, fingerprint: str | None = None) -> OptimisedInversion:
        """The DDIM ``inversion`` with what :func:`optimise_embeddings` found along it, started from ``cond`` and
        ``uncond`` at CFG ``cfg``; ``fingerprint`` (default: the inversion's) names the model it is for."""
        start, fixed = optimised_and_fixed(optimisation.branch, cond, uncond)
        return cls(trajectory=inversion.trajectory, sigmas=inversion.sigmas, convention=inversion.convention,
                   fingerprint=inversion.fingerprint if fingerprint is None else fingerprint,
                   asked_steps=inversion.asked_steps, optimisation=optimisation, cfg=cfg, initial_embedding=start,
                   fixed_embedding=fixed)

    @property
    def branch(self) -> Branch:
        return self.optimisation.branch

    @property
    def embeddings(self) -> tuple[torch.Tensor, ...]:
        return self.optimisation.embeddings

    def null_text_context(self, kind: str, slot: int, step: int) -> torch.Tensor | None:
        """Null-text inversion's per-step unconditional embedding for every unconditional row of an edit
        batch at edit ``step`` (a host's context schedule); None elsewhere, or for a TTIS inversion."""
        if self.branch != "uncond" or kind != "uncond":
            return None
        return self.embeddings[step] if 0 <= step < len(self.embeddings) else None

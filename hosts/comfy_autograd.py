"""TTIS and null-text inversion on a ComfyUI MODEL: autograd through the UNet despite inference mode.

ComfyUI runs nodes under ``torch.inference_mode()``, so a loaded model's weights are usually
*inference tensors*, which autograd refuses to save for backward ("Inference tensors cannot be saved
for backward"). The technique (METHODS.md, BARET; the one ComfyUI's own LoRA trainer,
``comfy_extras/nodes_train.py``, uses):

1. Work on ``model.clone()``: same weights, own patch lists; the caller's MODEL is never touched. Under
   ComfyUI's dynamic VRAM (``ModelPatcherDynamic``, the default on NVIDIA since 0.16), weights stream
   through staging buffers that are reused layer after layer, so a weight saved for backward could be
   overwritten before backward reads it. There the clone is what ComfyUI's own trainer uses instead: a
   non-dynamic deep copy (``clone(disable_dynamic=True)``, LoRA and other patches kept), fully loaded.
   A dynamic model that cannot be deep-copied (built in code, not loaded from a file) keeps the shared
   weights and has every per-forward weight copied (step 2), never a view of a staging buffer. On a CPU,
   and on every release before dynamic VRAM, nothing of this applies and the clone is the plain one.
   (Verified on the CPU only; no GPU was available when this was written.)
2. Give the clone an *identity weight wrapper* on every ComfyUI op (``add_weight_wrapper`` on each
   ``<module>.weight`` / ``.bias``). A module with a weight function runs through
   ``comfy.ops.cast_bias_weight``, which copies the weight each forward before calling the wrapper; run
   outside inference mode, that copy is a normal tensor autograd can save. The wrapper detaches it
   (no gradient flows into the shared parameters, which keep ``requires_grad=True`` in older ComfyUI) and
   clones a weight that is still an inference tensor (every weight, on a dynamic model that stayed
   dynamic). No weight is modified and nothing is stored: the copies live as long as one forward/backward.
3. Give the clone an fp32 compute dtype (``set_model_compute_dtype``) when the model computes in
   another dtype: the embedding, Adam, the loss and the backward pass are fp32 (no fp16 gradient
   overflow or underflow), also on models loaded in fp16/bf16. ``dtype=None`` keeps the model's.
4. Run the forward passes inside ``torch.inference_mode(False)`` (the core loop does).
5. When done, successful or not (cancelled, out of memory), load the caller's MODEL again with
   ``load_models_gpu``: ComfyUI then unpatches the clone (its object patches and weight functions)
   exactly as when a KSampler switches between two clones of one checkpoint. The caller's MODEL is
   then loaded (as the next KSampler would load it anyway).

The differentiable denoiser calls ``model.model.apply_model`` directly, one branch per call, with the
embedding as ``c_crossattn``, the model's ``transformer_options`` (attention patches of other packs)
and ``model_function_wrapper``, and the CONDITIONING's extra model conds (SDXL's pooled ``y``), all as
``comfy.samplers.calc_cond_batch`` passes them. ControlNets, areas, masks and hooks in a CONDITIONING
are not supported (a clear error): the loop optimises text embeddings only. The DDIM inversion itself is
:func:`.comfy_sampling.ddim_invert` on the same clone (target prompt, guidance 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Iterator
from typing import Any, Callable

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import torch

from ..inversion.baret_settings import BARET_DEFAULTS
from ..inversion.ddim import DEFAULT_CONVENTION, Convention
from ..inversion.embedding_opt import (
    Branch,
    BranchDenoiser,
    EmbeddingOptimisation,
    IterationCallback,
    LearningRate,
    OptimisationSettings,
    OptimisedInversion,
    null_text_lr,
    optimise_embeddings,
)
from .comfy_sampling import StepCallback, check_sd_model, ddim_invert, model_fingerprint, schedule_steps

# Activations kept for one backward pass, relative to ComfyUI's inference estimate (heuristic).
BACKWARD_MEMORY_FACTOR = 4
# CONDITIONING options the denoiser cannot honour while optimising a text embedding.
UNSUPPORTED_COND_KEYS = ("control", "area", "mask", "hooks", "gligen")


class CopyInferenceWeight:
    """Identity weight wrapper: the (per-forward) weight cut off from the parameter's autograd history,
    copied to a normal tensor when it is still an inference tensor (``always``: copied every time).

    Detaching keeps backward from computing (and storing in ``.grad``) gradients for the shared model's
    parameters, which older ComfyUI leaves with ``requires_grad=True``: only the embedding gets a gradient.
    ``always`` is for a dynamic-VRAM model whose per-forward weight may be a view of a reused staging buffer.
    """

    def __init__(self, always: bool = False) -> None:
        self.always = always

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        weight = weight.detach()
        return weight.clone() if self.always or weight.is_inference() else weight

    def __deepcopy__(self, memo: dict) -> CopyInferenceWeight:
        return self


def is_dynamic(model: Any) -> bool:
    """Whether ``model`` streams its weights with ComfyUI's dynamic VRAM (releases before it have no such mode)."""
    return bool(getattr(model, "is_dynamic", lambda: False)())


def trainable_copy(model: Any) -> tuple[Any, bool]:
    """The clone to run autograd through, and whether its weights must be copied every forward.

    A plain ``clone()``, except under dynamic VRAM: there, as ComfyUI's trainer (comfy_extras/nodes_train.py),
    a non-dynamic deep copy of the clone; when the model cannot be deep-copied, the plain clone with every
    per-forward weight copied (module docstring, step 1).
    """
    if not is_dynamic(model):
        return model.clone(), False
    try:
        return model.clone(disable_dynamic=True), False
    except RuntimeError as error:  # no cached_patcher_init: the model was not loaded from a file
        logging.warning("RealEdit: %s; optimising on the dynamic-VRAM model with every weight copied per forward "
                         "(slower, same result).", error)
        return model.clone(), True


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype the model's UNet computes in (its manual cast dtype, else its weights' dtype)."""
    cast = model.object_patches.get("manual_cast_dtype", getattr(model.model, "manual_cast_dtype", None))
    return cast or model.model_dtype()


def autograd_clone(model: Any, dtype: torch.dtype | None = torch.float32) -> Any:
    """A clone of ``model`` that autograd can run through (see the module docstring); ``dtype`` None
    keeps the model's compute dtype."""
    clone, copy_every_weight = trainable_copy(model)
    wrapper = CopyInferenceWeight(always=copy_every_weight)
    for name, module in clone.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        for param in ("weight", "bias"):
            if getattr(module, param, None) is not None:
                clone.add_weight_wrapper(f"{name}.{param}", wrapper)
    if dtype is not None and compute_dtype(model) != dtype:
        clone.set_model_compute_dtype(dtype)
    return clone


def is_deep_copy(clone: Any) -> bool:
    """Whether ``clone`` has a model of its own (:func:`trainable_copy`'s deep copy) rather than its parent's."""
    return clone.model is not getattr(clone.parent, "model", clone.model)


def hand_back(model: Any, clone: Any) -> None:
    """Load the caller's MODEL again: ComfyUI unpatches our clone (object patches, weight functions). A deep
    copy also gives its weights back to the offload device at once, instead of whenever ComfyUI collects it."""
    if is_deep_copy(clone):
        clone.detach()
    comfy.model_management.load_models_gpu([model])


def check_text_conditioning(conditioning: list, name: str) -> None:
    """TTIS / null-text optimise one text embedding: one entry, no ControlNet, area, mask or hooks."""
    if not isinstance(conditioning, list) or len(conditioning) != 1:
        count = len(conditioning) if isinstance(conditioning, list) else "no"
        raise ValueError(f"RealEdit: the {name} CONDITIONING must hold exactly one prompt, got {count} entries "
                         "(combine or concat them before this node).")
    embedding, options = conditioning[0]
    if not isinstance(embedding, torch.Tensor) or embedding.ndim != 3 or embedding.shape[0] != 1:
        raise ValueError(f"RealEdit: the {name} CONDITIONING is not a single text embedding (1, tokens, width).")
    found = [key for key in UNSUPPORTED_COND_KEYS if options.get(key) is not None]
    if found:
        raise ValueError(f"RealEdit: the {name} CONDITIONING carries {', '.join(found)}; embedding optimisation "
                         "supports plain text conditioning only (apply ControlNets etc. in the edit sampler).")


def embedding_and_extras(model: Any, conditioning: list, latent_shape: torch.Size, device: torch.device,
                         prompt_type: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The cross-attention embedding and the other model conds (SDXL ``y``) as ComfyUI's samplers build them."""
    noise = torch.zeros(latent_shape, device=device)
    conds = comfy.samplers.encode_model_conds(model.model.extra_conds, comfy.sampler_helpers.convert_cond(conditioning),
                                              noise, device, prompt_type)
    extras = {key: value.cond.to(device) for key, value in conds[0]["model_conds"].items() if key != "c_crossattn"}
    return conditioning[0][0].to(device), extras


def branch_denoiser(model: Any, extras: dict[Branch, dict[str, torch.Tensor]],
                    sample_sigmas: torch.Tensor) -> BranchDenoiser:
    """The differentiable k-diffusion denoiser of one CFG branch, ``denoise(x, sigma, embedding, branch)``.

    Calls ``apply_model`` as ``comfy.samplers.calc_cond_batch`` does (transformer options with
    ``cond_or_uncond``, the model's ``model_function_wrapper``), minus ControlNets and areas.
    """
    diffusion, options = model.model, model.model_options
    uuids = {"cond": uuid.uuid4(), "uncond": uuid.uuid4()}

    def denoise(x: torch.Tensor, sigma: float, embedding: torch.Tensor, branch: Branch) -> torch.Tensor:
        index = [0 if branch == "cond" else 1]
        timestep = torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32)
        transformer_options = dict(options.get("transformer_options", {}))
        transformer_options.update(cond_or_uncond=index, uuids=[uuids[branch]], sigmas=timestep,
                                   sample_sigmas=sample_sigmas)
        c = {"c_crossattn": embedding, "transformer_options": transformer_options,
             **{key: value.clone() for key, value in extras[branch].items()}}
        wrapper = options.get("model_function_wrapper")
        if wrapper is not None:
            return wrapper(diffusion.apply_model, {"input": x, "timestep": timestep, "c": c, "cond_or_uncond": index})
        return diffusion.apply_model(x, timestep, **c)

    return denoise


def interruptible(callback: Callable[..., None] | None) -> Callable[..., None]:
    """Honour ComfyUI's Cancel button at every call, then run the caller's callback."""

    def call(*args: Any) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback(*args)

    return call


def optimise_inversion(
    model: Any,
    latent: torch.Tensor,
    positive: list,
    negative: list,
    branch: Branch,
    settings: OptimisationSettings,
    *,
    steps: int,
    scheduler: str = "ddim_uniform",
    convention: Convention = DEFAULT_CONVENTION,
    dtype: torch.dtype | None = torch.float32,
    callback: IterationCallback | None = None,
    inversion_callback: StepCallback | None = None,
) -> OptimisedInversion:
    """DDIM-invert ``latent`` with ``positive`` (guidance 1), then optimise the ``branch`` embedding per step.

    The shared body of :func:`ttis_invert` and :func:`null_text_invert`. ``callback(step, iteration, loss)``
    runs after each iteration, ``inversion_callback(i, x)`` after each inversion step; both after a check
    of ComfyUI's interrupt flag. The caller's MODEL is never modified (module docstring).
    """
    check_sd_model(model, latent)
    settings.validate(schedule_steps(model, scheduler, steps), branch)  # as run (ddim_uniform: 31 for 30)
    check_text_conditioning(positive, "positive")
    check_text_conditioning(negative, "negative")
    clone = autograd_clone(model, dtype)
    try:
        inversion = ddim_invert(clone, latent, positive, steps=steps, scheduler=scheduler, guidance=1.0,
                                convention=convention, callback=interruptible(inversion_callback))
        result, cond, uncond = _optimise_on(clone, inversion.trajectory, inversion.sigmas, latent.shape, positive,
                                            negative, branch, settings, inversion.sampling_sigmas,
                                            interruptible(callback))
    finally:
        hand_back(model, clone)
    result = dataclasses.replace(result, embeddings=tuple(e.cpu() for e in result.embeddings),
                                 reconstruction=result.reconstruction.cpu())  # off the GPU, as the trajectory
    return OptimisedInversion.from_result(inversion, result, cond.cpu(), uncond.cpu(), settings.cfg,
                                          fingerprint=model_fingerprint(model))


def _optimise_on(clone: Any, trajectory: tuple[torch.Tensor, ...], sigmas: torch.Tensor, latent_shape: torch.Size,
                 positive: list, negative: list, branch: Branch, settings: OptimisationSettings,
                 sample_sigmas: torch.Tensor, callback: IterationCallback,
                 ) -> tuple[EmbeddingOptimisation, torch.Tensor, torch.Tensor]:
    """Load the clone for backward passes and run the core loop on its load device; with the cond and uncond
    embeddings it started from."""
    device = load_for_backward(clone, latent_shape)
    denoise, cond, uncond = prompt_denoiser(clone, positive, negative, latent_shape, device, sample_sigmas)
    with inference_tensor_errors():
        result = optimise_embeddings(denoise, [t.to(device) for t in trajectory], sigmas, cond, uncond, branch,
                                     settings, callback)
    return result, cond, uncond


def load_for_backward(clone: Any, latent_shape: torch.Size) -> torch.device:
    """Load an :func:`autograd_clone` with room for backward passes; returns its device."""
    memory = clone.memory_required(list(latent_shape)) * BACKWARD_MEMORY_FACTOR
    # a deep copy made for dynamic VRAM loads whole, as ComfyUI's trainer loads it (module docstring, step 1)
    comfy.model_management.load_models_gpu([clone], memory_required=memory, force_full_load=is_deep_copy(clone))
    return clone.load_device


def prompt_denoiser(clone: Any, positive: list, negative: list, latent_shape: torch.Size, device: torch.device,
                    sample_sigmas: torch.Tensor) -> tuple[BranchDenoiser, torch.Tensor, torch.Tensor]:
    """The clone's :func:`branch_denoiser` with both prompts' extra model conds, and the two text embeddings."""
    cond, cond_extras = embedding_and_extras(clone, positive, latent_shape, device, "positive")
    uncond, uncond_extras = embedding_and_extras(clone, negative, latent_shape, device, "negative")
    denoise = branch_denoiser(clone, {"cond": cond_extras, "uncond": uncond_extras}, sample_sigmas.to(device))
    return denoise, cond, uncond


@contextlib.contextmanager
def inference_tensor_errors() -> Iterator[None]:
    """Name the cause when autograd meets an inference-mode weight (a layer that is not a ComfyUI op)."""
    try:
        yield
    except RuntimeError as error:
        if "Inference tensors" not in str(error):
            raise
        raise RuntimeError(
            "RealEdit: a layer of this MODEL is not a ComfyUI op, so its inference-mode weights cannot take part "
            "in backpropagation; embedding optimisation does not support this model."
        ) from error


def ttis_invert(
    model: Any,
    latent: torch.Tensor,
    target_cond: list,
    negative: list,
    *,
    steps: int = BARET_DEFAULTS.steps,
    cfg: float = BARET_DEFAULTS.cfg,
    iterations: int = BARET_DEFAULTS.ttis_iterations,
    lr: LearningRate = BARET_DEFAULTS.ttis_lr,
    eps: float = BARET_DEFAULTS.early_stop_eps,
    delta: float = BARET_DEFAULTS.early_stop_delta,
    scheduler: str = "ddim_uniform",
    convention: Convention = DEFAULT_CONVENTION,
    dtype: torch.dtype | None = torch.float32,
    callback: IterationCallback | None = None,
    inversion_callback: StepCallback | None = None,
) -> OptimisedInversion:
    """BARET's target-text inversion schedule (Sec. 3.1, Eq. 1-2, Algorithm 1) on a ComfyUI MODEL.

    DDIM-inverts ``latent`` (user space, one image) with the target prompt, then per step optimises the
    target embedding (warm start, Adam) so the CFG step with ``negative`` (the empty prompt) lands on the
    inverted latent. ``embeddings`` of the result are the per-step optimised target embeddings.
    """
    settings = OptimisationSettings(iterations=iterations, lr=lr, eps=eps, delta=delta, cfg=cfg)
    return optimise_inversion(model, latent, target_cond, negative, "cond", settings, steps=steps,
                              scheduler=scheduler, convention=convention, dtype=dtype, callback=callback,
                              inversion_callback=inversion_callback)


def null_text_invert(
    model: Any,
    latent: torch.Tensor,
    cond: list,
    negative: list,
    *,
    steps: int = BARET_DEFAULTS.steps,
    cfg: float = BARET_DEFAULTS.cfg,
    iterations: int = BARET_DEFAULTS.null_text_iterations,
    lr: LearningRate | None = None,
    eps: float = BARET_DEFAULTS.early_stop_eps,
    delta: float = BARET_DEFAULTS.early_stop_delta,
    scheduler: str = "ddim_uniform",
    convention: Convention = DEFAULT_CONVENTION,
    dtype: torch.dtype | None = torch.float32,
    callback: IterationCallback | None = None,
    inversion_callback: StepCallback | None = None,
) -> OptimisedInversion:
    """Null-text inversion (Mokady et al. 2023) on a ComfyUI MODEL: the same loop as :func:`ttis_invert`
    with the unconditional embedding optimised, starting from ``negative`` (the empty prompt).

    ``lr`` defaults to null-text's schedule 1e-2 * (1 - s / 100); ``embeddings`` of the result are the
    per-step optimised unconditional embeddings (``branch == "uncond"``).
    """
    settings = OptimisationSettings(iterations=iterations, lr=null_text_lr() if lr is None else lr, eps=eps,
                                    delta=delta, cfg=cfg)
    return optimise_inversion(model, latent, cond, negative, "uncond", settings, steps=steps,
                              scheduler=scheduler, convention=convention, dtype=dtype, callback=callback,
                              inversion_callback=inversion_callback)

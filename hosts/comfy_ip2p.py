"""InstructPix2Pix three-way guidance in ComfyUI, with ZONE's attention capture (papers/zone.txt Sec. 4.2).

IP2P (Brooks et al., Eq. 2; ZONE Eq. 3-4) predicts noise in three branches:

    e = e(z, {}, {}) + s_I (e(z, c_I, {}) - e(z, {}, {})) + s_T (e(z, c_I, c_T) - e(z, c_I, {}))

(c_I the photo's latent concatenated to the 8-channel input, c_T the instruction). :class:`IP2PGuider`
computes exactly ComfyUI's ``Guider_DualCFG`` ("regular" style, comfy_extras/nodes_custom_sampler.py)
with cond1 = instruction + photo, cond2 = empty text + photo and negative = empty text with no photo
(InstructPixToPixConditioning's concat on the first two, comfy_extras/nodes_ip2p.py), but always runs
all three branches (the capture needs them even at guidance 1).

Rows: ``calc_cond_batch`` labels each chunk of the batch with its position in the list of conds, so in
DualCFG's order [negative, middle, positive] ``cond_or_uncond`` holds 0 (negative: empty text, no
photo), 1 (middle: empty text + photo) and 2 (positive: instruction + photo). ComfyUI's default
reading (0 = cond, 1 = uncond) would call the negative branch "cond" and the instruction "cond" too. An
``APPLY_MODEL`` wrapper on our clone rewrites the labels for the UNet call to the usual meaning --
the instruction branch 0 ("cond"), both empty-text branches 1 ("uncond") -- so attention hooks (and
other packs' patches) see cond = instruction, uncond = empty text.

Fusion with a second IP2P-type model (ZONE Eq. 5, MagicBrush): z_{t-1} = (z*_{t-1} + beta z'_{t-1}) /
(1 + beta), both models taking the same three-way guidance step from the same (fused) z_t. ComfyUI
samplers step from the guider's denoised prediction D(x), and a first-order step is affine in D with
coefficients that do not depend on the model (Euler: x_{i+1} = (s_{i+1}/s_i) x_i + (1 - s_{i+1}/s_i) D;
euler_ancestral adds the same noise to both; DDIM is Euler in sigma space), so fusing the two models'
D with Eq. 5's weights *is* fusing the two stepped latents, exactly, with any first-order sampler. With
higher-order or multistep samplers the same weights fuse every model evaluation instead (the natural
generalisation; the paper and the official code only use one-evaluation steps). The second model
rides along as an additional model of the IP2P clone, so ComfyUI loads both together.

Two choices, against the official code (lsl001006/ZONE, ``text2image_instructpix2pix_blend``):
* The official loop advances MagicBrush on its own, never-fused chain and pulls only IP2P's chain
  towards it; Eq. 5 has one z_t, so here both models step from the fused latent.
* M_b is captured from the IP2P model only (the hook is on its clone, never on the second model's),
  sampling the fused trajectory: as in the official code, whose AttentionStore is registered on the
  IP2P pipeline alone and reads IP2P's UNet on the fused latents.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import comfy.model_base
import comfy.model_patcher
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import torch
from comfy.patcher_extension import WrappersMP

from ..attention.hooks import AttentionHook
from ..masks.fusion import fuse_latents
from .comfy import install_hook

ROWS_WRAPPER_KEY = "realedit_ip2p_rows"
FUSION_MODELS_KEY = "realedit_zone_fusion"  # the second model, loaded with the IP2P clone
FUSION_SESSION_KEY = "realedit_zone_fusion_session"  # readies the second model inside the sampling run
# calc_cond_batch position in [negative, middle, positive] -> ComfyUI's cond (0) / uncond (1) label.
BRANCH_TO_ROW = {0: 1, 1: 1, 2: 0}
StepCallback = Callable[[int, torch.Tensor], None]


class NotIP2PModelError(ValueError):
    """The MODEL is not an 8-channel InstructPix2Pix UNet."""


def check_ip2p_model(model: Any, name: str = "model") -> None:
    """Refuse models that do not take the photo as 4 extra input channels the IP2P way (``name``: the input)."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    channels = getattr(unet, "in_channels", None)
    if channels != 8 or not isinstance(getattr(model, "model", None), comfy.model_base.IP2P):
        raise NotIP2PModelError(
            f"RealEdit: the '{name}' input is a {type(getattr(model, 'model', model)).__name__} with {channels} "
            "input channels; ZONE needs an InstructPix2Pix model (8 input channels: latent + photo), e.g. "
            "instruct-pix2pix-00-22000.safetensors or a MagicBrush checkpoint, loaded with Load Checkpoint."
        )


def check_fusion_partner(model: Any, second_model: Any) -> None:
    """The second model of Eq. 5 must be an IP2P model of the same base as the first (one latent space,
    one text encoder: the same CONDITIONING and photo latent feed both)."""
    check_ip2p_model(second_model, "second_model")
    first, second = type(model.model), type(second_model.model)
    if first is not second:
        raise NotIP2PModelError(
            f"RealEdit: 'second_model' is a {second.__name__} but 'model' is a {first.__name__}; the fusion "
            "needs two finetunes of the same base (e.g. InstructPix2Pix and MagicBrush, both SD1.5)."
        )


def _ip2p_rows_wrapper(executor: Callable, x: torch.Tensor, t: torch.Tensor, c_concat: Any, c_crossattn: Any,
                       control: Any, transformer_options: dict, **kwargs: Any) -> torch.Tensor:
    """APPLY_MODEL wrapper: relabel the three IP2P branches as cond (instruction) / uncond (empty text)."""
    chunks = transformer_options.get("cond_or_uncond")
    if chunks is not None:
        transformer_options = dict(transformer_options)
        transformer_options["cond_or_uncond"] = [BRANCH_TO_ROW.get(c, c) for c in chunks]
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def with_concat(conditioning: list, concat: torch.Tensor | None) -> list:
    """A copy of ``conditioning`` whose entries carry ``concat`` as concat_latent_image (None: drop it)."""
    out = []
    for embedding, options in conditioning:
        options = {k: v for k, v in options.items() if k != "concat_latent_image"}
        if concat is not None:
            options["concat_latent_image"] = concat
        out.append([embedding, options])
    return out


class IP2PGuider(comfy.samplers.CFGGuider):
    """``Guider_DualCFG`` (regular style) that always evaluates all three IP2P branches.

    With :meth:`set_partner`, a second IP2P guider is evaluated at the same x after this one and the
    two denoised predictions are fused by Eq. 5 (see the module doc for why that is the latent fusion).
    """

    partner: IP2PGuider | None = None
    beta: float = 0.0
    _partner_options: dict | None = None

    def set_conds(self, positive: list, middle: list, negative: list) -> None:
        middle = [[e, {**o, "prompt_type": "negative"}] for e, o in middle]
        self.inner_set_conds({"positive": positive, "middle": middle, "negative": negative})

    def set_cfg(self, text_cfg: float, image_cfg: float) -> None:  # type: ignore[override]
        self.text_cfg, self.image_cfg = text_cfg, image_cfg

    def set_partner(self, partner: IP2PGuider, beta: float) -> None:
        """Fuse ``partner``'s prediction with weight ``beta`` (Eq. 5); its model must be an additional model of
        this guider's model patcher (``FUSION_MODELS_KEY``) so that ComfyUI loads the two together."""
        self.partner, self.beta = partner, beta

    def three_way(self, x: torch.Tensor, timestep: torch.Tensor, model_options: dict) -> torch.Tensor:
        """IP2P Eq. 2 on this guider's model: D = D(z, {}, {}) + s_I (D(z, c_I, {}) - ...) + s_T (...)."""
        negative, middle, positive = (self.conds.get(k) for k in ("negative", "middle", "positive"))
        out = comfy.samplers.calc_cond_batch(self.inner_model, [negative, middle, positive], x, timestep,
                                             model_options)
        image_guided = comfy.samplers.cfg_function(self.inner_model, out[1], out[0], self.image_cfg, x, timestep,
                                                   model_options=model_options, cond=middle, uncond=negative)
        return image_guided + (out[2] - out[1]) * self.text_cfg

    def predict_noise(self, x: torch.Tensor, timestep: torch.Tensor, model_options: dict | None = None,
                      seed: int | None = None, **_unused: Any) -> torch.Tensor:
        denoised = self.three_way(x, timestep, model_options or {})
        if self._partner_options is None:
            return denoised
        partner = self.partner
        with _current_patcher(partner.model_patcher):
            second = partner.three_way(x, timestep, self._partner_options)
        return fuse_latents(denoised, second, self.beta)  # Eq. 5


def _fusion_session_wrapper(executor: Callable, guider: Any, sigmas: torch.Tensor, extra_args: dict, callback: Any,
                            noise: torch.Tensor, latent_image: torch.Tensor | None = None,
                            denoise_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    """SAMPLER_SAMPLE wrapper on the IP2P clone: make the fusion partner ready for the run, then sample.

    ComfyUI calls it inside ``CFGGuider.inner_sample`` once the main model is loaded and its conds are
    processed, with the sampler's own arguments (a signature every supported release shares); the guider
    itself is the sampler's ``model_wrap``. So the guider overrides none of ``CFGGuider``'s sampling
    internals, whose signatures change between releases (``latent_shapes`` since 0.3.67), and whatever
    else ComfyUI passes is handed on untouched.
    """
    def sample() -> torch.Tensor:
        return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, *args, **kwargs)

    if not isinstance(guider, IP2PGuider) or guider.partner is None or guider.beta == 0:
        return sample()
    with _partner_session(guider, noise, latent_image, sigmas, denoise_mask, extra_args.get("seed")) as options:
        guider._partner_options = options
        try:
            return sample()
        finally:
            guider._partner_options = None


@contextmanager
def _current_patcher(patcher: Any) -> Iterator[None]:
    """Make ``patcher`` its BaseModel's current patcher for a block (ComfyUI's calc_cond_batch reads it; two
    clones of one model share the BaseModel), restoring the previous one afterwards."""
    model = patcher.model
    previous = getattr(model, "current_patcher", None)
    model.current_patcher = patcher
    try:
        yield
    finally:
        model.current_patcher = previous


def _latent_shapes_kwargs(main: Any, partner_model: Any) -> dict:
    """``latent_shapes`` for ``process_conds`` where the release has it (0.3.67 and later: the main model's
    ``inner_sample`` sets it on its BaseModel), set on the partner's BaseModel the same way; else nothing."""
    if "latent_shapes" not in inspect.signature(comfy.samplers.process_conds).parameters:
        return {}
    shapes = getattr(main.inner_model, "latent_shapes", None)
    partner_model.latent_shapes = shapes
    return {"latent_shapes": shapes}


@contextmanager
def _partner_session(main: IP2PGuider, noise: torch.Tensor, latent_image: torch.Tensor | None, sigmas: torch.Tensor,
                     denoise_mask: torch.Tensor | None, seed: int | None) -> Iterator[dict]:
    """What ``CFGGuider.sample``/``outer_sample``/``inner_sample`` do to make a model ready, minus the loading
    (the partner is loaded with the main model): hooks and wrappers merged into its own model options,
    conds processed by its own BaseModel, pre-run/cleanup callbacks. Yields the partner's model options."""
    partner = main.partner
    patcher = partner.model_patcher
    device = noise.device
    conds = {k: [c.copy() for c in v] for k, v in partner.original_conds.items()}
    comfy.samplers.preprocess_conds_hooks(conds)
    options = comfy.model_patcher.create_model_options_clone(partner.model_options)
    comfy.sampler_helpers.prepare_model_patcher(patcher, conds, options)
    comfy.samplers.filter_registered_hooks_on_conds(conds, options)
    partner.inner_model = patcher.model
    partner.conds = comfy.samplers.process_conds(patcher.model, noise, conds, device, latent_image, denoise_mask,
                                                 seed, **_latent_shapes_kwargs(main, patcher.model))
    options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
    comfy.samplers.cast_to_load_options(options, device=device, dtype=patcher.model_dtype())
    with _current_patcher(patcher):
        patcher.pre_run()
    try:
        yield options
    finally:
        comfy.samplers.cast_to_load_options(options, device=patcher.offload_device)
        with _current_patcher(patcher):
            patcher.cleanup()
        patcher.restore_hook_patches()
        del partner.inner_model, partner.conds


def ip2p_model(model: Any, hook: AttentionHook | None = None) -> Any:
    """A clone of ``model`` with the row relabelling wrapper and, when given, ``hook`` on cross-attention."""
    check_ip2p_model(model)
    patched = install_hook(model, hook, self_attention=False) if hook is not None else model.clone()
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, ROWS_WRAPPER_KEY, _ip2p_rows_wrapper)
    patched.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, FUSION_SESSION_KEY, _fusion_session_wrapper)
    return patched


def _guider(model: Any, photo_latent: torch.Tensor, positive: list, negative: list, text_cfg: float,
            image_cfg: float) -> IP2PGuider:
    """An :class:`IP2PGuider` on ``model`` (already patched): the photo on the instruction and middle
    branches, removed from the negative branch."""
    guider = IP2PGuider(model)
    guider.set_conds(with_concat(positive, photo_latent), with_concat(negative, photo_latent),
                     with_concat(negative, None))
    guider.set_cfg(text_cfg, image_cfg)
    return guider


def ip2p_edit(
    model: Any,
    photo_latent: torch.Tensor,
    positive: list,
    negative: list,
    *,
    steps: int = 20,
    text_cfg: float = 7.5,
    image_cfg: float = 1.5,
    seed: int = 0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    hook: AttentionHook | None = None,
    callback: StepCallback | None = None,
    second_model: Any | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """Sample the IP2P edit of ``photo_latent`` (the VAE-encoded photo, user space); returns the edited latent.

    ``positive`` is the instruction's CONDITIONING, ``negative`` the empty text's; the photo is attached
    as concat_latent_image to the instruction and middle branches, removed from the negative branch.
    ``second_model`` (MagicBrush or another IP2P finetune of the same base) is fused after every step
    with weight ``beta`` (Eq. 5; beta 0 or no second model: the single-model edit, bit for bit). ``hook``
    sees the first model only.
    """
    if photo_latent.ndim != 4 or photo_latent.shape[1] != 4:
        raise ValueError(
            f"RealEdit: the photo latent has shape {tuple(photo_latent.shape)}; expected (1, 4, h, w) from the VAE."
        )
    if beta < 0:
        raise ValueError(f"RealEdit: the fusion weight beta must be >= 0, got {beta}.")
    patched = ip2p_model(model, hook)
    fused = second_model is not None and beta > 0
    if fused:
        check_fusion_partner(model, second_model)
        partner = _guider(ip2p_model(second_model), photo_latent, positive, negative, text_cfg, image_cfg)
        patched.set_additional_models(FUSION_MODELS_KEY, [partner.model_patcher])
    guider = _guider(patched, photo_latent, positive, negative, text_cfg, image_cfg)
    if fused:
        guider.set_partner(partner, beta)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    latent = torch.zeros_like(photo_latent)
    noise = comfy.sample.prepare_noise(latent, seed)

    def k_callback(step: int, _denoised: torch.Tensor, x: torch.Tensor, _total: int) -> None:
        if callback is not None:
            callback(step, x)

    sampler = comfy.samplers.sampler_object(sampler_name)
    return guider.sample(noise, latent, sampler, sigmas, callback=k_callback, disable_pbar=True, seed=seed)

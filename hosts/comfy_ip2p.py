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
"""

from __future__ import annotations

from typing import Any, Callable

import comfy.model_base
import comfy.sample
import comfy.samplers
import torch
from comfy.patcher_extension import WrappersMP

from ..attention.hooks import AttentionHook
from .comfy import install_hook

ROWS_WRAPPER_KEY = "realedit_ip2p_rows"
# calc_cond_batch position in [negative, middle, positive] -> ComfyUI's cond (0) / uncond (1) label.
BRANCH_TO_ROW = {0: 1, 1: 1, 2: 0}
StepCallback = Callable[[int, torch.Tensor], None]


class NotIP2PModelError(ValueError):
    """The MODEL is not an 8-channel InstructPix2Pix UNet."""


def check_ip2p_model(model: Any) -> None:
    """Refuse models that do not take the photo as 4 extra input channels the IP2P way."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    channels = getattr(unet, "in_channels", None)
    if channels != 8 or not isinstance(model.model, comfy.model_base.IP2P):
        raise NotIP2PModelError(
            f"RealEdit: the MODEL is a {type(getattr(model, 'model', model)).__name__} with {channels} input channels; "
            "ZONE needs an InstructPix2Pix model (8 input channels: latent + photo), e.g. "
            "instruct-pix2pix-00-22000.safetensors or a MagicBrush checkpoint, loaded with Load Checkpoint."
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
    """``Guider_DualCFG`` (regular style) that always evaluates all three IP2P branches."""

    def set_conds(self, positive: list, middle: list, negative: list) -> None:
        middle = [[e, {**o, "prompt_type": "negative"}] for e, o in middle]
        self.inner_set_conds({"positive": positive, "middle": middle, "negative": negative})

    def set_cfg(self, text_cfg: float, image_cfg: float) -> None:  # type: ignore[override]
        self.text_cfg, self.image_cfg = text_cfg, image_cfg

    def predict_noise(self, x: torch.Tensor, timestep: torch.Tensor, model_options: dict | None = None,
                      seed: int | None = None) -> torch.Tensor:
        model_options = model_options or {}
        negative, middle, positive = (self.conds.get(k) for k in ("negative", "middle", "positive"))
        out = comfy.samplers.calc_cond_batch(self.inner_model, [negative, middle, positive], x, timestep,
                                             model_options)
        image_guided = comfy.samplers.cfg_function(self.inner_model, out[1], out[0], self.image_cfg, x, timestep,
                                                   model_options=model_options, cond=middle, uncond=negative)
        return image_guided + (out[2] - out[1]) * self.text_cfg


def ip2p_model(model: Any, hook: AttentionHook | None = None) -> Any:
    """A clone of ``model`` with the row relabelling wrapper and, when given, ``hook`` on cross-attention."""
    check_ip2p_model(model)
    patched = install_hook(model, hook, self_attention=False) if hook is not None else model.clone()
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, ROWS_WRAPPER_KEY, _ip2p_rows_wrapper)
    return patched


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
) -> torch.Tensor:
    """Sample the IP2P edit of ``photo_latent`` (the VAE-encoded photo, user space); returns the edited latent.

    ``positive`` is the instruction's CONDITIONING, ``negative`` the empty text's; the photo is attached
    as concat_latent_image to the instruction and middle branches, removed from the negative branch.
    """
    if photo_latent.ndim != 4 or photo_latent.shape[1] != 4:
        raise ValueError(
            f"RealEdit: the photo latent has shape {tuple(photo_latent.shape)}; expected (1, 4, h, w) from the VAE."
        )
    patched = ip2p_model(model, hook)
    guider = IP2PGuider(patched)
    guider.set_conds(with_concat(positive, photo_latent), with_concat(negative, photo_latent),
                     with_concat(negative, None))
    guider.set_cfg(text_cfg, image_cfg)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    latent = torch.zeros_like(photo_latent)
    noise = comfy.sample.prepare_noise(latent, seed)

    def k_callback(step: int, _denoised: torch.Tensor, x: torch.Tensor, _total: int) -> None:
        if callback is not None:
            callback(step, x)

    sampler = comfy.samplers.sampler_object(sampler_name)
    return guider.sample(noise, latent, sampler, sigmas, callback=k_callback, disable_pbar=True, seed=seed)

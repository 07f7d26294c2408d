"""Shared node plumbing: progress with cancellation, custom socket types, validation helpers, and the prompt
words of the two-path P2P samplers (SpecRef, StyleDiffusion): token positions from a CLIP, the P2P cross edit,
LocalBlend words.

The samplers encode the source and target prompts themselves with the CLIP, so that words (target word for
M_t, LocalBlend words, reweighted words) map to the exact token positions ComfyUI's tokenizer gives
them (prompt weighting syntax such as ``(cat:1.2)`` is parsed away by that tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import comfy.model_management
import comfy.utils
import torch
import torch.nn.functional as F
from comfy_api.v0_0_2 import io

from ..attention.p2p import Refine, Replace, Reweight, cross_edit, resolve_mode
from ..attention.settings import SpecRefSettings
from ..attention.specref import SpecRefError
from ..attention.tokens import (
    Token,
    Tokenizer,
    TokenLookupError,
    WordNotFoundError,
    check_prompt_length,
    reweight_scale,
    word_positions,
    word_token_indices,
)
from ..hosts.comfy import discover_layers
from ..hosts.comfy_sampling import INVERSION_SCHEDULERS
from ..inversion.ddim import CONVENTIONS, DEFAULT_CONVENTION

Inversion = io.Custom("REALEDIT_INVERSION")
RefFeatures = io.Custom("REALEDIT_REF_FEATURES")

EDIT_MODES = ("auto", "replace", "refine", "reweight", "none")
LATENT_SCALE = 8  # VAE downscale of SD1.x / SD2.x / SDXL

CONVENTION_TOOLTIP = (
    "Where the inversion predicts noise. 'next' (default): at the current latent labelled with the next "
    "timestep, as diffusers' DDIMInverseScheduler and the official P2P / null-text / SpecRef code; every "
    "edit step then has a matching reference entry. 'current': at the current latent and its own timestep, "
    "SpecRef Eq. 1 as written (ComfyUI's FlipSigmas + euler)."
)


MAP_DOWNSCALE_TOOLTIP = (
    "Cross-attention maps (LocalBlend's, M_t) are read from the layers whose token grid is the latent divided by "
    "this. 4 (default): P2P's 16x16 maps at 512 px on SD1.x (32x32 at 1024 px on SDXL). Smaller images need a "
    "smaller value for maps fine enough to mark an object (the shapes world's 128 px images: 1, its 16x16 layers).")


def map_downscale_input(tooltip: str = MAP_DOWNSCALE_TOOLTIP,
                        default: int = SpecRefSettings().map_downscale) -> io.Int.Input:
    """The ``map_downscale`` input; ``default``: the node's method's (its execute's default)."""
    return io.Int.Input("map_downscale", default=default, min=1, max=64, optional=True, tooltip=tooltip)


def check_map_downscale(model: object, map_downscale: int) -> None:
    """Raise a ValueError naming the model's attention downscales unless ``map_downscale`` is one of them."""
    levels = sorted({layer.downscale for layer in discover_layers(model)})
    if map_downscale not in levels:
        raise ValueError(f"RealEdit: this model has no attention layers at map_downscale {map_downscale}; its "
                         f"attention layers sit at downscales {levels}.")


def scheduler_input() -> io.Combo.Input:
    return io.Combo.Input(
        "scheduler", options=list(INVERSION_SCHEDULERS), default="ddim_uniform",
        tooltip="Schedules uniform in the model's timesteps, which DDIM inversion retraces exactly.",
    )


def convention_input() -> io.Combo.Input:
    return io.Combo.Input("convention", options=list(CONVENTIONS), default=DEFAULT_CONVENTION,
                          tooltip=CONVENTION_TOOLTIP)


def progress(total: int) -> Callable[[int, object], None]:
    """A per-step callback: advances ComfyUI's progress bar and honours the Cancel button."""
    bar = comfy.utils.ProgressBar(total)

    def step(i: int, _latent: object = None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(i + 1, total)

    return step


def latent_samples(latent: dict, name: str = "latent") -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise ValueError(f"RealEdit: the {name} input is not an image LATENT (VAE Encode the photo first).")
    return samples


def latent_output(model, z: torch.Tensor, like: torch.Tensor) -> dict:
    """A user LATENT dict of the model-space latent ``z`` (e.g. an inversion's z_T): ``process_latent_out``,
    on the device and in the dtype of ``like`` (the latent the user connected)."""
    return {"samples": model.model.process_latent_out(z.to(like.device)).to(like.dtype)}


def single_image(samples: torch.Tensor, name: str) -> torch.Tensor:
    if samples.shape[0] != 1:
        raise ValueError(
            f"RealEdit: the {name} holds a batch of {samples.shape[0]}; inversion edits one image at a time "
            "(use 'Latent From Batch' to pick one)."
        )
    return samples


# -- words and tokens ------------------------------------------------------------------------------------
def clip_tokenizer(clip: object) -> Tokenizer:
    """A :data:`~..attention.tokens.Tokenizer` from a ComfyUI CLIP: its own CLIP-L (else first) tokenizer,
    so positions match what CLIPTextEncode feeds the model (weights parsed away, BOS/EOS/padding removed).
    """
    outer = getattr(clip, "tokenizer", None)
    inner = getattr(outer, "clip_l", None) or getattr(outer, str(getattr(outer, "clip", "")), None)
    hf = getattr(inner, "tokenizer", None)
    if inner is None or hf is None or not hasattr(inner, "tokenize_with_weights"):
        raise SpecRefError("RealEdit: this CLIP has no CLIP (BPE) tokenizer to look words up with; SpecRef "
                           "editing supports SD1.x, SD2.x and SDXL text encoders.")
    start, end = getattr(inner, "start_token", None), getattr(inner, "end_token", None)

    def tokenize(text: str) -> list[Token]:
        ids: list[int] = []
        for chunk in inner.tokenize_with_weights(text):
            chunk_ids = [t[0] for t in chunk]
            if chunk_ids and start is not None and chunk_ids[0] == start:
                chunk_ids = chunk_ids[1:]
            if end is not None and end in chunk_ids:
                chunk_ids = chunk_ids[: chunk_ids.index(end)]
            ids.extend(int(t) if isinstance(t, int) else -1 for t in chunk_ids)  # -1: a textual embedding
        texts = [hf.convert_ids_to_tokens(i) if i >= 0 else "<embedding></w>" for i in ids]
        return list(zip(ids, texts))

    return tokenize


def split_words(text: str) -> list[str]:
    """Comma-separated word groups (a group may hold several words: 'red car, tiger')."""
    return [w.strip() for w in (text or "").split(",") if w.strip()]


@dataclass(frozen=True)
class PromptEdit:
    """The two prompts of a P2P edit, tokenised, and the cross-attention control they call for."""

    tokenize: Tokenizer
    mode: str  # auto resolved: none / replace / refine / reweight
    cross_edit: Replace | Refine | Reweight | None


def prompt_edit(clip: object, source_text: str, target_text: str, edit_mode: str, reweight_words: str,
                reweight_factor: float) -> PromptEdit:
    """Tokenise both prompts (each at most 77 tokens) and build P2P's Replace / Refine / Reweight control (P2P
    Sec. 3.2); the P2P samplers (SpecRef, StyleDiffusion) share it. ``reweight`` needs ``reweight_words``."""
    tokenize = clip_tokenizer(clip)
    src_tokens, tgt_tokens = tokenize(source_text), tokenize(target_text)
    check_prompt_length(f"the source prompt {source_text!r}", src_tokens)
    check_prompt_length(f"the target prompt {target_text!r}", tgt_tokens)
    mode = resolve_mode(edit_mode, src_tokens, tgt_tokens)
    scale = None
    if mode == "reweight":
        if not split_words(reweight_words):
            raise ValueError("RealEdit: edit_mode 'reweight' needs reweight_words (words of the target prompt).")
        scale = reweight_scale(word_token_indices(target_text, split_words(reweight_words), tokenize),
                               reweight_factor)
    return PromptEdit(tokenize, mode, cross_edit(mode, src_tokens, tgt_tokens, scale))


def _positions_if_any(prompt: str, word: str, tokenize: Tokenizer) -> list[int]:
    """Positions of ``word`` in ``prompt``; [] when it does not occur there (other lookup errors raise)."""
    try:
        return word_positions(prompt, word, tokenize)
    except WordNotFoundError:
        return []


def blend_positions(source: str, target: str, words: Sequence[str], tokenize: Tokenizer) -> list[list[int]]:
    """LocalBlend token positions per path (source, target); each word must occur in one of the prompts."""
    found: tuple[set[int], set[int]] = (set(), set())
    for word in words:
        in_source, in_target = _positions_if_any(source, word, tokenize), _positions_if_any(target, word, tokenize)
        if not in_source and not in_target:
            raise TokenLookupError(f"RealEdit: the LocalBlend word {word!r} is in neither the source prompt "
                                   f"{source!r} nor the target prompt {target!r}.")
        found[0].update(in_source)
        found[1].update(in_target)
    return [sorted(found[0]), sorted(found[1])]


def image_mask(mask: torch.Tensor | None, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A (1, H, W) latent-size mask upscaled to image size (nearest); zeros when not computed."""
    size = (latent_hw[0] * LATENT_SCALE, latent_hw[1] * LATENT_SCALE)
    if mask is None:
        return torch.zeros(1, *size)
    return F.interpolate(mask.float().reshape(1, 1, *mask.shape[-2:]), size=size, mode="nearest")[0]


def encode(clip: object, text: str) -> list:
    """What CLIPTextEncode gives for ``text``."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))

"""RealEdit SpecRef Edit Sampler: SpecRef's edit stage (P2P two-path sampler + SR-attention) as one node;
RealEdit Apply SR-Attention: SR-attention alone, as a MODEL patch for ComfyUI's own samplers.

The edit sampler encodes the source and target prompts itself with the CLIP (the word helpers live in
``nodes/common.py``, shared with the StyleDiffusion sampler).
"""

from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io, ui

from ..attention.local_blend import LocalBlend
from ..attention.settings import MASK_RESIZE_MODES, P2PSettings, SpecRefSettings, describe
from ..attention.specref import SpecRefControls, SpecRefError, SRStats, parse_layers
from ..attention.tokens import word_token_indices
from ..hosts.comfy_edit import specref_edit
from ..hosts.comfy_sr import apply_sr_attention, check_stored_features
from .common import (
    EDIT_MODES,
    Inversion,
    RefFeatures,
    blend_positions,
    check_map_downscale,
    clip_tokenizer,
    encode,
    image_mask,
    map_downscale_input,
    progress,
    prompt_edit,
    split_words,
)

CATEGORY = "RealEdit/specref"
P2P_DEFAULTS = P2PSettings()
SR_DEFAULTS = SpecRefSettings()
log = logging.getLogger("realedit")


class SpecRefEditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditSpecRefEditSampler",
            display_name="RealEdit SpecRef Edit Sampler",
            category=CATEGORY,
            description=(
                "SpecRef editing (stage 2): a reconstruction path pinned to the source INVERSION and an edit "
                "path from z_T with the target prompt, tied by Prompt-to-Prompt (Replace / Refine / Reweight, "
                "self-attention replacement), LocalBlend on the blend words and, with REF_FEATURES, "
                "SR-attention that copies the reference object where the target word attends."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the INVERSION (and REF_FEATURES) were made with."),
                io.Clip.Input("clip", tooltip="Encodes both prompts and looks their words up."),
                Inversion.Input("inversion", tooltip="From RealEdit DDIM Invert on the source photo, or RealEdit "
                                "Null-Text Inversion (its per-step unconditional embeddings are then used)."),
                io.String.Input("source_text", multiline=True, default="a photo of a cat",
                                tooltip="The source caption (what the inversion used)."),
                io.String.Input("target_text", multiline=True, default="a photo of a tiger",
                                tooltip="The edited caption."),
                io.Conditioning.Input("negative"),
                io.Int.Input("steps", default=50, min=2, max=1000,
                             tooltip="Must equal the steps of the inversion and reference nodes."),
                io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1),
                io.Combo.Input("edit_mode", options=list(EDIT_MODES), default="auto",
                               tooltip="auto: replace when both prompts have the same number of words, else "
                                       "refine. reweight: scale the reweight words' attention (on top of auto)."),
                io.Float.Input("cross_replace", default=P2P_DEFAULTS.cross_replace, min=0.0, max=1.0, step=0.01,
                               tooltip=describe(P2PSettings, "cross_replace")),
                io.Float.Input("self_replace", default=P2P_DEFAULTS.self_replace, min=0.0, max=1.0, step=0.01,
                               tooltip=describe(P2PSettings, "self_replace")),
                io.String.Input("blend_words", default="", optional=True,
                                tooltip="LocalBlend words, comma separated (e.g. 'cat, tiger'); empty = off. "
                                "LocalBlend keeps the source wherever these words' maps are weak: name the edited "
                                "object; for an edit of the whole background or style leave it empty, or it can "
                                "keep patches of the old one (README: Fidelity on the shapes world)."),
                io.Float.Input("blend_threshold", default=P2P_DEFAULTS.blend_threshold, min=0.0, max=1.0, step=0.01,
                               tooltip=describe(P2PSettings, "blend_threshold")),
                io.String.Input("reweight_words", default="", optional=True,
                                tooltip="Words of the target prompt to reweight (edit_mode reweight)."),
                io.Float.Input("reweight_factor", default=2.0, min=-10.0, max=10.0, step=0.1, optional=True),
                RefFeatures.Input("ref_features", optional=True,
                                  tooltip="From RealEdit Reference Features; enables SR-attention."),
                io.Mask.Input("reference_mask", optional=True,
                              tooltip="M_s: the reference object in the reference photo (none = all of it)."),
                io.String.Input("target_words", default="", optional=True,
                                tooltip="Word(s) of the target prompt whose attention map gives M_t."),
                io.Float.Input("mt_threshold", default=0.5, min=0.0, max=1.0, step=0.01, optional=True),
                io.Float.Input("ms_threshold", default=0.5, min=0.0, max=1.0, step=0.01, optional=True),
                io.String.Input("blend_subtract_words", default="", optional=True,
                                tooltip="LocalBlend words whose region is taken out of the blend mask, comma "
                                        "separated (the official P2P code's substruct_words: maps without the "
                                        "max-pool, own threshold); empty = off (default, as there)."),
                io.Float.Input("blend_subtract_threshold", default=P2P_DEFAULTS.blend_threshold, min=0.0, max=1.0,
                               step=0.01, optional=True,
                               tooltip="Threshold of the subtracted words' max-normalised map (official P2P code: "
                                       "0.3, as the blend words')."),
                *_sr_option_inputs(),
                _uncond_shared_kv_input(optional=True),
                map_downscale_input(),
            ],
            outputs=[
                io.Latent.Output(display_name="edited"),
                io.Latent.Output(display_name="reconstruction"),
                io.Mask.Output(display_name="M_t", tooltip="Final M_t at image size (zeros without target words)."),
                io.Mask.Output(display_name="local_blend", tooltip="Last LocalBlend mask at image size."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, inversion, source_text, target_text, negative, steps, cfg, edit_mode,
                cross_replace, self_replace, blend_words="", blend_threshold=0.3, reweight_words="",
                reweight_factor=2.0, ref_features=None, reference_mask=None, target_words="", mt_threshold=0.5,
                ms_threshold=0.5, blend_subtract_words="", blend_subtract_threshold=P2P_DEFAULTS.blend_threshold,
                sr_layers="", mask_resize=SR_DEFAULTS.mask_resize, uncond_shared_kv=False,
                map_downscale=SR_DEFAULTS.map_downscale) -> io.NodeOutput:
        check_map_downscale(model, map_downscale)
        edit = prompt_edit(clip, source_text, target_text, edit_mode, reweight_words, reweight_factor)
        tokenize = edit.tokenize
        settings = SpecRefSettings(
            p2p=P2PSettings(cross_replace=cross_replace, self_replace=self_replace, blend_threshold=blend_threshold),
            mt_threshold=mt_threshold, ms_threshold=ms_threshold, mask_resize=mask_resize, map_downscale=map_downscale,
        )
        blend, subtract = split_words(blend_words), split_words(blend_subtract_words)
        if subtract and not blend:
            raise SpecRefError("RealEdit: blend_subtract_words need blend_words (LocalBlend is off without them).")
        local_blend = (LocalBlend(blend_positions(source_text, target_text, blend, tokenize),
                                  threshold=blend_threshold, start=settings.p2p.blend_start,
                                  subtract=blend_positions(source_text, target_text, subtract, tokenize)
                                  if subtract else None, subtract_threshold=blend_subtract_threshold)
                       if blend else None)
        target = split_words(target_words)
        positions = word_token_indices(target_text, target, tokenize) if target else None
        if ref_features is not None and positions is None:
            raise SpecRefError("RealEdit: SR-attention (ref_features connected) needs target_words: the word(s) "
                               f"of the target prompt {target_text!r} naming the object to copy.")
        controls = SpecRefControls(
            settings=settings, cross_edit=edit.cross_edit, local_blend=local_blend,
            target_positions=positions, ref_mask=reference_mask if ref_features is not None else None,
            sr_layers=parse_layers(sr_layers), sr_uncond_shared_kv=uncond_shared_kv,
        )

        step = progress(inversion.steps)
        result = specref_edit(model, inversion, encode(clip, source_text), encode(clip, target_text), negative,
                              cfg=cfg, controls=controls, ref_features=ref_features, steps=steps,
                              callback=lambda info: step(info.step))
        hw = tuple(result.latent.shape[-2:])
        text = f"RealEdit SpecRef: edit mode {edit.mode}; " + sr_report(result.stats)
        return io.NodeOutput({"samples": result.latent}, {"samples": result.reconstruction},
                             image_mask(result.mt_mask, hw), image_mask(result.blend_mask, hw),
                             ui=ui.PreviewText(text))


UNCOND_SHARED_KV_TOOLTIP = (
    "Also apply SR-attention to the unconditional rows, with the same reference K/V as the conditional rows (the "
    "reference is inverted once, without guidance); their M_t is the conditional row's. Not the official code's "
    "unconditional option, which pairs those rows with K/V from a CFG inversion of the reference. Default off (as "
    "there). Switch it on when the edit turns into coloured noise: with SR-attention on the conditional rows only, "
    "CFG multiplies the difference it makes by the cfg scale (on the shapes world at cfg 7.5 the whole image "
    "broke up; with this on it kept its background, README 'SpecRef under CFG').")


def _uncond_shared_kv_input(optional: bool = False) -> io.Boolean.Input:
    return io.Boolean.Input("uncond_shared_kv", default=False, optional=optional, tooltip=UNCOND_SHARED_KV_TOOLTIP)


def _sr_option_inputs() -> list:
    """SR-attention's layer subset and mask resizing (official-code options; defaults off / ours)."""
    return [
        io.String.Input("sr_layers", default="", optional=True,
                        tooltip="SR-attention only in these layers, e.g. '13-15' or '13, 15' (numbered 0-15 in call "
                                "order, METHODS.md; a subset of the REF_FEATURES' layers). Empty (default): every "
                                "layer the features hold. The official examples use three decoder layers."),
        io.Combo.Input("mask_resize", options=list(MASK_RESIZE_MODES), default=SR_DEFAULTS.mask_resize, optional=True,
                       tooltip=describe(SpecRefSettings, "mask_resize")),
    ]


def sr_report(stats: SRStats) -> str:
    """What SR-attention did, with the documented fallback spelled out when M_t stayed empty."""
    text = (f"SR-attention applied in {stats.applied} calls (skipped: {stats.empty_mt} empty M_t, "
            f"{stats.missing_reference} without reference K/V)")
    if stats.empty_mt and not stats.applied:
        text += (". M_t was empty at every SR-attention call (the target word's map never exceeded mt_threshold): "
                 "the reference was not used; lower mt_threshold or choose another target word")
        log.warning("RealEdit: %s", text)
    if stats.fallback_queries:
        text += (f"; {stats.fallback_queries} queries found no reference key inside the reference mask and kept "
                 "their own attention")
    return text


class ApplySRAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        defaults = SpecRefSettings()
        return io.Schema(
            node_id="RealEditApplySRAttention",
            display_name="RealEdit Apply SR-Attention",
            category=CATEGORY,
            description=(
                "SpecRef's SR-attention (Eq. 2-3) for ComfyUI's own samplers: a clone of the MODEL whose "
                "conditional rows attend to the reference's stored K/V inside the reference mask (M_s), where "
                "the target word attends (M_t, its cross-attention map in the same run, running mean since the "
                "first step). Sample with the steps and scheduler of RealEdit Reference Features (denoise 1, or "
                "KSamplerAdvanced start/end steps of that schedule); e.g. from the source's z_T with noise "
                "disabled for a one-path edit, or from noise."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the REF_FEATURES were made with (the clone is returned; "
                               "this one stays unpatched)."),
                io.Clip.Input("clip", tooltip="Looks the target words up in the target prompt."),
                RefFeatures.Input("ref_features", tooltip="From RealEdit Reference Features, mode 'stored'."),
                io.String.Input("target_text", multiline=True, default="a photo of a tiger",
                                tooltip="The positive prompt your sampler uses (the words are looked up in it)."),
                io.String.Input("target_words", default="tiger",
                                tooltip="Word(s) of the target prompt whose attention map gives M_t, comma "
                                        "separated (empty: give a target_mask instead)."),
                io.Float.Input("mt_threshold", default=defaults.mt_threshold, min=0.0, max=1.0, step=0.01,
                               tooltip=describe(SpecRefSettings, "mt_threshold")),
                io.Float.Input("ms_threshold", default=defaults.ms_threshold, min=0.0, max=1.0, step=0.01,
                               tooltip=describe(SpecRefSettings, "ms_threshold")),
                _uncond_shared_kv_input(),
                io.Mask.Input("reference_mask", optional=True,
                              tooltip="M_s: the reference object in the reference photo (none = all of it)."),
                io.Mask.Input("target_mask", optional=True,
                              tooltip="A fixed M_t (where to put the reference object) instead of the word's map."),
                *_sr_option_inputs(),
                map_downscale_input(),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched clone: use it in any sampler.")],
        )

    @classmethod
    def execute(cls, model, clip, ref_features, target_text, target_words, mt_threshold, ms_threshold,
                uncond_shared_kv, reference_mask=None, target_mask=None, sr_layers="",
                mask_resize=SR_DEFAULTS.mask_resize, map_downscale=SR_DEFAULTS.map_downscale) -> io.NodeOutput:
        check_stored_features(model, ref_features)
        check_map_downscale(model, map_downscale)
        words = split_words(target_words)
        positions = None
        if words:
            positions = word_token_indices(target_text, words, clip_tokenizer(clip))
        elif target_mask is None:
            raise SpecRefError("RealEdit Apply SR-Attention needs target_words (word(s) of the target prompt naming "
                               "the object to copy) or a target_mask.")
        settings = SpecRefSettings(mt_threshold=mt_threshold, ms_threshold=ms_threshold, mask_resize=mask_resize,
                                   map_downscale=map_downscale)
        controls = SpecRefControls(settings=settings, target_positions=positions, target_mask=target_mask,
                                   ref_mask=reference_mask, sr_uncond_shared_kv=uncond_shared_kv,
                                   sr_layers=parse_layers(sr_layers))
        patched, hook = apply_sr_attention(model, ref_features, controls)
        source = f"the words {words} at tokens {positions}" if words else "the target_mask"
        layers = sorted(hook.sr.layers)
        text = (f"RealEdit SR-attention: layers {layers}, edit steps "
                f"{ref_features.steps.start}-{ref_features.steps.stop - 1} of the {ref_features.total_steps} its "
                f"schedule runs; M_t from {source}. Sample with {ref_features.inversion.steps_asked} steps of the "
                "reference's scheduler.")
        return io.NodeOutput(patched, ui=ui.PreviewText(text))

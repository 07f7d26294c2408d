"""ZONE nodes (papers/zone.txt): IP2P edit + rough mask (Sec. 4.2), action, SAM, Region-IoU (Sec. 4.3), FFT
edge smoothing and composite (Sec. 4.4)."""

from __future__ import annotations

import functools
import logging

import comfy.model_management
import comfy.samplers
import torch
import torch.nn.functional as F
from comfy_api.v0_0_2 import io, ui

from ..attention.tokens import Token
from ..hosts.comfy_ip2p import check_fusion_partner, check_ip2p_model, ip2p_edit
from ..masks.actions import DEFAULT_ACTION, OVERRIDE_CHOICES, action_tooltip, classify_action, parse_action
from ..masks.composite import as_image_hwc, as_mask_hw, image_pair
from ..masks.fusion import AUTO_BETA, fusion_beta
from ..masks.ip2p_mask import IP2PMaskRecorder, instruction_eot_position
from ..masks.pipeline import smooth_and_composite
from ..masks.region_iou import FALLBACKS, as_segments, region_iou, region_iou_union
from ..masks.sam_auto import HF_SAM_REPOS, SamSettings, load_sam, sam_segments
from ..masks.settings import (
    DEFAULT_MASK_LAYERS,
    DEFAULT_MASK_ROWS,
    DEFAULT_SEGMENT,
    MASK_LAYER_CHOICES,
    MASK_ROW_CHOICES,
    PAPER_MASK_THRESHOLD,
    SEGMENT_CHOICES,
    ZONE_DEFAULTS,
    origin,
)
from .common import progress

CATEGORY = "RealEdit/zone"
SAM_FOLDER = "sams"
SamModel = io.Custom("REALEDIT_SAM")
NO_SAM_FILE = "(no SAM checkpoint in models/sams)"
EXPECTED_SAM_FILES = ("sam_vit_h_4b8939.pth", "sam_vit_l_0b3195.pth", "sam_vit_b_01ec64.pth")
HF_SAM_FILES = ("sam_vit_h_hf.safetensors", "sam_vit_l_hf.safetensors", "sam_vit_b_hf.safetensors")
log = logging.getLogger("realedit")


def _tip(text: str, field: str) -> str:
    return f"{text} Default: {origin(field)}."


def _mask_out(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) bool/float -> a ComfyUI MASK (1, H, W) float32 in [0, 1] on the CPU."""
    return mask.float().clamp(0, 1)[None].cpu()


def _schema(node_id: str, display_name: str, description: str, inputs: list, outputs: list) -> io.Schema:
    """A ZONE node's schema (one category for all)."""
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                     inputs=inputs, outputs=outputs)


def _image_pair_inputs(original_tooltip: str) -> list:
    """The 'original' and 'edited' IMAGE inputs of Region-IoU and the smoother, in that order."""
    return [io.Image.Input("original", tooltip=original_tooltip),
            io.Image.Input("edited", tooltip="The edited image I_sty (VAE Decode of the edit), same size.")]


@functools.cache
def _sd1_tokenizer():
    """ComfyUI's SD1 CLIP-L tokenizer (its bundled vocabulary: IP2P's text encoder's), loaded once."""
    from comfy.sd1_clip import SDTokenizer

    return SDTokenizer()


def instruction_tokens(text: str) -> list[Token]:
    """The instruction's BPE tokens as CLIP Text Encode gives them to IP2P (weights syntax parsed away),
    without BOS, EOS and padding."""
    tokenizer = _sd1_tokenizer()
    ids: list[int] = []
    for chunk in tokenizer.tokenize_with_weights(text):
        chunk_ids = [t[0] for t in chunk]
        if chunk_ids and chunk_ids[0] == tokenizer.start_token:
            chunk_ids = chunk_ids[1:]
        if tokenizer.end_token in chunk_ids:
            chunk_ids = chunk_ids[: chunk_ids.index(tokenizer.end_token)]
        ids.extend(int(t) if isinstance(t, int) else -1 for t in chunk_ids)
    return [(i, "") for i in ids]


class IP2PEditMask(io.ComfyNode):
    """IP2P three-way guidance with capture of the empty-text (or instruction) cross-attention (Sec. 4.2,
    Eq. 3-5)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "RealEditIP2PEditMask", "RealEdit IP2P Edit Mask",
            "ZONE Sec. 4.2: samples the InstructPix2Pix edit of the photo (three-way guidance as ComfyUI's "
            "DualCFG: text and image guidance) while recording the cross-attention of the two empty-text "
            "branches (as the official code; mask_rows: the instruction branch) in the encoder and decoder layers "
            "at 1/32 of the image size (16x16 at 512 px, as the official code), averaged over steps, heads and "
            "layers. Rough mask M_b = (A^1 - A^L) < T (Eq. 4), "
            "maps scaled to [0, 1], A^L at the instruction's end-of-text token. "
            "Optional second model (MagicBrush): fused after every step, Eq. 5.",
            inputs=[
                io.Model.Input("model", tooltip="An InstructPix2Pix model (8 input channels); others are refused. "
                               "M_b is read from this model's attention."),
                io.Vae.Input("vae", tooltip="Encodes the photo for the image conditioning."),
                io.Image.Input("image", tooltip="The photo (one image; sides a multiple of 8)."),
                io.Conditioning.Input("positive",
                                      tooltip="The instruction (CLIP Text Encode of e.g. 'make his tie blue')."),
                io.Conditioning.Input("negative", tooltip="The empty text (CLIP Text Encode with no text): both "
                                      "unconditional branches of IP2P use it."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=ZONE_DEFAULTS.steps, min=1, max=1000,
                             tooltip=_tip("Sampling steps.", "steps")),
                io.Float.Input("text_guidance", default=ZONE_DEFAULTS.text_cfg, min=0.0, max=100.0, step=0.1,
                               tooltip=_tip("s_T: guidance of the instruction over the empty text.", "text_cfg")),
                io.Float.Input("image_guidance", default=ZONE_DEFAULTS.image_cfg, min=0.0, max=100.0, step=0.05,
                               tooltip=_tip("s_I: guidance of the photo over no photo.", "image_cfg")),
                io.Float.Input("threshold", default=round(ZONE_DEFAULTS.mask_threshold, 4), min=-1.0, max=1.0,
                               step=0.005, tooltip=_tip(
                                   f"T of Eq. 4 in [0, 1] units: M_b = A^1 - A^L < T. The paper's 128/255 is "
                                   f"{PAPER_MASK_THRESHOLD:.3f}.", "mask_threshold")),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                               tooltip="Eq. 5 fuses the two models exactly with first-order samplers (euler, "
                                       "euler_ancestral, ddim); others fuse every model evaluation."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal"),
                io.Model.Input("second_model", optional=True,
                               tooltip="Optional MagicBrush (or any InstructPix2Pix finetune of the same base): "
                                       "after every step z = (z_ip2p + beta z_second) / (1 + beta) (ZONE Eq. 5). "
                                       "Both models step from the fused latent."),
                io.String.Input("action", default=DEFAULT_ACTION, force_input=True, optional=True,
                                tooltip="From RealEdit Instruction Action: sets Eq. 5's beta (unconnected: change)."),
                io.Float.Input("beta", default=AUTO_BETA, min=AUTO_BETA, max=10.0, step=0.01, optional=True,
                               tooltip=f"Eq. 5's weight of the second model. -1 (auto): {origin('beta_remove')}; "
                                       f"{origin('beta_other')}. 0 or more: use this value."),
                io.String.Input("instruction", default="", force_input=True, optional=True,
                                tooltip="The instruction's text (connect the String node that feeds CLIP Text "
                                        "Encode): A^L is read at its end-of-text token (paper; official code). "
                                        "Unconnected: at the last key, a padding token, with a warning."),
                io.Combo.Input("mask_layers", options=list(MASK_LAYER_CHOICES), default=DEFAULT_MASK_LAYERS,
                               optional=True, tooltip=_tip("Cross-attention layers averaged for A^1 and A^L, by "
                                                           "size relative to the image.", "mask_downscales")),
                io.Combo.Input("mask_rows", options=list(MASK_ROW_CHOICES), default=DEFAULT_MASK_ROWS,
                               optional=True, tooltip=_tip(
                                   "The IP2P branch whose cross-attention gives A^1 and A^L. instruction: the branch "
                                   "that knows the edit; on the trained Shapes world its maps mark the edit region "
                                   "best (README).", "mask_rows")),
            ],
            outputs=[
                io.Latent.Output(display_name="edited", tooltip="The globally edited latent (I_sty after VAE Decode)."),
                io.Mask.Output(display_name="rough_mask", tooltip="M_b (Eq. 4) at the image size."),
                io.Mask.Output(display_name="difference", tooltip="A^1 - A^L clamped to [0, 1], for preview."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, image, positive, negative, seed, steps, text_guidance, image_guidance, threshold,
                sampler_name, scheduler, second_model=None, action=DEFAULT_ACTION, beta=AUTO_BETA, instruction=None,
                mask_layers=None, mask_rows=None) -> io.NodeOutput:
        check_ip2p_model(model)
        recorder = mask_recorder(instruction, mask_layers, mask_rows)
        beta = fusion_beta(parse_action(action), beta)
        if second_model is not None:
            check_fusion_partner(model, second_model)
        pixels = as_image_hwc(image, "image")
        height, width = pixels.shape[:2]
        if height % 8 or width % 8:
            raise ValueError(
                f"RealEdit: the image is {width}x{height}; IP2P needs sides that are multiples of 8 so the edit "
                "matches the photo pixel for pixel. Resize or crop it first (e.g. Upscale Image or ImageCrop)."
            )
        photo_latent = vae.encode(pixels[None, ..., :3])
        edited = ip2p_edit(model, photo_latent, positive, negative, steps=steps, text_cfg=text_guidance,
                           image_cfg=image_guidance, seed=seed, sampler_name=sampler_name, scheduler=scheduler,
                           hook=recorder, callback=progress(steps), second_model=second_model, beta=beta)
        rough = recorder.rough_mask((height, width), threshold)
        if not bool(rough.mask.any()):
            log.warning("RealEdit IP2P Edit Mask: M_b is empty at T=%.3f (nothing localised); raise the threshold. "
                        "Region-IoU's 'rough' fallback then keeps the original image unchanged.", threshold)
        fusion = f"fused with the second model, beta {beta:g}" if second_model is not None and beta > 0 else "one model"
        summary = f"M_b covers {float(rough.mask.float().mean()):.1%} of the image; {fusion}"
        return io.NodeOutput({"samples": edited}, _mask_out(rough.mask), _mask_out(rough.difference),
                             ui=ui.PreviewText(summary))


def mask_recorder(instruction: str | None, mask_layers: str | None, mask_rows: str | None = None) -> IP2PMaskRecorder:
    """The M_b recorder for the node's inputs: A^L at the instruction's end-of-text token, the chosen layers and
    rows."""
    mask_layers = _choice("mask_layers", mask_layers, MASK_LAYER_CHOICES, DEFAULT_MASK_LAYERS)
    mask_rows = _choice("mask_rows", mask_rows, MASK_ROW_CHOICES, DEFAULT_MASK_ROWS)
    if instruction is None:
        log.warning("RealEdit IP2P Edit Mask: the 'instruction' input is not connected, so A^L is read at the last "
                    "key (a padding token), not at the instruction's end-of-text token as in the paper and the "
                    "official code. Connect the String node that feeds CLIP Text Encode.")
        eot = None
    else:
        classify_action(instruction)  # refuses an instruction without words, by name
        eot = instruction_eot_position(instruction, instruction_tokens)
    return IP2PMaskRecorder(MASK_ROW_CHOICES[mask_rows], MASK_LAYER_CHOICES[mask_layers], eot_position=eot)


def _choice(name: str, value: str | None, choices: dict, default: str, node: str = "IP2P Edit Mask") -> str:
    """``value`` (None: ``default``), refused by name unless it is one of ``choices``."""
    if value is None:
        return default
    if value not in choices:
        raise ValueError(f"RealEdit {node}: '{name}' is {value!r}; use one of {', '.join(choices)}.")
    return value


class InstructionAction(io.ComfyNode):
    """ZONE's action (add / remove / change) from the instruction's verbs, overridable."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "RealEditInstructionAction", "RealEdit Instruction Action",
            "The edit's action from the instruction's verbs (rules replacing ZONE's classifier); 'remove' makes "
            "Region-IoU segment the original photo and sets Eq. 5's fusion weight to 0.2.",
            inputs=[
                io.String.Input("instruction", multiline=True, default="make his tie blue", tooltip=action_tooltip()),
                io.Combo.Input("override", options=list(OVERRIDE_CHOICES), default="auto",
                               tooltip="auto: read the verbs; add / remove / change: use that action."),
            ],
            outputs=[io.String.Output(display_name="action")],
        )

    @classmethod
    def execute(cls, instruction, override) -> io.NodeOutput:
        action = classify_action(instruction, override)
        return io.NodeOutput(action, ui=ui.PreviewText(action))


def _sam_files() -> list[str]:
    import folder_paths

    if SAM_FOLDER not in folder_paths.folder_names_and_paths:
        return []
    return folder_paths.get_filename_list(SAM_FOLDER)


class SAMLoader(io.ComfyNode):
    """Loads Meta's SAM from models/sams: an official .pth (kind by file name) or the Hugging Face
    model.safetensors (transformers layout, converted; kind by its weights)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "RealEditSAMLoader", "RealEdit SAM Loader",
            "Segment Anything for Region-IoU. Meta's SAM in either form, into models/sams: the Hugging Face "
            "model.safetensors of " + ", ".join(HF_SAM_REPOS.values()) + " (the workflows name it "
            + ", ".join(HF_SAM_FILES) + "; the kind is read from the weights), or the official checkpoints ("
            + ", ".join(EXPECTED_SAM_FILES) + "; vit_h/vit_l/vit_b in the name). Both load into segment-anything's "
            "model, as plain tensors (weights_only / safetensors): no code in the file runs.",
            inputs=[
                io.Combo.Input("sam_name", options=_sam_files() or [NO_SAM_FILE],
                               tooltip="A file in models/sams (or an extra_model_paths.yaml 'sams' folder): "
                                       "Meta's Hugging Face model.safetensors (e.g. saved as "
                                       "sam_vit_h_hf.safetensors) or an official sam_vit_*.pth."),
                io.Combo.Input("device", options=["auto", "cpu"], default="auto",
                               tooltip="auto: ComfyUI's compute device; cpu: keep SAM off the GPU."),
            ],
            outputs=[SamModel.Output(display_name="sam")],
        )

    @classmethod
    def validate_inputs(cls, sam_name: str) -> bool | str:
        """Checked when the prompt is queued: a clear message instead of ComfyUI's "value not in list"."""
        return True if sam_name in _sam_files() else _missing_sam_message(sam_name)

    @classmethod
    def execute(cls, sam_name, device) -> io.NodeOutput:
        import folder_paths

        if sam_name not in _sam_files():
            raise FileNotFoundError(_missing_sam_message(sam_name))
        path = folder_paths.get_full_path_or_raise(SAM_FOLDER, sam_name)
        target = comfy.model_management.get_torch_device() if device == "auto" else torch.device("cpu")
        return io.NodeOutput(load_sam(path, target))


def _missing_sam_message(sam_name: str) -> str:
    import folder_paths

    files = _sam_files()
    registered = SAM_FOLDER in folder_paths.folder_names_and_paths
    folders = folder_paths.get_folder_paths(SAM_FOLDER) if registered else []
    return (
        f"RealEdit SAM Loader: no SAM checkpoint '{sam_name}' in {', '.join(folders) or 'models/sams'} "
        f"(found: {', '.join(files) or 'nothing'}). Download Meta's model.safetensors from "
        f"{', '.join('huggingface.co/' + repo for repo in HF_SAM_REPOS.values())} (saved as e.g. "
        f"{HF_SAM_FILES[0]}), or one of {', '.join(EXPECTED_SAM_FILES)} from the segment-anything repository, "
        "into that folder and refresh (a .pth name must contain vit_h, vit_l or vit_b)."
    )


def _resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(mask.shape) == size:
        return mask
    return F.interpolate(mask.float()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0] > 0.5


def _sam_setting_inputs() -> list:
    """SamAutomaticMaskGenerator's four quality settings, segment-anything's defaults (METHODS.md)."""
    def setting(name: str, field: str, text: str) -> io.Float.Input:
        return io.Float.Input(name, default=getattr(ZONE_DEFAULTS, field), min=0.0, max=1.0, step=0.01,
                              tooltip=_tip(text, field))

    return [
        io.Int.Input("points_per_side", default=ZONE_DEFAULTS.sam_points_per_side, min=1, max=128,
                     tooltip=_tip("SAM grid of point prompts.", "sam_points_per_side")),
        setting("pred_iou_thresh", "sam_pred_iou_thresh", "SAM's predicted-IoU filter."),
        setting("stability_score_thresh", "sam_stability_score_thresh", "SAM's stability filter."),
        setting("box_nms_thresh", "sam_box_nms_thresh", "SAM's box NMS IoU."),
    ]


def _candidate_segments(target: torch.Tensor, size: tuple[int, int], sam, segments,
                        settings: SamSettings) -> torch.Tensor:
    """(N, H, W) bool candidates at ``size``: the 'segments' batch when connected, else SAM's automatic masks of
    ``target`` (N may be 0)."""
    if segments is not None:
        candidates = as_segments(segments)
    elif sam is not None:
        candidates = sam_segments(sam, target, settings)
    else:
        raise ValueError("RealEdit Region-IoU: connect a SAM model ('sam') or a MASK batch of candidate "
                         "segments ('segments').")
    if not len(candidates):
        return torch.zeros(0, *size, dtype=torch.bool)
    return torch.stack([_resize_mask(s, size) for s in candidates])


def _original_candidates(original: torch.Tensor, size: tuple[int, int], sam, original_segments,
                         settings: SamSettings) -> torch.Tensor:
    """The original's candidates for segment 'edited and original': 'original_segments' when connected, else SAM
    on the original (refused by name when neither is connected)."""
    if original_segments is None and sam is None:
        raise ValueError("RealEdit Region-IoU: segment 'edited and original (ours)' also needs the original's "
                         "segments: connect them on 'original_segments' (the segmenter run on the original) or a "
                         "SAM model on 'sam', or set segment to 'edited image (paper)'.")
    return _candidate_segments(original, size, sam, original_segments, settings)


class RegionIoURefine(io.ComfyNode):
    """Eq. 6: the segment with the highest IoU against M_b becomes the refined mask M_f."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "RealEditRegionIoURefine", "RealEdit Region-IoU Refine",
            "ZONE Sec. 4.3, Eq. 6: segments the edited image with SAM's automatic masks (the original for "
            "'remove'), or takes candidate segments from any segmenter on 'segments', and picks the one "
            "with the highest IoU against the rough mask M_b. With 'segment' on 'edited and original (ours)' a "
            "'change' also segments the original and keeps the union of both images' choices.",
            inputs=[
                *_image_pair_inputs("The original photo (segmented instead for 'remove')."),
                io.Mask.Input("rough_mask", tooltip="M_b from RealEdit IP2P Edit Mask."),
                io.String.Input("action", default=DEFAULT_ACTION, force_input=True, optional=True,
                                tooltip="From RealEdit Instruction Action; 'remove' segments the original."),
                SamModel.Input("sam", optional=True,
                               tooltip="RealEdit SAM Loader (needed unless 'segments' is connected)."),
                io.Mask.Input("segments", optional=True,
                              tooltip="A MASK batch of candidate segments from any segmenter, run on the edited "
                                      "image (on the original for 'remove'); replaces SAM."),
                io.Combo.Input("fallback", options=list(FALLBACKS), default="error",
                               tooltip="error: stop when M_b is empty or no segment overlaps it; rough: use M_b "
                                       "(an empty M_b then leaves the photo unchanged), with a warning."),
                *_sam_setting_inputs(),
                io.Combo.Input("segment", options=list(SEGMENT_CHOICES), default=DEFAULT_SEGMENT, optional=True,
                               tooltip=_tip(
                                   "Which images a 'change' segments. edited and original: the union of the "
                                   "segment of each that best matches M_b (the original's only when it lies "
                                   "mostly in M_b or the edit's segment), so an object whose shape changes "
                                   "leaves no piece of its old outline (SAM runs twice; with 'segments' "
                                   "connected, connect the original's on 'original_segments'). 'add' segments "
                                   "the edited image and 'remove' the original either way.",
                                   "segment_original_too")),
                io.Mask.Input("original_segments", optional=True,
                              tooltip="With segment 'edited and original': the original's candidate segments "
                                      "from any segmenter (default: SAM on the original)."),
            ],
            outputs=[
                io.Mask.Output(display_name="refined_mask", tooltip="M_f (Eq. 6) at the image size."),
                io.Float.Output(display_name="iou", tooltip="R(k): IoU of the chosen segment (with 'edited and "
                                                            "original': of the union) with M_b (0: fallback)."),
                io.Mask.Output(display_name="segments", tooltip="All candidate segments, for preview."),
            ],
        )

    @classmethod
    def execute(cls, original, edited, rough_mask, fallback, points_per_side, pred_iou_thresh, stability_score_thresh,
                box_nms_thresh, action=DEFAULT_ACTION, sam=None, segments=None, segment=None,
                original_segments=None) -> io.NodeOutput:
        orig, edit = image_pair(original, edited, node="Region-IoU")
        size = tuple(edit.shape[:2])
        action = parse_action(action)
        segment = _choice("segment", segment, SEGMENT_CHOICES, DEFAULT_SEGMENT, node="Region-IoU")
        both = SEGMENT_CHOICES[segment] and action == "change"
        settings = SamSettings(points_per_side, pred_iou_thresh, stability_score_thresh, box_nms_thresh)
        candidates = _candidate_segments(orig if action == "remove" else edit, size, sam, segments, settings)
        rough = _resize_mask(as_mask_hw(rough_mask, "rough_mask"), size)
        if both:
            from_original = _original_candidates(orig, size, sam, original_segments, settings)
            result = region_iou_union(rough, candidates, from_original, fallback=fallback)
            chosen = [result.index, len(candidates) + result.original_index if result.original_index >= 0 else -1]
            candidates = torch.cat([candidates, from_original])  # the preview batch: the edit's, then the original's
        else:
            result = region_iou(rough, candidates, fallback=fallback)
            chosen = [result.index]
        if result.fallback_used:
            log.warning("RealEdit Region-IoU: %s; using M_b itself as the refined mask (fallback 'rough').",
                        "M_b is empty" if not bool(rough.any()) else "no segment overlaps M_b")
        preview = candidates.float() if len(candidates) else torch.zeros(1, *size)
        picked = " + ".join(str(k) for k in chosen if k >= 0) or "none (M_b itself)"
        text = f"segment {picked} of {len(candidates)}, IoU {result.iou:.3f}"
        return io.NodeOutput(_mask_out(result.mask), float(result.iou), preview, ui=ui.PreviewText(text))


class FFTEdgeSmooth(io.ComfyNode):
    """Eq. 7-8: final mask M_f* and the composite (edited inside, 0.6/0.4 band, original elsewhere)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "RealEditFFTEdgeSmooth", "RealEdit FFT Edge Smooth",
            "ZONE Sec. 4.4, Eq. 7-8: dilates M_f, low-pass FFT difference of edited and original inside it, "
            "threshold, closing and hole filling -> M_f*; composite = edited inside M_f, a blend on M_f* "
            "minus M_f, the original's pixels everywhere else (bit-identical).",
            inputs=[
                *_image_pair_inputs("The original photo I_G (its pixels are kept outside M_f*)."),
                io.Mask.Input("refined_mask", tooltip="M_f from RealEdit Region-IoU Refine."),
                io.Float.Input("d0", default=ZONE_DEFAULTS.fft_d0, min=1.0, max=4096.0, step=1.0,
                               tooltip=_tip("Low-pass radius at 512 px (scaled with the image size).", "fft_d0")),
                io.Float.Input("threshold", default=round(ZONE_DEFAULTS.fft_threshold, 4), min=0.0, max=1.0,
                               step=0.005, tooltip=_tip("Binarisation of the filtered difference.", "fft_threshold")),
                io.Float.Input("blend", default=ZONE_DEFAULTS.blend_alpha, min=0.0, max=1.0, step=0.05,
                               tooltip=_tip("Weight of the edited image on the band M_f* minus M_f.", "blend_alpha")),
            ],
            outputs=[
                io.Mask.Output(display_name="final_mask", tooltip="M_f* (Eq. 7)."),
                io.Image.Output(display_name="composite"),
            ],
        )

    @classmethod
    def execute(cls, original, edited, refined_mask, d0, threshold, blend) -> io.NodeOutput:
        orig, _ = image_pair(original, edited, node="FFT Edge Smooth")
        m_f = _resize_mask(as_mask_hw(refined_mask, "refined_mask"), tuple(orig.shape[:2]))
        smoothed, image = smooth_and_composite(original, edited, m_f, d0=d0, threshold=threshold, blend=blend)
        if image.ndim == 3:
            image = image[None]
        return io.NodeOutput(_mask_out(smoothed.final_mask), image)

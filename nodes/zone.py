"""ZONE nodes (papers/zone.txt): IP2P edit + rough mask (Sec. 4.2), action, SAM, Region-IoU (Sec. 4.3), FFT
edge smoothing and composite (Sec. 4.4)."""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.samplers
import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui

from ..hosts.comfy_ip2p import check_ip2p_model, ip2p_edit
from ..masks.actions import OVERRIDE_CHOICES, action_tooltip, classify_action
from ..masks.composite import as_image_hwc, as_mask_hw, composite
from ..masks.fft_smooth import fft_edge_smooth
from ..masks.ip2p_mask import IP2PMaskRecorder
from ..masks.region_iou import FALLBACKS, as_segments, region_iou
from ..masks.sam_auto import SamSettings, load_sam, sam_segments
from ..masks.settings import ZONE_DEFAULTS, origin
from .common import progress

CATEGORY = "RealEdit/zone"
SAM_FOLDER = "sams"
SamModel = io.Custom("REALEDIT_SAM")
NO_SAM_FILE = "(no SAM checkpoint in models/sams)"
EXPECTED_SAM_FILES = ("sam_vit_h_4b8939.pth", "sam_vit_l_0b3195.pth", "sam_vit_b_01ec64.pth")
log = logging.getLogger("realedit")


def _tip(text: str, field: str) -> str:
    return f"{text} Default: {origin(field)}."


def _mask_out(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) bool/float -> a ComfyUI MASK (1, H, W) float32 in [0, 1] on the CPU."""
    return mask.float().clamp(0, 1)[None].cpu()


class IP2PEditMask(io.ComfyNode):
    """IP2P three-way guidance with capture of the empty-text cross-attention (Sec. 4.2, Eq. 3-4)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditIP2PEditMask",
            display_name="RealEdit IP2P Edit Mask",
            category=CATEGORY,
            description=(
                "ZONE Sec. 4.2: samples the InstructPix2Pix edit of the photo (three-way guidance as ComfyUI's "
                "DualCFG: text and image guidance) while recording the cross-attention of the two empty-text "
                "branches in the encoder and decoder layers of at most 32x32 tokens (at 512 px), averaged over "
                "steps, heads and layers. Rough mask M_b = (A^1 - A^L) < T (Eq. 4), maps scaled to [0, 1]."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An InstructPix2Pix model (8 input channels); others are refused."),
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
                               step=0.005, tooltip=_tip("T of Eq. 4 in [0, 1] units: M_b = A^1 - A^L < T.",
                                                        "mask_threshold")),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler"),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal"),
            ],
            outputs=[
                io.Latent.Output(display_name="edited", tooltip="The globally edited latent (I_sty after VAE Decode)."),
                io.Mask.Output(display_name="rough_mask", tooltip="M_b (Eq. 4) at the image size."),
                io.Mask.Output(display_name="difference", tooltip="A^1 - A^L clamped to [0, 1], for preview."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, image, positive, negative, seed, steps, text_guidance, image_guidance, threshold,
                sampler_name, scheduler) -> io.NodeOutput:
        check_ip2p_model(model)
        pixels = as_image_hwc(image, "image")
        height, width = pixels.shape[:2]
        if height % 8 or width % 8:
            raise ValueError(
                f"RealEdit: the image is {width}x{height}; IP2P needs sides that are multiples of 8 so the edit "
                "matches the photo pixel for pixel. Resize or crop it first (e.g. Upscale Image or ImageCrop)."
            )
        photo_latent = vae.encode(pixels[None, ..., :3])
        recorder = IP2PMaskRecorder()
        edited = ip2p_edit(model, photo_latent, positive, negative, steps=steps, text_cfg=text_guidance,
                           image_cfg=image_guidance, seed=seed, sampler_name=sampler_name, scheduler=scheduler,
                           hook=recorder, callback=progress(steps))
        rough = recorder.rough_mask((height, width), threshold)
        if not bool(rough.mask.any()):
            log.warning("RealEdit IP2P Edit Mask: M_b is empty at T=%.3f; raise the threshold.", threshold)
        return io.NodeOutput({"samples": edited}, _mask_out(rough.mask), _mask_out(rough.difference))


class InstructionAction(io.ComfyNode):
    """ZONE's action (add / remove / change) from the instruction's verbs, overridable."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditInstructionAction",
            display_name="RealEdit Instruction Action",
            category=CATEGORY,
            description="The edit's action from the instruction's verbs (rules replacing ZONE's classifier); "
                        "'remove' makes Region-IoU segment the original photo.",
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
    """Loads a segment-anything checkpoint from models/sams (vit_h / vit_l / vit_b by file name)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditSAMLoader",
            display_name="RealEdit SAM Loader",
            category=CATEGORY,
            description="Segment Anything for Region-IoU. Put the official checkpoints ("
                        + ", ".join(EXPECTED_SAM_FILES) + ") or .safetensors conversions with vit_h/vit_l/vit_b "
                        "in the name into models/sams. "
                        "Loaded as plain tensors (weights_only / safetensors): no code in the file runs.",
            inputs=[
                io.Combo.Input("sam_name", options=_sam_files() or [NO_SAM_FILE],
                               tooltip="A file in models/sams (or an extra_model_paths.yaml 'sams' folder)."),
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
        f"(found: {', '.join(files) or 'nothing'}). Download one of {', '.join(EXPECTED_SAM_FILES)} from the "
        "segment-anything repository into that folder (any file name containing vit_h, vit_l or vit_b, .pth or "
        ".safetensors) and refresh."
    )


def _resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(mask.shape) == size:
        return mask
    return F.interpolate(mask.float()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0] > 0.5


class RegionIoURefine(io.ComfyNode):
    """Eq. 6: the segment with the highest IoU against M_b becomes the refined mask M_f."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditRegionIoURefine",
            display_name="RealEdit Region-IoU Refine",
            category=CATEGORY,
            description=(
                "ZONE Sec. 4.3, Eq. 6: segments the edited image with SAM's automatic masks (the original for "
                "'remove'), or takes candidate segments from any segmenter on 'segments', and picks the one "
                "with the highest IoU against the rough mask M_b."
            ),
            inputs=[
                io.Mask.Input("rough_mask", tooltip="M_b from RealEdit IP2P Edit Mask."),
                io.Image.Input("edited", tooltip="The edited image I_sty (VAE Decode of the edit)."),
                io.Image.Input("original", tooltip="The original photo (segmented instead for 'remove')."),
                io.String.Input("action", default="change", force_input=True, optional=True,
                                tooltip="From RealEdit Instruction Action; 'remove' segments the original."),
                SamModel.Input("sam", optional=True,
                               tooltip="RealEdit SAM Loader (needed unless 'segments' is connected)."),
                io.Mask.Input("segments", optional=True,
                              tooltip="A MASK batch of candidate segments from any segmenter; replaces SAM."),
                io.Combo.Input("fallback", options=list(FALLBACKS), default="error",
                               tooltip="error: stop when M_b is empty or no segment overlaps it; rough: use M_b."),
                io.Int.Input("points_per_side", default=ZONE_DEFAULTS.sam_points_per_side, min=1, max=128,
                             tooltip=_tip("SAM grid of point prompts.", "sam_points_per_side")),
                io.Float.Input("pred_iou_thresh", default=ZONE_DEFAULTS.sam_pred_iou_thresh, min=0.0, max=1.0,
                               step=0.01, tooltip=_tip("SAM's predicted-IoU filter.", "sam_pred_iou_thresh")),
                io.Float.Input("stability_score_thresh", default=ZONE_DEFAULTS.sam_stability_score_thresh, min=0.0,
                               max=1.0, step=0.01,
                               tooltip=_tip("SAM's stability filter.", "sam_stability_score_thresh")),
                io.Float.Input("box_nms_thresh", default=ZONE_DEFAULTS.sam_box_nms_thresh, min=0.0, max=1.0,
                               step=0.01, tooltip=_tip("SAM's box NMS IoU.", "sam_box_nms_thresh")),
            ],
            outputs=[
                io.Mask.Output(display_name="refined_mask", tooltip="M_f (Eq. 6) at the image size."),
                io.Float.Output(display_name="iou", tooltip="R(k): IoU of the chosen segment with M_b (0: fallback)."),
                io.Mask.Output(display_name="segments", tooltip="All candidate segments, for preview."),
            ],
        )

    @classmethod
    def execute(cls, rough_mask, edited, original, fallback, points_per_side, pred_iou_thresh, stability_score_thresh,
                box_nms_thresh, action="change", sam=None, segments=None) -> io.NodeOutput:
        edit = as_image_hwc(edited, "edited")
        orig = as_image_hwc(original, "original")
        if edit.shape != orig.shape:
            raise ValueError(f"RealEdit Region-IoU: 'edited' is {tuple(edit.shape)} but 'original' is "
                             f"{tuple(orig.shape)} (H, W, C); they must match.")
        size = tuple(edit.shape[:2])
        if segments is not None:
            candidates = as_segments(segments)
        elif sam is not None:
            target = orig if str(action).strip().lower() == "remove" else edit
            settings = SamSettings(points_per_side, pred_iou_thresh, stability_score_thresh, box_nms_thresh)
            candidates = sam_segments(sam, target, settings)
        else:
            raise ValueError("RealEdit Region-IoU: connect a SAM model ('sam') or a MASK batch of candidate "
                             "segments ('segments').")
        candidates = torch.stack([_resize_mask(s, size) for s in candidates]) if len(candidates) else (
            torch.zeros(0, *size, dtype=torch.bool))
        rough = _resize_mask(as_mask_hw(rough_mask, "rough_mask"), size)
        result = region_iou(rough, candidates, fallback=fallback)
        preview = candidates.float() if len(candidates) else torch.zeros(1, *size)
        return io.NodeOutput(_mask_out(result.mask), float(result.iou), preview,
                             ui=ui.PreviewText(f"segment {result.index} of {len(candidates)}, IoU {result.iou:.3f}"))


class FFTEdgeSmooth(io.ComfyNode):
    """Eq. 7-8: final mask M_f* and the composite (edited inside, 0.6/0.4 band, original elsewhere)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealEditFFTEdgeSmooth",
            display_name="RealEdit FFT Edge Smooth",
            category=CATEGORY,
            description=(
                "ZONE Sec. 4.4, Eq. 7-8: dilates M_f, low-pass FFT difference of edited and original inside it, "
                "threshold, closing and hole filling -> M_f*; composite = edited inside M_f, a blend on M_f* "
                "minus M_f, the original's pixels everywhere else (bit-identical)."
            ),
            inputs=[
                io.Image.Input("original", tooltip="The original photo I_G."),
                io.Image.Input("edited", tooltip="The edited image I_sty, same size."),
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
        orig = as_image_hwc(original, "original")
        edit = as_image_hwc(edited, "edited")
        if orig.shape != edit.shape:
            raise ValueError(f"RealEdit FFT Edge Smooth: 'original' is {tuple(orig.shape)} but 'edited' is "
                             f"{tuple(edit.shape)} (H, W, C); decode the edit at the photo's size.")
        m_f = _resize_mask(as_mask_hw(refined_mask, "refined_mask"), tuple(orig.shape[:2]))
        result = fft_edge_smooth(orig, edit, m_f, d0=d0, threshold=threshold)
        image = composite(original, edited.to(original.dtype), m_f, result.final_mask, alpha=blend)
        if image.ndim == 3:
            image = image[None]
        return io.NodeOutput(_mask_out(result.final_mask), image)


ZONE_NODES: list[type[io.ComfyNode]] = [IP2PEditMask, InstructionAction, SAMLoader, RegionIoURefine, FFTEdgeSmooth]

"""RealEdit Keep Unedited Pixels: ZONE's mask pipeline after any edit model (masks/keep.py)."""

from __future__ import annotations

import logging

import torch
from comfy_api.v0_0_2 import io, ui

from ..masks.align import UNVERIFIED
from ..masks.keep import KEEP_DEFAULTS, KeepSettings, keep_origin, keep_unedited

CATEGORY = "RealEdit/zone"
NODE_NAME = "RealEdit Keep Unedited Pixels"
log = logging.getLogger("realedit")


def _tip(text: str, field: str) -> str:
    return f"{text} Default: {keep_origin(field)}."


def _check_batch(value: torch.Tensor | None, name: str, ndim: int) -> None:
    """A ComfyUI IMAGE is (B, H, W, C) and a MASK (B, H, W) or (H, W): name the input otherwise."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or value.ndim not in (ndim, ndim - 1):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        kind = "an IMAGE (B, H, W, C)" if ndim == 4 else "a MASK (B, H, W)"
        raise ValueError(f"{NODE_NAME}: '{name}' must be {kind}, got {shape}.")


class KeepUneditedPixels(io.ComfyNode):
    """Original + any model's edit -> the original's own pixels outside the edit, the edit blended inside."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        d = KEEP_DEFAULTS
        return io.Schema(
            node_id="RealEditKeepUneditedPixels", display_name=NODE_NAME, category=CATEGORY,
            description="After any edit model (Qwen-Image-Edit, Flux Kontext, InstructPix2Pix, inpainting, "
                        "SDEdit): undoes the global shift/zoom of the edit, finds what changed (Delta E after "
                        "matching the global colour drift) or takes your mask, optionally snaps it to the best "
                        "segment (ZONE Region-IoU, Eq. 6), smooths its edge (ZONE Eq. 7-8) and composites: the "
                        "original's pixels, bit for bit, everywhere outside the final mask.",
            inputs=[
                io.Image.Input("original", tooltip="The photo you edited (a batch of 1 serves every edit)."),
                io.Image.Input("edited", tooltip="The edit model's output (VAE Decode), the original's size."),
                io.Mask.Input("rough_mask", optional=True,
                              tooltip="Optional M_b (e.g. RealEdit IP2P Edit Mask's rough_mask, or a drawn mask) "
                                      "at the image size; replaces the change map."),
                io.Mask.Input("segments", optional=True,
                              tooltip="Optional MASK batch of candidate segments at the image size (SAM-family "
                                      "nodes, any segmentation pack): the one with the highest IoU with M_b "
                                      "becomes the mask (ZONE Eq. 6)."),
                io.Float.Input("threshold", default=d.threshold, min=0.0, max=100.0, step=0.5,
                               tooltip=_tip("Delta E (CIE76) above which a pixel counts as edited.", "threshold")),
                io.Boolean.Input("align", default=d.align,
                                 tooltip=_tip("Estimate and undo the edit's global shift (and scale).", "align")),
                io.Boolean.Input("align_scale", default=d.align_scale,
                                 tooltip=_tip("Also estimate scale and a small rotation.", "align_scale")),
                io.Boolean.Input("colour_drift", default=d.colour_drift,
                                 tooltip=_tip("Treat a global colour change as drift.", "colour_drift")),
                io.Float.Input("max_coverage", default=d.max_coverage, min=0.0, max=1.0, step=0.05,
                               tooltip=_tip("Above this share of changed pixels the edit is kept whole.",
                                            "max_coverage")),
                io.Float.Input("blend", default=d.blend, min=0.0, max=1.0, step=0.05,
                               tooltip=_tip("Weight of the edit on the smoothed edge band.", "blend")),
                io.Boolean.Input("resize_edited", default=d.resize_edited,
                                 tooltip=_tip("Resize an edit of another size to the original's.", "resize_edited")),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The composite: the original outside final_mask."),
                io.Mask.Output(display_name="final_mask", tooltip="M_f*: where the output may differ from the "
                               "original."),
                io.Image.Output(display_name="aligned_edit", tooltip="The edit on the original's pixel grid "
                                "(before colour matching)."),
                io.String.Output(display_name="report", tooltip="Transform found, coverage, chosen segment."),
                io.Mask.Output(display_name="rough_mask", tooltip="M_b (the change map, or the mask given): preview "
                               "it to set the threshold."),
            ],
        )

    @classmethod
    def execute(cls, original: torch.Tensor, edited: torch.Tensor, threshold: float, align: bool,
                align_scale: bool, colour_drift: bool, max_coverage: float, blend: float, resize_edited: bool,
                rough_mask: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                **kwargs: object) -> io.NodeOutput:
        for value, name, ndim in ((original, "original", 4), (edited, "edited", 4), (rough_mask, "rough_mask", 3),
                                  (segments, "segments", 3)):
            _check_batch(value, name, ndim)
        settings = KeepSettings(threshold=threshold, align=align, align_scale=align_scale, colour_drift=colour_drift,
                                max_coverage=max_coverage, blend=blend, resize_edited=resize_edited)
        try:
            result = keep_unedited(original, edited, rough_mask, segments, settings=settings)
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message.replace("RealEdit:", f"{NODE_NAME}:", 1)) from exc
        for item in result.items:
            if item.alignment.note.startswith(UNVERIFIED):
                log.warning("%s: %s", NODE_NAME, item.report)
            elif item.status != "local":
                log.info("%s: %s", NODE_NAME, item.report)
        image = result.image
        images = image if image.ndim == 4 else image[None]
        aligned = result.aligned  # the whole warp: computed here, once per image
        aligned = aligned if aligned.ndim == 4 else aligned[None]
        final = result.final_mask.float()
        rough = result.rough_mask.float()
        final, rough = (final, rough) if final.ndim == 3 else (final[None], rough[None])
        return io.NodeOutput(images, final.cpu(), aligned, result.report, rough.cpu(),
                             ui=ui.PreviewText(result.report))

"""The shapes world: scenes whose truth is known, edits with exact ground truth, and tiny trained
SD1-family checkpoints (VAE, frozen text encoder, text-to-image UNet, InstructPix2Pix UNet) that ComfyUI's
``CheckpointLoaderSimple`` and the diffusers host load.

The renderer, captions, edits and reader (``scene``, ``edits``, ``reader``) are plain PyTorch; the
model modules import ComfyUI (``models``, ``training``) or diffusers (``diffusers_loader``).
``python -m realedit.testbed.shapes_world train`` trains everything (see ``__main__``).
"""

from .scene import (
    ALL_APPEARANCES,
    BACKGROUNDS,
    COLOURS,
    NAMED_APPEARANCES,
    POSITIONS,
    SHAPES,
    SIZE,
    SIZES,
    TEXTURES,
    UNNAMED_APPEARANCES,
    Appearance,
    Obj,
    Scene,
    random_scene,
    render,
    render_batch,
)

__all__ = [
    "ALL_APPEARANCES", "BACKGROUNDS", "COLOURS", "NAMED_APPEARANCES", "POSITIONS", "SHAPES", "SIZE", "SIZES",
    "TEXTURES", "UNNAMED_APPEARANCES", "Appearance", "Obj", "Scene", "random_scene", "render", "render_batch",
]

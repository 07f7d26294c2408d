"""A tiny random-weight Segment Anything model (no ComfyUI import, no checkpoint download).

It is built from ``segment_anything.modeling``'s own classes with the real layout (ViT image
encoder with windowed + global attention and relative positions, prompt encoder, two-way-transformer
mask decoder with 3 multimask outputs) at a fraction of the width, so ``SamPredictor`` and
``SamAutomaticMaskGenerator`` run their real code paths in well under a second per image on a CPU.
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

# SAM's pixel normalisation (ImageNet statistics in 0-255 units), as in segment_anything.build_sam.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def make_tiny_sam(seed: int = 0, image_size: int = 1024, patch_size: int = 16, embed_dim: int = 32,
                  depth: int = 2, prompt_embed_dim: int = 32) -> Sam:
    """A seeded random-weight ``Sam`` in eval mode, fp32 on the CPU.

    ``image_size`` stays SAM's 1024 by default so the preprocessing (``ResizeLongestSide``, padding)
    is the real one; the encoder is ``depth`` blocks of ``embed_dim`` channels (the last block global,
    the others windowed), and the prompt/mask side works at ``prompt_embed_dim`` channels (a
    multiple of 8: the decoder upscales through ``dim // 4`` and ``dim // 8`` channels).
    """
    if prompt_embed_dim % 8:
        raise ValueError(f"prompt_embed_dim must be a multiple of 8, got {prompt_embed_dim}")
    embedding_size = image_size // patch_size
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=depth,
                embed_dim=embed_dim,
                img_size=image_size,
                mlp_ratio=2,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=2,
                patch_size=patch_size,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=(depth - 1,),
                window_size=14,
                out_chans=prompt_embed_dim,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=prompt_embed_dim,
                image_embedding_size=(embedding_size, embedding_size),
                input_image_size=(image_size, image_size),
                mask_in_chans=8,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=2 * prompt_embed_dim,
                                              num_heads=2),
                transformer_dim=prompt_embed_dim,
                iou_head_depth=3,
                iou_head_hidden_dim=prompt_embed_dim,
            ),
            pixel_mean=list(PIXEL_MEAN),
            pixel_std=list(PIXEL_STD),
        )
        with torch.no_grad():  # zero-initialised by SAM; random here so positions matter
            sam.image_encoder.pos_embed.normal_(0.0, 0.02)
    for param in sam.parameters():
        param.requires_grad_(False)
    return sam.to(torch.float32).eval()

"""Token grounding of the world's text-to-image UNet: a loss on its cross-attention that draws each named
thing's words to where it is (the token loss L_token of Wang et al., "TokenCompose: Grounding Diffusion with
Token-level Supervision", CVPR 2024, arXiv 2312.03626).

Why the world needs it: trained on the denoising loss alone, the world's UNet reads its caption through
cross-attention that marks no object (session 17: the IoU of a word's P2P region with its object was 0.04-0.15 at
every layer resolution, about what a mask of the whole image scores), so every method that reads a word's
map (P2P's LocalBlend, SpecRef's M_t, StyleDiffusion's) edited the whole image. SD's maps mark their words
because it learnt from billions of images; a 1.8 M-parameter UNet on 12 000 scenes does not, so the world
teaches it with the masks its renderer knows. 2 000 steps with the loss at weight 0.1 gave a word region
IoU of 0.38-0.47 in the 16x16 layers (0.04-0.06 without) at the same denoising loss.

The grounded words of a scene: each object's shape word and colour word (within its own clause of the
caption), on the object's coverage; the background's name, on everything the objects leave. For word i,
with A_i its attention probabilities over the layer's queries (mean over heads) and B_i its region,

    L_token = mean_i (1 - sum_{u in B_i} A_i[u] / sum_u A_i[u])^2        (TokenCompose's L_token)

averaged over every cross-attention layer (regions resized to each layer's grid by area averaging).

Edit grounding of the world's InstructPix2Pix UNet (:func:`edit_grounding_targets`) applies the same loss to the
two keys ZONE's rough mask reads (ZONE, Sec. 4.2, Eq. 4: M_b = (A^1 - A^L) < T in the empty-text branches): the
start token (key 0) on everything the edit leaves, the instruction's end-of-text position (key n + 1 for n
instruction tokens) on the region it changes. SD-scale IP2P shows these maps untaught; the world's UNet, trained
on the denoising loss alone, did not (M_b's median IoU with the edit region 0.02-0.05).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...attention.hooks import grid_for
from ...attention.tokens import Tokenizer, word_token_indices
from ...masks.ip2p_mask import instruction_eot_position
from .scene import SIZE, Scene, coverage

WORDS_PER_SCENE = 2 * 2 + 1  # two objects' shape and colour words, and the background's name


def scene_words(scene: Scene, tokenize: Tokenizer) -> list[tuple[list[int], torch.Tensor]]:
    """The grounded words of ``scene``'s caption: (token positions, region (SIZE, SIZE) in [0, 1]) each. A word
    is looked up in its own clause ("a large red circle on the left" | " and ..." | ", on a grey background"),
    so two objects of one shape or colour, or an object of the background's colour, each get their own."""
    caption = scene.caption()
    phrases = [obj.phrase() for obj in scene.objects]
    # clause k ends where the caption's first k + 1 phrases end (BOS is position 0)
    ends = [len(tokenize(" and ".join(phrases[:k + 1]))) + 1 for k in range(len(phrases))]
    ends.append(len(tokenize(caption)) + 1)
    regions = [coverage(obj).float() for obj in scene.objects]
    background = 1 - torch.stack(regions).amax(0) if regions else torch.ones(SIZE, SIZE)
    clauses = [[(obj.shape, region)] + ([(obj.appearance.word, region)] if obj.appearance.word else [])
               for obj, region in zip(scene.objects, regions)] + [[(scene.background, background)]]
    words, start = [], 1
    for clause, end in zip(clauses, ends):
        for word, region in clause:
            positions = [p for p in word_token_indices(caption, word, tokenize) if start <= p < end]
            if not positions:
                raise ValueError(f"RealEdit: {word!r} is not in its clause of the caption {caption!r}")
            words.append((positions, region))
        start = end
    return words


def grounding_targets(scenes: Sequence[Scene], tokenize: Tokenizer, latent_hw: tuple[int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scene, the token position of each grounded word ``(S, WORDS_PER_SCENE)`` (-1: none) and its region
    ``(S, WORDS_PER_SCENE, h, w)`` at the latent's size (area averages, fp16)."""
    positions = torch.full((len(scenes), WORDS_PER_SCENE), -1, dtype=torch.long)
    regions = torch.zeros(len(scenes), WORDS_PER_SCENE, *latent_hw, dtype=torch.float16)
    for i, scene in enumerate(scenes):
        for j, (tokens, region) in enumerate(scene_words(scene, tokenize)):
            positions[i, j] = tokens[-1]  # a word of several BPE tokens: its last (the one marked </w>)
            regions[i, j] = F.interpolate(region[None, None], size=latent_hw, mode="area")[0, 0].half()
    return positions, regions


def edit_grounding_targets(instructions: Sequence[str], regions: torch.Tensor, tokenize: Tokenizer,
                           latent_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per IP2P pair, the keys ``(N, 2)``: the start token (0) and the instruction's end-of-text position, and their
    regions ``(N, 2, h, w)`` at the latent's size (area averages, fp16): everything outside the edit region
    ``regions`` ``(N, H, W)`` bool, and the region itself. The empty text's key at that position is an end-of-text
    padding token, so the same keys ground the rows whose instruction was dropped, as ZONE reads them."""
    changed = F.interpolate(regions[:, None].float(), size=latent_hw, mode="area")[:, 0]  # (N, h, w)
    positions = torch.tensor([[0, instruction_eot_position(text, tokenize)] for text in instructions])
    return positions, torch.stack([1 - changed, changed], 1).half()


def attn2_blocks(unet: torch.nn.Module) -> list[tuple[str, int]]:
    """The ``(stage, block index)`` keys of a ComfyUI ``UNetModel``'s blocks that hold cross-attention, as its
    ``attn2`` replace patches are keyed."""
    from comfy.ldm.modules.attention import SpatialTransformer

    stages = (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks))
    return [(stage, i) for stage, blocks in stages for i, block in enumerate(blocks)
            if any(isinstance(layer, SpatialTransformer) for layer in block)]


class CrossAttentionProbs:
    """``transformer_options`` whose attn2 replace patches compute every cross-attention explicitly (softmax
    (q k^T / sqrt(d)) v: the same output as ComfyUI's, differentiable) and keep each call's probabilities, mean
    over heads, in :attr:`probs` (the training loop clears it before each forward)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.probs: list[torch.Tensor] = []  # (B, queries, 77) per call
        self._patches = {key: self._attend for key in attn2_blocks(unet)}

    def options(self) -> dict:
        """A fresh ``transformer_options`` (the UNet writes its block indices into the one it is given)."""
        return {"patches_replace": {"attn2": dict(self._patches)}}

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        b, n, inner = q.shape
        q, k, v = (t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
        probs = (q @ k.transpose(-1, -2) * (inner // heads) ** -0.5).softmax(-1)  # (B, heads, n, 77)
        self.probs.append(probs.mean(1))
        return (probs @ v).transpose(1, 2).reshape(b, n, inner)


def grounding_loss(probs: Sequence[torch.Tensor], positions: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """L_token (module doc) over the recorded calls ``probs`` (B, N, 77); ``positions`` (B, J) (-1: no word),
    ``regions`` (B, J, h, w) at the latent's size. 0 when no row has a word."""
    valid = positions >= 0
    if not valid.any() or not probs:
        return torch.zeros((), device=positions.device)
    index, latent_hw = positions.clamp(min=0), tuple(regions.shape[-2:])
    resized: dict[int, torch.Tensor] = {}  # query count -> the regions on that grid (B, J, N); 3 grids, 10 calls
    losses = []
    for p in probs:
        if p.shape[1] not in resized:
            downscale = max(1, round((latent_hw[0] * latent_hw[1] / p.shape[1]) ** 0.5))
            grid = grid_for(latent_hw, downscale, p.shape[1])
            resized[p.shape[1]] = F.interpolate(regions.float(), size=grid, mode="area").flatten(2)
        region = resized[p.shape[1]]
        attention = p.gather(2, index[:, None, :].expand(-1, p.shape[1], -1)).transpose(1, 2)  # (B, J, N)
        inside = (attention * region).sum(-1) / attention.sum(-1).clamp(min=1e-12)
        losses.append((1 - inside)[valid].pow(2).mean())
    return torch.stack(losses).mean()

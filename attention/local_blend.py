"""P2P LocalBlend (SpecRef Eq. 5): keep the source latent outside the region of the blend words.

The mask, as P2P computes it: for each path, the sum of its blend words' cross-attention maps (mean
over heads, the 16x16 layers and the steps so far; the maps each row used, i.e. after the P2P cross
edit, as the official P2P code reads them), a 3x3 max-pool, nearest upsampling to the latent
size, division by the max, threshold 0.3; the source-word and target-word masks are united. After
each step from ``int(0.2 * N)`` on: x_edit = x_src + M * (x_edit - x_src).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .maps import CrossAttentionStore, normalize_max, token_sum
from .settings import P2PSettings, in_window

_DEFAULTS = P2PSettings()
PATH_SLOTS = (0, 1)  # the prompt slots of the source and edit paths


def word_region(maps: torch.Tensor, positions: Sequence[int], latent_hw: tuple[int, int],
                threshold: float = _DEFAULTS.blend_threshold, pool: bool = True) -> torch.Tensor:
    """One path's blend mask: (tokens, h, w) maps -> (H, W) bool at latent size.

    ``pool``: the 3x3 max-pool P2P applies to the blend words (not to the words it subtracts). An all-zero
    map (the words drew no attention) gives an empty mask.
    """
    m = token_sum(maps, positions)[None, None]  # (1, 1, h, w)
    if pool:
        m = F.max_pool2d(m, kernel_size=3, stride=1, padding=1)
    m = normalize_max(F.interpolate(m, size=latent_hw, mode="nearest"))[0, 0]  # (H, W), zeros: no attention
    region = m > threshold
    return region if threshold >= 0 else region & bool(m.any())  # a flat map stays empty


def local_blend_mask(maps: torch.Tensor, positions: Sequence[Sequence[int]], latent_hw: tuple[int, int],
                     threshold: float = _DEFAULTS.blend_threshold, pool: bool = True) -> torch.Tensor:
    """Union of the per-path masks: ``maps`` (paths, tokens, h, w), ``positions[i]`` for path i.

    Returns (H, W) bool. P2P: path 0 = source prompt and its words, path 1 = target prompt and its words.
    """
    if len(positions) != maps.shape[0]:
        raise ValueError(f"RealEdit: LocalBlend got maps of {maps.shape[0]} paths but words for {len(positions)}.")
    masks = [word_region(m, p, latent_hw, threshold, pool) for m, p in zip(maps, positions) if p]
    if not masks:
        raise ValueError("RealEdit: LocalBlend needs at least one blend word.")
    return torch.stack(masks).any(dim=0)


def blend(x_src: torch.Tensor, x_edit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x_src + mask * (x_edit - x_src) (SpecRef Eq. 5); ``mask`` broadcasts to the latents.

    A bool mask selects exactly: outside it the result *is* x_src, bit for bit.
    """
    mask = mask.to(x_src.device)
    if mask.dtype == torch.bool:
        return torch.where(mask, x_edit, x_src)
    return x_src + mask.to(x_src.dtype) * (x_edit - x_src)


@dataclass
class LocalBlend:
    """LocalBlend settings bound to the blend words' token positions, one list per path.

    ``positions[i]`` are the token positions of path ``i``'s blend words (path 0 = source, slot 0;
    path 1 = edit, slot 1; an empty list skips that path); the maps come from a
    :class:`CrossAttentionStore` recording the conditional rows. ``subtract``: words whose region is
    removed from the mask (the official P2P code's ``substruct_words``: same maps without the max-pool,
    thresholded at ``subtract_threshold``); None (default): off.
    """

    positions: Sequence[Sequence[int]]
    threshold: float = _DEFAULTS.blend_threshold
    start: float = _DEFAULTS.blend_start
    subtract: Sequence[Sequence[int]] | None = None
    subtract_threshold: float = _DEFAULTS.blend_threshold

    def blends_at(self, step: int, total: int) -> bool:
        """Whether to blend after step ``step`` (0-based) of ``total``: from int(start * N) on (P2P)."""
        return in_window(step, (self.start, 1.0), total)

    def mask(self, store: CrossAttentionStore, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The (H, W) bool blend mask from the store's running-mean maps."""
        maps = store.maps("cond", list(PATH_SLOTS))  # (paths, tokens, h, w)
        mask = local_blend_mask(maps, self.positions, latent_hw, self.threshold)
        if self.subtract is None or not any(self.subtract):
            return mask
        # P2P's substruct_words: their region (no max-pool, own threshold) is taken out of the blend mask
        return mask & ~local_blend_mask(maps, self.subtract, latent_hw, self.subtract_threshold, pool=False)

    def __call__(self, x_src: torch.Tensor, x_edit: torch.Tensor, store: CrossAttentionStore,
                 step: int, total: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Blended edit latent and the mask used (None when this step does not blend)."""
        if not self.blends_at(step, total):
            return x_edit, None
        mask = self.mask(store, tuple(x_edit.shape[-2:]))
        return blend(x_src, x_edit, mask), mask

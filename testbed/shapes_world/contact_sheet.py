"""A labelled contact sheet: a title, a row of images and masks each named underneath, and score lines."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

TILE = 256  # pixels per tile (the world's 128 px images shown at 2x, nearest neighbour)
GAP = 8
LABEL = 18  # pixels of text under a tile
LINE = 16  # pixels per text line


def _tile(image: torch.Tensor) -> Image.Image:
    """(H, W, 3) or (H, W) in [0, 1] -> a TILE x TILE RGB tile (aspect kept, padded with white)."""
    x = image.detach().float().cpu().clamp(0, 1)
    x = x[..., None].expand(*x.shape, 3) if x.ndim == 2 else x[..., :3]
    picture = Image.fromarray((x.numpy() * 255).round().astype(np.uint8))
    factor = TILE / max(picture.size)
    picture = picture.resize((max(1, round(picture.width * factor)), max(1, round(picture.height * factor))),
                             Image.NEAREST)
    tile = Image.new("RGB", (TILE, TILE), "white")
    tile.paste(picture, ((TILE - picture.width) // 2, (TILE - picture.height) // 2))
    return tile


def contact_sheet(title: str, tiles: list[tuple[str, torch.Tensor]], lines: list[str]) -> Image.Image:
    """One row of ``(label, image or mask)`` tiles under ``title``, with ``lines`` (scores, notes) below."""
    width = max(len(tiles), 1) * (TILE + GAP) + GAP
    height = GAP + LINE + GAP + TILE + LABEL + GAP + LINE * len(lines) + GAP
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((GAP, GAP), title, fill="black")
    top = GAP + LINE + GAP
    for i, (label, image) in enumerate(tiles):
        left = GAP + i * (TILE + GAP)
        sheet.paste(_tile(image), (left, top))
        draw.text((left, top + TILE + 3), label, fill="black")
    for j, line in enumerate(lines):
        draw.text((GAP, top + TILE + LABEL + GAP + j * LINE), line, fill="black")
    return sheet

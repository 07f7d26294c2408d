"""A labelled contact sheet (a title, a row of images and masks each named underneath, and score lines), and
the template browser's card for a workflow made from the same tiles."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from ...hosts.image_files import quantise

TILE = 256  # pixels per tile (the world's 128 px images shown at 2x, nearest neighbour)
GAP = 8
LABEL = 18  # pixels of text under a tile
LINE = 16  # pixels per text line
CARD_SIZE = (512, 384)  # ComfyUI's template browser shows example_workflows/<name>.jpg on a 4:3 card
CARD_TILE, CARD_COLUMNS, CARD_LABEL = 160, 3, 14  # two rows of three 160 px tiles, a label under each
CARD_TOP = 30  # pixels above the first row (the title)


def _tile(image: torch.Tensor, size: int = TILE, pad: str = "white") -> Image.Image:
    """(H, W, 3) or (H, W) in [0, 1] -> a ``size`` x ``size`` RGB tile (aspect kept, padded with ``pad``)."""
    x = quantise(image)
    x = x[..., None].expand(*x.shape, 3) if x.ndim == 2 else x[..., :3]
    picture = Image.fromarray(x.contiguous().numpy())
    factor = size / max(picture.size)
    picture = picture.resize((max(1, round(picture.width * factor)), max(1, round(picture.height * factor))),
                             Image.NEAREST)
    tile = Image.new("RGB", (size, size), pad)
    tile.paste(picture, ((size - picture.width) // 2, (size - picture.height) // 2))
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


def workflow_card(title: str, tiles: list[tuple[str, torch.Tensor]]) -> Image.Image:
    """A workflow's thumbnail for the template browser (``CARD_SIZE``, ComfyUI's dark theme): ``title`` over
    the first six ``(label, image or mask)`` tiles, in two rows of three. Order the tiles so that what the
    workflow does shows first (source, reference, edit, expected)."""
    card = Image.new("RGB", CARD_SIZE, "#1e1e22")
    draw = ImageDraw.Draw(card)
    title_font, label_font = ImageFont.load_default(size=16), ImageFont.load_default(size=12)
    draw.text((GAP, 6), fit_text(draw, title, title_font, CARD_SIZE[0] - 2 * GAP), font=title_font, fill="#f0f0f0")
    gap = (CARD_SIZE[0] - CARD_COLUMNS * CARD_TILE) // (CARD_COLUMNS + 1)  # 8
    for i, (label, image) in enumerate(tiles[:2 * CARD_COLUMNS]):
        row, column = divmod(i, CARD_COLUMNS)
        left, top = gap + column * (CARD_TILE + gap), CARD_TOP + row * (CARD_TILE + CARD_LABEL + 4)
        card.paste(_tile(image, CARD_TILE, "#1e1e22"), (left, top))
        draw.text((left, top + CARD_TILE + 1), label, font=label_font, fill="#e8e8e8")
    return card


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: float) -> str:
    """``text``, shortened with an ellipsis until it fits ``width`` pixels in ``font`` (at least 4 characters)."""
    while draw.textlength(text, font=font) > width and len(text) > 4:
        text = text[:-2].rstrip() + "…" if not text.endswith("…") else text[:-2] + "…"
    return text

"""Reading a scene back from an image: background, and each object's shape, appearance, position, size.

Used to score generated and edited images. Steps: the background is the named background nearest the
image's 4-pixel border (flat colours by mean, the texture by its spread); pixels farther than
``THRESHOLD`` from that background are foreground; connected components of at least ``MIN_AREA``
pixels are objects, left to right. Per object: the position is the named position nearest the
bounding-box centre; the shape is the one whose template (same box, the renderer's own outline) has
the highest IoU with the component; the size is the named size nearest the fitted radius; the
appearance is the known appearance nearest the interior's mean colour (stripes: the pattern whose two
colours are nearest the interior's two clusters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch

from .scene import (
    ALL_APPEARANCES,
    BACKGROUNDS,
    POSITIONS,
    SHAPE_EXTENT,
    SHAPES,
    SIZE,
    SIZES,
    TEXTURES,
    Appearance,
    Scene,
    background_image,
    signed_distance,
)

THRESHOLD = 0.18  # colour distance (RGB, [0, 1]) from the background that counts as foreground
MIN_AREA = 40  # pixels
BORDER = 4


@dataclass(frozen=True)
class ReadObject:
    shape: str
    appearance: Appearance
    position: str
    size: str
    centre: tuple[float, float]
    radius: float
    iou: float


@dataclass(frozen=True)
class Reading:
    background: str
    objects: tuple[ReadObject, ...]


def _as_array(image: torch.Tensor) -> np.ndarray:
    """``(H, W, 3)`` float64 in [0, 1]."""
    if image.ndim == 4:
        image = image[0]
    return image.detach().float().cpu().clamp(0, 1).numpy().astype(np.float64)


def read_background(image: np.ndarray) -> str:
    """The named background whose render is nearest the image's border (mean squared error)."""
    border = np.ones(image.shape[:2], dtype=bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    names = (*BACKGROUNDS, *TEXTURES)
    errors = [((image[border] - background_image(n).numpy()[border]) ** 2).mean() for n in names]
    return names[int(np.argmin(errors))]


def _appearance(pixels: np.ndarray) -> Appearance:
    """Nearest known appearance to interior ``pixels`` ``(n, 3)``: flat colours by the mean; the two
    stripe colours by the means of the pixels on either side of the main colour axis."""
    mean = pixels.mean(0)
    spread = np.linalg.norm(pixels.std(0))
    best, best_error = ALL_APPEARANCES[0], np.inf
    for appearance in ALL_APPEARANCES:
        a, b = (np.array(c) for c in appearance.colours())
        if appearance.kind == "pattern":
            if spread < 0.12:
                continue
            near_a = np.linalg.norm(pixels - a, axis=1) < np.linalg.norm(pixels - b, axis=1)
            if near_a.all() or not near_a.any():
                continue
            error = (np.linalg.norm(pixels[near_a].mean(0) - a) + np.linalg.norm(pixels[~near_a].mean(0) - b)) / 2
        else:
            error = np.linalg.norm(mean - a) + (0.5 * spread if spread >= 0.12 else 0.0)
        if error < best_error:
            best, best_error = appearance, error
    return best


def _read_object(mask: np.ndarray, image: np.ndarray) -> ReadObject:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    half = max(x1 - x0, y1 - y0) / 2
    best = ("circle", -1.0, half)
    for shape in SHAPES:
        radius = half / SHAPE_EXTENT[shape]
        template = (signed_distance(shape, centre, radius) < 0).numpy()
        iou = (template & mask).sum() / max(1, (template | mask).sum())
        if iou > best[1]:
            best = (shape, float(iou), radius)
    shape, iou, radius = best
    interior = scipy.ndimage.binary_erosion(mask, iterations=2)
    pixels = image[interior if interior.sum() >= 8 else mask]
    position = min(POSITIONS, key=lambda p: abs(POSITIONS[p] * SIZE - centre[0]))
    size = min(SIZES, key=lambda s: abs(SIZES[s] - radius))
    return ReadObject(shape, _appearance(pixels), position, size, centre, radius, iou)


def read(image: torch.Tensor) -> Reading:
    """Read an IMAGE ``(H, W, 3)`` (or ``(1, H, W, 3)``) in [0, 1] back into background and objects."""
    array = _as_array(image)
    background = read_background(array)
    distance = np.linalg.norm(array - background_image(background).numpy(), axis=-1)
    foreground = scipy.ndimage.binary_opening(distance > THRESHOLD, iterations=1)
    labels, count = scipy.ndimage.label(foreground)
    objects = []
    for index in range(1, count + 1):
        mask = labels == index
        if mask.sum() >= MIN_AREA:
            objects.append(_read_object(mask, array))
    objects.sort(key=lambda o: o.centre[0])
    return Reading(background, tuple(objects))


# ---------------------------------------------------------------------------------------------------
# Scoring against the intended scene.
# ---------------------------------------------------------------------------------------------------

def object_matches(read_obj: ReadObject, shape: str, appearance: Appearance, position: str) -> bool:
    return read_obj.shape == shape and read_obj.appearance == appearance and read_obj.position == position


def scene_matches(reading: Reading, scene: Scene, *, background: bool = True, size: bool = False) -> bool:
    """Whether ``reading`` has the scene's objects (shape, appearance, position; ``size`` too if asked),
    in order, nothing else, and (if ``background``) its background."""
    if background and reading.background != scene.background:
        return False
    if len(reading.objects) != len(scene.objects):
        return False
    for got, want in zip(reading.objects, scene.objects):
        if not object_matches(got, want.shape, want.appearance, want.position):
            return False
        if size and got.size != want.size:
            return False
    return True


def attribute_accuracy(reading: Reading, scene: Scene) -> tuple[int, int]:
    """(right, total) over each object's shape, appearance and position (a missing or extra object
    counts all its attributes wrong); objects paired by position."""
    total = 3 * len(scene.objects)
    right = 0
    by_position = {o.position: o for o in reading.objects}
    for want in scene.objects:
        got = by_position.get(want.position)
        if got is not None:
            right += 1 + (got.shape == want.shape) + (got.appearance == want.appearance)
    extra = max(0, len(reading.objects) - len(scene.objects))
    return right, total + 3 * extra

"""Reading a scene back from an image: background, and each object's shape, appearance, position, size.

Used to score generated and edited images. Steps: the background is the named background nearest the
image's 4-pixel border (flat colours by mean, the texture by its spread); pixels farther than
``THRESHOLD`` from that background are foreground; connected components of at least ``MIN_AREA``
pixels are objects, left to right. Per object: the appearance is the known appearance nearest the
interior's mean colour (stripes: the pattern whose two colours are nearest the interior's two clusters);
the object's soft coverage (:func:`coverage_map`: the renderer's compositing inverted with that
appearance's fill) gives the shape, the template that matches it best (:func:`_fit_shape`), and with it
the centre and radius; the position is the named position nearest the centre, the size the named size
nearest the radius."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import scipy.ndimage
import torch

from .scene import (
    ALL_APPEARANCES,
    BACKGROUNDS,
    POSITIONS,
    SHAPES,
    SIZE,
    SIZES,
    TEXTURES,
    Appearance,
    Scene,
    background_image,
    fill,
    shape_coverage,
)

THRESHOLD = 0.18  # colour distance (RGB, [0, 1]) from the background that counts as foreground
MIN_AREA = 40  # pixels
BORDER = 4
ATTRIBUTES = ("position", "colour", "shape")  # what the gates and benchmarks read back of each object


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


# Shapes are read from the object's soft coverage, not from its thresholded mask. The world's 8x VAE rounds
# a star's points and a small square's corners, and the mask of such a round trip, which a person still
# reads as a star or a square, had the highest IoU with the circle's outline: 29 of the 111 objects of the
# gates' scenes (t2i scenes and IP2P targets) read as circles through the VAE, every colour and position
# right. Coverage keeps its mass and centroid under any blur, so each shape's template is placed from those
# two and compared after blurring it as much as fits best (BLURS, Gaussian sigma in pixels; SCALES, around
# the area's radius). The same round trips now misread 16 shapes, 13 of them small stars, which the VAE
# turns into blobs (tests/test_shapes_world.py has the blur cases).
BLURS = (0.0, 1.0, 1.5, 2.0, 3.0)
SCALES = (0.9, 1.0, 1.1)
WINDOW = 4  # pixels around the object's mask where its coverage is read


def coverage_map(image: np.ndarray, background: np.ndarray, fill_colour: np.ndarray) -> np.ndarray:
    """The object's coverage ``alpha`` ``(H, W)`` in [0, 1] where ``image = background (1 - alpha) + fill alpha``
    (the renderer's compositing), by least squares per pixel; ``fill_colour`` ``(H, W, 3)``."""
    contrast = fill_colour - background
    alpha = ((image - background) * contrast).sum(-1) / np.maximum((contrast**2).sum(-1), 1e-6)
    return np.clip(alpha, 0.0, 1.0)


@cache
def _unit_template(shape: str) -> tuple[float, float, float]:
    """(area per radius squared, centroid offset x and y per radius) of the rendered ``shape``: the renderer
    centres a shape's bounding box, not its centroid (a triangle's sits a third of the way down)."""
    radius, centre = 40.0, (SIZE / 2, SIZE / 2)
    cover = shape_coverage(shape, centre, radius).numpy()
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    area = cover.sum()
    return (area / radius**2, ((cover * xs).sum() / area - centre[0]) / radius,
            ((cover * ys).sum() / area - centre[1]) / radius)


def _fit_shape(alpha: np.ndarray) -> tuple[str, tuple[float, float], float, float]:
    """(shape, centre, radius, soft IoU) of the template nearest ``alpha``: the highest cosine similarity over
    each shape, blurred by each of ``BLURS`` and scaled by each of ``SCALES`` around the radius that gives it
    ``alpha``'s area, centred on ``alpha``'s centroid."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    area = alpha.sum()
    centroid = ((alpha * xs).sum() / area, (alpha * ys).sum() / area)
    norm = np.sqrt((alpha**2).sum())
    best = ("circle", centroid, 0.0, -np.inf, 0.0)
    for shape in SHAPES:
        per_area, offset_x, offset_y = _unit_template(shape)
        for scale in SCALES:
            radius = scale * float(np.sqrt(area / per_area))
            centre = (centroid[0] - offset_x * radius, centroid[1] - offset_y * radius)
            template = shape_coverage(shape, centre, radius).numpy()
            for sigma in BLURS:
                blurred = scipy.ndimage.gaussian_filter(template, sigma) if sigma else template
                score = float((blurred * alpha).sum() / (np.sqrt((blurred**2).sum()) * norm))
                if score > best[3]:
                    iou = float(np.minimum(blurred, alpha).sum() / max(np.maximum(blurred, alpha).sum(), 1e-9))
                    best = (shape, centre, radius, score, iou)
    shape, centre, radius, _, iou = best
    return shape, centre, radius, iou


def _read_object(mask: np.ndarray, others: np.ndarray, image: np.ndarray, background: np.ndarray) -> ReadObject:
    """One object from its thresholded ``mask``; ``others``: the other objects' masks (kept out of its window)."""
    interior = scipy.ndimage.binary_erosion(mask, iterations=2)
    pixels = image[interior if interior.sum() >= 8 else mask]
    appearance = _appearance(pixels)
    window = scipy.ndimage.binary_dilation(mask, iterations=WINDOW) & ~others
    alpha = np.where(window, coverage_map(image, background, fill(appearance).numpy()), 0.0)
    if alpha.sum() < 1.0:  # the fill read lies on the background's side of the pixels: fall back on the mask
        alpha = mask.astype(np.float64)
    shape, centre, radius, iou = _fit_shape(alpha)
    position = min(POSITIONS, key=lambda p: abs(POSITIONS[p] * SIZE - centre[0]))
    size = min(SIZES, key=lambda s: abs(SIZES[s] - radius))
    return ReadObject(shape, appearance, position, size, centre, radius, iou)


def _objects_and_backdrop(array: np.ndarray) -> tuple[str, np.ndarray, np.ndarray, list[np.ndarray]]:
    """(background name, its render, the foreground labels (H, W), each object's mask): the objects are the
    connected components, ``MIN_AREA`` pixels or more, of what lies ``THRESHOLD`` or further from the background."""
    background = read_background(array)
    backdrop = background_image(background).numpy()
    distance = np.linalg.norm(array - backdrop, axis=-1)
    foreground = scipy.ndimage.binary_opening(distance > THRESHOLD, iterations=1)
    labels, count = scipy.ndimage.label(foreground)
    masks = [labels == index for index in range(1, count + 1)]
    return background, backdrop, labels, [mask for mask in masks if mask.sum() >= MIN_AREA]


def read(image: torch.Tensor) -> Reading:
    """Read an IMAGE ``(H, W, 3)`` (or ``(1, H, W, 3)``) in [0, 1] back into background and objects."""
    array = _as_array(image)
    background, backdrop, labels, masks = _objects_and_backdrop(array)
    objects = sorted((_read_object(mask, (labels > 0) & ~mask, array, backdrop) for mask in masks),
                     key=lambda o: o.centre[0])
    return Reading(background, tuple(objects))


def segments(image: torch.Tensor) -> torch.Tensor:
    """What an automatic segmenter such as SAM finds in a world image, as the reader sees it: each object's
    mask and the background around them (the pixels of no object), largest first; ``(N, H, W)`` bool."""
    _, _, labels, masks = _objects_and_backdrop(_as_array(image))
    found = [torch.from_numpy(mask) for mask in masks] + [torch.from_numpy(labels == 0)]
    return torch.stack(sorted(found, key=lambda mask: -int(mask.sum())))


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


def attributes_right(reading: Reading, scene: Scene) -> dict[str, int]:
    """How many of ``scene``'s objects the reading gets right, per attribute (``position``, ``colour``: the
    appearance, ``shape``); objects paired by position, so an object found elsewhere has none right."""
    right = dict.fromkeys(ATTRIBUTES, 0)
    by_position = {o.position: o for o in reading.objects}
    for want in scene.objects:
        got = by_position.get(want.position)
        if got is not None:
            right["position"] += 1
            right["colour"] += got.appearance == want.appearance
            right["shape"] += got.shape == want.shape
    return right


def attribute_accuracy(reading: Reading, scene: Scene) -> tuple[int, int]:
    """(right, total) over each object's shape, appearance and position (a missing or extra object
    counts all its attributes wrong); objects paired by position."""
    extra = max(0, len(reading.objects) - len(scene.objects))
    return sum(attributes_right(reading, scene).values()), 3 * (len(scene.objects) + extra)

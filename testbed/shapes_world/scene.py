"""Scenes of the shapes world: vocabulary, seeded sampling, rendering and captions (plain PyTorch).

A scene is a background (a named flat colour or the ``striped`` texture) and one or two objects; an
object has a shape, an appearance (a named colour, or an appearance with no word in the vocabulary:
an off-vocabulary colour or a two-colour stripe pattern, for SpecRef references), a named position
and a named size. Each object also carries its exact jitter (centre offset, size factor), so a scene
renders to the same pixels every time and an edited copy keeps everything it does not edit.

Images are ComfyUI ``IMAGE`` tensors: ``(H, W, 3)`` floats in [0, 1], here 128 x 128. Edges are
anti-aliased from the exact signed distance to the outline (one pixel wide), so edits and the VAE
see smooth data and the ground truth is exact.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, Callable

import torch

SIZE = 128  # image side in pixels; latents are SIZE // 8

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Named colours: the only colour words the captions use.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.14, 0.14),
    "green": (0.12, 0.66, 0.20),
    "blue": (0.16, 0.30, 0.88),
    "yellow": (0.96, 0.84, 0.12),
    "purple": (0.58, 0.20, 0.76),
}
# Appearances with no word in the vocabulary (a caption never names them): solid colours and stripes.
OFF_VOCABULARY_COLOURS: dict[str, tuple[float, float, float]] = {
    "teal": (0.05, 0.62, 0.60),
    "pink": (0.98, 0.56, 0.74),
    "olive": (0.50, 0.50, 0.08),
}
PATTERNS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "candy_stripes": ((0.90, 0.15, 0.20), (0.20, 0.78, 0.86)),
    "sea_stripes": ((0.10, 0.25, 0.70), (0.95, 0.85, 0.20)),
}
STRIPE_PERIOD = 12.0  # pixels, object patterns (horizontal stripes)

BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "grey": (0.50, 0.50, 0.50),
    "white": (0.93, 0.93, 0.92),
    "black": (0.08, 0.08, 0.09),
}
TEXTURES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "striped": ((0.74, 0.70, 0.64), (0.52, 0.50, 0.46)),  # soft diagonal stripes
}
TEXTURE_PERIOD = 24.0

# Named positions: centre x of the object (fraction of the width); y is the middle row.
POSITIONS: dict[str, float] = {"left": 0.28, "centre": 0.5, "right": 0.72}
SIZES: dict[str, float] = {"small": 13.0, "large": 20.0}  # pixels, the shape's half extent (circle radius)
JITTER_PIXELS = 3.0  # centre offset drawn uniformly in [-3, 3] on both axes
JITTER_SIZE = 0.08  # size factor drawn uniformly in [0.92, 1.08]

# Per shape: half extent relative to the size (circles fill [-1, 1]^2; squares look as large at 0.85).
SHAPE_EXTENT: dict[str, float] = {"circle": 1.0, "square": 0.85, "triangle": 1.0, "star": 1.0}


@dataclass(frozen=True)
class Appearance:
    """What an object looks like: ``kind`` ``"colour"`` (named), ``"offvocab"`` or ``"pattern"``."""

    kind: str
    name: str

    @property
    def word(self) -> str | None:
        """The caption word for it, or None when the vocabulary has none."""
        return self.name if self.kind == "colour" else None

    def colours(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        if self.kind == "colour":
            return COLOURS[self.name], COLOURS[self.name]
        if self.kind == "offvocab":
            return OFF_VOCABULARY_COLOURS[self.name], OFF_VOCABULARY_COLOURS[self.name]
        if self.kind == "pattern":
            return PATTERNS[self.name]
        raise ValueError(f"RealEdit: unknown appearance kind {self.kind!r}; use colour, offvocab or pattern")

    def mean_colour(self) -> tuple[float, float, float]:
        a, b = self.colours()
        return tuple((x + y) / 2 for x, y in zip(a, b))  # type: ignore[return-value]


NAMED_APPEARANCES: tuple[Appearance, ...] = tuple(Appearance("colour", c) for c in COLOURS)
UNNAMED_APPEARANCES: tuple[Appearance, ...] = (
    tuple(Appearance("offvocab", c) for c in OFF_VOCABULARY_COLOURS)
    + tuple(Appearance("pattern", p) for p in PATTERNS))
ALL_APPEARANCES: tuple[Appearance, ...] = NAMED_APPEARANCES + UNNAMED_APPEARANCES


@dataclass(frozen=True)
class Obj:
    """One object; ``dx, dy`` (pixels) and ``scale`` are its jitter."""

    shape: str
    appearance: Appearance
    position: str
    size: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) in pixels."""
        return POSITIONS[self.position] * SIZE + self.dx, SIZE / 2 + self.dy

    @property
    def radius(self) -> float:
        return SIZES[self.size] * self.scale

    def phrase(self) -> str:
        """``"a small red circle on the left"``; the colour word is left out when there is none."""
        colour = f"{self.appearance.word} " if self.appearance.word else ""
        where = "in the centre" if self.position == "centre" else f"on the {self.position}"
        return f"a {self.size} {colour}{self.shape} {where}"


@dataclass(frozen=True)
class Scene:
    """A background name (flat colour or texture) and one or two objects, ordered left to right."""

    background: str
    objects: tuple[Obj, ...]

    def caption(self) -> str:
        """``"a small red circle on the left and a large blue square on the right, on a grey background"``
        (``"a grey background"`` when there is no object)."""
        if not self.objects:
            return f"a {self.background} background"
        return " and ".join(o.phrase() for o in self.objects) + f", on a {self.background} background"

    def replace(self, **changes: object) -> Scene:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------------------

def random_object(rng: random.Random, position: str, *, unnamed: float = 0.0, jitter: bool = True) -> Obj:
    """An object at ``position``; with probability ``unnamed`` its appearance has no word."""
    pool = UNNAMED_APPEARANCES if rng.random() < unnamed else NAMED_APPEARANCES
    return Obj(rng.choice(SHAPES), rng.choice(pool), position, rng.choice(tuple(SIZES)),
               *(_jitter(rng) if jitter else (0.0, 0.0, 1.0)))


def _jitter(rng: random.Random) -> tuple[float, float, float]:
    return (rng.uniform(-JITTER_PIXELS, JITTER_PIXELS), rng.uniform(-JITTER_PIXELS, JITTER_PIXELS),
            rng.uniform(1 - JITTER_SIZE, 1 + JITTER_SIZE))


def random_scene(rng: random.Random, *, two_objects: float = 0.4, unnamed: float = 0.0,
                 textured: float = 0.25, jitter: bool = True) -> Scene:
    """A seeded random scene: two objects (left and right) with probability ``two_objects``, else one
    at a random position; the ``striped`` texture with probability ``textured``, else a flat colour."""
    background = rng.choice(tuple(TEXTURES)) if rng.random() < textured else rng.choice(tuple(BACKGROUNDS))
    if rng.random() < two_objects:
        objects = (random_object(rng, "left", unnamed=unnamed, jitter=jitter),
                   random_object(rng, "right", unnamed=unnamed, jitter=jitter))
    else:
        objects = (random_object(rng, rng.choice(tuple(POSITIONS)), unnamed=unnamed, jitter=jitter),)
    return Scene(background, objects)


# ---------------------------------------------------------------------------------------------------
# Rendering.
# ---------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates ``(x, y)``, each ``(SIZE, SIZE)``."""
    coords = torch.arange(SIZE, dtype=torch.float64) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x, y


@cache
def _polygon(shape: str) -> torch.Tensor:
    """Unit outline ``(n, 2)`` (x, y; y down) whose bounding box is exactly [-1, 1]^2."""
    if shape == "square":
        points = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        points = [(0, -1), (1, 1), (-1, 1)]
    elif shape == "star":
        points = []
        for k in range(10):
            angle = -math.pi / 2 + k * math.pi / 5
            r = 1.0 if k % 2 == 0 else 0.45
            points.append((r * math.cos(angle), r * math.sin(angle)))
    else:
        raise ValueError(f"RealEdit: {shape!r} is no polygon shape; one of {SHAPES}")
    p = torch.tensor(points, dtype=torch.float64)
    low, high = p.min(0).values, p.max(0).values
    return (p - (low + high) / 2) * (2 / (high - low))  # bounding box [-1, 1]^2


def _polygon_distance(px: torch.Tensor, py: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) from points to a closed polygon (even-odd rule)."""
    a, b = vertices, vertices.roll(-1, 0)
    points = torch.stack([px, py], -1)[..., None, :]  # (H, W, 1, 2)
    edge = b - a  # (n, 2)
    t = ((points - a) * edge).sum(-1) / (edge * edge).sum(-1)
    nearest = a + t.clamp(0, 1)[..., None] * edge
    distance = (points - nearest).norm(dim=-1).min(-1).values
    ay, by = a[:, 1], b[:, 1]
    crosses = (ay > py[..., None]) != (by > py[..., None])
    x_cross = a[:, 0] + (py[..., None] - ay) / (by - ay + 1e-12) * edge[:, 0]
    inside = (crosses & (px[..., None] < x_cross)).sum(-1) % 2 == 1
    return torch.where(inside, -distance, distance)


def signed_distance(shape: str, centre: tuple[float, float], radius: float) -> torch.Tensor:
    """Signed distance in pixels ``(SIZE, SIZE)`` to the outline of ``shape`` (negative inside)."""
    x, y = _grid()
    half = radius * SHAPE_EXTENT[shape]
    if shape == "circle":
        return torch.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2) - half
    return _polygon_distance(x, y, _polygon(shape) * half + torch.tensor(centre, dtype=torch.float64))


def shape_coverage(shape: str, centre: tuple[float, float], radius: float) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] ``(SIZE, SIZE)`` of ``shape`` (one pixel wide edge)."""
    return (0.5 - signed_distance(shape, centre, radius)).clamp(0, 1)


def coverage(obj: Obj) -> torch.Tensor:
    """:func:`shape_coverage` of ``obj``."""
    return shape_coverage(obj.shape, obj.centre, obj.radius)


def fill(appearance: Appearance) -> torch.Tensor:
    """The object's fill ``(SIZE, SIZE, 3)``: flat, or soft horizontal stripes in absolute coordinates."""
    a, b = (torch.tensor(c, dtype=torch.float64) for c in appearance.colours())
    if appearance.kind != "pattern":
        return a.expand(SIZE, SIZE, 3)
    _, y = _grid()
    mix = (0.5 + 1.5 * torch.sin(2 * math.pi * y / STRIPE_PERIOD)).clamp(0, 1)[..., None]
    return a + mix * (b - a)


def background_image(name: str) -> torch.Tensor:
    """The background ``(SIZE, SIZE, 3)``: a flat named colour or the soft diagonal ``striped`` texture."""
    if name in BACKGROUNDS:
        return torch.tensor(BACKGROUNDS[name], dtype=torch.float64).expand(SIZE, SIZE, 3)
    if name in TEXTURES:
        a, b = (torch.tensor(c, dtype=torch.float64) for c in TEXTURES[name])
        x, y = _grid()
        mix = (0.5 + 0.5 * torch.sin(2 * math.pi * (x + y) / TEXTURE_PERIOD / math.sqrt(2)))[..., None]
        return a + mix * (b - a)
    raise ValueError(f"RealEdit: unknown background {name!r}; one of {tuple(BACKGROUNDS) + tuple(TEXTURES)}")


def render(scene: Scene) -> torch.Tensor:
    """The scene as a ComfyUI IMAGE ``(SIZE, SIZE, 3)`` float32 in [0, 1]; deterministic."""
    image = background_image(scene.background).clone()
    for obj in scene.objects:
        alpha = coverage(obj)[..., None]
        image = image * (1 - alpha) + fill(obj.appearance) * alpha
    return image.float()


def render_batch(scenes: list[Scene]) -> torch.Tensor:
    """``(B, SIZE, SIZE, 3)``."""
    return torch.stack([render(s) for s in scenes])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """IMAGEs in [0, 1] -> uint8 (training pools: 4x smaller, error below 1/510)."""
    return (images * 255).round().to(torch.uint8)


def _render_chunk(scenes: list[Scene]) -> torch.Tensor:
    return to_uint8(render_batch(scenes))


def render_pool(scenes: list[Scene], workers: int = 1, chunk: int = 200) -> torch.Tensor:
    """``render_batch(scenes)`` as uint8 ``(B, SIZE, SIZE, 3)``, rendered in ``workers`` processes.

    Rendering is about 10 ms a scene on one core, so a training set of 20 000 scenes wants every core.
    The workers are spawned (never forked: the parent may hold CUDA and OpenMP state) and return
    uint8 chunks; the pixels are the same whatever ``workers`` is."""
    return torch.cat(map_chunks(_render_chunk, scenes, workers, chunk))


def map_chunks(function: Callable[[list[Any]], Any], items: list[Any], workers: int, chunk: int) -> list[Any]:
    """``[function(items[i:i + chunk]) for i in ...]``, in ``workers`` spawned processes when > 1."""
    parts = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    if workers <= 1 or len(parts) <= 1:
        return [function(part) for part in parts]
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(parts)), mp_context=context,
                                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(function, parts))

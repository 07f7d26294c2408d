"""Edits of a scene with exact ground truth: the expected image, the region that must change, the
instruction text (InstructPix2Pix / ZONE) and the target caption (P2P / BARET).

An edit keeps every other attribute, jitter included, so the expected image differs from the source
only where the edit acts: ``region`` is exactly the set of pixels where they differ.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from .scene import (
    BACKGROUNDS,
    NAMED_APPEARANCES,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Appearance,
    Obj,
    Scene,
    random_object,
    render,
    to_uint8,
)

EDIT_KINDS: tuple[str, ...] = ("recolour", "reshape", "remove", "add", "move", "resize", "background", "appearance")
# The kinds the InstructPix2Pix model is trained on (local edits with a one-line instruction).
IP2P_KINDS: tuple[str, ...] = ("recolour", "reshape", "remove", "background")


@dataclass(frozen=True)
class Edit:
    """``kind`` applied to object ``target`` (index into ``scene.objects``; unused for ``add`` and
    ``background``). ``value``: a colour name (recolour), shape (reshape), position (move), size name
    (resize), background name, an :class:`Obj` (add) or an :class:`Appearance` (appearance)."""

    kind: str
    target: int = 0
    value: object = None


@dataclass(frozen=True)
class GroundTruth:
    """Source and expected IMAGEs ``(H, W, 3)``, the changed region ``(H, W)`` bool, the texts."""

    source: torch.Tensor
    expected: torch.Tensor
    region: torch.Tensor
    instruction: str
    source_caption: str
    target_caption: str
    edited: Scene


def apply(scene: Scene, edit: Edit) -> Scene:
    """The edited scene (a new value; ``scene`` is unchanged)."""
    objects = list(scene.objects)
    if edit.kind == "background":
        return scene.replace(background=str(edit.value))
    if edit.kind == "add":
        assert isinstance(edit.value, Obj)
        return scene.replace(objects=tuple(sorted(objects + [edit.value], key=lambda o: POSITIONS[o.position])))
    obj = objects[edit.target]
    if edit.kind == "remove":
        del objects[edit.target]
        return scene.replace(objects=tuple(objects))
    changes: dict[str, object] = {
        "recolour": {"appearance": Appearance("colour", str(edit.value))},
        "reshape": {"shape": edit.value},
        "move": {"position": edit.value},
        "resize": {"size": edit.value},
        "appearance": {"appearance": edit.value},
    }.get(edit.kind, None)  # type: ignore[assignment]
    if changes is None:
        raise ValueError(f"RealEdit: unknown edit kind {edit.kind!r}; one of {EDIT_KINDS}")
    objects[edit.target] = dataclasses.replace(obj, **changes)  # type: ignore[arg-type]
    return scene.replace(objects=tuple(objects))


def _name(scene: Scene, index: int) -> str:
    """``"the circle"``, or ``"the circle on the left"`` when another object has the same shape."""
    obj = scene.objects[index]
    twins = [o for o in scene.objects if o.shape == obj.shape]
    if len(twins) > 1:
        where = "in the centre" if obj.position == "centre" else f"on the {obj.position}"
        return f"the {obj.shape} {where}"
    return f"the {obj.shape}"


def instruction(scene: Scene, edit: Edit) -> str:
    """The instruction text: ``"make the circle blue"``, ``"remove the square"``, ..."""
    if edit.kind == "background":
        return f"make the background {edit.value}"
    if edit.kind == "add":
        assert isinstance(edit.value, Obj)
        return "add " + edit.value.phrase()
    target = _name(scene, edit.target)
    obj = scene.objects[edit.target]
    if edit.kind == "recolour":
        return f"make {target} {edit.value}"
    if edit.kind == "reshape":
        return f"turn {target} into a {edit.value}"
    if edit.kind == "remove":
        return f"remove {target}"
    if edit.kind == "move":
        return f"move {target} to the {edit.value}"
    if edit.kind == "resize":
        return f"make {target} {'bigger' if SIZES[str(edit.value)] > SIZES[obj.size] else 'smaller'}"
    if edit.kind == "appearance":
        return f"make {target} look like the reference"
    raise ValueError(f"RealEdit: unknown edit kind {edit.kind!r}; one of {EDIT_KINDS}")


def ground_truth(scene: Scene, edit: Edit) -> GroundTruth:
    """Render source and expected images; the region is where they differ (exactly)."""
    edited = apply(scene, edit)
    source, expected = render(scene), render(edited)
    region = (source != expected).any(-1)
    return GroundTruth(source, expected, region, instruction(scene, edit), scene.caption(), edited.caption(), edited)


def footprint(scene: Scene, edit: Edit) -> torch.Tensor:
    """Where the edit may act ``(H, W)`` bool: the union of the old and new outlines' coverage of the
    edited object (with the 1-pixel anti-aliased rim), or, for a background edit, everything no object
    fully covers. ``ground_truth(...).region`` always lies inside it."""
    from .scene import coverage

    edited = apply(scene, edit)
    if edit.kind == "background":
        if not scene.objects:
            return torch.ones(render(scene).shape[:2], dtype=torch.bool)
        return torch.stack([coverage(o) for o in scene.objects]).amax(0) < 1
    if edit.kind == "add":
        return coverage(edit.value) > 0  # type: ignore[arg-type]
    old = coverage(scene.objects[edit.target]) > 0
    if edit.kind == "remove":
        return old
    new = coverage(edited.objects[edit.target]) > 0
    return old | new


# ---------------------------------------------------------------------------------------------------
# Random edits (seeded) for training and evaluation.
# ---------------------------------------------------------------------------------------------------

def possible_kinds(scene: Scene) -> list[str]:
    """Edit kinds that make sense for ``scene`` (``add`` needs a free side; ``move`` one object)."""
    kinds = ["background"]
    if scene.objects:
        kinds += ["recolour", "reshape", "remove", "resize", "appearance"]
    if len(scene.objects) == 1:
        kinds.append("move")
        if scene.objects[0].position != "centre":
            kinds.append("add")
    return kinds


def random_edit(scene: Scene, rng: random.Random, kinds: tuple[str, ...] = EDIT_KINDS) -> Edit:
    """A seeded edit of one of ``kinds`` that changes ``scene`` (raises when none applies)."""
    allowed = [k for k in possible_kinds(scene) if k in kinds]
    if not allowed:
        raise ValueError(f"RealEdit: no edit of kinds {kinds} applies to {scene.caption()!r}")
    kind = rng.choice(allowed)
    if kind == "background":
        return Edit(kind, 0, rng.choice([b for b in (*BACKGROUNDS, *TEXTURES) if b != scene.background]))
    if kind == "add":
        side = "right" if scene.objects[0].position == "left" else "left"
        return Edit(kind, 0, random_object(rng, side))
    target = rng.randrange(len(scene.objects))
    obj = scene.objects[target]
    if kind == "recolour":
        return Edit(kind, target, rng.choice([a.name for a in NAMED_APPEARANCES if a != obj.appearance]))
    if kind == "reshape":
        return Edit(kind, target, rng.choice([s for s in SHAPES if s != obj.shape]))
    if kind == "move":
        return Edit(kind, target, rng.choice([p for p in POSITIONS if p != obj.position]))
    if kind == "resize":
        return Edit(kind, target, next(s for s in SIZES if s != obj.size))
    if kind == "appearance":
        from .scene import UNNAMED_APPEARANCES

        return Edit(kind, target, rng.choice([a for a in UNNAMED_APPEARANCES if a != obj.appearance]))
    return Edit(kind, target)


def render_edit_pairs(pairs: list[tuple[Scene, Edit]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and expected renders, uint8 ``(B, H, W, 3)`` each, of ``(scene, edit)`` pairs (the IP2P
    training set; a worker process runs this, so it stays free of ComfyUI)."""
    truths = [ground_truth(scene, edit) for scene, edit in pairs]
    return to_uint8(torch.stack([t.source for t in truths])), to_uint8(torch.stack([t.expected for t in truths]))


def edit_regions(pairs: list[tuple[Scene, Edit]]) -> torch.Tensor:
    """The regions ``(B, H, W)`` bool that the edits of ``(scene, edit)`` pairs change (:func:`ground_truth`'s; the
    IP2P UNet's edit-grounding targets; a worker process runs this, so it stays free of ComfyUI)."""
    return torch.stack([ground_truth(scene, edit).region for scene, edit in pairs])

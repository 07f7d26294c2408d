"""The demo's edit for each shipped workflow, on the shapes world: the photo(s) it loads, the texts it is
given, which saved image is the edit, and the renderer's ground truth to score it against (no ComfyUI
import; ``demo.py`` runs the workflows and :mod:`.contact_sheet` draws the results).

Every task is fixed (hand-picked scenes, no randomness), so the contact sheets of two runs on the same
weights are the same. Scores (:func:`score`): the edit read back by the reader (did the edited attribute
come out?), PSNR to the expected image, and preservation: PSNR outside the region that should change,
against the source photo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import IP2P_FILE, T2I_FILE
from .edits import Edit, GroundTruth, apply, ground_truth
from .reader import read, scene_matches
from .scene import Appearance, Obj, Scene, coverage, render

RED, BLUE, YELLOW = Appearance("colour", "red"), Appearance("colour", "blue"), Appearance("colour", "yellow")
STRIPES = Appearance("pattern", "candy_stripes")  # no word for it: only the reference photo carries it


@dataclass(frozen=True)
class WorldTask:
    """One shipped workflow run on the world.

    ``inputs`` sets node inputs (node id -> {input: value}); ``photos`` replace the workflow's LoadImage
    nodes in id order, each ``(IMAGE (1, H, W, 3), MASK (1, H, W))``; ``edit_node`` is the SaveImage whose
    image is the edit; ``generated``: a text-to-image result, scored by read-back only (no source photo).
    """

    stem: str
    checkpoint: str
    truth: GroundTruth
    inputs: dict[str, dict[str, object]]
    photos: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    edit_node: str
    summary: str
    generated: bool = False
    reference: torch.Tensor | None = None  # (H, W, 3), shown on the sheet
    notes: tuple[str, ...] = field(default_factory=tuple)


def _photo(scene: Scene, mask_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoadImage's outputs for a rendered scene; the MASK is object ``mask_of``'s coverage (else empty)."""
    image = render(scene)
    mask = coverage(scene.objects[mask_of]) if mask_of is not None else torch.zeros(image.shape[:2])
    return image[None], mask[None]


def _words(scene: Scene, edit: Edit) -> tuple[str, str]:
    """(the word the edit replaces, the word that replaces it): P2P's blend words."""
    obj = scene.objects[edit.target]
    if edit.kind == "reshape":
        return obj.shape, str(edit.value)
    if edit.kind == "recolour":
        return str(obj.appearance.word), str(edit.value)
    if edit.kind == "background":
        return scene.background, str(edit.value)
    raise ValueError(f"no blend words for a {edit.kind} edit")


def _generation_truth(scene: Scene) -> GroundTruth:
    """Text to image: the scene its caption describes (the render is one of many right answers)."""
    image = render(scene)
    caption = scene.caption()
    return GroundTruth(image, image, torch.ones(image.shape[:2], dtype=torch.bool), "", caption, caption, scene)


def _task(stem: str, scene: Scene, edit: Edit, **kwargs: object) -> WorldTask:
    return WorldTask(stem=stem, truth=ground_truth(scene, edit), **kwargs)  # type: ignore[arg-type]


def world_tasks() -> list[WorldTask]:
    """The demo's tasks, one per shipped workflow that runs on the world (not the Qwen-Image-Edit one)."""
    circle = Scene("grey", (Obj("circle", RED, "centre", "large"),))
    pair = Scene("white", (Obj("square", BLUE, "left", "large"), Obj("triangle", YELLOW, "right", "large")))
    reshape = Edit("reshape", 0, "star")
    tasks = []

    probe_scene = Scene("grey", (Obj("square", BLUE, "left", "large"),))
    tasks.append(WorldTask("attention_probe", T2I_FILE, _generation_truth(probe_scene),
                           {"3": {"text": probe_scene.caption()}}, (), "8",
                           f"text to image: {probe_scene.caption()!r}", generated=True))

    truth = ground_truth(circle, reshape)
    tasks.append(_task("baret_text_edit", circle, reshape, checkpoint=T2I_FILE,
                       inputs={"4": {"text": truth.target_caption}}, photos=(_photo(circle),), edit_node="9",
                       summary=f"BARET: {truth.source_caption!r} -> {truth.target_caption!r}"))

    old, new = _words(circle, reshape)
    tasks.append(_task("nulltext_p2p_edit", circle, reshape, checkpoint=T2I_FILE,
                       inputs={"4": {"value": truth.source_caption},
                               "8": {"target_text": truth.target_caption, "blend_words": f"{old}, {new}"}},
                       photos=(_photo(circle),), edit_node="10",
                       summary=f"null-text inversion + P2P: {old} -> {new}"))

    reference = Scene("black", (Obj("square", STRIPES, "centre", "large"),))
    adopt = Edit("appearance", 0, STRIPES)
    truth = ground_truth(circle, adopt)
    shape = circle.objects[0].shape
    tasks.append(_task("specref_object_replace", circle, adopt, checkpoint=T2I_FILE,
                       inputs={"20": {"value": truth.source_caption},
                               "11": {"target_text": truth.target_caption, "blend_words": f"{shape}, {shape}",
                                      "target_words": shape}},
                       photos=(_photo(circle, 0), _photo(reference, 0)), edit_node="13",
                       reference=render(reference),
                       summary="SpecRef: the circle takes the reference object's stripes (no word for them)"))
    tasks.append(_task("specref_sr_ksampler", circle, adopt, checkpoint=T2I_FILE,
                       inputs={"6": {"text": truth.source_caption}, "20": {"value": truth.target_caption},
                               "21": {"value": shape}},
                       photos=(_photo(circle, 0), _photo(reference, 0)), edit_node="16",
                       reference=render(reference),
                       summary="SR attention in a plain KSampler: the circle takes the reference's stripes"))

    restyle = Edit("background", 0, "striped")
    truth = ground_truth(circle, restyle)
    tasks.append(_task("stylediffusion_edit", circle, restyle, checkpoint=T2I_FILE,
                       inputs={"4": {"value": truth.source_caption},
                               "8": {"target_text": truth.target_caption, "blend_words": shape,
                                     "reweight_words": "striped"}},
                       photos=(_photo(circle),), edit_node="10",
                       summary=f"StyleDiffusion: {truth.source_caption!r} -> {truth.target_caption!r}"))

    recolour = Edit("recolour", 0, "green")
    truth = ground_truth(pair, recolour)
    tasks.append(_task("zone_instruction_edit", pair, recolour, checkpoint=IP2P_FILE,
                       inputs={"3": {"value": truth.instruction}}, photos=(_photo(pair),), edit_node="12",
                       summary=f"ZONE: {truth.instruction!r} (the triangle must stay as it is)"))
    tasks.append(_task("keep_unedited_ip2p", pair, recolour, checkpoint=IP2P_FILE,
                       inputs={"3": {"text": truth.instruction}}, photos=(_photo(pair),), edit_node="9",
                       summary=f"IP2P + Keep Unedited Pixels: {truth.instruction!r}"))

    second = Edit("reshape", 1, "circle")
    first_truth = ground_truth(pair, recolour)
    both = ground_truth(apply(pair, recolour), second)
    combined = GroundTruth(first_truth.source, both.expected, (first_truth.source != both.expected).any(-1),
                           f"{first_truth.instruction}; then {both.instruction}", first_truth.source_caption,
                           both.target_caption, both.edited)
    tasks.append(WorldTask("zone_multi_turn", IP2P_FILE, combined,
                           {"5": {"value": first_truth.instruction}, "12": {"value": both.instruction}},
                           (_photo(pair),), "19", f"ZONE, two turns: {combined.instruction!r}"))
    return tasks


@dataclass(frozen=True)
class Scores:
    """An edit against the ground truth (``success``: the reader sees the expected scene)."""

    success: bool
    psnr_to_truth: float
    preservation_psnr: float  # outside the region that should change, against the source; inf if identical

    def line(self, generated: bool = False) -> str:
        verdict = "read back as asked" if self.success else "NOT read back as asked"
        if generated:
            return f"{verdict} (shape, colour, position of each object)"
        keep = "identical" if math.isinf(self.preservation_psnr) else f"{self.preservation_psnr:.1f} dB"
        return f"{verdict}; PSNR to the truth {self.psnr_to_truth:.1f} dB; outside the edit region {keep}"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.float() - b.float()).square().mean()) if a.numel() else 0.0
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def score(task: WorldTask, edit: torch.Tensor) -> Scores:
    """Score an edit (H, W, 3) in [0, 1] against the task's ground truth."""
    truth = task.truth
    if task.generated:
        return Scores(scene_matches(read(edit), truth.edited, background=False), math.nan, math.nan)
    outside = ~truth.region
    return Scores(success=scene_matches(read(edit), truth.edited),
                  psnr_to_truth=psnr(edit, truth.expected),
                  preservation_psnr=psnr(edit[outside], truth.source[outside]))

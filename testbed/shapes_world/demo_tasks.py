"""Shipped workflows as tasks on the shapes world: the photo(s) a workflow loads, the texts it is given,
which saved image is the edit, and the renderer's ground truth to score it against (no ComfyUI import).
:func:`task_for` makes the task of any scene and edit (the fidelity benchmark draws them seeded,
:mod:`.fidelity`); :func:`world_tasks` are the demo's, one per workflow on hand-picked scenes, so the
contact sheets of two runs on the same weights are the same (``demo.py`` runs them, :mod:`.contact_sheet`
draws them). Scores (:func:`score`): the edit read back by the reader (did the edited attribute
come out?), PSNR to the expected image, and preservation: PSNR outside the region that should change,
against the source photo.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .config import IP2P_FILE, T2I_FILE
from .edits import Edit, GroundTruth, apply, ground_truth
from .reader import read, scene_matches
from .scene import Appearance, Obj, Scene, coverage, render

RED, BLUE, YELLOW = Appearance("colour", "red"), Appearance("colour", "blue"), Appearance("colour", "yellow")
STRIPES = Appearance("pattern", "candy_stripes")  # no word for it: only the reference photo carries it
WORKFLOWS = Path(__file__).resolve().parents[2] / "api_workflows"
# The layers each method reads word maps from on the world (map_downscale: P2P's LocalBlend, SpecRef's M_t,
# StyleDiffusion's LocalBlend and its inversion's attention term). SD reads its 16x16 maps at 512 px, 4x below a
# 64x64 latent (the shipped workflows' 4); the world's 16x16 latents have 16x16 maps at 1, 8x8 at 2 and 4x4 at 4
# (whose 3x3 max-pool covers the image). The fidelity benchmark's map_downscale sweeps choose each on its
# method's tasks (README.md's fidelity table; session 18's files: P2P 2, SpecRef 4, its SR-KSampler workflow
# with it, StyleDiffusion 2; P2P 4 since session 24, at the world's null-text learning rate below).
WORLD_MAP_DOWNSCALE: dict[str, int] = {
    "nulltext_p2p_edit": 4, "specref_object_replace": 4, "specref_sr_ksampler": 4, "stylediffusion_edit": 2}
# Null-text inversion's Adam learning rate on the world (the Null-Text Inversion node's learning_rate; the shipped
# workflow keeps the paper's 1e-2, chosen on SD). At 1e-2 CFG with the target prompt breaks the world's edits inside
# the blend mask (shapes melt into blobs, colours spill). The fidelity benchmark's p2p-null-text-lr sweep chose 3e-3
# on held-out tasks (fidelity.HELD_OUT_SEED), with the world's maps at 2 and again at 4 (README.md, session 24).
WORLD_NULL_TEXT_LR = 0.003


@dataclass(frozen=True)
class ZoneMask:
    """How the IP2P Edit Mask node reads M_b: its ``mask_rows``, ``mask_layers`` and ``threshold`` inputs."""

    mask_rows: str
    mask_layers: str
    threshold: float

    def inputs(self) -> dict[str, str | float]:
        return asdict(self)


# How ZONE's M_b reads the world's IP2P UNet (the IP2P Edit Mask node's inputs): the instruction branch's maps
# at the 8x8 and 4x4 layers, T 0. The shipped workflows keep the official code's empty-text branches, 1/32 layers
# and T 0.21 (median IoU with the true edit region 0.12 on the committed UNet; 0.05 on session 20's); the fidelity
# benchmark's --sweep-zone-mask chose these (README.md's ZONE sweep; session 21, median IoU 0.40).
WORLD_ZONE_MASK = ZoneMask("instruction", "1/16 and 1/32", 0.0)
# Which images ZONE's Region-IoU segments on the world (the node's ``segment`` input): a 'change' also segments the
# original and keeps the union of both choices, so a reshaped object leaves no piece of its old outline. The
# shipped workflows keep the paper's edited image; the fidelity benchmark's --sweep zone-segment chose this
# (README.md's sweeps; session 22: 32.4 against 29.1 dB of edits made, the same 20 of 30 edits but one swapped).
WORLD_ZONE_SEGMENT = "edited and original (ours)"


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
    workflow: dict | None = None  # an API workflow of its own (a baseline); else the shipped ``stem``.json

    def with_inputs(self, overrides: dict[str, dict[str, object]]) -> WorldTask:
        """This task with ``overrides`` (node id -> {input: value}) merged over its node inputs."""
        merged = {node: {**self.inputs.get(node, {}), **values} for node, values in overrides.items()}
        return replace(self, inputs={**self.inputs, **merged})

    def api_workflow(self) -> dict:
        """The workflow to run: its own, or the shipped one named by ``stem``."""
        if self.workflow is not None:
            return copy.deepcopy(self.workflow)
        return shipped_workflow(self.stem)


def shipped_workflow(stem: str) -> dict:
    """The shipped API workflow ``api_workflows/<stem>.json``, a fresh copy."""
    return json.loads((WORKFLOWS / f"{stem}.json").read_text())


def photo(scene: Scene, mask_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoadImage's outputs for a rendered scene; the MASK is object ``mask_of``'s coverage (else empty)."""
    image = render(scene)
    mask = coverage(scene.objects[mask_of]) if mask_of is not None else torch.zeros(image.shape[:2])
    return image[None], mask[None]


def _words(scene: Scene, edit: Edit) -> tuple[str, str]:
    """(the word the edit replaces, the word that replaces it): P2P's blend words."""
    obj = scene.objects[edit.target]
    if edit.kind == "reshape":
        return obj.shape, str(edit.value)
    if edit.kind == "recolour":  # an appearance no word names: the caption calls the object by its shape alone
        return obj.appearance.word or obj.shape, str(edit.value)
    if edit.kind == "background":
        return scene.background, str(edit.value)
    raise ValueError(f"no blend words for a {edit.kind} edit")


def _generation_truth(scene: Scene) -> GroundTruth:
    """Text to image: the scene its caption describes (the render is one of many right answers)."""
    image = render(scene)
    caption = scene.caption()
    return GroundTruth(image, image, torch.ones(image.shape[:2], dtype=torch.bool), "", caption, caption, scene)


def task_for(stem: str, scene: Scene, edit: Edit, reference: Scene | None = None) -> WorldTask:
    """The task that runs shipped workflow ``stem`` on ``scene`` with ``edit``: its texts (captions, the
    instruction, P2P's blend and reweight words) and photos. ``reference``: the SpecRef reference scene,
    whose first object carries the appearance an ``appearance`` edit adopts."""
    truth = ground_truth(scene, edit)
    source, target = truth.source_caption, truth.target_caption
    photos = (photo(scene, edit.target if scene.objects else None),)
    if stem == "baret_text_edit":
        return WorldTask(stem, T2I_FILE, truth, {"4": {"text": target}}, photos, "9",
                         f"BARET: {source!r} -> {target!r}")
    maps = WORLD_MAP_DOWNSCALE.get(stem)
    if stem == "nulltext_p2p_edit":
        old, new = _words(scene, edit)
        return WorldTask(stem, T2I_FILE, truth,
                         {"4": {"value": source}, "7": {"learning_rate": WORLD_NULL_TEXT_LR},
                          "8": {"target_text": target, "blend_words": f"{old}, {new}", "map_downscale": maps}},
                         photos, "10", f"null-text inversion + P2P: {old} -> {new}")
    if stem in ("specref_object_replace", "specref_sr_ksampler"):
        if reference is None or edit.kind != "appearance":
            raise ValueError("SpecRef tasks adopt a reference object's appearance: give an appearance edit and "
                             "a reference scene")
        shape = scene.objects[edit.target].shape
        photos += (photo(reference, 0),)
        summary = f"SpecRef: the {shape} takes the reference object's appearance (no word for it)"
        if stem == "specref_object_replace":
            inputs = {"20": {"value": source},
                      "11": {"target_text": target, "blend_words": f"{shape}, {shape}", "target_words": shape,
                             "map_downscale": maps}}
            return WorldTask(stem, T2I_FILE, truth, inputs, photos, "13", summary, reference=render(reference))
        inputs = {"6": {"text": source}, "20": {"value": target}, "21": {"value": shape},
                  "12": {"map_downscale": maps}, "13": {"map_downscale": maps}}
        return WorldTask(stem, T2I_FILE, truth, inputs, photos, "16", "SR attention in a plain KSampler; " + summary,
                         reference=render(reference))
    if stem == "stylediffusion_edit":
        old, new = _words(scene, edit)
        inputs = {"4": {"value": source}, "7": {"map_downscale": maps},
                  "8": {"target_text": target, "blend_words": f"{old}, {new}", "reweight_words": new,
                        "map_downscale": maps}}
        return WorldTask(stem, T2I_FILE, truth, inputs, photos, "10", f"StyleDiffusion: {source!r} -> {target!r}")
    if stem == "zone_instruction_edit":
        return WorldTask(stem, IP2P_FILE, truth, {"3": {"value": truth.instruction}, "7": WORLD_ZONE_MASK.inputs(),
                                                  "10": {"segment": WORLD_ZONE_SEGMENT}}, photos, "12",
                         f"ZONE: {truth.instruction!r}")
    if stem == "keep_unedited_ip2p":
        return WorldTask(stem, IP2P_FILE, truth, {"3": {"text": truth.instruction}}, photos, "9",
                         f"IP2P + Keep Unedited Pixels: {truth.instruction!r}")
    raise ValueError(f"no world task for workflow {stem!r}")


# The demo's hand-picked scenes and edits (both hosts' demos run these).
CIRCLE = Scene("grey", (Obj("circle", RED, "centre", "large"),))
PAIR = Scene("white", (Obj("square", BLUE, "left", "large"), Obj("triangle", YELLOW, "right", "large")))
REFERENCE = Scene("black", (Obj("square", STRIPES, "centre", "large"),))
PROBE_SCENE = Scene("grey", (Obj("square", BLUE, "left", "large"),))
RESHAPE, ADOPT = Edit("reshape", 0, "star"), Edit("appearance", 0, STRIPES)
RESTYLE, RECOLOUR = Edit("background", 0, "striped"), Edit("recolour", 0, "green")


def world_tasks() -> list[WorldTask]:
    """The demo's tasks, one per shipped workflow that runs on the world (not the Qwen-Image-Edit one)."""
    tasks = [WorldTask("attention_probe", T2I_FILE, _generation_truth(PROBE_SCENE),
                       {"3": {"text": PROBE_SCENE.caption()}}, (), "8", f"text to image: {PROBE_SCENE.caption()!r}",
                       generated=True),
             task_for("baret_text_edit", CIRCLE, RESHAPE),
             task_for("nulltext_p2p_edit", CIRCLE, RESHAPE),
             task_for("specref_object_replace", CIRCLE, ADOPT, REFERENCE),
             task_for("specref_sr_ksampler", CIRCLE, ADOPT, REFERENCE),
             task_for("stylediffusion_edit", CIRCLE, RESTYLE),
             task_for("zone_instruction_edit", PAIR, RECOLOUR),
             task_for("keep_unedited_ip2p", PAIR, RECOLOUR)]
    first_truth = ground_truth(PAIR, RECOLOUR)
    both = ground_truth(apply(PAIR, RECOLOUR), Edit("reshape", 1, "circle"))
    combined = GroundTruth(first_truth.source, both.expected, (first_truth.source != both.expected).any(-1),
                           f"{first_truth.instruction}; then {both.instruction}", first_truth.source_caption,
                           both.target_caption, both.edited)
    tasks.append(WorldTask("zone_multi_turn", IP2P_FILE, combined,
                           {"5": {"value": first_truth.instruction}, "12": {"value": both.instruction},
                            "8": WORLD_ZONE_MASK.inputs(), "15": WORLD_ZONE_MASK.inputs(),
                            "10": {"segment": WORLD_ZONE_SEGMENT}, "17": {"segment": WORLD_ZONE_SEGMENT}},
                           (photo(PAIR),), "19", f"ZONE, two turns: {combined.instruction!r}"))
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

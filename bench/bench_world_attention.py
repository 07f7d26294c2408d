"""Benchmark: what the shapes world's text-to-image UNet passes through its attention (a measurement, no target).

SpecRef's SR-attention, P2P's and BARET's self-attention replacement and StyleDiffusion's tau_s all act on
self-attention: they can move only what flows through it. This measures how much does on the committed
text-to-image checkpoint, to tell a method that fails from a world that gives it little to act on.

1. **Leverage** (the checkpoint's diffusers twin, through the pack's ``DiffusersHost`` hooks): an attention
   kind switched off (the attention's output zeroed before the block's output projection, whose bias stays; the
   block's residual path carries on) against the unchanged model, the PSNR between the two images, medians over
   held-out scenes: DDIM reconstruction (inverted with the caption, sampled back at cfg 1, as the edit methods
   start; the inverted latent decides most of it) and generation from seeded noise at cfg 7.5 (CFG multiplies any
   change of the conditional row). Switched off: self-attention in the decoder's two finest resolutions (where
   SpecRef's SR-attention acts by default), self-attention everywhere, and, for scale, cross-attention everywhere.
   A high PSNR means that attention kind decides little of the image.
2. **SR-attention's reference transfer** (ComfyUI's executor, the shipped SpecRef workflow as the fidelity
   benchmark runs it, 10 steps): each seeded source photo edited with each appearance that has no word (the
   world's 3 off-vocabulary colours and 2 stripe patterns) as the reference. The edited object is described by
   its pixels' mean and standard deviation per RGB channel (8-bit; the stripes' two colours show in the spread),
   and so is the renderer's expected object for that reference. *Follow*: the least-squares slope of the edits'
   descriptions on the expected ones over the five references (deviations from their means), the median over the
   photos: 1 when the edit takes the reference's appearance, 0 when it changes with the reference no more than by
   chance. *Nearest*: how often the edit's description lies nearest its own reference's expected one among the
   five (chance 20%; the count of trials is printed). ``--sampler-inputs`` sets SpecRef Edit Sampler inputs (e.g.
   ``'{"uncond_shared_kv": true, "cfg": 3}'``) for both. ``--models DIR`` measures a candidate text-to-image
   checkpoint (``DIR/shapes_world_t2i.safetensors``, e.g. a retrain meant to carry appearance through
   self-attention) instead of the committed one, both parts on it.

    COMFYUI_PATH=... .venv/bin/python bench/bench_world_attention.py            # 10 scenes, 10 SpecRef photos
    COMFYUI_PATH=... .venv/bin/python bench/bench_world_attention.py --scenes 4 --photos 2 --json out.json
    COMFYUI_PATH=... .venv/bin/python bench/bench_world_attention.py --models retrained/ --parts specref
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if TYPE_CHECKING:
    from realedit.attention.hooks import AttentionContext, LayerInfo
    from realedit.batching.models import EditModel
    from realedit.hosts.diffusers import DiffusersHost

STEPS = 10  # the fidelity benchmark's steps
SWITCHED_OFF = ("decoder self (SR-attention's layers)", "self everywhere", "cross everywhere")
MODES = {"reconstruction, cfg 1": 1.0, "generation, cfg 7.5": 7.5}  # mode -> cfg
SPECREF_SAMPLER = "11"  # the SpecRef Edit Sampler's node id in specref_object_replace.json


class Switch:
    """An attention hook that zeroes the attention output of the calls ``off`` names (one of ``SWITCHED_OFF``;
    None: declines every call, the unchanged model). ``sr_layers``: the layers SR-attention acts in."""

    def __init__(self, sr_layers: frozenset[int]) -> None:
        self.sr_layers = sr_layers
        self.off: str | None = None

    def hits(self, ctx: AttentionContext) -> bool:
        """Whether this call is one ``off`` switches off."""
        if self.off == SWITCHED_OFF[0]:
            return ctx.kind == "self" and ctx.layer.index in self.sr_layers
        if self.off == SWITCHED_OFF[1]:
            return ctx.kind == "self"
        return self.off == SWITCHED_OFF[2] and ctx.kind == "cross"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ctx: AttentionContext) -> torch.Tensor | None:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2]) if self.hits(ctx) else None  # (batch, tokens, h*d)


def sr_layers(layers: list[LayerInfo]) -> frozenset[int]:
    """The layers SpecRef's SR-attention acts in by default: the Reference Features node's default window
    (the decoder's two finest resolutions)."""
    from realedit.inversion.bank import LayerWindow

    return frozenset(LayerWindow().select(layers))


@dataclasses.dataclass
class World:
    """The diffusers twin of the world's text-to-image checkpoint, its host carrying a :class:`Switch` (installed
    while ``with world.host``)."""

    model: EditModel
    host: DiffusersHost
    switch: Switch
    sigmas: torch.Tensor  # the sampling schedule, descending, ending at 0
    empty: torch.Tensor  # the empty prompt's embedding, CFG's unconditional row

    @classmethod
    def load(cls, t2i_file: Path | None = None) -> World:
        """The committed checkpoint's twin, or ``t2i_file``'s."""
        from realedit.hosts.diffusers import DiffusersHost, discover_layers
        from realedit.hosts.diffusers_sampling import sampling_sigmas
        from realedit.testbed.shapes_world.config import T2I_FILE
        from realedit.testbed.shapes_world.diffusers_loader import edit_model

        model = edit_model("shapes-world", T2I_FILE, torch.device("cpu"), torch.float32,
                           t2i_file.parent if t2i_file else None)
        switch = Switch(sr_layers(discover_layers(model.unet)))
        return cls(model, DiffusersHost(model.unet, switch), switch, sampling_sigmas(model.scheduler, STEPS)[1],
                   model.encode(""))

    def invert(self, latent: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """DDIM inversion with the unchanged model: the noisiest latent (sigma-space, at ``sigmas[0]``)."""
        from realedit.hosts.diffusers_sampling import ddim_invert

        self.switch.off = None
        return ddim_invert(self.host, self.model.scheduler, latent, cond, steps=STEPS).trajectory[-1]

    def sample(self, start: torch.Tensor, cond: torch.Tensor, cfg: float, off: str | None) -> torch.Tensor:
        """DDIM from ``start`` with ``off`` switched off: the decoded image (H, W, 3) in [0, 1]."""
        from realedit.hosts.diffusers_batch import decode_latent
        from realedit.hosts.diffusers_sampling import cfg_denoiser, prediction_type, sample, use_schedule

        self.switch.off = off
        scheduler = self.model.scheduler
        use_schedule(self.host, self.sigmas, scheduler.alphas_cumprod)  # the inversion left its own schedule
        self.host.begin_run()
        uncond = self.empty if cfg != 1 else None
        denoise = cfg_denoiser(self.host, scheduler.alphas_cumprod, cond, uncond, cfg, total_steps=STEPS,
                               prediction=prediction_type(scheduler))
        return decode_latent(self.model, sample(denoise, start, self.sigmas))


def leverage(scenes: int, seed: int, t2i_file: Path | None = None) -> dict[str, dict[str, float]]:
    """{mode: {switched off: median PSNR against the unchanged model}} over ``scenes`` held-out scenes, on the
    committed text-to-image checkpoint or ``t2i_file``."""
    from realedit.hosts.diffusers_batch import encode_image
    from realedit.testbed.shapes_world.demo_tasks import psnr
    from realedit.testbed.shapes_world.scene import random_scene, render

    world = World.load(t2i_file)
    rng = random.Random(seed)
    results: dict[str, dict[str, list[float]]] = {mode: {off: [] for off in SWITCHED_OFF} for mode in MODES}
    with world.host, torch.no_grad():
        for i in range(scenes):
            scene = random_scene(rng, two_objects=0.4, unnamed=0.15, textured=0.25)
            cond = world.model.encode(scene.caption())
            noised = world.invert(encode_image(world.model, render(scene)), cond)
            generator = torch.Generator().manual_seed(seed + i)
            noise = torch.randn(noised.shape, generator=generator) * float(world.sigmas[0])
            for mode, cfg in MODES.items():
                start = noised if cfg == 1 else noise
                unchanged = world.sample(start, cond, cfg, None)
                for off in SWITCHED_OFF:
                    results[mode][off].append(psnr(unchanged, world.sample(start, cond, cfg, off)))
    return {mode: {off: statistics.median(v) for off, v in per.items()} for mode, per in results.items()}


def follow(edits: torch.Tensor, expected: torch.Tensor) -> float:
    """Least-squares slope of the edits' descriptions on the expected ones, both (references, features)."""
    e, x = edits - edits.mean(0), expected - expected.mean(0)
    return float((e * x).sum() / (x * x).sum())


def describe(image: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """An object's appearance: the mean and standard deviation of each RGB channel over ``region``, 8-bit units.
    ``image`` (H, W, 3) in [0, 1], ``region`` (H, W) bool -> (6,)."""
    pixels = image[region] * 255  # (n, 3)
    return torch.cat([pixels.mean(0), pixels.std(0)])


def reference_transfer(photos: int, seed: int, sampler_inputs: dict[str, Any]) -> dict[str, float]:
    """SR-attention's follow and nearest-reference rate over ``photos`` seeded SpecRef photos, each edited with the
    five appearances that have no word as its reference (``sampler_inputs``: SpecRef Edit Sampler inputs)."""
    from realedit.testbed.shapes_world import fidelity
    from realedit.testbed.shapes_world.demo_tasks import task_for
    from realedit.testbed.shapes_world.edits import Edit
    from realedit.testbed.shapes_world.scene import (
        BACKGROUNDS,
        SHAPES,
        UNNAMED_APPEARANCES,
        Obj,
        Scene,
        random_scene,
    )

    rng = random.Random(seed)
    follows, nearest = [], []
    for _ in range(photos):
        scene = random_scene(rng, two_objects=0.4, unnamed=0.0, textured=0.25)
        target = rng.randrange(len(scene.objects))
        background = rng.choice([b for b in BACKGROUNDS if b != scene.background])
        shape = rng.choice(SHAPES)
        edits, expected = [], []
        for appearance in UNNAMED_APPEARANCES:
            reference = Scene(background, (Obj(shape, appearance, "centre", "large"),))
            task = task_for("specref_object_replace", scene, Edit("appearance", target, appearance), reference)
            edit = fidelity.run_task(task.with_inputs({SPECREF_SAMPLER: sampler_inputs}), STEPS)  # (H, W, 3) in [0, 1]
            edits.append(describe(edit, task.truth.region))
            expected.append(describe(task.truth.expected, task.truth.region))
        edit_features, expected_features = torch.stack(edits), torch.stack(expected)  # (5, 6) each
        follows.append(follow(edit_features, expected_features))
        closest = torch.cdist(edit_features, expected_features).argmin(1)  # (5,): the expected each edit is nearest
        nearest += (closest == torch.arange(len(UNNAMED_APPEARANCES))).tolist()
    return {"follow": statistics.median(follows), "nearest": sum(nearest) / len(nearest), "trials": len(nearest),
            "chance": 1 / len(UNNAMED_APPEARANCES), "photos": photos}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=10, help="held-out scenes for the leverage measure")
    parser.add_argument("--photos", type=int, default=10, help="SpecRef source photos, each with 5 references")
    parser.add_argument("--sampler-inputs", type=json.loads, default={},
                        help="SpecRef Edit Sampler inputs as JSON, e.g. '{\"uncond_shared_kv\": true}'")
    parser.add_argument("--parts", nargs="+", choices=("leverage", "specref"), default=["leverage", "specref"])
    parser.add_argument("--seed", type=int, default=70_000)
    parser.add_argument("--models", type=Path, metavar="DIR",
                        help="measure a candidate text-to-image checkpoint instead of the committed one: DIR holds "
                             "shapes_world_t2i.safetensors")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from realedit.testbed.comfy_env import bootstrap_comfyui

    bootstrap_comfyui()  # before anything imports comfy
    from realedit.testbed import comfy_runner
    from realedit.testbed.shapes_world.comfy_world import add_checkpoint_folder, use_candidate_models
    from realedit.testbed.shapes_world.config import T2I_FILE
    from realedit.testbed.shapes_world.models import register_comfy

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    comfy_runner.load_comfy_nodes()
    comfy_runner.load_pack()
    register_comfy()
    add_checkpoint_folder()
    try:
        t2i_file = use_candidate_models(args.models)[T2I_FILE] if args.models else None
    except ValueError as exc:
        raise SystemExit(f"--models: {exc}") from None
    if t2i_file and t2i_file.parent != args.models.resolve():
        raise SystemExit(f"--models: {args.models} holds no {T2I_FILE}, the checkpoint this bench measures")

    results: dict[str, Any] = {"t2i_file": str(t2i_file)} if t2i_file else {}
    if "leverage" in args.parts:
        results["leverage_psnr_db"] = leverage(args.scenes, args.seed, t2i_file)
        print_leverage(results["leverage_psnr_db"], args.scenes)
    if "specref" in args.parts:
        results["sr_reference"] = reference_transfer(args.photos, args.seed, args.sampler_inputs)
        print_transfer(results["sr_reference"], args.sampler_inputs)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_leverage(lever: dict[str, dict[str, float]], scenes: int) -> None:
    print(f"Leverage: PSNR of the image with an attention kind switched off against the unchanged model "
          f"(median of {scenes} held-out scenes, {STEPS} steps; higher = that attention decides less)")
    print(f"  {'switched off':40s}" + "".join(f"{mode:>24s}" for mode in lever))
    for off in SWITCHED_OFF:
        print(f"  {off:40s}" + "".join(f"{lever[mode][off]:21.1f} dB" for mode in lever))


def print_transfer(transfer: dict[str, float], sampler_inputs: dict[str, Any]) -> None:
    settings = f" with {json.dumps(sampler_inputs)}" if sampler_inputs else ""
    print(f"SR-attention (the shipped SpecRef workflow{settings}, {transfer['photos']} photos x 5 references "
          f"without a word): follow {transfer['follow']:.2f} (median; 1: the edit takes the reference's "
          f"appearance, 0: ignores it); nearest its own reference's expected object in {transfer['nearest']:.0%} "
          f"of {transfer['trials']} (chance {transfer['chance']:.0%})")

if __name__ == "__main__":
    main()

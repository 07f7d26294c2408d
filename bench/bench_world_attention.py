"""Benchmark: what the shapes world's text-to-image UNet passes through its attention (a measurement, no target).

SpecRef's SR-attention, P2P's and BARET's self-attention replacement and StyleDiffusion's tau_s all act on
self-attention: they can move only what flows through it. This measures how much does on the committed
text-to-image checkpoint, to tell a method that fails from a world that gives it nothing to act on.

1. **Leverage** (the checkpoint's diffusers twin, through the pack's ``DiffusersHost`` hooks): an attention
   kind switched off (its output zeroed; the block keeps its residual path) against the unchanged model, the
   PSNR between the two images, medians over held-out scenes: DDIM reconstruction (inverted with the caption,
   sampled back at cfg 1, as the edit methods start) and generation from seeded noise at cfg 7.5 (CFG multiplies
   any change of the conditional row). Switched off: self-attention in the decoder's two finest resolutions
   (where SpecRef's SR-attention acts by default), self-attention everywhere, and, for scale, cross-attention
   everywhere. A high PSNR means that attention kind decides little of the image.
2. **SR-attention's reference transfer** (ComfyUI's executor, the shipped SpecRef workflow as the fidelity
   benchmark runs it, 10 steps): each seeded source photo edited with each appearance that has no word (the
   world's 3 off-vocabulary colours and 2 stripe patterns) as the reference; the edited object's mean colour (the
   region that should change). *Follow*: the slope of the edits' colours on the references' colours (the
   least-squares slope of the deviations from their means over the five references, 8-bit RGB, median over the
   photos): 1 when the edit takes the reference's colour, 0 when it changes with the reference no more than
   by chance, as it would with SR-attention off. *Nearest*: how often the edit's colour lies nearest
   its own reference's among the five (chance 20%).

    COMFYUI_PATH=... .venv/bin/python bench/bench_world_attention.py            # 10 scenes, 6 SpecRef photos
    COMFYUI_PATH=... .venv/bin/python bench/bench_world_attention.py --scenes 4 --photos 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

STEPS = 10  # the fidelity benchmark's steps
SWITCHED_OFF = ("decoder self (SR-attention's layers)", "self everywhere", "cross everywhere")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


class Switch:
    """An attention hook that zeroes the output of the calls ``off`` names (one of ``SWITCHED_OFF``; None:
    declines every call, the unchanged model). ``sr_layers``: the layers SR-attention acts in."""

    def __init__(self, sr_layers: frozenset[int]) -> None:
        self.sr_layers = sr_layers
        self.off: str | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor | None:
        hit = {None: False,
               SWITCHED_OFF[0]: ctx.kind == "self" and ctx.layer.index in self.sr_layers,
               SWITCHED_OFF[1]: ctx.kind == "self",
               SWITCHED_OFF[2]: ctx.kind == "cross"}[self.off]
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2]) if hit else None  # (batch, tokens, heads*dim)


def sr_layers(layers) -> frozenset[int]:
    """The layers SpecRef's SR-attention acts in by default: the Reference Features node's default window
    (the decoder's two finest resolutions)."""
    from realedit.inversion.bank import LayerWindow

    return frozenset(LayerWindow().select(layers))


def leverage(scenes: int, seed: int) -> dict[str, dict[str, float]]:
    """{mode: {switched off: median PSNR}} over ``scenes`` held-out scenes (see the module docstring)."""
    from realedit.hosts.diffusers import DiffusersHost
    from realedit.hosts.diffusers_sampling import (
        cfg_denoiser,
        ddim_invert,
        prediction_type,
        sample,
        sampling_sigmas,
        use_schedule,
    )
    from realedit.testbed.shapes_world.config import T2I_FILE
    from realedit.testbed.shapes_world.diffusers_loader import edit_model
    from realedit.testbed.shapes_world.scene import random_scene, render

    model = edit_model("shapes-world", T2I_FILE, torch.device("cpu"), torch.float32)
    switch = Switch(frozenset())
    host = DiffusersHost(model.unet, switch)
    switch.sr_layers = sr_layers(host.layers)
    _, sigmas = sampling_sigmas(model.scheduler, STEPS)
    prediction, alphas = prediction_type(model.scheduler), model.scheduler.alphas_cumprod
    empty = model.encode("")
    rng = random.Random(seed)
    results: dict[str, dict[str, list[float]]] = {"reconstruction, cfg 1": {}, "generation, cfg 7.5": {}}

    def run(start: torch.Tensor, cond: torch.Tensor, cfg: float, off: str | None) -> torch.Tensor:
        switch.off = off
        use_schedule(host, sigmas, alphas)
        host.begin_run()
        denoise = cfg_denoiser(host, alphas, cond, empty if cfg != 1 else None, cfg, total_steps=STEPS,
                               prediction=prediction)
        latent = sample(denoise, start, sigmas)
        return model.vae.decode(latent / model.vae.config.scaling_factor).sample.clamp(-1, 1)

    with host, torch.no_grad():
        for i in range(scenes):
            scene = random_scene(rng, two_objects=0.4, unnamed=0.15, textured=0.25)
            cond = model.encode(scene.caption())
            pixels = render(scene).permute(2, 0, 1)[None] * 2 - 1  # (1, 3, H, W) in [-1, 1]
            latent = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
            switch.off = None
            noised = ddim_invert(host, model.scheduler, latent, cond, steps=STEPS).trajectory[-1]
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed + i)) * float(sigmas[0])
            for mode, start, cfg in (("reconstruction, cfg 1", noised, 1.0), ("generation, cfg 7.5", noise, 7.5)):
                base = run(start, cond, cfg, None)
                for off in SWITCHED_OFF:
                    psnr = _psnr((base + 1) / 2, (run(start, cond, cfg, off) + 1) / 2)
                    results[mode].setdefault(off, []).append(psnr)
    return {mode: {off: statistics.median(v) for off, v in per.items()} for mode, per in results.items()}


def follow(edits: torch.Tensor, refs: torch.Tensor) -> float:
    """Least-squares slope of the edits' colours on the references' colours, both (references, 3)."""
    e, r = edits - edits.mean(0), refs - refs.mean(0)
    return float((e * r).sum() / (r * r).sum())


def reference_transfer(photos: int, seed: int) -> dict[str, float]:
    """SR-attention's transfer and nearest-reference rate over ``photos`` seeded SpecRef photos."""
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
    refs = torch.tensor([a.mean_colour() for a in UNNAMED_APPEARANCES]) * 255  # (5, 3)
    follows, nearest = [], []
    for _ in range(photos):
        scene = random_scene(rng, two_objects=0.4, unnamed=0.0, textured=0.25)
        target = rng.randrange(len(scene.objects))
        background = rng.choice([b for b in BACKGROUNDS if b != scene.background])
        shape = rng.choice(SHAPES)
        colours = []
        for appearance in UNNAMED_APPEARANCES:
            reference = Scene(background, (Obj(shape, appearance, "centre", "large"),))
            task = task_for("specref_object_replace", scene, Edit("appearance", target, appearance), reference)
            edit = fidelity.run_task(task, STEPS)  # (H, W, 3) in [0, 1]
            colours.append(edit[task.truth.region].mean(0) * 255)
        edits = torch.stack(colours)  # (5, 3)
        follows.append(follow(edits, refs))
        nearest += (torch.cdist(edits, refs).argmin(1) == torch.arange(len(refs))).tolist()
    return {"follow": statistics.median(follows), "nearest": sum(nearest) / len(nearest),
            "chance": 1 / len(refs), "photos": photos}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=10, help="held-out scenes for the leverage measure")
    parser.add_argument("--photos", type=int, default=6, help="SpecRef source photos, each with 5 references")
    parser.add_argument("--seed", type=int, default=70_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from realedit.testbed.comfy_env import bootstrap_comfyui

    bootstrap_comfyui()  # before anything imports comfy
    from realedit.testbed import comfy_runner
    from realedit.testbed.shapes_world.comfy_world import add_checkpoint_folder
    from realedit.testbed.shapes_world.models import register_comfy

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    comfy_runner.load_comfy_nodes()
    comfy_runner.load_pack()
    register_comfy()
    add_checkpoint_folder()

    lever = leverage(args.scenes, args.seed)
    print(f"Leverage: PSNR of the image with an attention kind switched off against the unchanged model "
          f"(median of {args.scenes} held-out scenes, {STEPS} steps; higher = that attention decides less)")
    print(f"  {'switched off':40s}" + "".join(f"{mode:>24s}" for mode in lever))
    for off in SWITCHED_OFF:
        print(f"  {off:40s}" + "".join(f"{lever[mode][off]:21.1f} dB" for mode in lever))
    transfer = reference_transfer(args.photos, args.seed)
    print(f"SR-attention (the shipped SpecRef workflow, {args.photos} photos x 5 references without a word): "
          f"follow {transfer['follow']:.2f} (1: the edit takes the reference's colour, 0: ignores it); the edit's "
          f"colour nearest its own reference {transfer['nearest']:.0%} (chance {transfer['chance']:.0%})")
    if args.json:
        args.json.write_text(json.dumps({"leverage_psnr_db": lever, "sr_reference": transfer}, indent=2))


if __name__ == "__main__":
    main()

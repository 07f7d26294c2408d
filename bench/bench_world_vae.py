"""Benchmark: the shapes world's VAE width against its colour fidelity, at equal training steps.

ComfyUI's AutoencoderKL normalises with 32 groups. At 32 channels (the world's first VAE; the committed one has 64)
each group is one channel, so every GroupNorm removes each channel's mean over the image: the absolute colour of a flat
region can only pass through the encoder's last norm and the decoder's ``norm_out`` by way of the zero
padding's border effects. At 128 channels (SD's VAE at full resolution) a group holds 4 channels, whose
ratios carry the colour. This trains each width with the world's own VAE recipe (``train_vae``: the same
scenes, crops, loss and schedule) for the same steps, and measures on held-out scenes:

* the round trip's PSNR (the gate's measure);
* the colour error of each object: the distance, in 8-bit RGB units, between the mean colour of the
  object's interior (coverage 1, 2 px in from its edge) in the decoded image and in the render;
* the background's colour error, the same way, on pixels 6 px or more away from every object;
* flat images of 5 colours: the round trip's mean colour error.

    COMFYUI_PATH=... .venv/bin/python bench/bench_world_vae.py --widths 32 128 --steps 400

Each width may run in its own process (``--widths 32`` beside ``--widths 128``): the numbers do not depend
on the other runs (seeded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 128], help="VAE channels (ddconfig ch)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pool", type=int, default=2000, help="pre-rendered training scenes")
    parser.add_argument("--held-out", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from realedit.testbed.comfy_env import bootstrap_comfyui

    bootstrap_comfyui()
    import torch
    from realedit.testbed.shapes_world.config import RECIPES
    from realedit.testbed.shapes_world.models import make_vae
    from realedit.testbed.shapes_world.train_vae import held_out_scenes, train_vae, vae_pool

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    base = dataclasses.replace(RECIPES["cpu"], vae_pool=args.pool, vae_steps=args.steps, vae_batch=args.batch)
    pool = vae_pool(base)
    scenes = held_out_scenes(args.held_out)
    results = {}
    for width in args.widths:
        config = dataclasses.replace(base, vae=dict(base.vae, ch=width))
        ae = make_vae(config).first_stage_model.float()
        start = time.perf_counter()
        train_vae(ae, config, pool, log=lambda line: None)
        seconds = time.perf_counter() - start
        results[width] = {"parameters_m": sum(p.numel() for p in ae.parameters()) / 1e6,
                          "seconds_per_step": seconds / args.steps, **colour_fidelity(ae, scenes)}
        r = results[width]
        print(f"ch {width:4d}: {r['parameters_m']:.2f} M parameters, {r['seconds_per_step']:.2f} s/step; "
              f"held-out PSNR {r['psnr_db']:.2f} dB; colour error (8-bit RGB, median): objects "
              f"{r['object_error']:.1f}, background {r['background_error']:.1f}, flat images {r['flat_error']:.1f}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "batch": args.batch, "widths": results}, indent=2))


def colour_fidelity(ae, scenes) -> dict[str, float]:
    """PSNR and colour errors of ``ae``'s round trip on ``scenes`` (see the module docstring)."""
    import statistics

    import torch
    import torch.nn.functional as F
    from realedit.testbed.shapes_world.scene import coverage, render_batch
    from realedit.testbed.shapes_world.train_vae import _posterior, psnr, to_vae_input

    def round_trip(images: torch.Tensor) -> torch.Tensor:  # (B, H, W, 3) -> the same, decoded
        with torch.no_grad():
            mean, _ = _posterior(ae, to_vae_input(images))
            return ((ae.decode(mean) + 1) / 2).clamp(0, 1).movedim(1, -1)

    def error(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
        return float((a[where].mean(0) - b[where].mean(0)).norm() * 255)

    images = render_batch(scenes)
    decoded = round_trip(images)
    objects, background = [], []
    for image, out, scene in zip(images, decoded, scenes):
        near = torch.zeros(image.shape[:2], dtype=torch.bool)
        for obj in scene.objects:
            cover = coverage(obj)
            interior = -F.max_pool2d(-cover[None, None], 5, 1, 2)[0, 0] >= 1.0  # 2 px in from the edge
            if interior.any():
                objects.append(error(out, image, interior))
            near |= F.max_pool2d(cover[None, None], 13, 1, 6)[0, 0] > 0
        if scene.background in ("grey", "white", "black"):  # flat backgrounds: one colour to compare
            background.append(error(out, image, ~near))
    flat = torch.tensor([[0.08, 0.08, 0.09], [0.5, 0.5, 0.5], [0.93, 0.93, 0.92], [0.86, 0.14, 0.14],
                         [0.16, 0.30, 0.88]])[:, None, None, :].expand(-1, 128, 128, -1).contiguous()
    flat_out = round_trip(flat)
    everywhere = torch.ones(128, 128, dtype=torch.bool)
    return {"psnr_db": statistics.mean(psnr(o[None], i[None]) for o, i in zip(decoded, images)),
            "object_error": statistics.median(objects), "background_error": statistics.median(background),
            "flat_error": statistics.median(error(o, i, everywhere) for o, i in zip(flat_out, flat))}


if __name__ == "__main__":
    main()

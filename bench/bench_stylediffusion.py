"""Benchmark: StyleDiffusion's value-embedding inversion (both parameterisations) vs null-text inversion on the
same model, photo latent, prompts and steps, printed side by side in one run.

Rows: ``SD direct`` (A_s, B_s learned from A = 1, B = 0; our default without CLIP_VISION), ``SD clip`` (the
official per-step mapping network on CLIP-like image tokens: random unit-variance features of the text width,
257 tokens as ViT-L/14 gives, since no image encoder weights are available here) and ``null-text`` (10
iterations, lr 1e-2 (1 - s/100)). StyleDiffusion runs its official schedule (caps ceil(100 e^(-0.1 s)), lr
1e-2 (1 - s/100), early stop 1e-5 + 2e-5 s on latent + attention loss). Columns: wall time, UNet forward and
backward passes of the optimisation (+ the DDIM inversion's forwards), the final reconstruction MSE of x_0 (DDPM
space, latent part only), and the steps that met the threshold. A second table runs every method to one common
per-step threshold (``--same-mse`` x plain DDIM + CFG's mean per-step error, delta 0, cap 100 per step) and prints
the iterations each needed: for StyleDiffusion the threshold applies to latent + attention loss, so meeting it
implies the latent MSE met it too.

Modes: ``tiny`` (default; the tiny random-weight SD1-shaped UNet at 128 px: mechanics only, not a trained
model's convergence) and ``toy`` (the CPU-trained toy text-to-latent model of ``testbed/toy_diffusion.py``,
trained once and cached, as bench_baret.py uses). On the Shapes-world checkpoints or SD1.5 run it on a GPU.

    .venv/bin/python bench/bench_stylediffusion.py
    .venv/bin/python bench/bench_stylediffusion.py --steps 10 --max-iterations 20 --same-mse 0.5
    .venv/bin/python bench/bench_stylediffusion.py --only toy
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from realedit.testbed.comfy_env import bootstrap_comfyui  # noqa: E402


@dataclass(frozen=True)
class Row:
    method: str
    seconds: float
    forwards: int
    backwards: int
    final_mse: float
    met: int
    iterations: int


def passes(losses: tuple[tuple[float, ...], ...], thresholds: tuple[float, ...]) -> tuple[int, int, int]:
    """UNet forward and backward passes of the optimisation and the steps that met their threshold.

    Per step: one no-grad forward of the fixed branch; one forward per iteration; one backward per iteration
    that updated (all but a converged step's last); at the cap, one forward to measure the last update.
    """
    forwards = backwards = met = 0
    for step, threshold in zip(losses, thresholds):
        converged = bool(step) and step[-1] < threshold
        forwards += 1 + len(step) + (0 if converged else 1)
        backwards += len(step) - (1 if converged else 0)
        met += converged
    return forwards, backwards, met


def latent_mse(model, result, latent: torch.Tensor) -> float:
    """MSE of the reconstruction x_0 to the photo latent (model space = DDPM space at sigma 0)."""
    x0 = model.model.process_latent_in(latent)
    return float(torch.nn.functional.mse_loss(result.reconstruction.float(), x0.float()))


def run_methods(model, latent: torch.Tensor, cond: list, empty: list, steps: int, *, stop: dict,
                max_iterations: int | None, clip_tokens: int = 257) -> list[Row]:
    """Time the three inversions of ``latent`` with the source ``cond``."""
    from realedit.hosts.comfy_autograd import null_text_invert
    from realedit.hosts.comfy_stylediffusion import value_invert

    width = cond[0][0].shape[-1]
    features = torch.randn(1, clip_tokens, width, generator=torch.Generator().manual_seed(5))
    rows = []
    runs = (("SD direct", lambda: value_invert(model, latent, cond, empty, steps=steps, max_iterations=max_iterations,
                                               **stop)),
            ("SD clip", lambda: value_invert(model, latent, cond, empty, steps=steps, max_iterations=max_iterations,
                                             features=features, **stop)),
            ("null-text", lambda: null_text_invert(model, latent, cond, empty, steps=steps,
                                                   **({"iterations": max_iterations} if max_iterations else {}),
                                                   **stop)))
    for method, invert in runs:
        start = time.perf_counter()
        result = invert()
        seconds = time.perf_counter() - start
        found = getattr(result, "optimisation", result)
        forwards, backwards, met = passes(found.losses, found.thresholds)
        iterations = sum(len(step) for step in found.losses)
        rows.append(Row(method, seconds, forwards + steps, backwards, latent_mse(model, found, latent), met,
                        iterations))
    return rows


def print_table(title: str, steps: int, rows: list[Row]) -> None:
    print(f"\n{title}")
    print(f"  {'method':10} {'time s':>8} {'forwards':>9} {'backwards':>10} {'iterations':>11} {'final x0 MSE':>13} "
          f"{'met threshold':>14}")
    for row in rows:
        print(f"  {row.method:10} {row.seconds:8.2f} {row.forwards:9d} {row.backwards:10d} {row.iterations:11d} "
              f"{row.final_mse:13.3g} {row.met:>8d}/{steps}")
    null = rows[-1]
    for row in rows[:-1]:
        print(f"  {row.method} / null-text: time {row.seconds / null.seconds:.2f}x, forwards "
              f"{row.forwards / null.forwards:.2f}x, backwards {row.backwards / max(null.backwards, 1):.2f}x")


def plain_error(model, latent: torch.Tensor, cond: list, empty: list, steps: int) -> float:
    """Plain DDIM inversion + CFG 7.5's mean per-step MSE (the loop stops before any update)."""
    from realedit.hosts.comfy_autograd import null_text_invert

    plain = null_text_invert(model, latent, cond, empty, steps=steps, iterations=1, eps=1e9).optimisation
    return sum(plain.final_losses) / len(plain.final_losses)


def bench(name: str, model, latent: torch.Tensor, cond: list, empty: list, args: argparse.Namespace) -> None:
    plain = plain_error(model, latent, cond, empty, args.steps)  # also the warm-up
    official = run_methods(model, latent, cond, empty, args.steps, stop={}, max_iterations=args.max_iterations)
    print_table(f"{name}: {args.steps} steps, CFG 7.5, each method's own schedule and early stop "
                f"(StyleDiffusion cap {args.max_iterations or 'official'})", args.steps, official)
    threshold = args.same_mse * plain
    common = run_methods(model, latent, cond, empty, args.steps, stop={"eps": threshold, "delta": 0.0},
                         max_iterations=100)
    print_table(f"{name}: common per-step threshold {threshold:.3g} ({args.same_mse} x plain DDIM + CFG's mean "
                "per-step MSE), cap 100 per step", args.steps, common)


def run_tiny(args: argparse.Namespace) -> None:
    from realedit.testbed.comfy_models import make_tiny_unet

    model = make_tiny_unet("sd1", output_scale=0.01)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=g)
    cond = [[torch.randn(1, 77, 64, generator=g), {}]]
    empty = [[torch.randn(1, 77, 64, generator=g) * 0.1, {}]]
    bench("tiny random SD1-shaped UNet, latent 16x16", model, latent, cond, empty, args)


def run_toy(args: argparse.Namespace) -> None:
    from realedit.testbed.toy_diffusion import Caption, conditioning, toy_latent, toy_model

    model, clip, training = toy_model()
    print(f"toy model: final training loss {training.final_loss:.4f}, trained in {training.seconds:.0f} s")
    photo = Caption("red", "square", "left")
    bench(f"toy: photo '{photo.text}'", model, toy_latent(photo), conditioning(clip, photo.text),
          conditioning(clip, ""), args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("tiny", "toy"), default="tiny")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-iterations", type=int, default=None,
                        help="StyleDiffusion's per-step cap (default: the official ceil(100 e^(-0.1 s)))")
    parser.add_argument("--same-mse", type=float, default=0.5,
                        help="the common per-step threshold as a fraction of plain DDIM + CFG's mean error")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bootstrap_comfyui()
    {"tiny": run_tiny, "toy": run_toy}[args.only](args)


if __name__ == "__main__":
    main()

"""Benchmark: BARET's speed claim (TTIS vs null-text inversion, about 3.5x on SD1.5) on the shapes world's
text-to-image checkpoint, measured as convergence, not as one timed run.

For each photo / target pair (seeded world scenes with a shape, colour, position or size edit: the photo's
VAE latent, the target caption), each method runs with early stopping off at every per-step iteration cap
in ``--caps``; the final reconstruction MSE of x_0 is recorded against the optimisation's UNet passes
(forward + backward; the DDIM inversion's ``steps`` forwards, the same for both, are reported apart).
Each method at its paper settings (TTIS: lr 1e-3 constant; null-text: 1e-2 * (1 - s / 100)) and at its
best constant learning rate from ``--lrs`` (the lowest median MSE at the middle cap on the first three
pairs). Printed: the median MSE at each cap with its spread (25-75%), then, at paper settings and at the
best learning rates, the passes each method needs to reach a common MSE (the larger of the two medians at
the largest cap: both reach it), as medians over the pairs (log MSE interpolated between the caps either side of
it; a pair that never reaches it counts the largest cap's passes, a lower bound), and their ratio beside the
paper's 3.5x.

Measured here (``--steps 10``, 10 pairs, 11 minutes on one core beside other jobs), session 18's checkpoint
(v-prediction UNet with token grounding, four rounds, 97.1% of its read-back gate's attributes): at paper settings
null-text reaches the common MSE (0.0124) in 135 passes, TTIS in 418 (ratio 0.32x: TTIS's constant 1e-3 is too
small for this model, half the pairs do not reach it in 20 iterations a step); both do best at lr 0.01 here, where
TTIS's median MSE is the lower at every cap (cap 5: 4.9e-3 against 1.4e-2; cap 20: 7.1e-4 against 1.2e-3) and it
reaches the common 1.2e-3 in 315 passes against null-text's 417 (**1.33x**, at least: half the null-text pairs do
not reach it). Read off the caps alone (the first cap that reaches it, as until session 18), the ratios were 0.52x
and 1.00x, as on session 15's checkpoint (93.0% of the gate; both best at lr 0.1); session 9's (eps UNet of 6 000
steps, 48%) 0.29x and 1.00x, session 7's the same.

    COMFYUI_PATH=... .venv/bin/python bench/bench_baret_world.py                  # 10 pairs, 20 steps
    COMFYUI_PATH=... .venv/bin/python bench/bench_baret_world.py --pairs 2 --caps 1 2 --steps 5

"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_baret import passes  # noqa: E402

PAPER = "paper"
NO_EARLY_STOP = {"eps": 0.0, "delta": 0.0}  # loss < eps + s * delta = 0 never holds for an MSE


def world_pairs(count: int, seed: int = 60_000) -> list[tuple[object, str]]:
    """(source photo (H, W, 3), target caption) of ``count`` seeded world edits, held out from training."""
    from realedit.testbed.shapes_world.edits import ground_truth, random_edit
    from realedit.testbed.shapes_world.scene import random_scene

    rng = random.Random(seed)
    pairs = []
    while len(pairs) < count:
        scene = random_scene(rng, two_objects=0.4, unnamed=0.0, textured=0.25)
        try:
            edit = random_edit(scene, rng, ("reshape", "recolour", "move", "resize"))
        except ValueError:
            continue
        truth = ground_truth(scene, edit)
        pairs.append((truth.source, truth.target_caption))
    return pairs


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def passes_to_reach(runs: list[tuple[float, int]], target: float) -> float:
    """UNet passes one pair needs to reach ``target`` MSE, from its (final MSE, passes) at each cap in increasing
    order: the first cap's passes if it reaches it, else where log MSE, taken as linear in passes between the last
    cap above the target and the first at or below it, crosses it. A pair that never reaches it counts the largest
    cap's passes (a lower bound)."""
    previous = None
    for mse, count in runs:
        if mse <= target:
            if previous is None:
                return float(count)
            mse_0, count_0 = previous
            return count_0 + math.log(mse_0 / target) / math.log(mse_0 / mse) * (count - count_0)
        previous = (mse, count)
    return float(runs[-1][1])


def passes_to_common(curves: dict[str, dict[int, list[tuple[float, int]]]], labels: list[str],
                     last_cap: int) -> tuple[float, dict[str, float]]:
    """(the common MSE: the larger of the ``labels``' medians at ``last_cap``, {label: median over pairs of the
    passes to reach it, :func:`passes_to_reach`})."""
    common = max(statistics.median(mse for mse, _ in curves[label][last_cap]) for label in labels)
    needed = {}
    for label in labels:
        by_cap = curves[label]
        caps = sorted(by_cap)
        pairs = len(by_cap[last_cap])
        needed[label] = statistics.median(passes_to_reach([by_cap[cap][p] for cap in caps], common)
                                          for p in range(pairs))
    return common, needed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--caps", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 3e-1])
    parser.add_argument("--json", type=Path, default=Path("out/bench_baret_world.json"))
    args = parser.parse_args()

    from realedit.testbed.comfy_env import bootstrap_comfyui

    bootstrap_comfyui()  # before anything imports comfy
    from realedit.hosts.comfy_autograd import null_text_invert, ttis_invert
    from realedit.testbed import comfy_runner
    from realedit.testbed.shapes_world.comfy_world import load_world
    from realedit.testbed.toy_diffusion import conditioning

    comfy_runner.load_comfy_nodes()
    model, clip, vae = load_world().t2i
    empty = conditioning(clip, "")
    with torch.no_grad():  # as VAEEncode (the loaded weights are inference tensors)
        inputs = [(vae.encode(photo[None]), conditioning(clip, target)) for photo, target in world_pairs(args.pairs)]
    methods = {"TTIS": ttis_invert, "null-text": null_text_invert}

    def final_mse(method: str, lr: float | str, cap: int, pair: int) -> tuple[float, int]:
        latent, cond = inputs[pair]
        options = {} if lr == PAPER else {"lr": lr}
        result = methods[method](model, latent, cond, empty, steps=args.steps, iterations=cap, **NO_EARLY_STOP,
                                 **options).optimisation
        forwards, backwards = passes(result)
        return result.final_losses[-1], forwards + backwards

    start = time.perf_counter()
    middle = args.caps[len(args.caps) // 2]
    best: dict[str, float] = {}
    print(f"BARET on the shapes world: {args.pairs} pairs, {args.steps} steps, CFG 7.5, early stop off; "
          f"DDIM inversion costs {args.steps} forwards for both (not counted below)")
    for method in methods:
        sweep = {lr: statistics.median(final_mse(method, lr, middle, p)[0] for p in range(min(3, args.pairs)))
                 for lr in args.lrs}
        best[method] = min(sweep, key=sweep.get)
        print(f"  {method} learning-rate sweep at cap {middle}: "
              + ", ".join(f"{lr:g}: {mse:.3g}" for lr, mse in sweep.items()) + f" -> best {best[method]:g}")
    curves: dict[str, dict[int, list[tuple[float, int]]]] = {}
    for method in methods:
        for lr in (PAPER, best[method]):
            label = f"{method} ({'paper settings' if lr == PAPER else f'lr {lr:g}'})"
            curves[label] = {cap: [final_mse(method, lr, cap, p) for p in range(args.pairs)] for cap in args.caps}
    print(f"\n  median final MSE of x_0 (25-75%) and UNet passes per inversion, by iteration cap per step "
          f"({time.perf_counter() - start:.0f} s so far)")
    for label, by_cap in curves.items():
        cells = []
        for cap, runs in by_cap.items():
            low, mid, high = _quartiles([mse for mse, _ in runs])
            cells.append(f"cap {cap}: {mid:.3g} ({low:.3g}-{high:.3g}), {runs[0][1]} passes")
        print(f"  {label}:\n    " + "\n    ".join(cells))
    report = {}
    for setting in ("paper", "lr"):  # paper settings, then each method at its best learning rate
        labels = [label for label in curves if f"({setting}" in label]
        common, needed = passes_to_common(curves, labels, args.caps[-1])
        ratio = needed[labels[1]] / needed[labels[0]]
        print(f"\n  {'paper settings' if setting == 'paper' else 'best learning rates'}: passes to reach the common "
              f"MSE {common:.3g} (the larger median at cap {args.caps[-1]}), median over pairs, log MSE interpolated "
              "between caps (a pair that never reaches it counts the largest cap's passes):")
        for label in labels:
            print(f"    {label:34s} {needed[label]:8.0f}")
        print(f"    null-text / TTIS: {ratio:.2f}x (BARET reports about 3.5x on SD1.5 at paper settings)")
        report[setting] = {"common_mse": common, "passes": needed, "ratio_null_over_ttis": ratio}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"pairs": args.pairs, "steps": args.steps, "best_lr": best, **report,
                                     "curves": {k: {str(c): v for c, v in d.items()} for k, d in curves.items()}},
                                    indent=2))
    print(f"wrote {args.json} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

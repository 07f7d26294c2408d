"""Benchmark: BARET's TTIS vs null-text inversion on the same model, photo latent and steps (target
time ratio <= 0.33; BARET reports ~16 s vs 50-60 s on SD1.5).

Both run the shared loop with their paper defaults (TTIS: 5 iterations, lr 1e-3 constant; null-text:
10 iterations, lr 1e-2 * (1 - s / 100)) and the *same* early-stop criterion, loss < eps + s * delta:
a step ends as soon as its reconstruction reaches the threshold, so both are timed to the same
per-step reconstruction MSE (or to their iteration cap). Printed side by side in one run: wall time,
UNet forward and backward passes, the final reconstruction MSE of x_0, steps that met the threshold,
and the time ratio. Random-weight models: the iteration counts show the mechanics, not SD's
convergence speed; run with a real checkpoint's UNet for the paper's numbers.

    .venv/bin/python bench/bench_baret.py                      # tiny model + SD1.5-shaped UNet at 32x32, CPU
    .venv/bin/python bench/bench_baret.py --only tiny --steps 50
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from realedit.testbed.comfy_env import bootstrap_comfyui  # noqa: E402


def passes(result) -> tuple[int, int]:
    """UNet forward and backward passes of the optimisation (the DDIM inversion adds ``steps`` forwards).

    Per step: one no-grad forward of the fixed branch; one forward per iteration; one backward per
    iteration that updated (all but a converged step's last); at the cap, one forward to measure the
    last update.
    """
    forwards = backwards = 0
    for losses, converged in zip(result.losses, result.converged):
        forwards += 1 + len(losses) + (0 if converged else 1)
        backwards += len(losses) - (1 if converged else 0)
    return forwards, backwards


def run(name: str, model, width: int, latent_hw: tuple[int, int], steps: int, stop: dict[str, float],
        same_mse: float | None = None) -> None:
    from realedit.hosts.comfy_autograd import null_text_invert, ttis_invert

    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, *latent_hw, generator=g)
    cond = [[torch.randn(1, 77, width, generator=g), {}]]
    empty = [[torch.randn(1, 77, width, generator=g) * 0.1, {}]]
    if same_mse is not None:
        threshold = common_threshold(model, latent, cond, empty, steps, same_mse)
        stop = {"eps": threshold, "delta": 0.0, "iterations": 100}
        print(f"\n{name}: common per-step MSE threshold {threshold:.3g} = {same_mse} x plain DDIM's mean error, "
              "iteration cap 100 for both")
    ttis_invert(model, latent, cond, empty, steps=2, iterations=1)  # warm-up: loading and first-call costs
    rows = []
    for method, invert in (("TTIS", ttis_invert), ("null-text", null_text_invert)):
        start = time.perf_counter()
        inversion = invert(model, latent, cond, empty, steps=steps, **stop)
        seconds = time.perf_counter() - start
        result = inversion.optimisation
        forwards, backwards = passes(result)
        rows.append((method, seconds, forwards + steps, backwards, result.final_losses[-1], sum(result.converged)))
    print(f"\n{name}: latent {latent_hw[0]}x{latent_hw[1]}, {steps} steps, CFG 7.5, early stop eps + s * delta")
    print(f"  {'method':10} {'time s':>8} {'forwards':>9} {'backwards':>10} {'final MSE':>11} {'met threshold':>14}")
    for method, seconds, forwards, backwards, mse, met in rows:
        print(f"  {method:10} {seconds:8.2f} {forwards:9d} {backwards:10d} {mse:11.3g} {met:>8d}/{steps}")
    print(f"  time ratio TTIS / null-text: {rows[0][1] / rows[1][1]:.3f} (target <= 0.33)")


def common_threshold(model, latent: torch.Tensor, cond: list, empty: list, steps: int, fraction: float) -> float:
    """A per-step MSE both methods must reach: ``fraction`` of plain DDIM inversion + CFG 7.5 sampling's
    mean per-step error on this model and latent (a pilot run without optimisation)."""
    from realedit.hosts.comfy_autograd import ttis_invert

    pilot = ttis_invert(model, latent, cond, empty, steps=steps, iterations=1, eps=1e9)  # stops before updating
    plain = [losses[0] for losses in pilot.optimisation.losses]
    return fraction * sum(plain) / len(plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["tiny", "sd15"])
    parser.add_argument("--steps", type=int, default=None, help="default: 50 tiny, 10 SD1.5-shaped on CPU")
    parser.add_argument("--eps", type=float, default=None, help="common early-stop eps (default BARET's 1e-5)")
    parser.add_argument("--delta", type=float, default=None, help="common early-stop delta (default 2e-5)")
    parser.add_argument("--same-mse", type=float, default=None, metavar="F",
                        help="time both to a common per-step MSE: F x plain DDIM's mean error (e.g. 0.5), cap 100")
    args = parser.parse_args()
    stop = {k: v for k, v in (("eps", args.eps), ("delta", args.delta)) if v is not None}
    bootstrap_comfyui()
    import comfy.model_management
    from realedit.testbed.comfy_models import make_sd15_shaped_unet, make_tiny_unet

    device = comfy.model_management.get_torch_device()
    if args.only in (None, "tiny"):
        run("tiny UNet", make_tiny_unet("sd1", output_scale=0.01), 64, (16, 16), args.steps or 50, stop, args.same_mse)
    if args.only in (None, "sd15"):
        model, width = make_sd15_shaped_unet(device, dtype=torch.float32)
        steps = args.steps or (50 if device.type == "cuda" else 10)
        run("SD1.5-shaped UNet", model, width, (32, 32), steps, stop, args.same_mse)


if __name__ == "__main__":
    main()

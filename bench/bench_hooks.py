"""Benchmark: sampling with RealEdit's pass-through hooks vs the unpatched model (target ratio <= 1.05).
DDIM inversion and the reference bank (time and memory) are in bench/bench_inversion.py.

Side by side in one run, same model, seed and steps, alternating the two variants so drift hits both.

    .venv/bin/python bench/bench_hooks.py                 # tiny model + SD1.5-shaped UNet, CPU
    .venv/bin/python bench/bench_hooks.py --only tiny     # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from realedit.testbed.comfy_env import bootstrap_comfyui  # noqa: E402


def _timed(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _side_by_side(a, b, repeats: int) -> tuple[float, float]:
    a(), b()  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(_timed(a, 1))
        times_b.append(_timed(b, 1))
    return statistics.median(times_a), statistics.median(times_b)


def sd15_shaped_unet(device: torch.device):
    """A full-size SD1.5 UNet (860M parameters) with random weights (see ``testbed.comfy_models``)."""
    from realedit.testbed.comfy_models import make_sd15_shaped_unet

    return make_sd15_shaped_unet(device)


def bench_model(name: str, model, context_dim: int, latent_hw: tuple[int, int], steps: int, repeats: int) -> None:
    import comfy.sample
    from realedit.hosts.comfy import install_hook

    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, context_dim, generator=g), {}]]
    uncond = [[torch.randn(1, 77, context_dim, generator=g), {}]]
    latent = torch.zeros(1, 4, *latent_hw)
    noise = comfy.sample.prepare_noise(latent, 0)

    def decline(q, k, v, ctx):
        return None

    hooked = install_hook(model, decline)

    def run(m, cfg=7.5):
        return lambda: comfy.sample.sample(m, noise, steps, cfg, "euler", "ddim_uniform", cond, uncond, latent,
                                           seed=0, disable_pbar=True)

    plain, with_hooks = _side_by_side(run(model), run(hooked), repeats)
    print(f"{name}: sampling {steps} steps, cfg 7.5: unpatched {plain:.3f}s, pass-through hooks {with_hooks:.3f}s, "
          f"ratio {with_hooks / plain:.3f} (target <= 1.05)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["tiny", "sd15"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bootstrap_comfyui()
    from realedit.testbed.comfy_models import make_tiny_unet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.only in (None, "tiny"):
        bench_model("tiny sd1 (16x16 latent)", make_tiny_unet("sd1"), 64, (16, 16), 10, args.repeats)
    if args.only in (None, "sd15"):
        model, context = sd15_shaped_unet(device)
        bench_model("SD1.5-shaped (32x32 latent)", model, context, (32, 32), 4, max(2, args.repeats // 2))


if __name__ == "__main__":
    main()

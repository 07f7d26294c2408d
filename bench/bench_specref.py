"""Benchmark: the SpecRef edit sampler against plain sampling, side by side in one run (issue 4).

* edit step time / two plain CFG sampling steps (ComfyUI's euler, cfg 7.5, same model, schedule and steps):
  target <= 1.30. The edit runs two paths (reconstruction + edit, each with CFG: 4 UNet rows) with the
  default windows: P2P word swap for 0.8 of the steps, self-attention replacement for 0.4, LocalBlend,
  SR-attention onto a stored fp16 bank (decoder's two finest resolutions, steps 0.08-1.0), M_t from a word.
  The breakdown shows what the two-path machinery alone (every control off) and P2P + LocalBlend cost.
* RealEdit Apply SR-Attention in ComfyUI's own sampler / the unpatched sampler (same steps).
* peak memory of an edit with default windows, over the loaded model, beside plain sampling's: on a GPU
  ``torch.cuda.max_memory_allocated``; on the CPU the process's resident memory, sampled every 2 ms.

Timing helpers come from bench_inversion.py (alternating variants, CPU time on the CPU).

    .venv/bin/python bench/bench_specref.py                 # tiny model + SD1.5-shaped UNet (32x32), CPU
    .venv/bin/python bench/bench_specref.py --only tiny     # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_hooks import sd15_shaped_unet  # noqa: E402
from bench_inversion import Timing, side_by_side  # noqa: E402
from realedit.testbed.comfy_env import bootstrap_comfyui  # noqa: E402

WORD = (2,)  # the target word's token position in the (random) prompts


def _prompts(width: int, latent_hw: tuple[int, int]):
    g = torch.Generator().manual_seed(0)
    source, target, empty, negative = ([[torch.randn(1, 77, width, generator=g), {}]] for _ in range(4))
    photos = torch.randn(1, 4, *latent_hw, generator=g), torch.randn(1, 4, *latent_hw, generator=g)
    return source, target, empty, negative, photos


def _ratio_text(timing: Timing, rows: int, target: str) -> str:
    """b / (rows * a): the edit against ``rows`` plain runs."""
    median = statistics.median(timing.ratios) / rows
    return f"ratio {timing.b / (rows * timing.a):.3f}{target}; pairs: median {median:.3f}"


class PeakMemory:
    """Peak memory over a baseline while a function runs: CUDA's allocator peak on a GPU, else the
    process's resident set size sampled by a thread (Linux /proc)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __call__(self, fn: Callable[[], object]) -> int:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        base, peak, done = self._rss(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], self._rss())
                time.sleep(self.interval)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            done.set()
            thread.join()
        return max(peak[0], self._rss()) - base


def bench_model(name: str, model, width: int, latent_hw: tuple[int, int], steps: int, repeats: int) -> None:
    import comfy.sample
    from realedit.attention.local_blend import LocalBlend
    from realedit.attention.p2p import Replace
    from realedit.attention.settings import P2PSettings, SpecRefSettings
    from realedit.attention.specref import SpecRefControls
    from realedit.hosts.comfy_edit import specref_edit
    from realedit.hosts.comfy_sampling import ddim_invert, reference_features
    from realedit.hosts.comfy_sr import apply_sr_attention
    from realedit.inversion.bank import BankSettings

    source, target, empty, negative, (photo, reference) = _prompts(width, latent_hw)
    inversion = ddim_invert(model, photo, source, steps=steps)
    features = reference_features(model, reference, empty, BankSettings(), steps=steps)  # defaults: fp16, offload
    noise = torch.zeros_like(photo)
    z_T = model.model.process_latent_out(inversion.z_T)

    def plain(m=model) -> Callable[[], object]:  # what KSampler runs: euler, cfg 7.5, from z_T without noise
        return lambda: comfy.sample.sample(m, noise, steps, 7.5, "euler", "ddim_uniform", target, negative, z_T,
                                           disable_noise=True, seed=0, disable_pbar=True)

    def edit(controls: SpecRefControls, ref=None) -> Callable[[], object]:
        return lambda: specref_edit(model, inversion, source, target, negative, cfg=7.5, controls=controls,
                                    ref_features=ref)

    full = SpecRefControls(cross_edit=Replace(torch.eye(77)), local_blend=LocalBlend([WORD, WORD]),
                           target_positions=WORD)
    off = SpecRefControls(settings=SpecRefSettings(p2p=P2PSettings(self_replace=0.0)))
    p2p = SpecRefControls(cross_edit=full.cross_edit, local_blend=full.local_blend, target_positions=WORD)
    print(f"{name}: {steps} steps, {latent_hw[0]}x{latent_hw[1]} latent; {features.describe()}")
    for label, controls, ref in (("two paths, every control off", off, None),
                                 ("P2P word swap + self-attention replacement + LocalBlend", p2p, None),
                                 ("full SpecRef edit (P2P, LocalBlend, SR-attention)", full, features)):
        timing = side_by_side(plain(), edit(controls, ref), repeats)
        print(f"  {label}: edit step {timing.b / steps:.3f}s vs plain CFG step {timing.a / steps:.3f}s, "
              f"edit / two plain: {_ratio_text(timing, 2, ' (target <= 1.30)' if ref is not None else '')}")
    patched, _ = apply_sr_attention(model, features, SpecRefControls(target_positions=WORD))
    timing = side_by_side(plain(), plain(patched), repeats)
    print(f"  Apply SR-Attention in ComfyUI's sampler: {timing.text()} of the unpatched sampler")

    peak = PeakMemory()
    plain_peak, edit_peak = peak(plain()), peak(edit(full, features))
    where = "CUDA allocator" if torch.cuda.is_available() else "resident memory"
    print(f"  peak memory over the loaded model ({where}): edit with default windows {edit_peak / 2**20:.1f} MiB "
          f"(bank {features.nbytes / 2**20:.1f} MiB, held before), plain CFG sampling {plain_peak / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["tiny", "sd15"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="steps on the SD1.5-shaped UNet (default 5)")
    parser.add_argument("--latent", type=int, default=32, help="SD1.5-shaped latent side (32 = 256 px)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bootstrap_comfyui()
    from realedit.testbed.comfy_models import make_tiny_unet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.only in (None, "tiny"):
        bench_model("tiny sd1", make_tiny_unet("sd1"), 64, (16, 16), 10, args.repeats)
    if args.only in (None, "sd15"):
        model, width = sd15_shaped_unet(device)
        bench_model("SD1.5-shaped", model, width, (args.latent, args.latent), args.steps or 5,
                    max(2, args.repeats - 1))


if __name__ == "__main__":
    main()

"""Benchmark: DDIM inversion and the reference feature bank (issue 3), side by side in one run.

* inversion time / plain sampling time (ComfyUI's euler at cfg 1, same model, schedule and steps;
  target <= 1.05), and the stored-bank reference inversion / plain sampling;
* source + reference inverted as one batch of two / one after the other (is batching worth it?);
* bank memory at 512x512 on an SD1.5-shaped UNet from shapes: default window (fp16) and live mode
  against every layer and step in fp32 (targets <= 0.25 stored, <= 0.01 live);
* live mode's extra edit time per step: the SpecRef edit sampler with live vs stored REF_FEATURES,
  and what the UNet call costs with 4 rows (two paths, CFG), 5 (one extra conditional row) and 6.

Variants alternate (a, b, a, b, ...) so drift hits both; each ratio is the median of the per-pair
ratios, with their range. On the CPU the time is the process's CPU time (one thread), so other jobs on
a shared machine do not inflate one variant; on a GPU, wall time with device syncs.

    .venv/bin/python bench/bench_inversion.py                 # tiny model + SD1.5-shaped UNet (32x32), CPU
    .venv/bin/python bench/bench_inversion.py --only tiny     # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from realedit.testbed.comfy_env import bootstrap_comfyui  # noqa: E402


def _once(fn: Callable[[], object]) -> float:
    """Seconds fn takes: wall time with device syncs on a GPU; on the CPU this process's CPU time, which
    other processes on a shared machine do not inflate (the benchmark pins one thread)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


@dataclass(frozen=True)
class Timing:
    """Best times of two variants run alternately, and the per-pair ratios b / a."""

    a: float
    b: float
    ratios: list[float]

    def text(self, target: str = "") -> str:
        """Headline: the ratio of best times (noise on a shared machine only adds time); then the
        median and range of the per-pair ratios."""
        r = self.ratios
        pairs = f"; pairs: median {statistics.median(r):.3f}, range {r[0]:.3f}-{r[-1]:.3f}" if len(r) > 1 else ""
        return f"ratio {self.b / self.a:.3f}{target}{pairs}"


def side_by_side(a: Callable[[], object], b: Callable[[], object], repeats: int) -> Timing:
    """a and b alternated ``repeats`` times after one warm-up each."""
    a(), b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(_once(a))
        times_b.append(_once(b))
    return Timing(min(times_a), min(times_b), sorted(tb / ta for ta, tb in zip(times_a, times_b)))


def _inputs(width: int, latent_hw: tuple[int, int]):
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, width, generator=g), {}]]
    empty = [[torch.randn(1, 77, width, generator=g) * 0.1, {}]]
    negative = [[torch.randn(1, 77, width, generator=g), {}]]
    source = torch.randn(1, 4, *latent_hw, generator=g)
    reference = torch.randn(1, 4, *latent_hw, generator=g)
    return cond, empty, negative, source, reference


def inversion_vs_sampling(name: str, model, width: int, latent_hw: tuple[int, int], steps: int, repeats: int) -> None:
    import comfy.sample
    from realedit.hosts.comfy_sampling import ddim_invert, reference_features

    cond, _, _, source, _ = _inputs(width, latent_hw)
    noise = comfy.sample.prepare_noise(source, 0)

    def plain():
        return comfy.sample.sample(model, noise, steps, 1.0, "euler", "ddim_uniform", cond, cond, source, seed=0,
                                   disable_pbar=True)

    timing = side_by_side(plain, lambda: ddim_invert(model, source, cond, steps=steps), repeats)
    print(f"{name}: DDIM inversion {timing.b:.3f}s vs sampling {timing.a:.3f}s (euler, cfg 1, {steps} steps), "
          f"{timing.text(' (target <= 1.05)')}")
    timing = side_by_side(plain, lambda: reference_features(model, source, cond, steps=steps), repeats)
    print(f"{name}: reference inversion recording the default bank {timing.b:.3f}s vs sampling {timing.a:.3f}s, "
          f"{timing.text()}")


def batched_vs_separate(name: str, model, width: int, latent_hw: tuple[int, int], steps: int, repeats: int) -> None:
    from realedit.hosts.comfy_sampling import invert_source_and_reference

    cond, empty, _, source, reference = _inputs(width, latent_hw)

    def pair(batched: bool):
        def run():
            result = invert_source_and_reference(model, source, cond, reference, empty, steps=steps, batched=batched)
            assert result.batched == batched
        return run

    timing = side_by_side(pair(False), pair(True), repeats)
    print(f"{name}: source + reference in one batch {timing.b:.3f}s vs one after the other {timing.a:.3f}s, "
          f"{timing.text(' (< 1: batching saves time)')}")


def live_edit_cost(name: str, model, width: int, latent_hw: tuple[int, int], steps: int, repeats: int) -> None:
    """Live vs stored REF_FEATURES in the SpecRef edit sampler, and UNet calls of 4, 5 and 6 rows."""
    from realedit.hosts.comfy_sampling import invert_source_and_reference

    cond, empty, negative, source, reference = _inputs(width, latent_hw)
    try:
        from realedit.attention.specref import SpecRefControls
        from realedit.hosts.comfy_edit import specref_edit
    except ImportError as error:  # the edit sampler is another issue's; report, do not fail
        print(f"{name}: live edit cost skipped ({error})")
        return
    stored = invert_source_and_reference(model, source, cond, reference, empty, steps=steps)
    live = invert_source_and_reference(model, source, cond, reference, empty, steps=steps,
                                       settings=_live_settings())
    controls = SpecRefControls(target_positions=(2,))

    def edit(features):
        return lambda: specref_edit(model, stored.source, cond, cond, negative, controls=controls,
                                    ref_features=features.reference)

    timing = side_by_side(edit(stored), edit(live), repeats)
    print(f"{name}: SpecRef edit step with stored REF_FEATURES {timing.a / steps:.3f}s, live "
          f"{timing.b / steps:.3f}s: +{(timing.b - timing.a) / steps:.3f}s per step, {timing.text()}")
    _row_costs(name, model, width, latent_hw, repeats)


def _live_settings():
    from realedit.inversion.bank import BankSettings

    return BankSettings(mode="live")


def _row_costs(name: str, model, width: int, latent_hw: tuple[int, int], repeats: int) -> None:
    """One UNet call with 4 rows (source + edit, cond + uncond), 5 (+ the reference as one cond row),
    6 (+ the reference in both CFG halves)."""
    unet = model.model
    device = model.load_device
    model.model.to(device)
    times = {}
    for rows in (4, 5, 6):
        x = torch.randn(rows, 4, *latent_hw, device=device, dtype=unet.get_dtype())
        context = torch.randn(rows, 77, width, device=device, dtype=unet.get_dtype())
        t = torch.full((rows,), 1.0, device=device)

        def call(x=x, context=context, t=t):
            with torch.no_grad():
                unet.apply_model(x, t, c_crossattn=context)

        call()
        times[rows] = min(_once(call) for _ in range(repeats))
    print(f"{name}: one UNet call with 4 rows {times[4]:.3f}s, 5 rows {times[5]:.3f}s (x{times[5] / times[4]:.3f}: "
          f"one extra conditional row), 6 rows {times[6]:.3f}s (x{times[6] / times[4]:.3f})")


def kv_widths(model, layers) -> dict[int, int]:
    """K/V width (heads * dim) of every self-attention layer, read from its transformer block."""
    unet = model.model.diffusion_model
    blocks = {"input": unet.input_blocks, "middle": [unet.middle_block], "output": unet.output_blocks}
    widths = {}
    for layer in layers:
        kind, index, t = layer.host_key
        transformer = next(m for m in blocks[kind][index if kind != "middle" else 0]
                           if hasattr(m, "transformer_blocks"))
        widths[layer.index] = transformer.transformer_blocks[t].attn1.to_k.out_features
    return widths


def bank_memory(model, latent_hw: tuple[int, int], steps: int = 50) -> None:
    """Bank bytes from shapes: default window in fp16 and live mode vs every layer and step in fp32."""
    from realedit.hosts.comfy import discover_layers
    from realedit.inversion.bank import BankSettings, bank_nbytes

    layers = discover_layers(model)
    widths = kv_widths(model, layers)
    defaults = BankSettings()
    chosen = [layers[i] for i in defaults.layers.select(layers)]
    full = bank_nbytes(layers, latent_hw, widths, steps, 4)
    stored = bank_nbytes(chosen, latent_hw, widths, len(defaults.steps.select(steps)), 2)
    live = (steps + 1) * 4 * latent_hw[0] * latent_hw[1] * 4  # the reference's latent trajectory, fp32
    print(f"bank at {latent_hw[0] * 8}x{latent_hw[1] * 8} px, {steps} steps, SD1.5-shaped: every layer and step "
          f"fp32 {full / 2**20:.0f} MiB; default window (layers {[layer.index for layer in chosen]}, steps 4-49) fp16 "
          f"{stored / 2**20:.0f} MiB, ratio {stored / full:.3f} (target <= 0.25); live {live / 2**20:.2f} MiB, "
          f"ratio {live / full:.5f} (target <= 0.01)")


def check_shape_formula(model) -> None:
    """The shape formula equals a real bank's bytes (tiny model, every layer and step, fp32)."""
    from realedit.hosts.comfy import discover_layers
    from realedit.hosts.comfy_sampling import reference_features
    from realedit.inversion.bank import BankSettings, LayerWindow, StepWindow, bank_nbytes

    cond, _, _, latent, _ = _inputs(64, (16, 16))
    settings = BankSettings(layers=LayerWindow("any", 8), steps=StepWindow(0.0, 1.0), dtype=torch.float32)
    features = reference_features(model, latent, cond, settings, steps=4)
    layers = discover_layers(model)
    computed = bank_nbytes(layers, (16, 16), kv_widths(model, layers), 4, 4)
    assert features.bank.nbytes == computed, (features.bank.nbytes, computed)
    print(f"shape formula check: a real full fp32 bank on the tiny model holds {computed} bytes, as computed")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["tiny", "sd15"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bootstrap_comfyui()
    from bench_hooks import sd15_shaped_unet
    from realedit.testbed.comfy_models import make_tiny_unet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = []
    if args.only in (None, "tiny"):
        tiny = make_tiny_unet("sd1")
        check_shape_formula(tiny)
        models.append(("tiny sd1 (16x16 latent)", tiny, 64, (16, 16), 10, args.repeats))
    if args.only in (None, "sd15"):
        sd15, width = sd15_shaped_unet(device)
        models.append(("SD1.5-shaped (32x32 latent)", sd15, width, (32, 32), 4, max(2, args.repeats // 5)))
    for spec in models:
        inversion_vs_sampling(*spec)
    for spec in models:
        batched_vs_separate(*spec)
    for spec in models:
        live_edit_cost(*spec)
    if args.only in (None, "sd15"):
        bank_memory(sd15, (64, 64))


if __name__ == "__main__":
    main()

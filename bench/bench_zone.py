"""Benchmark: ZONE's mask pipeline at 512x512 on the CPU (SAM's own inference excluded).

Region-IoU (Eq. 6) over 100 candidate masks plus the FFT edge smoother (Eq. 7-8): target <= 50 ms in
total. Printed next to the same work with Region-IoU as a per-mask Python loop (torch, and numpy as the
official ``find_most_overlapping_segmentation`` does), measured side by side in one run: the variants
alternate, so drift and other people's load on a shared machine hit all of them; medians of
``--repeats`` runs.

    .venv/bin/python bench/bench_zone.py                  # 100 masks, 512x512, 1 thread
    .venv/bin/python bench/bench_zone.py --masks 200 --size 1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from realedit.masks import composite, fft_edge_smooth, region_iou  # noqa: E402

TARGET_MS = 50.0


def scene(size: int, masks: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A textured photo, an edit of a square (plus IP2P-like global noise), a coarse M_b and ``masks``
    SAM-like candidate segments (random boxes, one of them the square), all at ``size`` x ``size``."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = 0.5 + 0.2 * torch.sin(40 * x) * torch.cos(30 * y)
    original = torch.stack([base, 0.9 * base, 0.8 * base + 0.1], -1).clamp(0, 1)  # (H, W, 3)
    square = ((y - 0.4).abs() < 0.1) & ((x - 0.35).abs() < 0.1)
    edited = (original + 0.02 * torch.randn(original.shape, generator=g)).clamp(0, 1)
    edited[square] = torch.tensor([0.1, 0.1, 0.6])
    rough = torch.nn.functional.interpolate(square[None, None].float(), size=(size // 8, size // 8),
                                            mode="area")[0, 0] > 0.3  # M_b at the latent grid
    corners = torch.rand(masks, 4, generator=g)
    y0, x0 = corners[:, 0:1, None] * 0.8, corners[:, 1:2, None] * 0.8
    y1, x1 = y0 + 0.05 + 0.3 * corners[:, 2:3, None], x0 + 0.05 + 0.3 * corners[:, 3:4, None]
    segments = (y >= y0) & (y < y1) & (x >= x0) & (x < x1)  # (N, H, W) bool
    segments[masks // 2] = square
    return original, edited, rough, segments


def region_iou_loop(rough: torch.Tensor, segments: torch.Tensor) -> tuple[int, float]:
    """Eq. 6 one segment at a time (the official code's loop), M_b resized to the segments' size."""
    rough = torch.nn.functional.interpolate(rough[None, None].float(), size=tuple(segments.shape[1:]),
                                            mode="nearest-exact")[0, 0] > 0.5
    best, best_iou = -1, 0.0
    for index, segment in enumerate(segments):
        union = int((segment | rough).sum())
        iou = int((segment & rough).sum()) / union if union else 0.0
        if iou > best_iou:
            best, best_iou = index, iou
    return best, best_iou


def region_iou_numpy_loop(rough: np.ndarray, segments: list[np.ndarray]) -> tuple[int, float]:
    """The official code's loop: np.logical_and / np.logical_or and sums per SAM mask (M_b at image size)."""
    best, best_iou = -1, 0.0
    for index, segment in enumerate(segments):
        union = np.sum(np.logical_or(rough, segment))
        iou = np.sum(np.logical_and(rough, segment)) / union if union else 0.0
        if iou > best_iou:
            best, best_iou = index, float(iou)
    return best, best_iou


def median_ms(fn: Callable[[], object], samples: list[float]) -> None:
    start = time.perf_counter()
    fn()
    samples.append((time.perf_counter() - start) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    original, edited, rough, segments = scene(args.size, args.masks)
    float_segments = segments.float()  # a ComfyUI MASK batch from another segmenter

    rough_full = torch.nn.functional.interpolate(rough[None, None].float(), size=(args.size, args.size),
                                                 mode="nearest-exact")[0, 0].numpy() > 0.5
    numpy_segments = list(segments.numpy())  # SAM's records: one (H, W) bool array each
    result = region_iou(rough, segments)
    for loop in (region_iou_loop(rough, segments), region_iou_numpy_loop(rough_full, numpy_segments)):
        assert (result.index, result.iou) == loop, "the Region-IoUs disagree"
    m_f = result.mask

    variants: dict[str, Callable[[], object]] = {
        "region_iou (bool segments)": lambda: region_iou(rough, segments),
        "region_iou (float MASK batch)": lambda: region_iou(rough, float_segments),
        "region_iou per-mask loop": lambda: region_iou_loop(rough, segments),
        "region_iou per-mask numpy loop": lambda: region_iou_numpy_loop(rough_full, numpy_segments),
        "fft_edge_smooth": lambda: fft_edge_smooth(original, edited, m_f),
        "composite": lambda: composite(original, edited, m_f, m_f),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.repeats):  # interleaved: every variant sees the same load
        for name, fn in variants.items():
            median_ms(fn, times[name])
    ms = {name: statistics.median(t) for name, t in times.items()}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"ZONE mask pipeline, {args.size}x{args.size}, {args.masks} candidate masks, CPU, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}; load average {load:.2f} "
          f"on {os.cpu_count()} cores (a shared machine: absolute times vary, ratios less)")
    for name, value in ms.items():
        print(f"  {name:32s} {value:8.2f} ms")
    vectorised = ms["region_iou (bool segments)"] + ms["fft_edge_smooth"]
    looped = ms["region_iou per-mask loop"] + ms["fft_edge_smooth"]
    print(f"Region-IoU + FFT smoother: {vectorised:.2f} ms (target <= {TARGET_MS:.0f} ms: "
          f"{'met' if vectorised <= TARGET_MS else 'MISSED'}); with the per-mask loop {looped:.2f} ms")
    one = ms["region_iou (bool segments)"]
    print(f"ratio loop / vectorised: Region-IoU alone {ms['region_iou per-mask loop'] / one:.1f}x (torch loop), "
          f"{ms['region_iou per-mask numpy loop'] / one:.1f}x (numpy loop); "
          f"Region-IoU + smoother {looped / vectorised:.2f}x (torch loop)")


if __name__ == "__main__":
    main()

"""Benchmark: batch editing rows per minute, locally vs on a local Ray instance, and the model-loading cost
each worker pays, side by side in one run.

A 20-row manifest (the example rows of every available method on synthetic 64 px photos, repeated) runs
once in this process and once on ``ray.init(num_cpus=workers)`` with ``workers`` model-holding actors, each
into a fresh folder. Rows per minute are given for the whole run (model loading and, for Ray, actor start
included) and per row computed (sum of the rows' own seconds). Random-weight tiny model by default: the
numbers time the mechanics (scheduling, loading, I/O), not a real checkpoint's sampling.

    .venv/bin/python bench/bench_batch.py                     # tiny model, 20 rows, 2 Ray workers
    .venv/bin/python bench/bench_batch.py --rows 40 --steps 10 --workers 4 --model /path/to/diffusers-folder
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from realedit.batching import BatchOptions, run_batch  # noqa: E402
from realedit.batching import run as batch_run  # noqa: E402
from realedit.batching.example import example_rows, write_example  # noqa: E402


def _run(manifest: Path, out: Path, model: str, options: BatchOptions) -> dict:
    start = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        summary = run_batch(manifest, model, out, options, log=quiet)
    summary["wall"] = time.perf_counter() - start
    return summary


def _line(name: str, summary: dict, workers_started: float = 0.0) -> str:
    rows = summary["ran"]
    compute = sum(r.get("seconds", 0.0) for r in summary["rows"])
    loads = [f"{w['model_load_seconds']:.2f}" + (f" (+{w['ip2p_load_seconds']:.2f} IP2P)" if "ip2p_load_seconds" in w
                                                else "") for w in summary["workers"]]
    wall = summary["wall"] + workers_started
    return (f"{name:<22} {rows:>4} {summary['failed']:>6} {wall:>9.1f} {60 * rows / wall:>12.1f} "
            f"{60 * rows / compute if compute else 0:>14.1f} {len(loads):>7}  "
            + ", ".join(loads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        per_copy = len(example_rows(args.steps))
        copies = -(-args.rows // per_copy)
        manifest = write_example(Path(tmp) / "inputs", size=args.size, steps=args.steps, copies=copies)
        lines = manifest.read_text().splitlines()[: args.rows]
        manifest.write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} rows ({', '.join(r['id'] for r in example_rows(args.steps))}, repeated), {args.size} px, "
              f"{args.steps} steps, model {args.model}")
        local = _run(manifest, Path(tmp) / "local", args.model, BatchOptions(threads=1))
        results = [("local (1 process)", local, 0.0)]
        if batch_run.ray_available():
            import ray

            start = time.perf_counter()
            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     runtime_env={"env_vars": {"PYTHONPATH": batch_run._package_path()}})
            started = time.perf_counter() - start
            try:
                options = BatchOptions(threads=1, ray=True, workers=args.workers)
                results.append((f"Ray ({args.workers} actors)", _run(manifest, Path(tmp) / "ray", args.model,
                                                                       options), started))
            finally:
                ray.shutdown()
            print(f"ray.init: {started:.1f} s (included in the Ray row's wall time)")
        else:
            print(batch_run.RAY_INSTALL)
    print(f"{'':<22} {'rows':>4} {'failed':>6} {'wall s':>9} {'rows/min':>12} {'rows/min/row*':>14} "
          f"{'workers':>7}  model load s per worker")
    for name, summary, started in results:
        print(_line(name, summary, started))
    print("* rows per minute of row compute alone (sum of the rows' own seconds; loading and scheduling excluded)")


if __name__ == "__main__":
    main()

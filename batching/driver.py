"""The batch run end to end: validate, leave out finished rows, run (locally or on Ray), summarise.

    from realedit.batching import run_batch
    summary = run_batch(Path("edits.jsonl"), model="tiny", out=Path("out/batch"))

Invalid rows are all listed before any model loads; with ``skip_invalid`` the valid ones run anyway.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import outputs
from .manifest import Problem, Row, validate
from .models import DEFAULT_IP2P, check_model_spec
from .run import Job, Progress, StopFlag, run_local, run_ray


class InvalidManifestError(ValueError):
    """Some rows are invalid and ``skip_invalid`` was not given."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"RealEdit: {len(problems)} invalid row(s) in the manifest:\n{lines}\n"
                         "Fix them, or pass --skip-invalid to run the valid rows.")


@dataclass
class BatchOptions:
    """How to run: locally (``ray`` False) or on Ray (``ray_address`` None: start or find a local instance)."""

    skip_invalid: bool = False
    ray: bool = False
    ray_address: str | None = None
    workers: int | None = None
    model_config: Path | None = None
    ip2p_model: str | None = None  # default: the model's own IP2P twin where there is one (tiny -> tiny-ip2p)
    default_steps: int | None = None
    device: str | None = None
    threads: int | None = None
    limit: int | None = None  # run at most this many pending rows (then stop as after Ctrl-C)
    extra: dict[str, Any] = field(default_factory=dict)


def plan(manifest: Path, out: Path, job: Job, skip_invalid: bool) -> tuple[list[Row], list[Row], list[Problem]]:
    """(pending rows, finished rows, problems); raises :class:`InvalidManifestError` unless ``skip_invalid``."""
    rows, problems = validate(manifest, job.default_steps, ip2p=job.ip2p_model is not None)
    if problems and not skip_invalid:
        raise InvalidManifestError(problems)
    done = [r for r in rows if outputs.is_done(out, r.id, job.row_key(r))]
    finished = {r.id for r in done}
    return [r for r in rows if r.id not in finished], done, problems


def run_batch(manifest: Path, model: str, out: Path, options: BatchOptions | None = None,
              log: TextIO | None = None) -> dict[str, Any]:
    """Run every pending row of ``manifest`` with ``model`` into ``out``; returns the summary it wrote."""
    options = options or BatchOptions()
    log = log or sys.stderr
    manifest, out = manifest.resolve(), out.resolve()
    check_model_spec(model)
    ip2p = options.ip2p_model or DEFAULT_IP2P.get(model)
    if ip2p is not None:
        check_model_spec(ip2p)
    config = str(options.model_config) if options.model_config else None
    job = Job(model=model, out=str(out), ip2p_model=ip2p, model_config=config, default_steps=options.default_steps,
              device=options.device, threads=options.threads)
    pending, done, problems = plan(manifest, out, job, options.skip_invalid)
    for problem in problems:
        log.write(f"RealEdit: skipping invalid {problem}\n")
    if options.limit is not None:
        pending = pending[: options.limit]
    log.write(f"RealEdit batch: {len(pending)} row(s) to run, {len(done)} already done, {len(problems)} invalid; "
              f"model {model}; {'Ray' if options.ray else 'local'}\n")
    progress = Progress(len(pending), log)
    stop = StopFlag()
    start = time.perf_counter()
    try:
        if options.ray:
            records, workers = run_ray(pending, job, progress.update, address=options.ray_address,
                                       workers=options.workers)
        else:
            with stop.on_sigint():
                records, workers = run_local(pending, job, progress.update, stop)
    except KeyboardInterrupt:
        log.write("\nRealEdit: interrupted; finished rows are kept, re-run the same command to resume\n")
        raise
    finally:
        progress.close()
    elapsed = time.perf_counter() - start
    summary = _summary(manifest, model, out, options, pending, done, problems, records, workers, elapsed, stop)
    all_records = [r for r in (outputs.read_record(out, row.id) for row in sorted(pending + done, key=_line)) if r]
    outputs.write_summary(out, summary, all_records)
    log.write(f"RealEdit batch: {summary['ok']} ok, {summary['failed']} failed this run "
              f"({summary['rows_per_minute']:.2f} rows/min); {out / outputs.SUMMARY}, {out / outputs.CONTACT_SHEET}\n")
    return {**summary, "rows": all_records}


def _line(row: Row) -> int:
    return row.line


def _summary(manifest: Path, model: str, out: Path, options: BatchOptions, pending: list[Row], done: list[Row],
             problems: list[Problem], records: list[dict], workers: list[dict], elapsed: float,
             stop: StopFlag) -> dict[str, Any]:
    ok = sum(r.get("status") == "ok" for r in records)
    return {
        "manifest": str(manifest), "model": model, "out": str(out), "engine": "ray" if options.ray else "local",
        "ray_address": options.ray_address, "ran": len(records), "ok": ok, "failed": len(records) - ok,
        "already_done": len(done), "not_run": len(pending) - len(records), "stopped_early": stop.set,
        "invalid": [{"line": p.line, "id": p.id, "reasons": list(p.reasons)} for p in problems],
        "seconds": round(elapsed, 3), "rows_per_minute": round(60 * len(records) / elapsed, 3) if elapsed else 0.0,
        "workers": workers,
    }

"""Running validated rows: locally in this process, or on Ray with one model-holding actor per GPU / CPU slot.

Both paths go through :class:`RowWorker`: it loads the model once, then for each row resolves the settings,
runs :func:`~..hosts.diffusers_batch.run_row` and writes the outputs (:mod:`.outputs`). A row that raises
gets an error record and the run goes on. Rows already finished (:func:`.outputs.is_done`) are left out
before anything starts, so a re-run only computes what is missing, on either path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import outputs
from .manifest import Row
from .models import EditModel

RAY_INSTALL = ("RealEdit: --ray needs Ray Data, which is not installed here: pip install 'realedit[batch]' "
               "(or pip install 'ray[data]') in this environment, and on every node of the cluster.")


@dataclass(frozen=True)
class Job:
    """What every worker needs to run rows: the model to load, where outputs go, run-wide defaults."""

    model: str
    out: str
    ip2p_model: str | None = None  # InstructPix2Pix model for zone rows without an edited image
    model_config: str | None = None
    default_steps: int | None = None
    device: str | None = None
    threads: int | None = None  # torch CPU threads per worker (results match across runs with equal counts)

    def row_key(self, row: Row) -> str:
        """What a finished row's outputs depend on: the row, its files, the model(s) it used, the default steps."""
        ip2p = [self.ip2p_model] if row.spec.needs_ip2p(row.to_dict()) else []
        return row.key(json.dumps([self.model, self.model_config, self.default_steps, *ip2p]))


class RowWorker:
    """Holds one loaded model and runs rows with it (the Ray actor class and the local loop's worker)."""

    def __init__(self, job: Job) -> None:
        import torch

        from .models import load_model

        if job.threads:
            torch.set_num_threads(job.threads)
        self.job, self.out = job, Path(job.out)
        config = Path(job.model_config) if job.model_config else None
        self.model = load_model(job.model, device=job.device, config=config)
        self.worker = {"host": socket.gethostname(), "pid": os.getpid(),
                       "model_load_seconds": round(self.model.load_seconds, 3), "threads": torch.get_num_threads()}
        self._ip2p: EditModel | None = None

    def ip2p(self) -> EditModel:
        """The InstructPix2Pix model, loaded on the first row that needs it and kept."""
        from .models import load_model

        if self._ip2p is None:
            if not self.job.ip2p_model:
                raise ValueError("RealEdit: this row samples InstructPix2Pix; pass --ip2p-model.")
            self._ip2p = load_model(self.job.ip2p_model, device=self.job.device)
            self.worker["ip2p_load_seconds"] = round(self._ip2p.load_seconds, 3)
        return self._ip2p

    def run(self, row: Row) -> dict[str, Any]:
        """Run one row and write its outputs (or its error record); returns the record."""
        from ..hosts.diffusers_batch import run_row, settings_record

        key = self.job.row_key(row)
        base = {"id": row.id, "line": row.line, "method": row.method, "key": key, "model": self.job.model,
                "seed": row.seed, "row": row.to_dict(), "worker": self.worker}
        start = time.perf_counter()
        try:
            run = row.spec.settings(row.settings, self.job.default_steps)
            ip2p = self.ip2p() if row.spec.needs_ip2p(row.to_dict()) else None
            result = run_row(self.model, row, run, ip2p=ip2p)
        except Exception as e:  # a failing row is recorded, the batch goes on
            return outputs.write_error(self.out, row.id, {
                **base, "status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                "seconds": round(time.perf_counter() - start, 3)})
        record = {**base, "status": "ok", "settings": settings_record(run), "info": result.info,
                  "scores": result.info.pop("scores", None),
                  "timings": {k: round(v, 4) for k, v in result.timings.items()},
                  "seconds": round(time.perf_counter() - start, 3)}
        return outputs.write_row(self.out, row.id, result.images, result.masks, record)

    def __call__(self, batch: dict) -> dict:
        """Ray Data's ``map_batches`` entry: rows as JSON strings in, records as JSON strings out."""
        import numpy as np

        records = [self.run(Row.from_dict(json.loads(text))) for text in batch["row"]]
        return {"record": np.array([json.dumps(r, default=str) for r in records], dtype=object)}


# -- progress -------------------------------------------------------------------------------------------------
class Progress:
    """One status line on stderr: rows done of total, rows per minute, ETA, the last row."""

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.start = time.perf_counter()
        self.stream = stream or sys.stderr
        self.interactive = getattr(self.stream, "isatty", lambda: False)()

    @property
    def rows_per_minute(self) -> float:
        elapsed = time.perf_counter() - self.start
        return 60.0 * self.done / elapsed if elapsed > 0 and self.done else 0.0

    def update(self, record: dict) -> None:
        self.done += 1
        self.failed += record.get("status") != "ok"
        rate = self.rows_per_minute
        eta = (self.total - self.done) / rate * 60 if rate else float("nan")
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} rows  {rate:.2f} rows/min  "
                f"ETA {_duration(eta)}  last: {record['id']} {record.get('status')}"
                + (f" ({self.failed} failed)" if self.failed else ""))
        self.stream.write(("\r" + line + "\033[K") if self.interactive else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# -- Ctrl-C ---------------------------------------------------------------------------------------------------------
class StopFlag:
    """Set by the first Ctrl-C: the local loop finishes the current row, then stops. A second Ctrl-C
    interrupts at once (files are still whole: every write is atomic)."""

    def __init__(self) -> None:
        self.set = False

    @contextmanager
    def on_sigint(self) -> Iterator[StopFlag]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handle(signum, frame):
            if self.set:
                raise KeyboardInterrupt
            self.set = True
            sys.stderr.write("\nRealEdit: stopping after the current row (Ctrl-C again to stop now)\n")

        previous = signal.signal(signal.SIGINT, handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


# -- local and Ray ---------------------------------------------------------------------------------------------------
OnRecord = Callable[[dict], None]


def run_local(rows: list[Row], job: Job, on_record: OnRecord, stop: StopFlag | None = None,
              worker: RowWorker | None = None) -> tuple[list[dict], list[dict]]:
    """Rows one after the other in this process (the model loaded once). Returns (records, workers)."""
    stop = stop or StopFlag()
    records: list[dict] = []
    if not rows:
        return records, []
    worker = worker or RowWorker(job)
    for row in rows:
        if stop.set:
            break
        record = worker.run(row)
        records.append(record)
        on_record(record)
    return records, [worker.worker]


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def _package_path() -> str:
    """The folder that holds the ``realedit`` package this process imported (workers of a local Ray instance
    import it from there; links are kept, as the import system keeps them)."""
    return str(Path(sys.modules[__package__.rsplit(".", 1)[0]].__file__).parent.parent)


def run_ray(rows: list[Row], job: Job, on_record: OnRecord, *, address: str | None, workers: int | None,
            gpus_per_worker: float | None = None) -> tuple[list[dict], list[dict]]:
    """Rows through Ray Data: ``map_batches`` over an actor pool (one actor per GPU, else per CPU slot), each
    actor loading the model once; records stream back as rows finish. Ray is started locally when
    ``address`` is None and no cluster is running, else joined (``"auto"`` or ``"ray://host:10001"``)."""
    if not ray_available():
        raise RuntimeError(RAY_INSTALL)
    import ray

    started_here = not ray.is_initialized()
    if started_here and address:  # a cluster: RealEdit is installed on its nodes
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    elif started_here:  # this machine: workers import the same RealEdit as this process
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [_package_path(),
                                                                       os.environ.get("PYTHONPATH")]))}}
        ray.init(runtime_env=env, log_to_driver=False, include_dashboard=False, logging_level="ERROR")
    try:
        return _ray_rows(ray, rows, job, on_record, workers, gpus_per_worker)
    finally:
        if started_here:
            ray.shutdown()


def _ray_rows(ray, rows: list[Row], job: Job, on_record: OnRecord, workers: int | None,
              gpus_per_worker: float | None) -> tuple[list[dict], list[dict]]:
    if not rows:
        return [], []
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress line is the one shown
    resources = ray.cluster_resources()
    gpus = gpus_per_worker if gpus_per_worker is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
    slots = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1))
    size = max(1, min(workers or slots, len(rows)))
    threads = job.threads or 1  # one CPU slot per actor: one torch thread unless told otherwise
    worker_job = Job(**{**job.__dict__, "threads": threads})
    items = [{"row": json.dumps(r.to_dict())} for r in rows]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(RowWorker, fn_constructor_kwargs={"job": worker_job}, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=size), num_cpus=1 if gpus else threads,
                        num_gpus=gpus or None)
    records, seen = [], {}
    for item in ds.iter_rows():
        record = json.loads(item["record"])
        records.append(record)
        seen[(record["worker"]["host"], record["worker"]["pid"])] = record["worker"]
        on_record(record)
    return records, list(seen.values())

"""Batch editing over a manifest (``python -m realedit.batch``): the work below the README's command.

* :mod:`.manifest` - JSONL / CSV rows, validated before any model loads (every bad row by line).
* :mod:`.methods` - per method: manifest fields, override keys, settings from the pack's dataclasses.
* :mod:`.models` - the model loader registry (``tiny``, diffusers folders, single-file checkpoints).
* :mod:`.outputs` - atomic PNG / JSON writes, resume checks, ``summary.json``, the contact sheet.
* :mod:`.run` - the row worker, the local loop (progress, Ctrl-C) and Ray Data's actor pool.
* :mod:`.driver` - :func:`run_batch`, the whole run.

One row runs through the diffusers host's Python API (:mod:`realedit.hosts.diffusers_batch`).
"""

from .driver import BatchOptions, InvalidManifestError, run_batch
from .manifest import ManifestError, Problem, Row, validate
from .models import DEFAULT_MODEL, EditModel, load_model, register_loader

__all__ = [
    "DEFAULT_MODEL",
    "BatchOptions",
    "EditModel",
    "InvalidManifestError",
    "ManifestError",
    "Problem",
    "Row",
    "load_model",
    "register_loader",
    "run_batch",
    "validate",
]

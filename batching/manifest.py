"""The batch manifest: one edit per row, JSONL or CSV, validated before any model loads.

A JSONL row (paths relative to the manifest's folder)::

    {"id": "cat2tiger", "method": "specref", "image": "cat.png", "prompt": "a cat on a sofa",
     "target": "a tiger on a sofa", "word": "tiger", "reference": "tiger.png",
     "reference_mask": "tiger_mask.png", "settings": {"steps": 30, "cross_replace": 0.6}, "seed": 0}

CSV takes the same column names; ``settings`` is a JSON object in its cell, ``segments`` paths are
separated by ``;``, an empty cell is an absent field. :func:`validate` checks every row and returns all
problems with their line numbers (files that are missing or are not images, unknown methods or fields, a
word that is not in its prompt, mismatched image sizes, unknown setting keys, bad setting values,
duplicate ids) so that one pass over the manifest lists everything to fix.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..attention.tokens import prompt_words
from .methods import METHODS, RESERVED, MethodSpec

PATH_FIELDS = ("image", "reference", "reference_mask", "edited", "mask", "ground_truth")
TEXT_FIELDS = ("prompt", "target", "instruction", "word", "blend_words")
FIELDS = ("id", "method", *PATH_FIELDS, "segments", *TEXT_FIELDS, "seed", "settings")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ManifestError(ValueError):
    """The manifest itself cannot be read (missing file, unknown format)."""


@dataclass(frozen=True)
class Row:
    """One validated edit. Paths are absolute; ``settings`` holds the row's overrides as written."""

    line: int
    id: str
    method: str
    image: str | None = None
    reference: str | None = None
    reference_mask: str | None = None
    edited: str | None = None
    mask: str | None = None
    ground_truth: str | None = None
    segments: tuple[str, ...] = ()
    prompt: str | None = None
    target: str | None = None
    instruction: str | None = None
    word: str | None = None
    blend_words: str | None = None
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Row:
        return Row(**{**data, "segments": tuple(data.get("segments") or ())})

    def key(self, model: str) -> str:
        """What a finished row's outputs were made from: the row (paths and file stamps) and the model."""
        stamps = [(p, Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in self.paths() if Path(p).exists()]
        payload = json.dumps([{k: v for k, v in self.to_dict().items() if k != "line"}, stamps, model],
                             sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def paths(self) -> list[str]:
        return [p for p in (*(getattr(self, f) for f in PATH_FIELDS), *self.segments) if p]


@dataclass(frozen=True)
class Problem:
    """A bad row: its 1-based line (CSV: the header is line 1), id if known, and every reason."""

    line: int
    id: str | None
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        name = f" ({self.id})" if self.id else ""
        return f"line {self.line}{name}: " + "; ".join(self.reasons)


# -- reading -------------------------------------------------------------------------------------------------
def _jsonl(path: Path) -> Iterable[tuple[int, dict | str]]:
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            yield number, f"not valid JSON ({e.msg} at column {e.colno})"
            continue
        yield number, data if isinstance(data, dict) else "a row must be a JSON object"


def _csv_cell(name: str, value: str) -> Any:
    if name == "settings":
        return json.loads(value)
    if name == "segments":
        return [s.strip() for s in value.split(";") if s.strip()]
    if name == "seed":
        return int(value)
    return value


def _csv(path: Path) -> Iterable[tuple[int, dict | str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for record in reader:
            number = reader.line_num
            try:
                yield number, {k: _csv_cell(k, v) for k, v in record.items() if k and v not in (None, "")}
            except (ValueError, json.JSONDecodeError) as e:
                yield number, f"a cell cannot be read ({e})"


def read_rows(path: Path) -> list[tuple[int, dict | str]]:
    """(line, raw row or a reason it could not be parsed) for every row of a .jsonl / .csv manifest."""
    if not path.is_file():
        raise ManifestError(f"RealEdit: the manifest {path} does not exist; pass a .jsonl or .csv file.")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return list(_jsonl(path))
    if suffix == ".csv":
        return list(_csv(path))
    raise ManifestError(f"RealEdit: the manifest {path} is neither .jsonl nor .csv; rename it or convert it.")


# -- validation ----------------------------------------------------------------------------------------------
def _image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) from the file header, or the reason it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "does not exist"
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as e:
        return f"is not an image ({type(e).__name__})"


def _check_fields(raw: dict, spec: MethodSpec) -> list[str]:
    reasons = []
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        reasons.append(f"unknown field(s) {', '.join(unknown)} (fields: {', '.join(FIELDS)})")
    missing = [f for f in spec.required if not raw.get(f)]
    if missing:
        reasons.append(f"method {spec.name!r} needs {', '.join(missing)}")
    for name in (*TEXT_FIELDS, *PATH_FIELDS):
        if name in raw and not isinstance(raw[name], str):
            reasons.append(f"{name} must be a string, got {raw[name]!r}")
    if not isinstance(raw.get("seed", 0), int) or isinstance(raw.get("seed"), bool):
        reasons.append(f"seed must be an integer, got {raw['seed']!r}")
    if not isinstance(raw.get("settings", {}), dict):
        reasons.append("settings must be an object of setting name -> value")
    segments = raw.get("segments", [])
    if not isinstance(segments, list) or not all(isinstance(s, str) for s in segments):
        reasons.append("segments must be a list of mask paths")
    return reasons


def _check_words(raw: dict, spec: MethodSpec) -> list[str]:
    """Every word of a words field occurs in its prompt (whole words, punctuation and case ignored);
    the model's own tokenizer maps them to token positions when the row runs."""
    reasons = []
    for words_field, prompt_field in spec.word_fields:
        words, prompt = raw.get(words_field), raw.get(prompt_field)
        if not isinstance(words, str) or not isinstance(prompt, str):
            continue
        known = [w.lower() for w in prompt_words(prompt)]
        for word in words.replace(",", " ").split():
            if not all(part.lower() in known for part in prompt_words(word)):
                reasons.append(f"the {words_field} {word!r} is not in the {prompt_field} {prompt!r}")
    return reasons


def _resolve(raw: dict, base: Path) -> dict:
    out = dict(raw)
    for name in PATH_FIELDS:
        if isinstance(out.get(name), str):
            out[name] = str((base / out[name]).resolve())
    if isinstance(out.get("segments"), list):
        out["segments"] = [str((base / s).resolve()) for s in out["segments"] if isinstance(s, str)]
    return out


def _check_files(raw: dict, spec: MethodSpec) -> list[str]:
    reasons, sizes = [], {}
    for name in (*spec.images, *spec.masks):
        values = raw.get(name)
        for i, value in enumerate(values if isinstance(values, list) else [values] if values else []):
            label = f"{name}[{i}]" if isinstance(values, list) else name
            size = _image_size(Path(value))
            if isinstance(size, str):
                reasons.append(f"{label} {value} {size}")
            else:
                sizes[label] = size
    if "image" in sizes:
        width, height = sizes["image"]
        if spec.runs_model(raw) and (width % 8 or height % 8):
            reasons.append(f"image is {width}x{height}; the VAE needs sides that are multiples of 8 (resize or crop)")
        for label, size in sizes.items():
            if label.split("[")[0] in spec.same_size and size != sizes["image"]:
                reasons.append(f"{label} is {size[0]}x{size[1]} but image is {width}x{height}")
    if "reference" in sizes and "reference_mask" in sizes and sizes["reference"] != sizes["reference_mask"]:
        reasons.append(f"reference_mask is {sizes['reference_mask'][0]}x{sizes['reference_mask'][1]} but "
                       f"reference is {sizes['reference'][0]}x{sizes['reference'][1]}")
    return reasons


def _check_row(raw: dict, spec: MethodSpec, default_steps: int | None, ip2p: bool) -> list[str]:
    reasons = _check_fields(raw, spec) + spec.check(raw) + _check_words(raw, spec)
    if spec.needs_ip2p(raw) and not ip2p:
        reasons.append(f"method {spec.name!r} without an edited image samples InstructPix2Pix: pass --ip2p-model "
                       "(an InstructPix2Pix diffusers folder)")
    if not spec.available():
        reasons.append(f"method {spec.name!r} is not available in this installation (update RealEdit)")
    elif isinstance(raw.get("settings", {}), dict):
        try:
            spec.settings(raw.get("settings", {}), default_steps)
        except (ValueError, TypeError) as e:
            reasons.append(str(e).removeprefix("RealEdit: ").rstrip("."))
    return reasons + _check_files(raw, spec)


def validate(path: Path, default_steps: int | None = None, ip2p: bool = True) -> tuple[list[Row], list[Problem]]:
    """All rows of the manifest at ``path``: the valid ones, and a :class:`Problem` for every other one.

    Reads image headers only (no pixels, no model). ``default_steps`` is the run's ``--steps`` (rows
    without a ``steps`` setting use it; validation builds every row's settings with it); ``ip2p``: whether the
    run has an InstructPix2Pix model (zone rows without an edited image need one).
    """
    rows: list[Row] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for line, raw in read_rows(path):
        if isinstance(raw, str):
            problems.append(Problem(line, None, (raw,)))
            continue
        row_id = raw.get("id", f"line{line:05d}")
        reasons = []
        if not isinstance(row_id, str) or not _ID.match(row_id):
            reasons.append(f"id {row_id!r} must be 1-100 letters, digits, '.', '_' or '-' (it names the row's folder)")
        elif row_id in seen:
            reasons.append(f"id {row_id!r} is already used on line {seen[row_id]}")
        else:
            seen[row_id] = line
        method = raw.get("method")
        if method in RESERVED:
            reasons.append(RESERVED[method].removeprefix("RealEdit: "))
        elif method not in METHODS:
            reasons.append(f"unknown method {method!r} (methods: {', '.join(METHODS)})")
        else:
            reasons += _check_row(_resolve(raw, path.parent), METHODS[method], default_steps, ip2p)
        if reasons:
            problems.append(Problem(line, row_id if isinstance(row_id, str) else None, tuple(reasons)))
        else:
            rows.append(Row.from_dict({**_resolve(raw, path.parent), "line": line, "id": row_id}))
    return rows, problems

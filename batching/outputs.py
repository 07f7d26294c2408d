"""What a batch run writes, atomically: per row a folder of PNGs and ``record.json``; ``summary.json`` and
``contact_sheet.html`` for the run.

Every file is written to a temporary name in its own folder and moved into place with ``os.replace``
(atomic on POSIX and Windows), so a kill leaves either the old file or the new one, never half of one.
A row's ``record.json`` is written last: a row is finished when its record says ``ok``, was made from the
same row and model (:meth:`~.manifest.Row.key`), and every file it lists exists.
"""

from __future__ import annotations

import html
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..hosts.image_files import quantise

RECORD = "record.json"
SUMMARY = "summary.json"
CONTACT_SHEET = "contact_sheet.html"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def png_bytes(image: torch.Tensor) -> bytes:
    """(H, W, 3) or (H, W) float in [0, 1] -> PNG bytes (8-bit, rounded; no timestamp chunks)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(quantise(image).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, (json.dumps(data, indent=1, sort_keys=True, default=str) + "\n").encode())


def row_dir(out: Path, row_id: str) -> Path:
    return out / "rows" / row_id


def read_record(out: Path, row_id: str) -> dict | None:
    try:
        return json.loads((row_dir(out, row_id) / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_done(out: Path, row_id: str, key: str) -> bool:
    """Whether the row finished before with the same inputs and model, and its files are all there."""
    record = read_record(out, row_id)
    if record is None or record.get("status") != "ok" or record.get("key") != key:
        return False
    folder = row_dir(out, row_id)
    return all((folder / name).is_file() for name in record.get("files", []))


def write_row(out: Path, row_id: str, images: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
              record: dict[str, Any]) -> dict[str, Any]:
    """The row's PNGs (``edit.png``, other images, ``mask_<name>.png``), then its record (listing them)."""
    folder = row_dir(out, row_id)
    files = []
    for name, image in images.items():
        atomic_write(folder / f"{name}.png", png_bytes(image))
        files.append(f"{name}.png")
    for name, mask in masks.items():
        atomic_write(folder / f"mask_{name}.png", png_bytes(mask))
        files.append(f"mask_{name}.png")
    record = {**record, "files": files}
    write_json(folder / RECORD, record)
    return record


def write_error(out: Path, row_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """A failed row's record (status ``error``, the message and traceback); re-runs retry it."""
    write_json(row_dir(out, row_id) / RECORD, record)
    return record


# -- the run's summary ------------------------------------------------------------------------------------------
def _rel(path: str | None, out: Path) -> str | None:
    return None if not path else os.path.relpath(path, out)


def _cell_images(record: dict, out: Path) -> str:
    folder = row_dir(out, record["id"]).relative_to(out)
    cells = []
    for name in record.get("files", []):
        src = html.escape(str(folder / name))
        cells.append(f'<figure><a href="{src}"><img src="{src}" width="128"></a><figcaption>'
                     f"{html.escape(name.removesuffix('.png'))}</figcaption></figure>")
    return "".join(cells)


def _text(record: dict) -> str:
    row = record.get("row", {})
    parts = [f"<b>{k}</b>: {html.escape(str(row[k]))}" for k in ("prompt", "target", "instruction", "word")
             if row.get(k)]
    if record.get("scores"):
        parts.append("<b>scores</b>: " + html.escape(", ".join(f"{k} {v:.4g}" for k, v in record["scores"].items())))
    if record.get("error"):
        parts.append(f'<span class="error">{html.escape(record["error"])}</span>')
    return "<br>".join(parts)


def contact_sheet(records: Iterable[dict], out: Path, title: str, invalid: Iterable[dict] = ()) -> str:
    """One table row per manifest row: source photo, every output image and mask, prompts, scores, errors;
    above it the rows that were not run because they are invalid."""
    lines = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font:13px sans-serif} td{vertical-align:top;border-top:1px solid #ccc;padding:4px}"
        " figure{display:inline-block;margin:2px;text-align:center} .error{color:#b00} img{image-rendering:pixelated}"
        "</style>",
        f"<h1>{html.escape(title)}</h1>",
        *(f'<p class="error">line {p["line"]} ({html.escape(str(p.get("id")))}) not run: '
          f'{html.escape("; ".join(p["reasons"]))}</p>' for p in invalid),
        "<table><tr><th>id</th><th>method</th><th>status</th><th>source</th><th>outputs</th><th>text</th></tr>",
    ]
    for record in records:
        source = _rel(record.get("row", {}).get("image"), out)
        src_cell = f'<img src="{html.escape(source)}" width="128">' if source else ""
        lines.append(f"<tr><td>{html.escape(record['id'])}</td><td>{html.escape(record.get('method', ''))}</td>"
                     f"<td>{html.escape(record.get('status', ''))}</td><td>{src_cell}</td>"
                     f"<td>{_cell_images(record, out)}</td><td>{_text(record)}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict[str, Any], records: list[dict]) -> None:
    """``summary.json`` (the run's counts, speed, invalid rows and every row's record) and the contact sheet."""
    write_json(out / SUMMARY, {**summary, "rows": records})
    sheet = contact_sheet(records, out, f"RealEdit batch: {summary.get('manifest')}", summary.get("invalid", ()))
    atomic_write(out / CONTACT_SHEET, sheet.encode())

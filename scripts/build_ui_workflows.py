"""Generate the UI-format workflows (what users drag into ComfyUI) from their API-format twins.

The API twins in ``api_workflows/`` are the source of truth: tests execute them. This script writes
``example_workflows/<name>.json`` in ComfyUI's UI format (nodes, links, widget values in the order of each
node's inputs): the folder ComfyUI's template browser lists. The twins live outside every folder name the
browser scans (example_workflows, example(s), workflow(s)), so each template is listed once. Run it after
editing a twin; ``tests/test_workflows.py`` fails when the two disagree.

Also from the twin (``testbed/workflow_format.py`` says how): the layout (a column block and a titled group
per stage, node sizes from ``testbed/ui_node_sizes.json``), node titles (the twin's ``_meta.title``), model
metadata for the front end's download dialog, and a Note: ``api_workflows/<name>.md`` (what the workflow
does, what to connect, which model family, the settings worth changing first) above a generated list of
the photos and model files it needs. A twin without its ``.md`` gets the generated list only (and a
warning). ``--thumbnails`` also draws ``example_workflows/<name>.jpg`` (the template browser's thumbnail) as
a diagram of the workflow's stages; ``--thumbnails-from DIR`` takes the cards the demo made from its real
outputs on the shapes world (``DIR/<name>.jpg``, e.g. ``out/demo/thumbnails`` after ``python -m
realedit.demo`` with ComfyUI) and draws the diagram only for a workflow the demo has no card for.

    .venv/bin/python scripts/build_ui_workflows.py [--thumbnails | --thumbnails-from DIR] [names...]

Generate on the oldest supported ComfyUI (0.3.64): a newer one adds slots some core nodes gained (0.33 gave
Save Image an IMAGE output), which the front end rebuilds from the server anyway.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT.parent))


from realedit.testbed.shapes_world.contact_sheet import CARD_SIZE as THUMB_SIZE  # noqa: E402  (after the path)
from realedit.testbed.shapes_world.contact_sheet import fit_text  # noqa: E402


def _label(node: dict, display_names: dict[str, str]) -> str:
    return node.get("title") or display_names.get(node["type"], node["type"]).removeprefix("RealEdit ")


def draw_thumbnail(name: str, ui: dict, note: str | None, display_names: dict[str, str]) -> Image.Image:
    """A labelled diagram of the workflow: its stages left to right (the group colours), the nodes of each
    by title, and the model family from the note's first line. For workflows without a demo card (one that
    needs weights the shapes world has no stand-in for)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = THUMB_SIZE
    image = Image.new("RGB", THUMB_SIZE, "#1e1e22")
    draw = ImageDraw.Draw(image)
    title_font, stage_font, node_font = (ImageFont.load_default(size=s) for s in (24, 15, 11))
    heading = (note or name).splitlines()[0]
    size = 24
    while draw.textlength(heading, font=title_font) > width - 32 and size > 12:
        size -= 1
        title_font = ImageFont.load_default(size=size)
    draw.text((16, 12 + (24 - size) / 2), heading, font=title_font, fill="#f0f0f0")
    groups = ui["groups"]
    top, bottom, gap = 58, height - 16, 14
    column = (width - 32 - gap * (len(groups) - 1)) / max(len(groups), 1)
    for i, group in enumerate(groups):
        x0 = 16 + i * (column + gap)
        gx, gy, gw, gh = group["bounding"]
        members = [n for n in ui["nodes"] if n["type"] != "Note"
                   and gx <= n["pos"][0] < gx + gw and gy <= n["pos"][1] < gy + gh]
        members.sort(key=lambda n: (n["pos"][0], n["pos"][1]))
        draw.rounded_rectangle((x0, top, x0 + column, bottom), radius=8, fill=group["color"])
        stage = group["title"].split(":")[0]
        draw.text((x0 + 7, top + 6), stage, font=stage_font, fill="#ffffff")
        y = top + 30
        for node in members:
            label = fit_text(draw, _label(node, display_names), node_font, column - 16)
            if y + 18 > bottom - 4:
                draw.text((x0 + 8, y), "…", font=node_font, fill="#ffffff")
                break
            draw.rounded_rectangle((x0 + 5, y, x0 + column - 5, y + 16), radius=3, fill="#2b2b30")
            draw.text((x0 + 9, y + 2), label, font=node_font, fill="#e8e8e8")
            y += 19
        if i + 1 < len(groups):
            mid = (top + bottom) / 2
            draw.polygon([(x0 + column + 2, mid - 6), (x0 + column + gap - 2, mid), (x0 + column + 2, mid + 6)],
                         fill="#f0f0f0")
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: every api_workflows/*.json)")
    parser.add_argument("--thumbnails", action="store_true", help="also draw example_workflows/<name>.jpg")
    parser.add_argument("--thumbnails-from", type=Path, metavar="DIR",
                        help="take example_workflows/<name>.jpg from the demo's cards DIR/<name>.jpg (a diagram "
                             "where there is none)")
    args = parser.parse_args()

    from realedit.testbed.comfy_runner import load_comfy_nodes, load_pack
    from realedit.testbed.workflow_format import api_to_ui, unknown_model_files

    load_comfy_nodes()
    load_pack()
    import nodes

    twins = ROOT / "api_workflows"
    paths = [twins / f"{n}.json" for n in args.names] or sorted(twins.glob("*.json"))
    for api_path in paths:
        twin = json.loads(api_path.read_text())
        note_path = api_path.with_suffix(".md")
        if not note_path.is_file():
            print(f"warning: no {note_path.relative_to(ROOT)}: the note lists only what {api_path.stem} needs")
        for name in unknown_model_files(twin):
            print(f"warning: {api_path.stem}: no download address for {name} (add it to MODEL_FILES in "
                  "testbed/workflow_format.py)")
        note = note_path.read_text().strip() if note_path.is_file() else None
        ui = api_to_ui(twin, nodes.NODE_CLASS_MAPPINGS, note=note)
        target = ROOT / "example_workflows" / api_path.name
        target.write_text(json.dumps(ui, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {target.relative_to(ROOT)}")
        if args.thumbnails or args.thumbnails_from:
            thumb = target.with_suffix(".jpg")
            card = args.thumbnails_from / thumb.name if args.thumbnails_from else None
            if card is not None and card.is_file():
                copy_card(card, thumb)
                made = f"the demo's {card}"
            else:
                draw_thumbnail(api_path.stem, ui, note, nodes.NODE_DISPLAY_NAME_MAPPINGS).save(thumb, quality=88)
                made = "a diagram"
            print(f"wrote {thumb.relative_to(ROOT)} ({made})")


def copy_card(card: Path, thumb: Path) -> None:
    """Copy a demo card to ``thumb``, refusing one that is not a THUMB_SIZE JPEG."""
    import shutil

    from PIL import Image

    with Image.open(card) as image:
        if image.format != "JPEG" or image.size != THUMB_SIZE:
            raise SystemExit(f"{card}: a card must be a {THUMB_SIZE[0]}x{THUMB_SIZE[1]} JPEG, got {image.format} "
                             f"{image.size[0]}x{image.size[1]}")
    shutil.copyfile(card, thumb)


if __name__ == "__main__":
    main()

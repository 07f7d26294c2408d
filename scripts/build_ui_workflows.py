"""Generate the UI-format workflows (what users drag into ComfyUI) from their API-format twins.

The API twins in ``api_workflows/`` are the source of truth: tests execute them. This script writes
``example_workflows/<name>.json`` in ComfyUI's UI format (nodes, links, widget values in the order of each
node's inputs): the folder ComfyUI's template browser lists. The twins live outside every folder name the
browser scans (example_workflows, example(s), workflow(s)), so each template is listed once. Run it after
editing a twin; ``tests/test_workflows.py`` fails when the two disagree.

    .venv/bin/python scripts/build_ui_workflows.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT.parent))


def main() -> None:
    from realedit.testbed.comfy_runner import load_comfy_nodes, load_pack
    from realedit.testbed.workflow_format import api_to_ui

    load_comfy_nodes()
    load_pack()
    import nodes

    for api_path in sorted((ROOT / "api_workflows").glob("*.json")):
        ui = api_to_ui(json.loads(api_path.read_text()), nodes.NODE_CLASS_MAPPINGS)
        target = ROOT / "example_workflows" / api_path.name
        target.write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

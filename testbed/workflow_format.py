"""Convert between ComfyUI's API workflow format and its UI (graph) format.

Only what this pack's workflows use: every input is a link or a widget value (no widgets converted
to sockets), one output slot per link. Node classes are read the way the front end reads
``/object_info``: ``INPUT_TYPES()`` order gives the widget order, ``RETURN_TYPES`` the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH, ROW_HEIGHT = 360, 260


def _inputs(node_class: type) -> list[tuple[str, str, dict]]:
    spec = node_class.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind = "COMBO" if isinstance(value[0], list) else value[0]
            out.append((name, kind, value[1] if len(value) > 1 else {}))
    return out


def _is_widget(kind: str, options: dict) -> bool:
    return kind in WIDGET_TYPES and not options.get("forceInput")


def _output_names(node_class: type) -> list[str]:
    names = getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES
    return [str(n) for n in names]


def _depths(workflow: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            links = [v for v in workflow[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((visit(str(v[0])) for v in links), default=-1)
        return depth[node_id]

    for node_id in workflow:
        visit(node_id)
    return depth


def api_to_ui(workflow: Mapping[str, Mapping[str, Any]], classes: Mapping[str, type]) -> dict[str, Any]:
    """The UI-format graph of an API workflow, laid out in columns by dependency depth."""
    depth = _depths(workflow)
    rows: dict[int, int] = {}
    links: list[list[Any]] = []
    ui_nodes = {}
    for order, node_id in enumerate(sorted(workflow, key=lambda n: (depth[n], int(n)))):
        node = workflow[node_id]
        node_class = classes[node["class_type"]]
        column = depth[node_id]
        row = rows.get(column, 0)
        rows[column] = row + 1
        ui_inputs, widgets = [], []
        for name, kind, options in _inputs(node_class):
            value = node["inputs"].get(name)
            if _is_widget(kind, options):
                widgets.append(value)
                if options.get("control_after_generate"):
                    widgets.append("fixed")
                if options.get("image_upload"):
                    widgets.append("image")
            elif value is not None or name in node["inputs"]:
                link_id = len(links) + 1
                links.append([link_id, int(value[0]), int(value[1]), int(node_id), len(ui_inputs), kind])
                ui_inputs.append({"name": name, "type": kind, "link": link_id})
        types = [str(t) for t in node_class.RETURN_TYPES]
        ui_nodes[node_id] = {
            "id": int(node_id), "type": node["class_type"], "pos": [column * COLUMN_WIDTH, row * ROW_HEIGHT],
            "size": [320, 120], "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs,
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (n, t) in enumerate(zip(_output_names(node_class), types))],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        }
    for link_id, origin, slot, _target, _target_slot, _kind in links:
        ui_nodes[str(origin)]["outputs"][slot]["links"].append(link_id)
    return {
        "last_node_id": max(int(n) for n in workflow), "last_link_id": len(links),
        "nodes": [ui_nodes[n] for n in sorted(ui_nodes, key=int)], "links": links,
        "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }


def ui_to_api(ui: Mapping[str, Any], classes: Mapping[str, type]) -> dict[str, dict[str, Any]]:
    """The API workflow a UI graph queues (what the front end sends to /prompt)."""
    link_origin = {link[0]: (str(link[1]), link[2]) for link in ui["links"]}
    api: dict[str, dict[str, Any]] = {}
    for node in ui["nodes"]:
        node_class = classes[node["type"]]
        widgets = list(node.get("widgets_values", []))
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs: dict[str, Any] = {}
        for name, kind, options in _inputs(node_class):
            if name in linked:
                origin, slot = link_origin[linked[name]]
                inputs[name] = [origin, slot]
            elif _is_widget(kind, options) and widgets:
                inputs[name] = widgets.pop(0)
                if options.get("control_after_generate") or options.get("image_upload"):
                    widgets.pop(0)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api

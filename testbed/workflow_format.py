"""Convert between ComfyUI's API workflow format and its UI (graph) format.

Only what this pack's workflows use: every input is a link or a widget value, one output slot per link.
A widget fed by a link (e.g. a String primitive typed once feeding CLIP Text Encode's ``text`` and
Instruction Action's ``instruction``) is a socket input with ``"widget": {"name": ...}``, as the front
end saves it, and keeps a slot in ``widgets_values`` (its default), which the API side skips. Node
classes are read the way the front end reads ``/object_info``: ``INPUT_TYPES()`` order gives the widget
order, ``RETURN_TYPES`` the outputs.
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


def _widget_values(value: Any, options: dict) -> list[Any]:
    """A widget's entries in ``widgets_values``: its value, then the extra control values the front end adds."""
    extras = ["fixed"] if options.get("control_after_generate") else []
    return [value, *extras, *(["image"] if options.get("image_upload") else [])]


def _absent_widget_value(node_id: str, class_type: str, name: str, options: dict) -> Any:
    """The value a widget the API twin leaves out shows (and queues): its default, as on a freshly added node.

    The front end sends every widget's value to ``/prompt``, so such a UI file queues this default
    where the twin has nothing (``tests/test_workflows.py`` then names the input to add to the twin).
    Writing ``null`` instead would queue ``null``, which ComfyUI rejects for numbers and turns into
    the string ``"None"`` for text.
    """
    if "default" not in options:
        raise ValueError(f"node {node_id} ({class_type}): widget input {name!r} has no value in the API workflow "
                         "and no default; add it to the workflow")
    return options["default"]


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
            linked = isinstance(value, list)
            if _is_widget(kind, options):
                if linked:
                    shown = options.get("default", "" if kind == "STRING" else None)
                elif name in node["inputs"]:
                    shown = value
                else:
                    shown = _absent_widget_value(node_id, node["class_type"], name, options)
                widgets.extend(_widget_values(shown, options))
            if linked:
                link_id = len(links) + 1
                links.append([link_id, int(value[0]), int(value[1]), int(node_id), len(ui_inputs), kind])
                ui_input = {"name": name, "type": kind, "link": link_id}
                if _is_widget(kind, options):
                    ui_input["widget"] = {"name": name}
                ui_inputs.append(ui_input)
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
            has_value = _is_widget(kind, options) and bool(widgets)
            if has_value:  # a linked widget keeps its slot in widgets_values: consume it either way
                value = widgets.pop(0)
                del widgets[:len(_widget_values(value, options)) - 1]
            if name in linked:
                origin, slot = link_origin[linked[name]]
                inputs[name] = [origin, slot]
            elif has_value:
                inputs[name] = value
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api

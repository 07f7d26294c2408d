"""Convert between ComfyUI's API workflow format and its UI (graph) format, and lay the UI graph out.

Only what this pack's workflows use: every input is a link or a widget value, one output slot per link.
A widget fed by a link (e.g. a String primitive typed once feeding CLIP Text Encode's ``text`` and
Instruction Action's ``instruction``) is a socket input with ``"widget": {"name": ...}``, as the front
end saves it, and keeps a slot in ``widgets_values`` (the primitive's text, which newer front ends show
greyed out, else the widget's default), which the API side skips. Node
classes are read the way the front end reads ``/object_info``: ``INPUT_TYPES()`` order gives the widget
order, ``RETURN_TYPES`` the outputs.

What only the UI file has, none of which the front end queues:
- the layout: one column block per pipeline stage (inputs, inversion, edit, masks, outputs), each in a
  titled group, nodes sized from ``ui_node_sizes.json`` (sizes the front end itself computes, measured by
  ``scripts/check_ui_workflows.py --measure-sizes``), image nodes at their size with a preview shown;
- a Note node (``Note`` is a front-end-only class: ``ui_to_api`` skips it, as the front end does);
- model metadata on each loader (``properties.models`` and the workflow's ``models`` list: name, url,
  directory), which the front end's missing-models dialog reads to offer a download.
Node titles are shared with the API twin: ``_meta.title`` there, ``title`` here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_TYPES = {"Note", "MarkdownNote"}  # front-end-only nodes: never queued, not in NODE_CLASS_MAPPINGS
SIZES_FILE = Path(__file__).resolve().parent / "ui_node_sizes.json"

# ---------------------------------------------------------------- stages

STAGES = ("inputs", "inversion", "edit", "masks", "outputs")
STAGE_TITLES = {"inputs": "1. inputs: models, photos, prompts", "inversion": "2. inversion",
                "edit": "3. edit", "masks": "4. masks", "outputs": "5. outputs"}
STAGE_COLORS = {"inputs": "#3f789e", "inversion": "#8A8", "edit": "#b06634", "masks": "#a1309b",
                "outputs": "#3f5f8a"}
STAGE_OF_CLASS = {
    "CheckpointLoaderSimple": "inputs", "LoadImage": "inputs", "RealEditSAMLoader": "inputs",
    "CLIPTextEncode": "inputs", "EmptyLatentImage": "inputs", "VAEEncode": "inputs",
    "RealEditInstructionAction": "inputs",
    "RealEditDDIMInvert": "inversion", "RealEditReferenceFeatures": "inversion",
    "RealEditInvertSourceAndReference": "inversion", "RealEditNullTextInversion": "inversion",
    "RealEditTargetTextInversion": "inversion",
    "KSampler": "edit", "KSamplerAdvanced": "edit", "VAEDecode": "edit", "RealEditSpecRefEditSampler": "edit",
    "RealEditBaretEditSampler": "edit", "RealEditApplySRAttention": "edit",
    "RealEditAttentionMapRecorder": "edit", "RealEditAttentionProbe": "edit", "RealEditIP2PEditMask": "edit",
    "RealEditRegionIoURefine": "masks", "RealEditFFTEdgeSmooth": "masks", "RealEditWordAttentionMap": "masks",
    "RealEditKeepUneditedPixels": "masks", "MaskToImage": "masks",
    "SaveImage": "outputs", "PreviewImage": "outputs", "PreviewAny": "outputs", "RealEditProbeReport": "outputs",
}
# Fallback for a class not in the table: the first keyword found in its lower-cased name.
STAGE_KEYWORDS = (("load", "inputs"), ("primitive", "inputs"), ("textencode", "inputs"), ("invert", "inversion"),
                  ("inversion", "inversion"), ("save", "outputs"), ("preview", "outputs"), ("report", "outputs"),
                  ("mask", "masks"), ("refine", "masks"), ("smooth", "masks"), ("keep", "masks"))
CONVERTERS = {"VAEDecode", "MaskToImage"}  # join the outputs block when they feed only output nodes
IMAGE_NODES = {"LoadImage", "SaveImage", "PreviewImage"}  # measured with an image shown

# ---------------------------------------------------------------- models the workflows expect

# file name -> (models/ folder, download address). Both front ends offer a download button for an address on
# huggingface.co or civitai.com, and 1.27 only for a file name ending .safetensors / .sft; every file here qualifies.
# SAM: Meta's own Hugging Face copies (facebook/sam-vit-*, transformers' SamModel layout, which
# masks/sam_auto.py converts on load) under a name that keeps the kind; the official .pth files
# (dl.fbaipublicfiles.com: no button on either front end) load as well and the note names them (SAM_OFFICIAL).
MODEL_FILES: dict[str, tuple[str, str]] = {
    "v1-5-pruned-emaonly.safetensors": ("checkpoints", "https://huggingface.co/stable-diffusion-v1-5/"
                                        "stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors"),
    "sd_xl_base_1.0.safetensors": ("checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/"
                                   "resolve/main/sd_xl_base_1.0.safetensors"),
    "instruct-pix2pix-00-22000.safetensors": ("checkpoints", "https://huggingface.co/timbrooks/instruct-pix2pix/"
                                              "resolve/main/instruct-pix2pix-00-22000.safetensors"),
    "sam_vit_h_hf.safetensors": ("sams", "https://huggingface.co/facebook/sam-vit-huge/resolve/main/model.safetensors"),
    "sam_vit_l_hf.safetensors": ("sams", "https://huggingface.co/facebook/sam-vit-large/resolve/main/model.safetensors"),
    "sam_vit_b_hf.safetensors": ("sams", "https://huggingface.co/facebook/sam-vit-base/resolve/main/model.safetensors"),
    "qwen_image_edit_fp8_e4m3fn.safetensors": (
        "diffusion_models", "https://huggingface.co/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files/"
        "diffusion_models/qwen_image_edit_fp8_e4m3fn.safetensors"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": (
        "text_encoders", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/"
        "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"),
    "qwen_image_vae.safetensors": (
        "vae", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/"
        "qwen_image_vae.safetensors"),
}
# The official segment-anything file of each Hugging Face SAM above: (name, address), the note's alternative.
SAM_OFFICIAL: dict[str, tuple[str, str]] = {
    f"sam_{kind}_hf.safetensors": (official, f"https://dl.fbaipublicfiles.com/segment_anything/{official}")
    for kind, official in (("vit_h", "sam_vit_h_4b8939.pth"), ("vit_l", "sam_vit_l_0b3195.pth"),
                           ("vit_b", "sam_vit_b_01ec64.pth"))}
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")

# ---------------------------------------------------------------- layout constants (canvas pixels)

TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar sits above a node's pos
NODE_GAP_X, NODE_GAP_Y = 40, 30
GROUP_PAD, GROUP_TITLE, GROUP_GAP = 20, 40, 50
MIN_COLUMN_HEIGHT = 1100
TITLE_CHAR_WIDTH = 9  # a generous width per title character (the front end widens a node for its title)
NOTE_SIZE = (460, 520)
NOTE_LINE_CHARS, NOTE_LINE_HEIGHT = 55, 17  # the note's text box wraps about this many characters a line
PREVIEW_WIDTH, PREVIEW_ROOM = 320, 100  # image nodes: at least this wide, this much taller than measured


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


# INT widgets the front end gives a control_after_generate widget even when the node does not ask for one
# (its INT widget constructor: ``control_after_generate ?? ["seed", "noise_seed"].includes(name)``).
SEED_WIDGET_NAMES = ("seed", "noise_seed")


def _has_generate_control(name: str, kind: str, options: dict) -> bool:
    flag = options.get("control_after_generate")
    return bool(flag) if flag is not None else kind == "INT" and name in SEED_WIDGET_NAMES


def _widget_values(value: Any, name: str, kind: str, options: dict) -> list[Any]:
    """A widget's entries in ``widgets_values``: its value, then the extra control values the front end adds."""
    extras = ["fixed"] if _has_generate_control(name, kind, options) else []
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


def _linked_widget_value(workflow: Mapping[str, Mapping[str, Any]], link: list[Any], kind: str, options: dict) -> Any:
    """What a widget fed by a link shows (greyed out; it is not queued): the text of the String primitive that
    feeds it, so the node reads as it will run, else the widget's default."""
    origin = workflow[str(link[0])]
    value = origin["inputs"].get("value")
    if origin["class_type"].startswith("Primitive") and kind == "STRING" and isinstance(value, str):
        return value
    return options.get("default", "" if kind == "STRING" else None)


def _output_names(node_class: type) -> list[str]:
    names = getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES
    return [str(n) for n in names]


def _links_of(node: Mapping[str, Any]) -> list[list[Any]]:
    return [v for v in node["inputs"].values() if isinstance(v, list)]


def _depths(workflow: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            depth[node_id] = 1 + max((visit(str(v[0])) for v in _links_of(workflow[node_id])), default=-1)
        return depth[node_id]

    for node_id in workflow:
        visit(node_id)
    return depth


# ---------------------------------------------------------------- stages and sizes


def class_stage(class_type: str, has_links: bool = True) -> str:
    """The stage of a node class: the table, else a keyword of its name, else inputs (no links) or edit."""
    if class_type in STAGE_OF_CLASS:
        return STAGE_OF_CLASS[class_type]
    name = class_type.lower()
    for keyword, stage in STAGE_KEYWORDS:
        if keyword in name:
            return stage
    return "edit" if has_links else "inputs"


def node_stages(workflow: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Each node's stage; a VAE Decode / Mask To Image whose every consumer is an output joins the outputs."""
    stages = {nid: class_stage(node["class_type"], bool(_links_of(node))) for nid, node in workflow.items()}
    consumers: dict[str, list[str]] = {nid: [] for nid in workflow}
    for nid, node in workflow.items():
        for origin, _slot in _links_of(node):
            consumers[str(origin)].append(nid)
    for nid, node in workflow.items():
        users = consumers[nid]
        if node["class_type"] in CONVERTERS and users and all(stages[u] == "outputs" for u in users):
            stages[nid] = "outputs"
    return stages


def load_sizes(path: Path = SIZES_FILE) -> dict[str, dict[str, list[int]]]:
    """Per node class: ``size`` (computeSize after load, the largest over the measured front ends) and, for
    image nodes, ``with_image`` (the size once a photo or an output is shown)."""
    return json.loads(path.read_text())["sizes"] if path.is_file() else {}


def _estimated_size(node_class: type | None) -> list[int]:
    """A size for a class the table lacks: a slot row per input/output, a widget row per widget."""
    if node_class is None:
        return [320, 120]
    rows = max(len(_inputs(node_class)), len(node_class.RETURN_TYPES))
    return [360, 40 + 28 * rows]


def node_size(class_type: str, title: str | None, sizes: Mapping[str, Mapping[str, list[int]]],
              node_class: type | None) -> list[int]:
    entry = sizes.get(class_type, {})
    width, height = entry.get("with_image") or entry.get("size") or _estimated_size(node_class)
    if "with_image" in entry:  # a bigger preview than the front end's minimum
        width, height = max(width, PREVIEW_WIDTH), height + PREVIEW_ROOM
    if title:
        width = max(width, TITLE_CHAR_WIDTH * len(title) + 60)
    return [int(width), int(height)]


def _columns(order: list[str], sizes: Mapping[str, list[int]], max_height: int) -> list[list[str]]:
    """Fill columns top to bottom in ``order``, a new column when the next node would pass ``max_height``."""
    columns: list[list[str]] = [[]]
    height = 0
    for nid in order:
        box = sizes[nid][1] + TITLE_HEIGHT
        if columns[-1] and height + box > max_height:
            columns.append([])
            height = 0
        columns[-1].append(nid)
        height += box + NODE_GAP_Y
    return columns


def layout(workflow: Mapping[str, Mapping[str, Any]], sizes: Mapping[str, list[int]], origin_x: int = 0
           ) -> tuple[dict[str, list[int]], list[dict[str, Any]]]:
    """Node positions and one titled group per stage, stages left to right, nodes never overlapping.

    ``sizes``: the size each node will have (body, without the title bar). A node's box is
    ``[x, y - TITLE_HEIGHT, w, h + TITLE_HEIGHT]``; the group box holds its nodes' boxes plus padding and its title.
    """
    depth, stages = _depths(workflow), node_stages(workflow)
    tallest = max(h + TITLE_HEIGHT for _w, h in sizes.values())
    max_height = max(MIN_COLUMN_HEIGHT, tallest)
    positions: dict[str, list[int]] = {}
    groups = []
    x = origin_x
    top = GROUP_TITLE + GROUP_PAD + TITLE_HEIGHT  # the first node's pos.y inside a group starting at y=0
    for stage in STAGES:
        members = sorted((n for n in workflow if stages[n] == stage), key=lambda n: (depth[n], int(n)))
        if not members:
            continue
        group_x, column_x, bottom = x, x + GROUP_PAD, 0
        for column in _columns(members, sizes, max_height):
            y = top
            for nid in column:
                positions[nid] = [column_x, y]
                bottom = max(bottom, y + sizes[nid][1])
                y += sizes[nid][1] + TITLE_HEIGHT + NODE_GAP_Y
            column_x += max(sizes[n][0] for n in column) + NODE_GAP_X
        right = column_x - NODE_GAP_X + GROUP_PAD
        groups.append({"id": len(groups) + 1, "title": STAGE_TITLES[stage],
                       "bounding": [group_x, 0, right - group_x, bottom + GROUP_PAD],
                       "color": STAGE_COLORS[stage], "font_size": 24, "flags": {}})
        x = right + GROUP_GAP
    return positions, groups


# ---------------------------------------------------------------- models and the note


def model_metadata(workflow: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict[str, str]]]:
    """Per node id, the ``{name, url, directory}`` of each model file its widgets name (known files only)."""
    found: dict[str, list[dict[str, str]]] = {}
    for nid, node in workflow.items():
        for value in node["inputs"].values():
            if isinstance(value, str) and value in MODEL_FILES:
                directory, url = MODEL_FILES[value]
                found.setdefault(nid, []).append({"name": value, "url": url, "directory": directory})
    return found


def unknown_model_files(workflow: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Model-like file names in the workflow with no entry in ``MODEL_FILES`` (no download offered)."""
    return sorted({v for node in workflow.values() for v in node["inputs"].values()
                   if isinstance(v, str) and v.endswith(MODEL_SUFFIXES) and v not in MODEL_FILES})


def needs_text(workflow: Mapping[str, Mapping[str, Any]]) -> str:
    """The note's generated part: the photos to load and the model files to put where."""
    photos = sorted({node["inputs"]["image"] for node in workflow.values()
                     if node["class_type"] == "LoadImage" and isinstance(node["inputs"].get("image"), str)})
    lines = ["Needs:"]
    if photos:
        lines.append("- photos (Load Image: upload your own): " + ", ".join(photos))
    for name in sorted({m["name"] for models in model_metadata(workflow).values() for m in models}):
        directory, url = MODEL_FILES[name]
        lines.append(f"- models/{directory}/{name}\n  {url}")
        saved_as = url.rsplit("/", 1)[-1]
        if saved_as != name:
            lines.append(f"  (a browser saves it as {saved_as}: rename it to {name})")
        if name in SAM_OFFICIAL:
            official, official_url = SAM_OFFICIAL[name]
            lines.append(f"  or the official {official} (same folder, loads the same; pick it in the SAM Loader)\n"
                         f"  {official_url}")
    lines += [f"- {name} (in the folder its loader reads)" for name in unknown_model_files(workflow)]
    return "\n".join(lines)


# ---------------------------------------------------------------- API -> UI


def api_to_ui(workflow: Mapping[str, Mapping[str, Any]], classes: Mapping[str, type], note: str | None = None,
              sizes: Mapping[str, Mapping[str, list[int]]] | None = None) -> dict[str, Any]:
    """The UI-format graph of an API workflow: stage groups, a note (``note`` above the generated needs),
    node sizes from the measured table (``load_sizes()`` unless given), model metadata on the loaders."""
    sizes = load_sizes() if sizes is None else sizes
    depth = _depths(workflow)
    titles = {nid: node.get("_meta", {}).get("title") for nid, node in workflow.items()}
    node_sizes = {nid: node_size(node["class_type"], titles[nid], sizes, classes.get(node["class_type"]))
                  for nid, node in workflow.items()}
    note_width = max(NOTE_SIZE[0], sizes.get("Note", {}).get("size", [0])[0])
    positions, groups = layout(workflow, node_sizes, origin_x=note_width + GROUP_GAP)
    models = model_metadata(workflow)
    links: list[list[Any]] = []
    ui_nodes = {}
    for order, node_id in enumerate(sorted(workflow, key=lambda n: (depth[n], int(n)))):
        node = workflow[node_id]
        node_class = classes[node["class_type"]]
        ui_inputs, widgets = [], []
        for name, kind, options in _inputs(node_class):
            value = node["inputs"].get(name)
            linked = isinstance(value, list)
            if _is_widget(kind, options):
                if linked:
                    shown = _linked_widget_value(workflow, value, kind, options)
                elif name in node["inputs"]:
                    shown = value
                else:
                    shown = _absent_widget_value(node_id, node["class_type"], name, options)
                widgets.extend(_widget_values(shown, name, kind, options))
            if linked:
                link_id = len(links) + 1
                links.append([link_id, int(value[0]), int(value[1]), int(node_id), len(ui_inputs), kind])
                ui_input = {"name": name, "type": kind, "link": link_id}
                if _is_widget(kind, options):
                    ui_input["widget"] = {"name": name}
                ui_inputs.append(ui_input)
        types = [str(t) for t in node_class.RETURN_TYPES]
        properties: dict[str, Any] = {"Node name for S&R": node["class_type"]}
        if node_id in models:
            properties["models"] = models[node_id]
        ui_node = {
            "id": int(node_id), "type": node["class_type"], "pos": positions[node_id], "size": node_sizes[node_id],
            "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs,
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (n, t) in enumerate(zip(_output_names(node_class), types))],
            "properties": properties, "widgets_values": widgets,
        }
        if titles[node_id]:
            ui_node["title"] = titles[node_id]
        ui_nodes[node_id] = ui_node
    for link_id, origin, slot, _target, _target_slot, _kind in links:
        ui_nodes[str(origin)]["outputs"][slot]["links"].append(link_id)
    note_id = max(int(n) for n in workflow) + 1
    text = "\n\n".join(part for part in (note, needs_text(workflow)) if part)
    note_height = max(NOTE_SIZE[1], NOTE_LINE_HEIGHT * sum(1 + len(line) // NOTE_LINE_CHARS
                                                            for line in text.splitlines()) + 40)
    note_node = {"id": note_id, "type": "Note", "title": "read me", "pos": [0, TITLE_HEIGHT],
                 "size": [note_width, note_height], "flags": {}, "order": len(ui_nodes), "mode": 0,
                 "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text],
                 "color": "#432", "bgcolor": "#653"}
    all_models = [m for nid in sorted(models, key=int) for m in models[nid]]
    unique = list({(m["name"], m["directory"]): m for m in all_models}.values())
    return {
        "last_node_id": note_id, "last_link_id": len(links),
        "nodes": [ui_nodes[n] for n in sorted(ui_nodes, key=int)] + [note_node], "links": links,
        "groups": groups, "config": {}, "extra": {}, "version": 0.4,
        **({"models": unique} if unique else {}),
    }


# ---------------------------------------------------------------- UI -> API


def ui_to_api(ui: Mapping[str, Any], classes: Mapping[str, type]) -> dict[str, dict[str, Any]]:
    """The API workflow a UI graph queues (what the front end sends to /prompt; notes are not queued, a
    custom node title travels as ``_meta.title``)."""
    link_origin = {link[0]: (str(link[1]), link[2]) for link in ui["links"]}
    api: dict[str, dict[str, Any]] = {}
    for node in ui["nodes"]:
        if node["type"] in NOTE_TYPES:
            continue
        node_class = classes[node["type"]]
        widgets = list(node.get("widgets_values", []))
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs: dict[str, Any] = {}
        for name, kind, options in _inputs(node_class):
            has_value = _is_widget(kind, options) and bool(widgets)
            if has_value:  # a linked widget keeps its slot in widgets_values: consume it either way
                value = widgets.pop(0)
                del widgets[:len(_widget_values(value, name, kind, options)) - 1]
            if name in linked:
                origin, slot = link_origin[linked[name]]
                inputs[name] = [origin, slot]
            elif has_value:
                inputs[name] = value
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            api[str(node["id"])]["_meta"] = {"title": node["title"]}
    return api


def boxes_overlap(a: Iterable[float], b: Iterable[float]) -> bool:
    """Whether two ``[x, y, w, h]`` boxes share an area (touching edges do not count)."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah

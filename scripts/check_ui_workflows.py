"""Load every UI workflow in the real ComfyUI front end and check it queues exactly its API twin.

A manual developer check (not CI: it needs a browser and a ComfyUI checkout). For each
``example_workflows/<name>.json`` it, in a headless Chromium page of a running ComfyUI:

1. uploads a stand-in photo for each Load Image file the workflow names (so previews load), calls
   ``app.loadGraphData(ui)``, shows a stand-in output image on every Save / Preview Image node (as after a
   run), and records missing node types, open dialogs, toasts and notification cards, console
   errors/warnings and page errors raised meanwhile;
2. checks the layout as loaded (photos and outputs shown): no two node boxes overlap, every node but the
   note lies inside one group, there is a note;
3. checks the missing-models dialog (1.2x) or issues panel (1.3x+) lists each model file the workflow names
   with its folder and offers a download button for every one of them;
4. checks every input the server's ``/object_info`` declares for each node (required and optional)
   is on the loaded node: a socket for a link-only input (e.g. ``ref_features``), a widget otherwise;
5. calls ``app.graphToPrompt()`` and compares its ``output`` (what the front end POSTs to
   ``/prompt``, ``_meta`` dropped) with ``api_workflows/<name>.json``: node ids, class types, every
   input (links as ``[node_id, slot]`` and widget values);
6. runs ComfyUI's own ``execution.validate_inputs`` (in a subprocess with the pack's venv; nothing is
   executed) on both prompts and reports validation errors the front end's prompt has and the twin
   has not (missing model/image files fail both and are ignored).

It counts only what the pack causes: not the red mark on a loader whose model file is absent (the server
has no models; the missing-models dialog is checked instead), not a request for a file the check removed,
not the front end's own deprecation warnings (it prints those it ignored).

The server it starts gets the testbed's torchaudio stand-in (``testbed/torchaudio_standin.py``, installed only
where no torchaudio is importable) through a ``sitecustomize`` in a scratch ``PYTHONPATH`` folder: ComfyUI 0.33
imports torchaudio at module level, and a venv without it can run the check all the same. The checkout and the
venv are not touched.

Exit status 0 when every workflow passes, 1 otherwise.

Setup (once): a Chromium and playwright in a venv of their own, e.g.::

    apt-get install -y chromium
    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright

The front end is the one the server's venv pins (``comfyui-frontend-package``); ``--front-end-root`` runs
another one (ComfyUI's own server flag), e.g. the newest from the registry in a venv of its own::

    python3 -m venv /tmp/fe-new && /tmp/fe-new/bin/pip install comfyui-frontend-package
    --front-end-root /tmp/fe-new/lib/python3.11/site-packages/comfyui_frontend_package/static

Usage (from the repo root; the script starts ComfyUI on CPU itself, from ``--comfy``, with the pack linked
into a scratch ``custom_nodes`` folder given by an extra-model-paths file, so the ComfyUI checkout is not
touched, and removes server and scratch after)::

    /tmp/pw/bin/python scripts/check_ui_workflows.py --comfy /opt/ComfyUI --python .venv/bin/python
    /tmp/pw/bin/python scripts/check_ui_workflows.py zone_multi_turn      # some of them
    /tmp/pw/bin/python scripts/check_ui_workflows.py --url http://127.0.0.1:8188  # a running server
    /tmp/pw/bin/python scripts/check_ui_workflows.py --measure-sizes      # rewrite testbed/ui_node_sizes.json

With ``--url`` the script uploads its stand-in images to that server's input folder and changes none of its
settings (on a fresh user the newer front end's template browser may cover the graph in screenshots).

``--measure-sizes`` adds each node class's size, as this front end computes it after load and with an image
shown, to ``testbed/ui_node_sizes.json`` (the largest over the front ends measured so far); run it once per
front end, then ``scripts/build_ui_workflows.py``.

Options: ``--comfy /opt/ComfyUI``, ``--python .venv/bin/python`` (the server's and validator's
interpreter), ``--front-end-root DIR``, ``--port 8189``, ``--chromium /usr/bin/chromium``,
``--screenshots DIR``, ``--json FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "testbed"))
from workflow_format import MODEL_SUFFIXES  # noqa: E402, I001  (a plain module: no torch, no ComfyUI)

WORKFLOWS = ROOT / "example_workflows"
TWINS = ROOT / "api_workflows"
SIZES = ROOT / "testbed" / "ui_node_sizes.json"
PACK_PREFIX = "RealEdit"
PACK_MODULE = "realedit"
STAND_IN_OUTPUT = "realedit_check_output.png"
NOTE_TYPES = ("Note", "MarkdownNote")
# Console lines the front end writes about itself, whatever the workflow: printed, never counted.
FRONT_END_NOISE = ("deprecat", "[DEPRECATED]", "Vue warn", "[Intervention]", "was preloaded using link preload")

# The page is ready when the app, its graph and the node definitions are there.
READY_JS = "() => !!(window.app && window.app.graph && window.LiteGraph && window.app.canvas)"

COMMON_JS = """
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const comfyApi = () => window.app.api ?? window.comfyAPI?.api?.api;
const showOutput = (node, filename) => comfyApi().dispatchCustomEvent("executed", {
    node: String(node.id), display_node: String(node.id), prompt_id: "realedit-check",
    output: {images: [{filename, subfolder: "", type: "input"}]}});
const titleHeight = () => window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
const box = (n) => {
    const r = n.boundingRect;
    if (r && r.length === 4) return Array.from(r, Number);
    return [n.pos[0], n.pos[1] - titleHeight(), n.size[0], n.size[1] + titleHeight()];
};
const redraw = async () => {
    window.app.graph.setDirtyCanvas(true, true);
    window.app.canvas.draw?.(true, true);
    await sleep(300);
};
const waitImages = async (nodes, ms) => {
    const deadline = Date.now() + ms;
    while (Date.now() < deadline && !nodes.every((n) => (n.imgs?.length ?? 0) > 0)) await sleep(100);
    return nodes.filter((n) => !((n.imgs?.length ?? 0) > 0)).map((n) => String(n.id));
};
const visibleText = (selectors) => Array.from(document.querySelectorAll(selectors))
    .filter((e) => e.offsetParent !== null || e.getClientRects().length > 0)
    .map((e) => e.innerText.trim()).filter((t) => t).map((t) => t.slice(0, 1500));
"""

# Notification cards: PrimeVue toasts (all versions), the newer front end's error overlay ("N issues found").
NOTIFICATIONS = ".p-toast-message, [data-testid*='toast'], [data-testid='error-overlay'], [role='alert']"
# Missing models are shown: every name in the 1.2x dialog, or the 1.3x+ card (its panel lists them).
MODELS_SHOWN_JS = """(names) => {
    const text = Array.from(document.querySelectorAll(".p-dialog")).map((e) => e.innerText).join("\\n");
    return names.every((n) => text.includes(n)) || !!document.querySelector("[data-testid='error-overlay']");
}"""
# No dialog left open from the previous workflow.
DIALOGS_CLOSED_JS = "() => !document.querySelector('.p-dialog')"

LOAD_JS = "async ({ui, output}) => {const NOTIFICATIONS = " + json.dumps(NOTIFICATIONS) + ";" + COMMON_JS + """
    const app = window.app;
    await app.loadGraphData(ui, true, true, null, {showMissingNodesDialog: true, showMissingModelsDialog: true});
    await sleep(500);
    const shown = app.graph.nodes.filter((n) => ["LoadImage", "SaveImage", "PreviewImage"].includes(n.type));
    const view = async (n) => {  // previews are added when a node is drawn: draw each at full size
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [-n.pos[0] + 50, -n.pos[1] + 80];
        await redraw();
    };
    for (const n of shown) if (n.type !== "LoadImage") showOutput(n, output);
    const deadline = Date.now() + 10000;
    let noImage = shown;
    do {  // an output preview's image is created when its node is drawn
        for (const n of noImage) await view(n);
        noImage = noImage.filter((n) => !((n.imgs?.length ?? 0) > 0));
    } while (noImage.length && Date.now() < deadline);
    for (const n of shown) await view(n);  // once more: the preview widget joins the node at a draw
    const registered = window.LiteGraph.registered_node_types;
    const nodes = app.graph.nodes.map((n) => ({
        id: String(n.id), type: n.type, title: n.title, registered: n.type in registered, has_errors: !!n.has_errors,
        box: box(n), models: n.properties?.models ?? null,
        inputs: (n.inputs || []).map((i) => ({name: i.name, type: String(i.type), link: i.link, widget: !!i.widget})),
        widgets: (n.widgets || []).map((w) => ({name: w.name, value: w.value === undefined ? "<undefined>" : w.value})),
    }));
    const groups = (app.graph.groups ?? app.graph._groups ?? []).map((g) => ({
        title: g.title, box: Array.from(g.boundingRect ?? g._bounding ?? g.bounding, Number)}));
    const prompt = await app.graphToPrompt();
    return {nodes, groups, no_image: noImage.map((n) => String(n.id)), output: prompt.output,
            dialogs: visibleText(".p-dialog"),
            toasts: visibleText(NOTIFICATIONS)};
}"""

MEASURE_JS = "async ({types, photo, output}) => {" + COMMON_JS + """
    const app = window.app;
    const grown = (node) => {  // what loadGraphData does: the larger of the saved size and computeSize()
        const computed = node.computeSize();
        return [Math.max(node.size[0], computed[0]), Math.max(node.size[1], computed[1])].map(Math.ceil);
    };
    app.graph.clear();
    const nodes = {};
    let x = 0;
    for (const type of types) {  // one graph, one node per class: distinct ids, no outputs shown yet
        if (!(type in window.LiteGraph.registered_node_types)) continue;
        const node = window.LiteGraph.createNode(type);
        node.pos = [x, 100];
        x += 800;
        app.graph.add(node);
        nodes[type] = node;
    }
    await redraw();
    const sizes = Object.fromEntries(Object.entries(nodes).map(([type, node]) => [type, {size: grown(node)}]));
    const imaged = Object.entries(nodes).filter(([type]) => ["LoadImage", "SaveImage", "PreviewImage"].includes(type));
    app.canvas.ds.scale = 1;  // previews are added when a node is drawn: bring the image nodes into view
    app.canvas.ds.offset = [0, 0];
    imaged.forEach(([, node], i) => { node.pos = [50 + 450 * i, 150]; });
    for (const [type, node] of imaged) {
        if (type === "LoadImage") {
            const widget = node.widgets.find((w) => w.name === "image");
            widget.value = photo;
            widget.callback?.(photo);
        } else {
            showOutput(node, output);
        }
    }
    await waitImages(imaged.map(([, node]) => node), 8000);
    await redraw();
    for (const [type, node] of imaged) sizes[type].with_image = grown(node);
    app.graph.clear();
    return {sizes, version: window.__COMFYUI_FRONTEND_VERSION__ ?? null};
}"""

# The newer front end (1.3x+) reports missing models in a notification card ("N issues found", "View details")
# that opens a side panel listing each model with its folder and a Download button where it can offer one.
DETAILS_JS = "async () => {" + COMMON_JS + """
    const button = Array.from(document.querySelectorAll("button")).find((b) => b.innerText.trim() === "View details");
    if (!button) return null;
    button.click();
    await sleep(1500);
    const text = document.body.innerText;
    const start = text.indexOf("Missing Models");
    document.querySelector("button:has(i[class*='lucide--panel-right'])")?.click();  // close the panel again
    await sleep(300);
    return start < 0 ? text.slice(-3000) : text.slice(start, start + 3000);
}"""

CLOSE_DIALOGS_JS = """() => {
    document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-toast-close-button').forEach((b) => b.click());
    document.dispatchEvent(new KeyboardEvent("keydown", {key: "Escape", bubbles: true}));
}"""

# Settings of a fresh user that would open a dialog over the graph (the newer front end's template browser).
# Set only on the server the script starts. The LOD font size draws every node in full at any zoom (for the
# screenshots); the minimap would cover part of them.
QUIET_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                  "LiteGraph.Canvas.MinFontSizeForLOD": 1, "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1}
# Requests this offline check cannot make (the dialog asks model hosts for the file size): printed, not counted.
OFFLINE = ("ERR_NAME_NOT_RESOLVED", "ERR_INTERNET_DISCONNECTED", "Error fetching file size")


# ---------------------------------------------------------------- stand-in images


def stand_in_png(width: int = 512, height: int = 512) -> bytes:
    """An RGB gradient PNG (written with zlib alone: this script runs in the playwright venv)."""
    rows = b"".join(b"\x00" + b"".join(bytes((x * 255 // width, y * 255 // height, 128)) for x in range(width))
                    for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def set_setting(url: str, name: str, value: Any) -> None:
    request = urllib.request.Request(f"{url}/settings/{name}", data=json.dumps(value).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def upload(url: str, name: str, data: bytes) -> None:
    """POST an image to the server's input folder (``/upload/image``, as the Load Image button does)."""
    boundary = "realedit-check-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
            f"--{boundary}--\r\n").encode()
    request = urllib.request.Request(f"{url}/upload/image", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


# ---------------------------------------------------------------- server


STANDIN = ROOT / "testbed" / "torchaudio_standin.py"
# The server's sitecustomize: the torchaudio stand-in (loaded from its file under a private name, so the testbed
# folder is not put on the server's path), then the interpreter's own sitecustomize, if any, that this one hides.
SITECUSTOMIZE = """import importlib.machinery, importlib.util, os, sys

_spec = importlib.util.spec_from_file_location("realedit_check_torchaudio_standin", STANDIN)
_standin = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _standin
_spec.loader.exec_module(_standin)
_standin.install_if_missing()
_here = os.path.dirname(os.path.abspath(__file__))
_own = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _own is not None and _own.loader is not None:
    _module = importlib.util.module_from_spec(_own)
    _own.loader.exec_module(_module)
"""


@contextmanager
def comfy_server(comfy: Path, python: str, port: int, front_end_root: Path | None) -> Iterator[str]:
    """ComfyUI on CPU with the pack loaded from a scratch custom_nodes folder (an extra-model-paths entry),
    temporary user/input/output dirs, so the checkout stays untouched."""
    scratch = Path(tempfile.mkdtemp(prefix="realedit_ui_check_"))
    dirs = {name: scratch / name for name in ("user", "input", "output", "temp", "custom_nodes")}
    for d in dirs.values():
        d.mkdir()
    (dirs["custom_nodes"] / PACK_MODULE).symlink_to(ROOT)
    extra = scratch / "extra_model_paths.yaml"
    extra.write_text(f"realedit_check:\n  custom_nodes: {dirs['custom_nodes']}\n")
    site = scratch / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.replace("STANDIN", repr(str(STANDIN))))
    python_path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    log = open(scratch / "server.log", "w")
    cmd = [python, str(comfy / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--user-directory", str(dirs["user"]), "--input-directory", str(dirs["input"]),
           "--output-directory", str(dirs["output"]), "--temp-directory", str(dirs["temp"]),
           "--extra-model-paths-config", str(extra)]
    if front_end_root is not None:
        cmd += ["--front-end-root", str(front_end_root)]
    server = subprocess.Popen(cmd, cwd=comfy, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_pack(url, server, scratch / "server.log")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)


def object_info(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/object_info", timeout=60) as response:
        return json.load(response)


def wait_for_pack(url: str, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"ComfyUI exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if any(name.startswith(PACK_PREFIX) for name in object_info(url)):
                return
            sys.exit(f"ComfyUI is up but no {PACK_PREFIX}* node loaded:\n{log.read_text()[-3000:]}")
        except OSError:
            time.sleep(2)
    sys.exit(f"ComfyUI did not answer within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


# ---------------------------------------------------------------- comparisons


def strip_meta(output: dict[str, Any]) -> dict[str, Any]:
    return {nid: {k: v for k, v in node.items() if k != "_meta"} for nid, node in output.items()}


def declared_inputs(info: dict[str, Any], class_type: str) -> set[str]:
    spec = info.get(class_type, {}).get("input", {})
    return {name for section in ("required", "optional", "hidden") for name in spec.get(section, {})}


def prompt_differences(frontend: dict[str, Any], twin: dict[str, Any], info: dict[str, Any] | None = None
                       ) -> tuple[list[str], list[str]]:
    """Every way the front end's prompt differs from the API twin (titles, ``_meta``, are not compared), and
    apart the inputs a front end adds that change nothing: those the node does not declare (the server drops
    them: e.g. the ``preview`` text 1.2x sends for Preview Any) and optional ones at their declared default
    (inputs a newer ComfyUI gave a core node, e.g. 0.33's CFGNorm ``pre_cfg``; the twins are written on the
    oldest supported release)."""
    frontend, twin = strip_meta(frontend), strip_meta(twin)
    diffs, undeclared = [], []
    for nid in sorted(set(twin) - set(frontend), key=int):
        diffs.append(f"node {nid} ({twin[nid]['class_type']}) is in the twin but not queued by the front end")
    for nid in sorted(set(frontend) - set(twin), key=int):
        diffs.append(f"node {nid} ({frontend[nid]['class_type']}) is queued by the front end but not in the twin")
    for nid in sorted(set(twin) & set(frontend), key=int):
        ours, theirs = twin[nid], frontend[nid]
        label = f"node {nid} ({ours['class_type']})"
        if ours["class_type"] != theirs["class_type"]:
            diffs.append(f"{label}: front end class_type {theirs['class_type']!r}")
        for name in sorted(set(ours["inputs"]) | set(theirs["inputs"])):
            if name not in theirs["inputs"]:
                diffs.append(f"{label}.{name}: twin {ours['inputs'][name]!r}, front end sends nothing")
            elif name not in ours["inputs"]:
                extra = f"{label}.{name}: front end sends {theirs['inputs'][name]!r}, twin has no such input"
                known = info is None or name in declared_inputs(info, ours["class_type"])
                if not known:
                    undeclared.append(f"{extra} (not declared by the node: the server drops it)")
                elif at_optional_default(info, ours["class_type"], name, theirs["inputs"][name]):
                    undeclared.append(f"{extra} (an optional input of this ComfyUI release, at its default: the "
                                      "node runs as without it)")
                else:
                    diffs.append(extra)
            elif not same_value(ours["inputs"][name], theirs["inputs"][name]):
                diffs.append(f"{label}.{name}: twin {ours['inputs'][name]!r}, front end {theirs['inputs'][name]!r}")
    return diffs, undeclared


def at_optional_default(info: dict[str, Any] | None, class_type: str, name: str, value: Any) -> bool:
    """Whether ``name`` is an optional input of the server's node and ``value`` its declared default."""
    declared = (info or {}).get(class_type, {}).get("input", {}).get("optional", {}).get(name)
    options = declared[1] if declared and len(declared) > 1 and isinstance(declared[1], dict) else {}
    return "default" in options and same_value(options["default"], value)


def same_value(a: Any, b: Any) -> bool:
    """JSON equality (JavaScript has one number type, so 2 == 2.0) that keeps booleans apart from 0/1."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def missing_slots(nodes: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    """Declared inputs the loaded node has neither a socket nor a widget for."""
    problems = []
    for node in nodes:
        spec = info.get(node["type"], {}).get("input", {})
        sockets = {i["name"] for i in node["inputs"]}
        widgets = {w["name"] for w in node["widgets"]}
        for section in ("required", "optional"):
            for name in spec.get(section, {}):
                if name not in sockets and name not in widgets:
                    problems.append(f"node {node['id']} ({node['type']}): {section} input {name!r} "
                                    "has neither a socket nor a widget")
    return problems


def boxes_overlap(a: list[float], b: list[float]) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def inside(inner: list[float], outer: list[float]) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1] and inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


def layout_problems(loaded: dict[str, Any]) -> list[str]:
    """Overlapping node boxes, nodes outside every group (or in several), a missing note."""
    nodes = loaded["nodes"]
    problems = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if boxes_overlap(a["box"], b["box"]):
                problems.append(f"nodes {a['id']} ({a['title']}) and {b['id']} ({b['title']}) overlap: "
                                f"{[round(v) for v in a['box']]} / {[round(v) for v in b['box']]}")
    for i, a in enumerate(loaded["groups"]):
        for b in loaded["groups"][i + 1:]:
            if boxes_overlap(a["box"], b["box"]):
                problems.append(f"groups {a['title']!r} and {b['title']!r} overlap")
    for node in nodes:
        if node["type"] in NOTE_TYPES:
            continue
        holders = [g["title"] for g in loaded["groups"] if inside(node["box"], g["box"])]
        if len(holders) != 1:
            problems.append(f"node {node['id']} ({node['title']}) lies in {len(holders)} groups {holders}")
    if not any(node["type"] in NOTE_TYPES for node in nodes):
        problems.append("no note")
    if loaded["no_image"]:
        problems.append(f"no image shown on nodes {loaded['no_image']} (stand-in photo or output)")
    return problems


# ---------------------------------------------------------------- validation (runs under the pack's venv)


def validation_errors(python: str, prompts: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """ComfyUI's validate_inputs errors per prompt name, in a subprocess that imports ComfyUI and the pack."""
    run = subprocess.run([python, __file__, "--validate-worker"], input=json.dumps(prompts), text=True,
                         capture_output=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if run.returncode != 0:
        return {name: [f"validator failed: {run.stderr[-2000:]}"] for name in prompts}
    return json.loads(run.stdout.strip().splitlines()[-1])


def validate_worker() -> None:
    sys.path.insert(0, str(ROOT.parent))
    from realedit.testbed.comfy_runner import load_comfy_nodes, load_pack

    load_comfy_nodes()
    load_pack()
    import execution

    async def errors_of(prompt: dict[str, Any]) -> list[str]:
        validated: dict[str, Any] = {}
        found = []
        for nid in prompt:
            valid, errors, _ = await execution.validate_inputs("check", json.loads(json.dumps(prompt)), nid, validated)
            for e in errors if not valid else []:
                name = e.get("extra_info", {}).get("input_name", "")
                found.append(f"node {nid} ({prompt[nid]['class_type']}).{name}: {e['type']}: {e.get('details', '')}")
        return sorted(set(found))

    prompts = json.loads(sys.stdin.read())
    print(json.dumps({name: asyncio.run(errors_of(p)) for name, p in prompts.items()}))


# ---------------------------------------------------------------- browser


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


async def open_page(pw: Any, url: str, chromium: str) -> tuple[Any, Any, list[str]]:
    browser = await pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
    page = await browser.new_page(viewport={"width": 1800, "height": 1000})
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"console.{m.type}: {m.text[:400]}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e} at {(e.stack or '').splitlines()[1:3]}"))
    page.on("response", lambda r: messages.append(f"http {r.status}: {r.url}") if r.status >= 400 else None)
    page.on("requestfailed", lambda r: messages.append(f"request failed ({r.failure}): {r.url}"))
    await page.goto(url)
    await page.wait_for_function(READY_JS, timeout=180_000)
    await page.wait_for_timeout(3000)
    await page.evaluate(CLOSE_DIALOGS_JS)
    return browser, page, messages


async def check_in_browser(url: str, names: list[str], chromium: str, shots: Path | None) -> dict[str, Any]:
    from playwright.async_api import TimeoutError as PlaywrightTimeout
    from playwright.async_api import async_playwright

    results = {}
    async with async_playwright() as pw:
        browser, page, messages = await open_page(pw, url, chromium)
        version = await page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
        startup = list(messages)
        for name in names:
            messages.clear()
            ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
            loaded = await page.evaluate(LOAD_JS, {"ui": ui, "output": STAND_IN_OUTPUT})
            await page.wait_for_timeout(1000)  # dialogs and notifications open after the load returns
            if ui.get("models"):  # the missing-models dialog / card waits for the model folders: give it time
                try:
                    await page.wait_for_function(MODELS_SHOWN_JS, arg=[m["name"] for m in ui["models"]],
                                                 timeout=20_000)
                except PlaywrightTimeout:
                    pass  # model_dialog_problems reports the models nobody listed
            later = await page.evaluate(
                "() => Array.from(document.querySelectorAll('.p-dialog')).map((e) => e.innerText.trim())")
            loaded["dialogs"] = list(dict.fromkeys(loaded["dialogs"] + later))
            if shots:  # the graph alone: dialogs closed, notification cards hidden for the picture
                await page.evaluate(CLOSE_DIALOGS_JS)
                await page.evaluate(f"() => document.querySelectorAll({json.dumps(NOTIFICATIONS)})"
                                    ".forEach((e) => e.style.visibility = 'hidden')")
                await page.wait_for_timeout(300)
                await page.evaluate("() => { window.app.canvas.ds.scale = 1; }")
                await page.evaluate(FIT_JS)
                await page.wait_for_timeout(500)
                await page.screenshot(path=str(shots / f"{name}.png"))
                await page.evaluate(f"() => document.querySelectorAll({json.dumps(NOTIFICATIONS)})"
                                    ".forEach((e) => e.style.visibility = '')")
            loaded["messages"] = list(messages)  # what opening the details panel logs is the check's own doing
            details = await page.evaluate(DETAILS_JS)
            loaded["panels"] = [details] if details else []
            await page.evaluate(CLOSE_DIALOGS_JS)
            try:
                await page.wait_for_function(DIALOGS_CLOSED_JS, timeout=5_000)
            except PlaywrightTimeout:
                pass
            results[name] = loaded
        await browser.close()
    return {"front_end": version, "startup_messages": startup, "workflows": results}


FIT_JS = """() => {  // the whole graph in view (the offset is changed in place: newer front ends keep a typed array)
    const app = window.app;
    const boxes = [...app.graph.nodes.map((n) => [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30]),
                   ...(app.graph.groups ?? app.graph._groups ?? []).map((g) => Array.from(g._bounding ?? g.bounding))];
    const x0 = Math.min(...boxes.map((b) => b[0])), y0 = Math.min(...boxes.map((b) => b[1]));
    const x1 = Math.max(...boxes.map((b) => b[0] + b[2])), y1 = Math.max(...boxes.map((b) => b[1] + b[3]));
    const canvas = app.canvas.canvas;
    const left = 80, margin = 30, top = 110;  // the side and menu bars over the canvas
    const scale = Math.min((canvas.clientWidth - left - margin) / (x1 - x0),
                           (canvas.clientHeight - top - margin) / (y1 - y0), 1);
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset[0] = left / scale - x0;
    app.canvas.ds.offset[1] = top / scale - y0;
    app.graph.setDirtyCanvas(true, true);
    app.canvas.draw?.(true, true);
}"""


async def measure_in_browser(url: str, types: list[str], chromium: str) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser, page, _messages = await open_page(pw, url, chromium)
        measured = await page.evaluate(MEASURE_JS, {"types": types, "photo": "realedit_check_photo.png",
                                                    "output": STAND_IN_OUTPUT})
        await browser.close()
    return measured


# ---------------------------------------------------------------- main


def input_image_names(twin: dict[str, Any]) -> set[str]:
    return {node["inputs"]["image"] for node in twin.values()
            if node["class_type"] == "LoadImage" and isinstance(node["inputs"].get("image"), str)}


def absent_files(twin: dict[str, Any], info: dict[str, Any]) -> dict[str, set[str]]:
    """Per node id, the combo values the server does not offer (model files it does not have)."""
    absent: dict[str, set[str]] = {}
    for nid, node in twin.items():
        spec = info.get(node["class_type"], {}).get("input", {})
        for section in ("required", "optional"):
            for name, declared in spec.get(section, {}).items():
                value = node["inputs"].get(name)
                options = declared[0] if declared and isinstance(declared[0], list) else (
                    declared[1].get("options") if len(declared) > 1 and declared[0] == "COMBO" else None)
                if isinstance(value, str) and options is not None and value not in options:
                    absent.setdefault(nid, set()).add(value)
    return absent


def is_front_end_noise(message: str) -> bool:
    """The front end's own deprecation warnings, and requests to the internet this offline check cannot make."""
    if any(key in message for key in OFFLINE):
        return True
    return message.startswith("console.") and PACK_MODULE not in message.lower() and any(
        key.lower() in message.lower() for key in FRONT_END_NOISE)


DOWNLOAD_HOSTS = ("https://huggingface.co/", "https://civitai.com/")  # the hosts both front ends download from


def offers_download(text: str, name: str, directory: str) -> bool | None:
    """Whether the missing-models dialog (1.2x: ``dir / name`` then ``Download (size)``) or the issues panel
    (1.3x+: ``name``, ``dir``, ``Download``) shows a download button for the file; None if it is not listed."""
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        if line == f"{directory} / {name}":
            return i + 1 < len(lines) and lines[i + 1].startswith("Download (")
        if line == name and i + 1 < len(lines) and lines[i + 1] == directory:
            return i + 2 < len(lines) and lines[i + 2] == "Download"
    return None


def model_dialog_problems(loaded: dict[str, Any], twin: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Each model file a loader names has ``properties.models`` metadata, the front end lists it as missing, and
    offers a download button for it (issue 15's "a download button for each model it expects"). (problems, notes)"""
    from_ui = {n["id"]: n["models"] or [] for n in loaded["nodes"]}
    problems, notes = [], []
    text = "\n".join(loaded["dialogs"] + loaded["toasts"] + loaded.get("panels", []))
    for nid, node in twin.items():
        for value in node["inputs"].values():
            if not (isinstance(value, str) and value.endswith(MODEL_SUFFIXES)):
                continue
            label = f"node {nid} ({node['class_type']}): {value}"
            declared = [m for m in from_ui.get(nid, []) if m.get("name") == value]
            if not declared or not declared[0].get("url") or not declared[0].get("directory"):
                problems.append(f"{label}: no model metadata")
                continue
            button = offers_download(text, value, declared[0]["directory"])
            if button is None:
                problems.append(f"{label}: not listed by the front end's missing-models dialog / panel")
            elif button:
                notes.append(f"{label}: download button ({declared[0]['url']})")
            else:
                why = "" if declared[0]["url"].startswith(DOWNLOAD_HOSTS) else (
                    " (the front ends download from Hugging Face and Civitai only)")
                problems.append(f"{label}: listed without a download button{why}")
    return problems, notes


def is_issues_card(text: str, absent: dict[str, set[str]]) -> bool:
    """The newer front end's "N issues found" / "N errors found" card, when N is the number of model files the
    server lacks (its panel, the missing models, is checked by model_dialog_problems)."""
    found = re.search(r"(\d+) (?:issues?|errors?) found", text)
    files = {value for values in absent.values() for value in values if value.endswith(MODEL_SUFFIXES)}
    return bool(found) and int(found.group(1)) == len(files)


def is_expected_dialog(text: str) -> bool:
    """The missing-models dialog (checked by model_dialog_problems): expected, the server has no models."""
    lowered = text.lower()
    return "missing models" in lowered or ("is missing" in lowered and "model file" in lowered)


def report(name: str, loaded: dict[str, Any], twin: dict[str, Any], info: dict[str, Any],
           validation: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(problems the pack causes, what was seen and ignored)."""
    problems, ignored = [], []
    absent = absent_files(twin, info)
    for node in loaded["nodes"]:
        if not node["registered"]:
            problems.append(f"node {node['id']}: type {node['type']!r} is missing in the front end")
        elif node["has_errors"]:
            if node["id"] in absent:
                ignored.append(f"node {node['id']} ({node['type']}) marked: absent file {sorted(absent[node['id']])}")
            else:
                problems.append(f"node {node['id']} ({node['type']}): marked has_errors")
    for text in loaded["dialogs"]:
        (ignored if is_expected_dialog(text) else problems).append(f"dialog: {text[:300]!r}")
    for text in loaded["toasts"]:
        expected = is_expected_dialog(text) or is_issues_card(text, absent)
        (ignored if expected else problems).append(f"notification: {text[:300]!r}")
    offline = [m for m in loaded["messages"] if any(key in m for key in OFFLINE)]
    if offline:
        ignored.append(f"{len(offline)} console lines / failed requests to the internet (this check is offline)")
    for message in loaded["messages"]:
        if message not in offline:
            (ignored if is_front_end_noise(message) else problems).append(f"while loading: {message}")
    problems += layout_problems(loaded)
    model_problems, model_notes = model_dialog_problems(loaded, twin)
    problems += model_problems
    ignored += model_notes
    problems += missing_slots(loaded["nodes"], info)
    diffs, undeclared = prompt_differences(loaded["output"], twin, info)
    problems += diffs
    ignored += undeclared
    twin_errors = set(validation[f"{name}/twin"])
    problems += [f"validation (front end prompt only): {e}" for e in validation[f"{name}/frontend"]
                 if e not in twin_errors]
    return problems, ignored


def measure(url: str, chromium: str, info: dict[str, Any]) -> None:
    """Measure every pack class and every class a twin uses; keep the largest size seen per class."""
    types = sorted({n for n in info if n.startswith(PACK_PREFIX)}
                   | {node["class_type"] for p in TWINS.glob("*.json") for node in json.loads(p.read_text()).values()}
                   | {"Note", "MarkdownNote", "PrimitiveString", "PrimitiveStringMultiline", "SaveImage",
                      "PreviewImage", "LoadImage", "KSampler", "KSamplerAdvanced", "VAEDecode", "VAEEncode"})
    measured = asyncio.run(measure_in_browser(url, types, chromium))
    table = json.loads(SIZES.read_text()) if SIZES.is_file() else {"front_ends": [], "sizes": {}}
    for node_type, entry in measured["sizes"].items():
        kept = table["sizes"].setdefault(node_type, {})
        for key, size in entry.items():
            kept[key] = [max(a, b) for a, b in zip(kept.get(key, [0, 0]), size)]
    table["front_ends"] = sorted(set(table["front_ends"]) | {str(measured["version"])})
    table["sizes"] = dict(sorted(table["sizes"].items()))
    SIZES.write_text(json.dumps(table, indent=1) + "\n")
    print(f"measured {len(measured['sizes'])} node classes on front end {measured['version']}; wrote {SIZES}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: every api_workflows/*.json)")
    parser.add_argument("--url", help="use this running ComfyUI instead of starting one")
    parser.add_argument("--comfy", type=Path, default=Path("/opt/ComfyUI"))
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--front-end-root", type=Path, help="serve this front end (a comfyui_frontend_package "
                        "static/ folder) instead of the pinned one")
    parser.add_argument("--port", type=int, default=8189)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--screenshots", type=Path, help="save a screenshot of each loaded workflow here")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--measure-sizes", action="store_true", help=f"measure node sizes into {SIZES.name}")
    parser.add_argument("--validate-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.validate_worker:
        validate_worker()
        return 0
    if os.sep in args.python:  # a path relative to here; the server runs in the ComfyUI folder
        args.python = os.path.abspath(args.python)
    args.comfy = args.comfy.resolve()
    names = args.names or sorted(p.stem for p in TWINS.glob("*.json"))
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)

    server = comfy_server(args.comfy, args.python, args.port, args.front_end_root) if not args.url else None
    with server or nullcontext(args.url) as url:
        twins = {name: json.loads((TWINS / f"{name}.json").read_text()) for name in names}
        photo = stand_in_png()
        for image in sorted(set().union(*map(input_image_names, twins.values())) | {STAND_IN_OUTPUT,
                                                                                    "realedit_check_photo.png"}):
            upload(url, image, photo)
        info = object_info(url)  # after the uploads: the photos are among Load Image's options
        for setting, value in QUIET_SETTINGS.items() if server else ():
            set_setting(url, setting, value)
        if args.measure_sizes:
            measure(url, args.chromium, info)
            return 0
        raw = asyncio.run(check_in_browser(url, names, args.chromium, args.screenshots))

    prompts = {}
    for name in names:
        prompts[f"{name}/twin"] = strip_meta(twins[name])
        prompts[f"{name}/frontend"] = strip_meta(raw["workflows"][name]["output"])
    validation = validation_errors(args.python, prompts)
    if args.json:
        args.json.write_text(json.dumps({**raw, "validation": validation}, indent=1))

    print(f"front end {raw['front_end']}")
    if raw["startup_messages"]:
        print("front end startup messages (not counted):\n  " + "\n  ".join(raw["startup_messages"]))
    failed = 0
    for name in names:
        problems, ignored = report(name, raw["workflows"][name], twins[name], info, validation)
        failed += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {name}" + "".join(f"\n     - {p}" for p in problems))
        print("".join(f"     (ignored: {i})\n" for i in ignored), end="")
    print(f"{len(names) - failed}/{len(names)} workflows load without overlaps and queue exactly their API twin "
          f"(front end {raw['front_end']})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

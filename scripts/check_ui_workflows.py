"""Load every UI workflow in the real ComfyUI front end and check it queues exactly its API twin.

A manual developer check (not CI: it needs a browser and a ComfyUI checkout). For each
``example_workflows/<name>.json`` it, in a headless Chromium page of a running ComfyUI:

1. calls ``app.loadGraphData(ui)`` and records missing node types, open dialogs, toasts, console
   errors/warnings and page errors raised while loading;
2. checks every input the server's ``/object_info`` declares for each node (required and optional)
   is on the loaded node: a socket for a link-only input (e.g. ``ref_features``), a widget otherwise;
3. calls ``app.graphToPrompt()`` and compares its ``output`` (what the front end POSTs to
   ``/prompt``, ``_meta`` dropped) with ``api_workflows/<name>.json``: node ids, class types, every
   input (links as ``[node_id, slot]`` and widget values);
4. runs ComfyUI's own ``execution.validate_inputs`` (in a subprocess with the pack's venv; nothing is
   executed) on both prompts and reports validation errors the front end's prompt has and the twin
   has not (missing model/image files fail both and are ignored).

Exit status 0 when every workflow matches, 1 otherwise.

Setup (once): a Chromium and playwright in a venv of their own, e.g.::

    apt-get install -y chromium
    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright

Usage (from the repo root; the script starts ComfyUI on CPU itself, from ``--comfy``, with the pack
symlinked into ``custom_nodes/realedit`` if it is not there, and removes server and symlink after)::

    /tmp/pw/bin/python scripts/check_ui_workflows.py                 # all workflows
    /tmp/pw/bin/python scripts/check_ui_workflows.py zone_multi_turn  # some of them
    /tmp/pw/bin/python scripts/check_ui_workflows.py --url http://127.0.0.1:8188  # a running server

Options: ``--comfy /opt/ComfyUI``, ``--python .venv/bin/python`` (the server's and validator's
interpreter), ``--port 8189``, ``--chromium /usr/bin/chromium``, ``--screenshots DIR``, ``--json FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "example_workflows"
PACK_PREFIX = "RealEdit"

# The page is ready when the app, its graph and the node definitions are there.
READY_JS = "() => !!(window.app && window.app.graph && window.comfyAPI && window.LiteGraph)"

LOAD_JS = """async (ui) => {
    const app = window.app;
    await app.loadGraphData(ui, true, true, null, {showMissingNodesDialog: true, showMissingModelsDialog: true});
    await new Promise((r) => setTimeout(r, 500));
    const registered = window.LiteGraph.registered_node_types;
    const nodes = app.graph.nodes.map((n) => ({
        id: String(n.id), type: n.type, registered: n.type in registered, has_errors: !!n.has_errors,
        inputs: (n.inputs || []).map((i) => ({name: i.name, type: String(i.type), link: i.link, widget: !!i.widget})),
        widgets: (n.widgets || []).map((w) => ({name: w.name, value: w.value === undefined ? "<undefined>" : w.value})),
    }));
    const visible = (sel) => Array.from(document.querySelectorAll(sel))
        .filter((e) => e.offsetParent !== null).map((e) => e.innerText.trim().slice(0, 500));
    const prompt = await app.graphToPrompt();
    return {nodes, dialogs: visible(".p-dialog"), toasts: visible(".p-toast-message"), output: prompt.output};
}"""

CLOSE_DIALOGS_JS = """() => {
    document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-toast-close-button').forEach((b) => b.click());
}"""


# ---------------------------------------------------------------- server


@contextmanager
def comfy_server(comfy: Path, python: str, port: int) -> Iterator[str]:
    """ComfyUI on CPU with the pack loaded; temporary user/input/output dirs so the checkout stays clean."""
    link = comfy / "custom_nodes" / "realedit"
    created_link = not link.exists() and not link.is_symlink()
    if created_link:
        link.symlink_to(ROOT)
    scratch = Path(tempfile.mkdtemp(prefix="realedit_ui_check_"))
    dirs = {name: scratch / name for name in ("user", "input", "output", "temp")}
    for d in dirs.values():
        d.mkdir()
    log = open(scratch / "server.log", "w")
    cmd = [python, str(comfy / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--user-directory", str(dirs["user"]), "--input-directory", str(dirs["input"]),
           "--output-directory", str(dirs["output"]), "--temp-directory", str(dirs["temp"])]
    server = subprocess.Popen(cmd, cwd=comfy, stdout=log, stderr=subprocess.STDOUT)
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
        if created_link:
            link.unlink()
        shutil.rmtree(scratch, ignore_errors=True)


def object_info(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/object_info", timeout=30) as response:
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


def prompt_differences(frontend: dict[str, Any], twin: dict[str, Any]) -> list[str]:
    """Every way the front end's prompt differs from the API twin."""
    diffs = []
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
                diffs.append(f"{label}.{name}: front end sends {theirs['inputs'][name]!r}, twin has no such input")
            elif not same_value(ours["inputs"][name], theirs["inputs"][name]):
                diffs.append(f"{label}.{name}: twin {ours['inputs'][name]!r}, front end {theirs['inputs'][name]!r}")
    return diffs


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


async def check_in_browser(url: str, names: list[str], chromium: str, shots: Path | None) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    results = {}
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1800, "height": 1000})
        messages: list[str] = []
        page.on("console", lambda m: messages.append(f"console.{m.type}: {m.text[:400]}")
                if m.type in ("error", "warning") and not m.text.startswith("Failed to load resource") else None)
        page.on("pageerror", lambda e: messages.append(f"pageerror: {e} at {(e.stack or '').splitlines()[1:3]}"))
        page.on("response", lambda r: messages.append(f"http {r.status}: {r.url}") if r.status >= 400 else None)
        page.on("requestfailed", lambda r: messages.append(f"request failed ({r.failure}): {r.url}"))
        await page.goto(url)
        await page.wait_for_function(READY_JS, timeout=120_000)
        await page.wait_for_timeout(2000)
        await page.evaluate(CLOSE_DIALOGS_JS)
        startup = list(messages)
        for name in names:
            messages.clear()
            ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
            loaded = await page.evaluate(LOAD_JS, ui)
            loaded["messages"] = list(messages)
            if shots:
                await page.screenshot(path=str(shots / f"{name}.png"))
            await page.evaluate(CLOSE_DIALOGS_JS)
            results[name] = loaded
        await browser.close()
    return {"startup_messages": startup, "workflows": results}


# ---------------------------------------------------------------- main


def input_image_names(twin: dict[str, Any]) -> set[str]:
    return {node["inputs"]["image"] for node in twin.values()
            if node["class_type"] == "LoadImage" and isinstance(node["inputs"].get("image"), str)}


def is_missing_input_image(message: str, twin: dict[str, Any]) -> bool:
    """A 404 for the preview of a LoadImage file: the demo photos are not in the (empty) input folder."""
    if not message.startswith("http 404: ") or "/view?" not in message:
        return False
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(message.removeprefix("http 404: ")).query)
    return query.get("type") == ["input"] and bool(set(query.get("filename", [])) & input_image_names(twin))


def report(name: str, loaded: dict[str, Any], twin: dict[str, Any], info: dict[str, Any],
           validation: dict[str, list[str]]) -> list[str]:
    problems = []
    for node in loaded["nodes"]:
        if not node["registered"]:
            problems.append(f"node {node['id']}: type {node['type']!r} is missing in the front end")
        elif node["has_errors"]:
            problems.append(f"node {node['id']} ({node['type']}): marked has_errors")
    problems += [f"dialog: {d!r}" for d in loaded["dialogs"]]
    problems += [f"toast: {t!r}" for t in loaded["toasts"]]
    problems += [f"while loading: {m}" for m in loaded["messages"] if not is_missing_input_image(m, twin)]
    problems += missing_slots(loaded["nodes"], info)
    problems += prompt_differences(strip_meta(loaded["output"]), twin)
    twin_errors = set(validation[f"{name}/twin"])
    problems += [f"validation (front end prompt only): {e}" for e in validation[f"{name}/frontend"]
                 if e not in twin_errors]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: every api_workflows/*.json)")
    parser.add_argument("--url", help="use this running ComfyUI instead of starting one")
    parser.add_argument("--comfy", type=Path, default=Path("/opt/ComfyUI"))
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--port", type=int, default=8189)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--screenshots", type=Path, help="save a screenshot of each loaded workflow here")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--validate-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.validate_worker:
        validate_worker()
        return 0
    names = args.names or sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)

    with comfy_server(args.comfy, args.python, args.port) if not args.url else nullcontext(args.url) as url:
        info = object_info(url)
        raw = asyncio.run(check_in_browser(url, names, args.chromium, args.screenshots))

    twins = {name: json.loads((WORKFLOWS / "api" / f"{name}.json").read_text()) for name in names}
    prompts = {}
    for name in names:
        prompts[f"{name}/twin"] = twins[name]
        prompts[f"{name}/frontend"] = strip_meta(raw["workflows"][name]["output"])
    validation = validation_errors(args.python, prompts)
    if args.json:
        args.json.write_text(json.dumps({**raw, "validation": validation}, indent=1))

    if raw["startup_messages"]:
        print("front end startup messages:\n  " + "\n  ".join(raw["startup_messages"]))
    failed = 0
    for name in names:
        problems = report(name, raw["workflows"][name], twins[name], info, validation)
        failed += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {name}" + "".join(f"\n     - {p}" for p in problems))
        images = sorted(input_image_names(twins[name]))
        if images:
            print(f"     (LoadImage files not in the input folder, previews 404 as expected: {', '.join(images)})")
    print(f"{len(names) - failed}/{len(names)} workflows load and queue exactly their API twin")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

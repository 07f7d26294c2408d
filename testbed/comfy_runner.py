"""Run an API-format ComfyUI workflow in-process through ComfyUI's own validator and executor.

No HTTP server: ``execution.PromptExecutor`` gets a small stand-in server that records the
messages it would send to the browser. Node classes come from ComfyUI's core, its built-in
``comfy_extras`` and, when the workflow needs them, this pack, loaded from the repository root by
ComfyUI's own ``nodes.load_custom_node`` exactly as from ``custom_nodes/<folder>`` (so it is a
*second* copy of the package under the module name ComfyUI gives it, not ``realedit``).

Model substitution: there are no real checkpoints on a test machine, so by default every
``CheckpointLoaderSimple`` node is replaced, for this run only, by a constant node that returns
``comfy_models.make_tiny_checkpoint(family, seed)`` -- same output types, so ComfyUI validates and
links the workflow unchanged. More generally ``overrides={node_id: outputs}`` replaces *any* node
by one returning the given tuple (an ``IMAGE``/``MASK`` pair for a ``LoadImage``, a tiny SAM for a
model loader, ...). The workflow dict itself is never modified.

Example::

    result = run_workflow(workflow, outputs=["8"], tiny_checkpoint="sd1")
    image = result["8"][0]          # VAEDecode's IMAGE, (B, H, W, 3)
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import inspect
import itertools
import logging
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .comfy_env import bootstrap_comfyui

# Loader nodes replaced by the tiny checkpoint unless ``tiny_checkpoint=None`` or overridden.
CHECKPOINT_LOADERS = ("CheckpointLoaderSimple",)

REPO_ROOT = Path(__file__).resolve().parent.parent

_state: dict[str, Any] = {"extras_failed": None, "pack_nodes": None}
_override_ids = itertools.count()


class WorkflowError(RuntimeError):
    """ComfyUI rejected (``validation``) or failed to execute (``execution``) the workflow.

    ``node_id``/``class_type`` name the failing node where ComfyUI says which; ``details`` holds
    ComfyUI's own error record (``node_errors`` for validation, the ``execution_error`` message
    with ``exception_type``, ``exception_message`` and ``traceback`` for execution).
    """

    def __init__(self, message: str, *, stage: str, node_id: str | None = None, class_type: str | None = None,
                 details: Any = None) -> None:
        super().__init__(message)
        self.stage, self.node_id, self.class_type, self.details = stage, node_id, class_type, details


class PackNotAvailableError(RuntimeError):
    """The pack's node package could not be loaded into ComfyUI."""


@dataclass
class WorkflowResult:
    """What a run produced.

    ``outputs`` maps each requested node id to its outputs, one entry per output slot (a slot that
    ComfyUI ran as a list -- ``OUTPUT_IS_LIST`` or list-mapped execution with several items -- is a
    list; a single item is unwrapped). ``raw_outputs`` keeps ComfyUI's list-per-slot form. ``ui``
    holds the UI results of output nodes (``PreviewImage`` ...), ``messages`` the executor's
    ``(event, data)`` status messages (``execution_start``, ``execution_cached``, ``execution_success``).
    """

    outputs: dict[str, tuple[Any, ...]]
    raw_outputs: dict[str, list[list[Any]]]
    ui: dict[str, dict[str, Any]]
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __getitem__(self, node_id: str) -> tuple[Any, ...]:
        return self.outputs[str(node_id)]


class _StandInServer:
    """The attributes of ``server.PromptServer`` that ``execution.PromptExecutor`` uses."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


@contextmanager
def _quiet_logging(level: int = logging.ERROR) -> Iterator[None]:
    root = logging.getLogger()
    previous = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(previous)


def _import_utils_package(root: Path) -> None:
    """Import ComfyUI's top-level ``utils`` package (``server.py``, which some extras import, needs it).

    ComfyUI's ``nodes.py`` puts ``comfy/`` first on ``sys.path``, after which ``import utils`` finds
    ``comfy/utils.py`` instead; ``main.py`` imports the package before that happens, so do we,
    with the checkout's root searched first.
    """
    if "utils" in sys.modules:
        return
    saved = list(sys.path)
    sys.path.insert(0, str(root))
    try:
        importlib.import_module("utils.install_util")
    finally:
        sys.path[:] = saved


def load_comfy_nodes(extras: bool = True) -> list[str]:
    """Import ComfyUI's ``nodes``/``execution`` and (once per process) its built-in extra nodes.

    Returns the ``comfy_extras`` files that failed to import (ComfyUI logs and skips those; on a
    machine without a working torchaudio, the audio nodes). API nodes and ``custom_nodes/`` are
    never loaded. Idempotent.
    """
    root = bootstrap_comfyui()
    _import_utils_package(root)
    import nodes

    if extras and _state["extras_failed"] is None:
        with _quiet_logging():
            _state["extras_failed"] = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False,
                                                                         init_api_nodes=False)) or []
    return list(_state["extras_failed"] or [])


def load_pack(path: Path | str | None = None) -> list[str]:
    """Load the pack (default: this repository) with ComfyUI's ``load_custom_node``; once per process.

    Returns the node ids it registered. Raises :class:`PackNotAvailableError` with ComfyUI's
    logged reason when the package has no ``nodes`` package yet or fails to load.
    """
    if _state["pack_nodes"] is not None:
        return list(_state["pack_nodes"])
    load_comfy_nodes()
    import nodes

    root = Path(path) if path is not None else REPO_ROOT
    if not (root / "nodes" / "__init__.py").is_file():
        raise PackNotAvailableError(
            f"the pack at {root} has no nodes/__init__.py yet: only core ComfyUI nodes can run "
            "(pass pack=False, or write the nodes package)")
    before = set(nodes.NODE_CLASS_MAPPINGS)
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = _Collect(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        # As ComfyUI's init_external_custom_nodes: a custom node never replaces a built-in one.
        ok = asyncio.run(nodes.load_custom_node(str(root), ignore=before, module_parent="custom_nodes"))
    finally:
        logging.getLogger().removeHandler(handler)
    if not ok:
        reasons = "\n".join(records) or "(ComfyUI logged no reason)"
        raise PackNotAvailableError(f"ComfyUI could not load the pack at {root}:\n{reasons}")
    _state["pack_nodes"] = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
    return list(_state["pack_nodes"])


def _constant_node_class(template: type, outputs: Sequence[Any]) -> type:
    """A V1 node class with ``template``'s output types and no inputs, returning ``outputs``."""
    return_types = tuple(template.RETURN_TYPES)
    values = tuple(outputs)
    if len(values) != len(return_types):
        raise ValueError(f"override for a {template.__name__} needs {len(return_types)} outputs "
                         f"{return_types}, got {len(values)}")

    class TestbedConstant:
        RETURN_TYPES = return_types
        RETURN_NAMES = tuple(getattr(template, "RETURN_NAMES", None) or return_types)
        OUTPUT_IS_LIST = tuple(getattr(template, "OUTPUT_IS_LIST", None) or (False,) * len(return_types))
        FUNCTION = "run"
        CATEGORY = "testbed"

        @classmethod
        def INPUT_TYPES(cls) -> dict[str, dict[str, Any]]:  # noqa: N802  (ComfyUI's name)
            return {"required": {}}

        def run(self) -> tuple[Any, ...]:
            return values

    return TestbedConstant


def _unwrap(raw: list[list[Any]]) -> tuple[Any, ...]:
    return tuple(slot[0] if isinstance(slot, list) and len(slot) == 1 else slot for slot in raw)


def _execution_error(messages: list[tuple[str, dict[str, Any]]]) -> WorkflowError:
    for event, data in messages:
        if event in ("execution_error", "execution_interrupted"):
            node_id, class_type = data.get("node_id"), data.get("node_type")
            if event == "execution_interrupted":
                return WorkflowError(f"execution interrupted at {class_type} #{node_id}", stage="execution",
                                     node_id=node_id, class_type=class_type, details=data)
            tb = "".join(data.get("traceback") or [])
            return WorkflowError(
                f"{class_type} #{node_id} failed: {data.get('exception_type')}: {data.get('exception_message')}"
                f"\n{tb}", stage="execution", node_id=node_id, class_type=class_type, details=data)
    return WorkflowError("ComfyUI reported a failed execution without an error message", stage="execution",
                         details=messages)


async def _validate(prompt_id: str, prompt: dict[str, Any], targets: Sequence[str]) -> None:
    import execution

    validated: dict[str, Any] = {}
    lines: list[str] = []
    for node_id in targets:
        try:
            valid, _reasons, _ = await execution.validate_inputs(prompt_id, prompt, node_id, validated)
        except Exception as ex:  # what validate_prompt reports as exception_during_validation
            raise WorkflowError(f"exception while validating #{node_id}: {ex}", stage="validation",
                                node_id=node_id, class_type=prompt[node_id]["class_type"]) from ex
        if valid is not True:
            break
    node_errors = {nid: result[1] for nid, result in validated.items() if result[0] is not True and result[1]}
    if not node_errors:
        return
    for nid, reasons in node_errors.items():
        for reason in reasons:
            lines.append(f"{prompt[nid]['class_type']} #{nid}: {reason['message']}: {reason['details']}")
    first = next(iter(node_errors))
    raise WorkflowError("ComfyUI rejected the workflow:\n" + "\n".join(lines), stage="validation", node_id=first,
                        class_type=prompt[first]["class_type"], details=node_errors)


def run_workflow(
    workflow: Mapping[str, Mapping[str, Any]],
    outputs: Iterable[str | int] | None = None,
    *,
    overrides: Mapping[str | int, Sequence[Any] | Callable[[], Sequence[Any]]] | None = None,
    tiny_checkpoint: str | None = "sd1",
    checkpoint_seed: int = 0,
    pack: bool | None = None,
    run_output_nodes: bool = True,
    extra_data: Mapping[str, Any] | None = None,
    output_dir: Path | str | None = None,
) -> WorkflowResult:
    """Validate and execute an API-format workflow with ComfyUI's executor; return node outputs.

    Args:
        workflow: ``{node_id: {"class_type": ..., "inputs": {...}}}`` (links are ``[node_id, slot]``).
        outputs: node ids whose outputs to return; they are executed even if they are not output
            nodes. Default: none (only the output nodes run; see ``ui``).
        overrides: ``{node_id: outputs_tuple}`` (or a zero-argument callable returning it): that node
            is replaced for this run by a constant node with the same output types (a slot the
            original marks ``OUTPUT_IS_LIST`` takes a list).
        tiny_checkpoint: family (``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"ip2p"``) of the tiny
            ``(MODEL, CLIP, VAE)`` substituted for every ``CheckpointLoaderSimple`` not in
            ``overrides`` (built fresh each run with ``checkpoint_seed``); ``None`` keeps the loaders.
        pack: load this pack's nodes: ``True`` always, ``False`` never, ``None`` (default) only when
            the workflow uses a class ComfyUI itself does not have.
        run_output_nodes: also run the workflow's output nodes (as ComfyUI would).
        extra_data: ComfyUI's ``extra_data`` (e.g. ``extra_pnginfo``).
        output_dir: where ``SaveImage``/``PreviewImage`` write; default a temporary folder deleted
            after the run (``ui`` still names the files).

    Raises:
        WorkflowError: validation or execution failed, with ComfyUI's message.
        PackNotAvailableError: the pack's nodes were needed but could not be loaded.
    """
    load_comfy_nodes()
    import execution
    import folder_paths

    import nodes

    prompt: dict[str, Any] = {str(k): copy.deepcopy(dict(v)) for k, v in workflow.items()}
    wanted = [str(node_id) for node_id in (outputs or [])]
    for node_id in wanted:
        if node_id not in prompt:
            raise KeyError(f"requested output node {node_id!r} is not in the workflow")

    unknown = sorted({n.get("class_type") for n in prompt.values()} - set(nodes.NODE_CLASS_MAPPINGS), key=str)
    if pack or (pack is None and unknown):
        load_pack()

    substitutes: dict[str, Sequence[Any] | Callable[[], Sequence[Any]]] = {
        str(k): v for k, v in (overrides or {}).items()}
    if tiny_checkpoint is not None:
        for node_id, node in prompt.items():
            if node.get("class_type") in CHECKPOINT_LOADERS and node_id not in substitutes:
                substitutes[node_id] = _tiny_checkpoint_factory(tiny_checkpoint, checkpoint_seed)

    registered: list[str] = []
    try:
        for node_id, value in substitutes.items():
            if node_id not in prompt:
                raise KeyError(f"override for node {node_id!r}, which is not in the workflow")
            template = nodes.NODE_CLASS_MAPPINGS.get(prompt[node_id].get("class_type"))
            if template is None:
                raise WorkflowError(f"override for #{node_id}: unknown class {prompt[node_id].get('class_type')!r}",
                                    stage="validation", node_id=node_id)
            values = value() if callable(value) else value
            name = f"TestbedConstant_{next(_override_ids)}"
            nodes.NODE_CLASS_MAPPINGS[name] = _constant_node_class(template, values)
            registered.append(name)
            prompt[node_id] = {"class_type": name, "inputs": {}}

        prompt_id = str(uuid.uuid4())
        for node_id, node in prompt.items():
            if node.get("class_type") not in nodes.NODE_CLASS_MAPPINGS:
                raise WorkflowError(f"#{node_id}: node class {node.get('class_type')!r} does not exist",
                                    stage="validation", node_id=node_id, class_type=node.get("class_type"))
        output_nodes = [nid for nid, node in prompt.items()
                        if getattr(nodes.NODE_CLASS_MAPPINGS[node["class_type"]], "OUTPUT_NODE", False) is True]
        targets = list(dict.fromkeys(wanted + (output_nodes if run_output_nodes else [])))
        if not targets:
            raise WorkflowError("nothing to run: no requested outputs and no output nodes", stage="validation")
        asyncio.run(_validate(prompt_id, prompt, targets))

        with _directories(folder_paths, output_dir):
            executor = _prompt_executor(execution, _StandInServer())
            executor.execute(prompt, prompt_id, dict(extra_data or {}), targets)
            messages = list(executor.status_messages)
            if not executor.success or any(e in ("execution_error", "execution_interrupted") for e, _ in messages):
                raise _execution_error(messages)
            raw = {nid: _cached_outputs(executor, nid) for nid in wanted}
            ui = dict(executor.history_result.get("outputs", {}))
    finally:
        for name in registered:
            nodes.NODE_CLASS_MAPPINGS.pop(name, None)
    missing = [nid for nid, value in raw.items() if value is None]
    if missing:
        raise WorkflowError(f"ComfyUI produced no outputs for {missing}", stage="execution", details=messages)
    return WorkflowResult(outputs={nid: _unwrap(value) for nid, value in raw.items()}, raw_outputs=raw, ui=ui,
                          messages=messages)


def _prompt_executor(execution: Any, server: _StandInServer) -> Any:
    """ComfyUI's ``PromptExecutor`` with the classic cache, on every supported release.

    Releases that take ``cache_args`` (0.3.67 and later) read its RAM headroom keys on every run even with
    the classic cache; zeros leave the cache as it is (no RAM-pressure release).
    """
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return execution.PromptExecutor(server, cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
    return execution.PromptExecutor(server)


def _cached_outputs(executor: Any, node_id: str) -> list[list[Any]] | None:
    """A node's outputs from the executor's output cache: a plain list-per-slot before 0.17, since then a
    ``CacheEntry`` (``.outputs``) returned by a coroutine."""
    entry = executor.caches.outputs.get(node_id)
    if inspect.isawaitable(entry):
        entry = asyncio.run(entry)
    return getattr(entry, "outputs", entry)


def _tiny_checkpoint_factory(family: str, seed: int) -> Callable[[], tuple[Any, Any, Any]]:
    def build() -> tuple[Any, Any, Any]:
        from .comfy_models import make_tiny_checkpoint

        return make_tiny_checkpoint(family, seed=seed)  # type: ignore[arg-type]

    return build


@contextmanager
def _directories(folder_paths: Any, output_dir: Path | str | None) -> Iterator[None]:
    """Point ComfyUI's output and temp folders at ``output_dir`` (or a temporary one) for a run."""
    previous = folder_paths.get_output_directory(), folder_paths.get_temp_directory()
    with tempfile.TemporaryDirectory(prefix="realedit-run-") as scratch:
        # absolute: ComfyUI's SaveImage refuses to mix a relative output folder with its absolute paths
        target = Path(output_dir).resolve() if output_dir is not None else Path(scratch)
        target.mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(target))
        folder_paths.set_temp_directory(str(target / "temp"))
        try:
            yield
        finally:
            folder_paths.set_output_directory(previous[0])
            folder_paths.set_temp_directory(previous[1])


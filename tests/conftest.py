"""Shared fixtures. Two threads stall at random on the 2-core CI machines: pin one."""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from realedit.testbed.comfy_env import DEFAULT_COMFYUI_PATH, bootstrap_comfyui, find_comfyui  # noqa: E402

COMFY_SKIP_REASON = (
    f"ComfyUI not found at $COMFYUI_PATH or {DEFAULT_COMFYUI_PATH}: ComfyUI-host tests skipped "
    "(see README, 'Running the tests')"
)
# Set by CI (.ci/run): a missing ComfyUI checkout fails every ComfyUI-host test instead of skipping it.
REQUIRE_COMFYUI = os.environ.get("REALEDIT_REQUIRE_COMFYUI", "") not in ("", "0")
COMFY_FIXTURES = {"comfy", "runner"}


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in-process; skips the test with a visible reason when absent (fails under
    ``REALEDIT_REQUIRE_COMFYUI=1``)."""
    if find_comfyui() is None:
        if REQUIRE_COMFYUI:
            pytest.fail(f"REALEDIT_REQUIRE_COMFYUI is set but {COMFY_SKIP_REASON}", pytrace=False)
        pytest.skip(COMFY_SKIP_REASON)
    bootstrap_comfyui()
    import comfy.model_management

    return comfy


@pytest.fixture(scope="session")
def runner(comfy):
    """ComfyUI's nodes and this pack loaded in-process: ``testbed.comfy_runner`` to execute workflows."""
    from realedit.testbed import comfy_runner

    comfy_runner.load_comfy_nodes()
    comfy_runner.load_pack()
    return comfy_runner


def pytest_collection_modifyitems(config, items):
    """Every test that needs ComfyUI (through its fixtures) carries the ``comfy`` marker, so ``-m comfy``
    selects exactly the ComfyUI-host tests (CI runs them once more on the second host)."""
    for item in items:
        if COMFY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.comfy)


def pytest_report_header(config):
    path = find_comfyui()
    return f"ComfyUI host: {path}" if path else f"ComfyUI host: none ({COMFY_SKIP_REASON})"


@pytest.fixture(scope="session")
def shapes_world(runner):
    """The committed shapes world checkpoints loaded by CheckpointLoaderSimple in ComfyUI's executor
    (``testbed.shapes_world.comfy_world.ComfyWorld``)."""
    from realedit.testbed.shapes_world.comfy_world import load_world

    return load_world()

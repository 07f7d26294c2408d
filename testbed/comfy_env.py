"""Find a ComfyUI checkout and make it importable in this process (tests, demo, benchmarks).

ComfyUI is not a registry package: a checkout is found at ``$COMFYUI_PATH``, else ``/opt/ComfyUI``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_COMFYUI_PATH = "/opt/ComfyUI"


def find_comfyui() -> Path | None:
    """The ComfyUI checkout to use, or None when there is none."""
    path = Path(os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI_PATH)
    return path if (path / "comfy" / "model_patcher.py").is_file() else None


def bootstrap_comfyui(path: Path | None = None) -> Path:
    """Put ComfyUI on ``sys.path`` and configure it for this machine (CPU unless CUDA works).

    Idempotent. Raises ``FileNotFoundError`` naming where it looked when no checkout is found.
    """
    path = path or find_comfyui()
    if path is None:
        raise FileNotFoundError(
            f"no ComfyUI checkout at $COMFYUI_PATH or {DEFAULT_COMFYUI_PATH}; set COMFYUI_PATH to one"
        )
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if "comfy.model_management" not in sys.modules:
        import torch

        from .torchaudio_standin import install_if_missing

        install_if_missing()  # ComfyUI 0.33.0 imports torchaudio at module level
        from comfy.cli_args import args  # ComfyUI parses no command line unless asked to

        args.cpu = not torch.cuda.is_available()
        args.disable_all_custom_nodes = True
        args.use_pytorch_cross_attention = True  # SDPA: far faster than the basic backend on CPU
        import comfy.model_management  # noqa: F401  (selects the device from args)
    return path

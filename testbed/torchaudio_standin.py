"""A stand-in ``torchaudio`` for test machines where no torchaudio matches the pinned torch.

ComfyUI 0.33.0 imports torchaudio at module level (``comfy/sd.py`` -> the LTX audio VAE, several text
encoders and extras), though only its audio models call it. The registry's newest torchaudio is built for
an older torch than the one the pack is tested on, so the setup leaves it out and the testbed (tests, demo,
benchmarks; never the pack itself, never a user's ComfyUI) installs this stand-in before ComfyUI is
imported: ``import torchaudio`` and ``from torchaudio.x import y`` succeed, and anything actually *used*
raises ``ImportError`` naming the missing package. Image models never reach it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

PACKAGE = "torchaudio"
MESSAGE = ("torchaudio is not installed (a test stand-in replaces it): ComfyUI's audio models cannot run "
           "here; install a torchaudio built for this torch to use them")


class _Unavailable:
    """What every attribute of the stand-in is: a class (so ``class X(torchaudio.Y)`` still defines X)
    that raises when instantiated or called."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise ImportError(MESSAGE)


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Unavailable,), {"__module__": self.__name__})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None, target: object = None):  # noqa: ANN201
        if fullname != PACKAGE and not fullname.startswith(PACKAGE + "."):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []  # a package: submodules import through this finder too
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install_if_missing() -> bool:
    """Install the stand-in when no torchaudio can be found; returns whether it was installed."""
    if any(isinstance(finder, _StandInFinder) for finder in sys.meta_path):
        return True
    if PACKAGE in sys.modules or importlib.util.find_spec(PACKAGE) is not None:
        return False
    sys.meta_path.append(_StandInFinder())
    return True

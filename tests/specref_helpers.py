"""Helpers shared by the SpecRef tests of both hosts (plain PyTorch, no ComfyUI import)."""

from __future__ import annotations

import torch
from realedit.attention.specref import LiveReference


def spy_live_kv(monkeypatch) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """Record the K/V the live reference row hands SR-attention, per (layer, edit step)."""
    seen: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    original = LiveReference.kv

    def kv(self, k, v, ctx):
        out = original(self, k, v, ctx)
        seen[(ctx.layer.index, ctx.step)] = (out[0][0].clone(), out[1][0].clone())
        return out

    monkeypatch.setattr(LiveReference, "kv", kv)
    return seen


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()

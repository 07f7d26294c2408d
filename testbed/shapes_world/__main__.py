"""``python -m realedit.testbed.shapes_world train [--stage all|vae|data|t2i|ip2p|decoder|pack] [--threads 1]``.

Seeded (``WorldConfig.seed``); uses CUDA when ComfyUI finds it. Stages run in order and each saves its
result under ``$REALEDIT_CACHE/shapes_world-<config hash>/``; ``pack`` measures the quality gates and writes
the fp16 single-file checkpoints to ``testbed/shapes_world_models/``.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realedit.testbed.shapes_world")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the world's models and measure the gates")
    train.add_argument("--stage", default="all", choices=("all", "vae", "data", "t2i", "ip2p", "decoder", "pack"))
    train.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared CPUs)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from ..comfy_env import bootstrap_comfyui

    bootstrap_comfyui()
    from . import training

    training.set_threads(args.threads)
    stages = ("vae", "data", "t2i", "ip2p", "decoder", "pack") if args.stage == "all" else (args.stage,)
    for stage in stages:
        getattr(training, f"stage_{stage}")()
    return 0


if __name__ == "__main__":
    sys.exit(main())

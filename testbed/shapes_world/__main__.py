"""``python -m realedit.testbed.shapes_world train [--stage STAGE] [--recipe auto|gpu|cpu] [--threads 1] [--workers 1]
[--seconds S] [--prediction eps|v] [--rounds N]``.

Seeded (``WorldConfig.seed``); trains on CUDA when ComfyUI finds it, with the GPU recipe (the config's defaults),
else with the CPU recipe (``config.CPU_RECIPE``: fewer samples, sized for two cores). Stages run in order and each
saves its result under ``$REALEDIT_CACHE/shapes_world/``: ``vae``, ``decoder`` (needs ``vae``), ``data`` (needs
``vae``), ``t2i`` and ``ip2p`` (need ``data``), ``ip2p_grounding`` (the IP2P UNet's edit-grounding fine-tuning:
needs ``ip2p``); ``measure`` prints the gates on those weights; ``pack`` measures the gates on the fp16 single-file
checkpoints it writes to ``testbed/shapes_world_models/``. ``--seconds`` caps each stage's steps to what fits in
that time (a GPU lease is short); ``--workers`` renders the training sets in that many processes. ``--stage
committed`` writes the committed checkpoints' weights into the cache as their stages' files, so that a later stage
fine-tunes them. ``scripts/train_shapes_world_gpu.sh`` runs the stages side by side on one GPU,
``scripts/train_shapes_world_cpu.sh`` on two CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .config import PREDICTIONS

STAGES = ("vae", "decoder", "data", "t2i", "ip2p", "ip2p_grounding", "pack")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realedit.testbed.shapes_world")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the world's models and measure the gates")
    train.add_argument("--stage", default="all", choices=("all",) + STAGES + ("measure", "committed"),
                       help="one stage (default: all of them in order); committed: write the committed checkpoints' "
                            "weights into the cache as their stages' files, to fine-tune from them")
    train.add_argument("--recipe", default="auto", choices=("auto", "gpu", "cpu"),
                       help="step counts and batches for a GPU or for two CPU cores (config.CPU_RECIPE); auto "
                            "(default): gpu where ComfyUI trains on CUDA, else cpu")
    train.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared CPUs)")
    train.add_argument("--workers", type=int, default=1, help="processes rendering the training sets")
    train.add_argument("--seconds", type=float, default=None, help="cap each stage's steps to this many seconds")
    train.add_argument("--unet-channels", type=int, default=None,
                       help="the UNets' model_channels (default: the config's); a variant for comparison")
    train.add_argument("--prediction", default=None, choices=PREDICTIONS,
                       help="what the UNets predict (default: the config's, v: v-prediction, as SD2); eps: as SD1.5")
    train.add_argument("--rounds", type=int, default=None,
                       help="rounds of UNet training (default: the recipe's); each round after the first restarts "
                            "from the previous round's weights (config.WorldConfig.unet_rounds)")
    train.add_argument("--report", default=None, help="write the stage's numbers (JSON) to this file")
    train.add_argument("--export", default=None,
                       help="afterwards, copy the weights of the stages run (fp16) to this folder")
    train.add_argument("--smoke", action="store_true",
                       help="a check of the pipeline in a few CPU minutes: tiny data, few steps, tiny gates; "
                            "measures instead of packing")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from ..comfy_env import bootstrap_comfyui

    bootstrap_comfyui()
    from . import training
    from .config import RECIPES

    training.set_threads(args.threads)
    recipe = args.recipe
    if recipe == "auto":
        import comfy.model_management

        recipe = "gpu" if comfy.model_management.get_torch_device().type == "cuda" else "cpu"
    config = RECIPES[recipe]
    if args.unet_channels:
        config = dataclasses.replace(config, unet=dict(config.unet, model_channels=args.unet_channels))
    if args.prediction:
        config = dataclasses.replace(config, prediction=args.prediction)
    if args.rounds is not None:  # WorldConfig refuses a count below 1
        config = dataclasses.replace(config, unet_rounds=args.rounds)
    if args.smoke:
        from . import gates

        config = dataclasses.replace(config, vae_pool=64, vae_steps=40, vae_batch=4, decoder_steps=40,
                                     decoder_batch=4, dataset_scenes=450, unet_steps=45, unet_batch=8, ip2p_steps=45,
                                     edit_grounding_steps=20)
        gates.FULL_SIZES.update({"t2i": 2, "vae": 2, "ip2p": 2})
    stages = STAGES if args.stage == "all" else (args.stage,)
    if args.smoke and "pack" in stages:  # never overwrite the committed checkpoints with miniature weights
        stages = tuple(s for s in stages if s != "pack") + ("measure",)
    numbers = {}
    for stage in stages:
        numbers[stage] = getattr(training, f"stage_{stage}")(config, workers=args.workers, seconds=args.seconds)
    if args.export:
        from pathlib import Path

        for path in training.export_stages(config, Path(args.export), stages):
            print(f"exported {path}")
    if args.report:
        with open(args.report, "w") as file:
            json.dump(numbers, file, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

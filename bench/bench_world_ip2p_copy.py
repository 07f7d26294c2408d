"""Benchmark: does the shapes world's IP2P UNet copy its image conditioning where the instruction keeps the image?

InstructPix2Pix gets the source latent c_I beside the noisy latent; wherever the edit changes nothing, c_I itself is
a good prediction of the clean latent. ``gates.ip2p_kept_x0_errors`` measures, on the IP2P gate's held-out edits
(background changes left out), the one-step x0 prediction's squared error over the latent cells the edit leaves
untouched, at several noise levels t, side by side for the IP2P UNet given c_I and the instruction, the same with
c_I zero (training's dropped image), the text-to-image UNet (the edited scene's caption, no image) and c_I itself
(``copy``: the VAE's own context effects, the same at every t).

Session 12 on the committed files (40 edits, 28 without background changes):

    t          ip2p ip2p_no_image           t2i          copy
  100        0.0040        0.0044        0.0154        0.0547
  300        0.0082        0.0097        0.0405        0.0547
  500        0.0180        0.0240        0.0686        0.0547
  700        0.0527        0.0916        0.0863        0.0547
  900        0.2607        0.7301        0.3104        0.0547

The IP2P UNet uses c_I (at t = 900, c_I cuts its error to about a third) but reproduces it poorly where sampling
sets the layout and colours: at t = 900 its error is 5x copying's, near what text alone gives the t2i UNet. Only about
4% of that error is the per-channel mean, so it is not the 32-channel GroupNorm stripping means. An eps model's x0
there is x_t minus sigma (7.9) times its eps, so an eps error of 0.004 is 0.26 in x0; 600 steps of fine-tuning with
the eps loss weighted by clamp(1/SNR(t), 1, 20) (x0 weighting at high noise) left it at 0.25 (``--ip2p-unet``).

    COMFYUI_PATH=... .venv/bin/python bench/bench_world_ip2p_copy.py [--timesteps 100 500 700 900] [--edits 40]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    parser.add_argument("--edits", type=int, default=40, help="the IP2P gate's first N held-out edits")
    parser.add_argument("--ip2p-unet", type=Path, default=None,
                        help="a safetensors file of IP2P UNet weights (diffusion_model keys) measured in place of the "
                             "committed ones: a training variant")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from realedit.testbed.comfy_env import bootstrap_comfyui

    bootstrap_comfyui()
    import safetensors.torch
    import torch
    from realedit.testbed.shapes_world.comfy_world import load_world
    from realedit.testbed.shapes_world.gates import ip2p_kept_x0_errors

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    world = load_world()
    if args.ip2p_unet:
        with torch.inference_mode():
            world.ip2p[0].model.diffusion_model.load_state_dict(safetensors.torch.load_file(str(args.ip2p_unet)))
    errors = ip2p_kept_x0_errors(world.ip2p, world.t2i[0], tuple(args.timesteps), n=args.edits)
    print(f"x0 squared error on the latent cells the edit keeps (IP2P gate's first {args.edits} edits, "
          "background changes left out)")
    names = ("ip2p", "ip2p_no_image", "t2i", "copy")
    print(f"{'t':>5} " + " ".join(f"{name:>13}" for name in names))
    for t, row in errors.items():
        print(f"{t:>5} " + " ".join(f"{row[name]:>13.4f}" for name in names))
    if args.json:
        args.json.write_text(json.dumps({"edits": args.edits, "x0_error_kept": errors}, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark: BARET's TTIS vs null-text inversion on the same model, photo latent, prompts and steps
(target time ratio <= 0.33; BARET reports ~16 s vs 50-60 s on SD1.5).

Both run the shared loop with their paper defaults (TTIS: 5 iterations, lr 1e-3 constant; null-text:
10 iterations, lr 1e-2 * (1 - s / 100)) and the *same* early-stop criterion, loss < eps + s * delta:
a step ends as soon as its reconstruction reaches the threshold, so both are timed to the same
per-step reconstruction MSE (or to their iteration cap). Both DDIM-invert the photo with the target
prompt and reconstruct with CFG 7.5 against the empty prompt. Printed side by side in one run: wall
time, UNet forward and backward passes, the final reconstruction MSE of x_0 (DDPM space), steps that
met the threshold, and the time ratio; the "no tuning" row is plain DDIM inversion + CFG sampling
(what both improve on; not timed). The ratio compares like with like only when both reach the same
final MSE: the line under each table says which method reached the other's.

Modes (all on the CPU here; CUDA when available):

* ``toy``: a tiny text-conditioned model *trained* on CPU (``testbed/toy_diffusion.py``: 8x8 latents
  of "a red square on the left", trained once in minutes and cached under $REALEDIT_CACHE or
  ~/.cache/realedit). The photo is one caption's latent, the target a mismatching sentence, so CFG
  7.5 with the target pushes away from the photo as on a trained SD model: the mechanism BARET's
  speed-up rests on. Prints the model's text check (does sampling follow the caption?) first.
* ``tiny`` / ``sd15``: random-weight UNets (tiny; SD1.5-shaped at 32x32) with random embeddings: the
  iteration counts show the mechanics only, not a trained model's convergence.
* a real checkpoint: ``--checkpoint model.safetensors --image photo.png --prompt "target sentence"``
  (ComfyUI's own loader, the VAE encode of the image resized to a multiple of 64, long side ``--size``)
  for the paper's numbers; use a GPU.

    .venv/bin/python bench/bench_baret.py                      # toy, tiny and SD1.5-shaped
    .venv/bin/python bench/bench_baret.py --only toy --same-mse 0.5
    .venv/bin/python bench/bench_baret.py --only toy --ttis-lr 1e-2       # TTIS with a 10x larger step
    .venv/bin/python bench/bench_baret.py --only tiny --steps 50
    .venv/bin/python bench/bench_baret.py --checkpoint v1-5.safetensors --image cat.png --prompt "a photo of a dog"
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from realedit.testbed.comfy_env import bootstrap_comfyui  # noqa: E402

# (photo caption, target sentence): a position, a colour and a shape edit, and the matching sentence.
TOY_PAIRS = (
    (("red", "square", "left"), "a red square on the right"),
    (("red", "square", "left"), "a blue square on the left"),
    (("green", "circle", "top"), "a yellow circle on the bottom"),
    (("red", "square", "left"), "a red square on the left"),
)


@dataclass(frozen=True)
class Row:
    method: str
    seconds: float
    forwards: int
    backwards: int
    final_mse: float
    met: int


def passes(result) -> tuple[int, int]:
    """UNet forward and backward passes of the optimisation (the DDIM inversion adds ``steps`` forwards).

    Per step: one no-grad forward of the fixed branch; one forward per iteration; one backward per
    iteration that updated (all but a converged step's last); at the cap, one forward to measure the
    last update.
    """
    forwards = backwards = 0
    for losses, converged in zip(result.losses, result.converged):
        forwards += 1 + len(losses) + (0 if converged else 1)
        backwards += len(losses) - (1 if converged else 0)
    return forwards, backwards


def random_inputs(width: int, latent_hw: tuple[int, int]) -> tuple[torch.Tensor, list, list]:
    """A seeded random photo latent, target embedding and (small) empty-prompt embedding."""
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, *latent_hw, generator=g)
    cond = [[torch.randn(1, 77, width, generator=g), {}]]
    empty = [[torch.randn(1, 77, width, generator=g) * 0.1, {}]]
    return latent, cond, empty


def plain_reconstruction(model, latent: torch.Tensor, cond: list, empty: list, steps: int):
    """Plain DDIM inversion + CFG 7.5 sampling (the loop stops before updating at every step)."""
    from realedit.hosts.comfy_autograd import ttis_invert

    return ttis_invert(model, latent, cond, empty, steps=steps, iterations=1, eps=1e9).optimisation


@dataclass(frozen=True)
class Options:
    """What the command line sets for every run: the common early stop, ``--same-mse``, ``--ttis-lr``."""

    stop: dict[str, float]
    same_mse: float | None = None
    ttis_lr: float | None = None


def run(name: str, model, latent: torch.Tensor, cond: list, empty: list, steps: int, options: Options) -> list[Row]:
    """Time TTIS and null-text inversion of ``latent`` with the target ``cond``; print and return the rows."""
    from realedit.hosts.comfy_autograd import null_text_invert, ttis_invert

    plain = plain_reconstruction(model, latent, cond, empty, steps)  # also the warm-up: first-call costs
    stop = options.stop
    if options.same_mse is not None:
        threshold = options.same_mse * sum(plain.final_losses) / len(plain.final_losses)
        stop = {"eps": threshold, "delta": 0.0, "iterations": 100}
        print(f"\n{name}: common per-step MSE threshold {threshold:.3g} = {options.same_mse} x plain DDIM's mean "
              "error, iteration cap 100 for both")
    rows = []
    ttis_options = {"lr": options.ttis_lr} if options.ttis_lr is not None else {}
    for method, invert, options in (("TTIS", ttis_invert, ttis_options), ("null-text", null_text_invert, {})):
        start = time.perf_counter()
        result = invert(model, latent, cond, empty, steps=steps, **stop, **options).optimisation
        seconds = time.perf_counter() - start
        forwards, backwards = passes(result)
        rows.append(Row(method, seconds, forwards + steps, backwards, result.final_losses[-1], sum(result.converged)))
    print_table(name, tuple(latent.shape[-2:]), steps, rows, plain)
    return rows


def print_table(name: str, latent_hw: tuple[int, ...], steps: int, rows: list[Row], plain) -> None:
    print(f"\n{name}: latent {latent_hw[0]}x{latent_hw[1]}, {steps} steps, CFG 7.5, early stop eps + s * delta")
    print(f"  {'method':10} {'time s':>8} {'forwards':>9} {'backwards':>10} {'final MSE':>11} {'met threshold':>14}")
    for row in rows:
        print(f"  {row.method:10} {row.seconds:8.2f} {row.forwards:9d} {row.backwards:10d} {row.final_mse:11.3g} "
              f"{row.met:>8d}/{steps}")
    plain_forwards, _ = passes(plain)
    print(f"  {'no tuning':10} {'-':>8} {plain_forwards + steps:9d} {0:10d} {plain.final_losses[-1]:11.3g}")
    ttis, null = rows
    print(f"  time ratio TTIS / null-text: {ttis.seconds / null.seconds:.3f} (target <= 0.33)")
    print(f"  {same_quality(ttis, null)}")


def same_quality(ttis: Row, null: Row, tolerance: float = 0.05) -> str:
    """Which method reached the other's final x_0 MSE (within ``tolerance``, relative): only then is the time
    ratio a speed-up at equal quality."""
    if ttis.final_mse <= null.final_mse * (1 + tolerance):
        relation = "at most" if ttis.final_mse <= null.final_mse else f"within {tolerance:.0%} of"
        return (f"TTIS reached null-text's final MSE ({ttis.final_mse:.3g}, {relation} {null.final_mse:.3g}) in "
                f"{ttis.seconds / null.seconds:.2f} x its time")
    return (f"TTIS did NOT reach null-text's final MSE ({ttis.final_mse:.3g} > {null.final_mse:.3g}): the ratio "
            "compares unequal quality (null-text ends better)")


def run_toy(steps: int, options: Options) -> None:
    """Train (or load) the toy model, print its text check, then benchmark each (photo, target) pair."""
    from realedit.testbed.toy_diffusion import Caption, conditioning, renderer_check, text_check, toy_latent, toy_model

    model, clip, training = toy_model()
    print(f"toy model: final training loss {training.final_loss:.4f} (eps MSE), trained in {training.seconds:.0f} s")
    print(f"  reader on clean renders: {renderer_check().line()}")
    for cfg in (1.0, 7.5):
        print(f"  samples: {text_check(model, clip, cfg).line()}")
    summary = []
    for parts, target in TOY_PAIRS:
        photo = Caption(*parts)
        name = f"toy: photo '{photo.text}', target '{target}'"
        rows = run(name, model, toy_latent(photo), conditioning(clip, target), conditioning(clip, ""), steps,
                   options)
        summary.append((photo.text, target, rows))
    print_summary(summary)


def print_summary(summary: list[tuple[str, str, list[Row]]]) -> None:
    print("\ntoy summary (TTIS and null-text: time s, final MSE; time ratio):")
    print(f"  {'photo':26} {'target':30} {'TTIS s':>6} {'MSE':>9} {'null s':>6} {'MSE':>9} {'ratio':>6}")
    for photo, target, (ttis, null) in summary:
        print(f"  {photo:26} {target:30} {ttis.seconds:6.2f} {ttis.final_mse:9.3g} "
              f"{null.seconds:6.2f} {null.final_mse:9.3g} {ttis.seconds / null.seconds:6.3f}")


def image_latent(vae, path: str, size: int) -> torch.Tensor:
    """VAEEncode of the image at ``path``, resized so its long side is ``size`` and both sides are multiples of 64."""
    import numpy as np
    from PIL import Image

    image = Image.open(path).convert("RGB")
    scale = size / max(image.size)
    width, height = (max(64, round(side * scale / 64) * 64) for side in image.size)
    image = image.resize((width, height), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
    with torch.no_grad():
        return vae.encode(pixels[:, :, :, :3])  # as VAEEncode


def run_checkpoint(args: argparse.Namespace, options: Options) -> None:
    """A real checkpoint through ComfyUI's own loader: the photo's VAE latent, the target and empty prompts."""
    import comfy.sd
    from realedit.testbed.toy_diffusion import conditioning

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)[:3]
    latent = image_latent(vae, args.image, args.size)
    name = f"{os.path.basename(args.checkpoint)}: photo {os.path.basename(args.image)}, target '{args.prompt}'"
    run(name, model, latent, conditioning(clip, args.prompt), conditioning(clip, ""), args.steps or 50, options)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["toy", "tiny", "sd15"])
    parser.add_argument("--steps", type=int, default=None,
                        help="default: 50 (toy, tiny, checkpoint; SD1.5-shaped on GPU), 10 SD1.5-shaped on CPU")
    parser.add_argument("--eps", type=float, default=None, help="common early-stop eps (default BARET's 1e-5)")
    parser.add_argument("--delta", type=float, default=None, help="common early-stop delta (default 2e-5)")
    parser.add_argument("--same-mse", type=float, default=None, metavar="F",
                        help="time both to a common per-step MSE: F x plain DDIM's mean error (e.g. 0.5), cap 100")
    parser.add_argument("--ttis-lr", type=float, default=None,
                        help="TTIS's Adam learning rate (default BARET's 1e-3); null-text keeps its schedule")
    parser.add_argument("--checkpoint", help="a real SD checkpoint (ComfyUI's load_checkpoint_guess_config)")
    parser.add_argument("--image", help="with --checkpoint: the photo to invert")
    parser.add_argument("--prompt", help="with --checkpoint: the target sentence")
    parser.add_argument("--size", type=int, default=512, help="with --checkpoint: the image's long side (default 512)")
    args = parser.parse_args()
    if args.checkpoint and not (args.image and args.prompt):
        parser.error("--checkpoint needs --image and --prompt")
    if (args.image or args.prompt) and not args.checkpoint:
        parser.error("--image and --prompt go with --checkpoint")
    return args


def main() -> None:
    args = parse_args()
    stop = {k: v for k, v in (("eps", args.eps), ("delta", args.delta)) if v is not None}
    options = Options(stop, args.same_mse, args.ttis_lr)
    bootstrap_comfyui()
    if args.checkpoint:
        run_checkpoint(args, options)
        return
    import comfy.model_management
    from realedit.testbed.comfy_models import make_sd15_shaped_unet, make_tiny_unet

    device = comfy.model_management.get_torch_device()
    if args.only in (None, "toy"):
        run_toy(args.steps or 50, options)
    if args.only in (None, "tiny"):
        model = make_tiny_unet("sd1", output_scale=0.01)
        run("tiny UNet", model, *random_inputs(64, (16, 16)), args.steps or 50, options)
    if args.only in (None, "sd15"):
        model, width = make_sd15_shaped_unet(device, dtype=torch.float32)
        steps = args.steps or (50 if device.type == "cuda" else 10)
        run("SD1.5-shaped UNet", model, *random_inputs(width, (32, 32)), steps, options)


if __name__ == "__main__":
    main()

"""The README's demo: every RealEdit method end to end.

    python -m realedit.demo --out out/demo                      # the shapes world, on whichever host is here
    python -m realedit.demo --out out/demo --model tiny         # the tiny random-weight model
    python -m realedit.demo --out out/demo --checkpoint sd15.safetensors   # a real SD checkpoint (ComfyUI)

By default every method runs on the shapes world (its committed checkpoints and rendered photos), with one
contact sheet per method scored against the renderer's ground truth, ``<out>/<workflow>.png``:

* where a ComfyUI checkout is found ($COMFYUI_PATH or /opt/ComfyUI), the shipped workflows run through
  ComfyUI's own executor;
* otherwise on the diffusers host: the probe and StyleDiffusion through the Python API, SpecRef, null-text
  P2P, BARET, ZONE and Keep Unedited Pixels through the batch runner (``--model shapes-world``), on the same
  scenes and edits; the world's captions are tokenised with its committed token table
  (``testbed/shapes_world/tokens.py``), as ComfyUI's tokenizer would.

``--model tiny`` runs the random-weight tiny model instead (ComfyUI: the shipped workflows; diffusers: the
probe, BARET and StyleDiffusion, then the batch runner's example), whose images show that the pipeline runs
and what it writes, not an edit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .testbed.demo_inputs import WorldRun
    from .testbed.shapes_world.demo_tasks import WorldTask

ROOT = Path(__file__).resolve().parent
WORKFLOWS = ROOT / "api_workflows"


def _save_image(image, path: Path) -> None:
    """Save a (H, W, 3) float image in [0, 1] (or a (H, W) mask) as PNG."""
    from PIL import Image

    from .hosts.image_files import quantise

    Image.fromarray(quantise(image).numpy()).save(path)
    print(f"  wrote {path}")


def run_comfy(out: Path, checkpoint: Path | None, size: int, steps: int) -> None:
    from .testbed import comfy_runner
    from .testbed.demo_inputs import tiny_run, untiny_loaders

    print("ComfyUI found: running the shipped workflows through ComfyUI's executor")
    if checkpoint is not None:
        import folder_paths

        folder_paths.add_model_folder_path("checkpoints", str(checkpoint.parent))
    for twin in sorted(WORKFLOWS.glob("*.json")):
        shipped = json.loads(twin.read_text())
        if missing := untiny_loaders(shipped):
            print(f"{twin.stem}: not run (needs {', '.join(missing)} weights)")
            continue
        workflow, overrides, family = tiny_run(shipped, size, steps)
        kwargs: dict = {"output_dir": out / twin.stem, "overrides": overrides, "tiny_checkpoint": family}
        if checkpoint is not None:
            for node in workflow.values():
                if node["class_type"] == "CheckpointLoaderSimple":
                    node["inputs"]["ckpt_name"] = checkpoint.name
            kwargs["tiny_checkpoint"] = None
        result = comfy_runner.run_workflow(workflow, **kwargs)
        print(f"{twin.stem}:")
        for ui in result.ui.values():
            for image in ui.get("images", []):
                print(f"  wrote {out / twin.stem / image.get('subfolder', '') / image['filename']}")
            for text in ui.get("text", []):
                print("  " + str(text).replace("\n", "\n  "))


def run_world_comfy(out: Path, steps: int) -> None:
    """Every shipped workflow that runs on the shapes world, through ComfyUI's executor with the world's
    checkpoints and photos; one labelled contact sheet per workflow, scored against the renderer's truth."""
    from .testbed.demo_inputs import WorldRun, run_world_task
    from .testbed.shapes_world.comfy_world import add_checkpoint_folder
    from .testbed.shapes_world.demo_tasks import world_tasks
    from .testbed.shapes_world.models import register_comfy

    print("ComfyUI found: the shipped workflows on the shapes world (its trained checkpoints), through "
          "ComfyUI's executor")
    register_comfy()
    add_checkpoint_folder()
    for task in world_tasks():
        try:
            run = run_world_task(task, steps, out / task.stem)
        except Exception as exc:  # one failing workflow must not hide the others' sheets
            print(f"{task.stem}: FAILED: {exc}")
            run = WorldRun({}, [f"FAILED: {exc}"])
        _world_sheet(task, run, out / f"{task.stem}.png")


def _world_sheet(task: WorldTask, run: WorldRun, path: Path) -> None:
    """The contact sheet of one world task: its photos, every saved image (named by its SaveImage
    prefix), the expected image and region, and the scores; and the workflow's template-browser card from
    the same tiles, ``<folder>/thumbnails/<workflow>.jpg`` (``scripts/build_ui_workflows.py
    --thumbnails-from`` ships it)."""
    from .hosts.image_files import load_image
    from .testbed.shapes_world.contact_sheet import contact_sheet
    from .testbed.shapes_world.demo_tasks import score

    photos = [] if task.generated else [("source", task.truth.source)]
    if task.reference is not None:
        photos.append(("reference", task.reference))
    saved, edit = [], None
    for node_id in sorted(run.saved, key=int):
        prefix, files = run.saved[node_id]
        for file in files:
            image = load_image(file)
            saved.append((node_id == task.edit_node, prefix, image))
            edit = image if node_id == task.edit_node and edit is None else edit
    expected = [("expected (renderer)", task.truth.expected)]
    region = [] if task.generated else [("region that should change", task.truth.region.float())]
    tiles = photos + [(("EDIT: " if is_edit else "") + prefix, image) for is_edit, prefix, image in saved]
    lines = [task.summary]
    lines.append("scores: " + (score(task, edit).line(task.generated) if edit is not None else "no edit saved"))
    lines += [text.splitlines()[0][:160] for text in run.texts[:3]]
    contact_sheet(f"{task.stem} (shapes world, {task.checkpoint})", tiles + expected + region, lines).save(path)
    print(f"{task.stem}: {lines[1]}\n  wrote {path}")
    _world_card(task, photos, saved, region, path.parent / "thumbnails" / f"{task.stem}.jpg")


def _world_card(task: WorldTask, photos: list, saved: list, region: list, path: Path) -> None:
    """The workflow's template-browser card (JPEG): the photos, the edit, the truth, then the other saved
    images (masks) and the region; ``saved`` holds (is the edit, SaveImage prefix, image)."""
    from .testbed.shapes_world.contact_sheet import workflow_card

    edits = [("generated" if task.generated else "edit", image) for is_edit, _, image in saved if is_edit]
    others = [(prefix.removeprefix("realedit_").replace("_", " "), image) for is_edit, prefix, image in saved
              if not is_edit]
    tiles = photos + edits + [("expected", task.truth.expected)] + others
    tiles += [("region to change", image) for _, image in region]
    heading = (WORKFLOWS / f"{task.stem}.md").read_text().splitlines()[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    workflow_card(f"{heading}, on the shapes world", tiles).save(path, quality=90)


def _probe_sample(unet, vae, scheduler, cond, uncond, noise, steps: int):
    """Sampling at CFG 7.5 from unit ``noise`` (1, 4, h, w) with the attention probe hooked in: the decoded
    image and the probe's summary."""
    import torch

    from .attention.probe import ProbeHook
    from .hosts.diffusers import DiffusersHost
    from .hosts.diffusers_batch import vae_decode
    from .hosts.diffusers_sampling import cfg_denoiser, sample, sampling_sigmas, use_schedule

    _, sigmas = sampling_sigmas(scheduler, steps)
    probe = ProbeHook()
    with torch.no_grad(), DiffusersHost(unet, probe) as host:
        use_schedule(host, sigmas, scheduler.alphas_cumprod)
        denoise = cfg_denoiser(host, scheduler.alphas_cumprod, cond, uncond, cfg=7.5, total_steps=steps)
        latent = sample(denoise, noise * sigmas[0], sigmas)
    return vae_decode(vae, latent)[0], probe.summary()


def run_world_diffusers(out: Path, steps: int) -> None:
    """Every method on the shapes world on the diffusers host (no ComfyUI): the probe and StyleDiffusion
    directly, SpecRef, null-text P2P, BARET, ZONE and Keep Unedited Pixels through the batch runner
    (``--model shapes-world``), on the ComfyUI demo's scenes and edits; one contact sheet per method, scored
    against the renderer's truth, ``<out>/<method>.png``."""
    import dataclasses

    from .batching.driver import run_batch
    from .batching.models import load_model
    from .batching.outputs import read_record, row_dir
    from .testbed.demo_inputs import WorldRun
    from .testbed.shapes_world.demo_tasks import world_tasks
    from .testbed.shapes_world.world_batch import WORKFLOW_OF, write_world_manifest

    print("No ComfyUI found: every method on the shapes world (its trained checkpoints) on the diffusers host")
    model = load_model("shapes-world", device="cpu")
    tasks = {task.stem: task for task in world_tasks()}
    for stem, run in (("attention_probe", _world_probe), ("stylediffusion_edit", _world_stylediffusion)):
        task = tasks[stem]
        image, text = run(model, task, steps)
        _save_image(image, out / f"{stem}_edit.png")
        _world_sheet(dataclasses.replace(task, edit_node="0"), WorldRun({"0": ("edit", [out / f"{stem}_edit.png"])},
                                                                          [text]), out / f"{stem}.png")
    manifest, row_tasks = write_world_manifest(out / "batch_inputs", steps)
    summary = run_batch(manifest, "shapes-world", out / "batch")
    print(f"batch runner: {summary['ok']} rows ok, {summary['failed']} failed")
    for row_id, task in row_tasks.items():
        record = read_record(out / "batch", row_id) or {}
        files = sorted(record.get("files", []), key=lambda f: f != "edit.png")  # the edit first
        saved = {str(i): (Path(f).stem, [row_dir(out / "batch", row_id) / f]) for i, f in enumerate(files)}
        texts = [str(record.get("report") or record.get("error") or record.get("status", "no record"))]
        _world_sheet(dataclasses.replace(task, edit_node="0"), WorldRun(saved, texts),
                     out / f"{WORKFLOW_OF[row_id]}.png")


def _world_probe(model, task: WorldTask, steps: int):
    """Text to image of the probe's caption at CFG 7.5 with the attention probe hooked in."""
    import torch

    from .testbed.shapes_world.scene import SIZE

    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    return _probe_sample(model.unet, model.vae, model.scheduler, model.encode(task.truth.target_caption),
                         model.encode(""), noise, steps)


def _world_stylediffusion(model, task: WorldTask, steps: int):
    """StyleDiffusion's value inversion of the task's photo with its source caption, then the P2Plus edit to the
    target caption (P2P's automatic Replace / Refine, LocalBlend on the two edited words)."""

    from .attention.local_blend import LocalBlend
    from .attention.p2p import cross_edit, resolve_mode
    from .attention.stylediffusion import P2PlusControls
    from .attention.tokens import word_positions
    from .hosts.diffusers_batch import vae_decode, vae_encode
    from .hosts.diffusers_stylediffusion import stylediffusion_edit, value_invert
    from .settings.stylediffusion import SD_DEFAULTS
    from .testbed.shapes_world.demo_tasks import WORLD_MAP_DOWNSCALE

    source, target = task.truth.source_caption, task.truth.target_caption
    old, new = (w.strip() for w in task.inputs["8"]["blend_words"].split(","))
    src, tgt = model.tokenize(source), model.tokenize(target)
    blend = LocalBlend([word_positions(source, old, model.tokenize), word_positions(target, new, model.tokenize)],
                       threshold=SD_DEFAULTS.blend_threshold, start=SD_DEFAULTS.blend_start)
    controls = P2PlusControls(cross_edit=cross_edit(resolve_mode("auto", src, tgt), src, tgt), local_blend=blend,
                              map_downscale=WORLD_MAP_DOWNSCALE[task.stem])
    latent = vae_encode(model.vae, task.truth.source[None])
    cond, uncond = model.encode(source), model.encode("")
    inversion = value_invert(model.unet, model.scheduler, latent, cond, uncond, steps=steps,
                             map_downscale=WORLD_MAP_DOWNSCALE[task.stem])
    result = stylediffusion_edit(model.unet, model.scheduler, inversion, cond, model.encode(target), uncond,
                                 controls=controls)
    return vae_decode(model.vae, result.latent)[0], inversion.report()


def run_diffusers(out: Path, size: int, steps: int) -> None:
    import torch

    from .testbed.diffusers_models import make_ddim_scheduler, make_tiny_diffusers_unet, make_tiny_diffusers_vae

    print("No ComfyUI found: running on the diffusers host (tiny random-weight UNet and VAE)")
    unet, vae, scheduler = make_tiny_diffusers_unet("sd1"), make_tiny_diffusers_vae(), make_ddim_scheduler()
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    image, summary = _probe_sample(unet, vae, scheduler, cond, uncond,
                                   torch.randn(1, 4, size // 8, size // 8, generator=g), steps)
    print("probe (hooked sampling):\n  " + summary.replace("\n", "\n  "))
    _save_image(image, out / "probe_sample.png")
    run_diffusers_baret(out, unet, vae, scheduler, size, steps, cond, uncond)
    run_diffusers_stylediffusion(out, unet, vae, scheduler, size, steps, cond, uncond)
    run_diffusers_batch(out, size, steps)


def run_diffusers_batch(out: Path, size: int, steps: int) -> None:
    """SpecRef, null-text P2P, BARET, ZONE (a given edit, and an IP2P edit) and Keep Unedited Pixels through
    the batch runner's diffusers-host functions on the same synthetic photos (``batching.example``), with the
    tiny model: every method's images and masks, and the runner's contact sheet."""
    from .batching.driver import run_batch
    from .batching.example import write_example
    from .batching.outputs import CONTACT_SHEET

    manifest = write_example(out / "batch_inputs", size=size, steps=steps)
    summary = run_batch(manifest, "tiny", out / "batch")
    print(f"batch runner on the diffusers host: {summary['ok']} rows ok, {summary['failed']} failed; contact sheet "
          f"{out / 'batch' / CONTACT_SHEET}")


def run_diffusers_baret(out: Path, unet, vae, scheduler, size: int, steps: int, target, uncond) -> None:
    """BARET on the diffusers host: TTIS on the synthetic source photo, then the three-process edit."""

    from .hosts.diffusers_baret import baret_edit, ttis_invert
    from .hosts.diffusers_batch import vae_decode, vae_encode
    from .testbed.images import source_scene

    latent = vae_encode(vae, source_scene(size, size).image)
    inversion = ttis_invert(unet, scheduler, latent, target, uncond, steps=steps)
    print("BARET TTIS:\n  " + inversion.optimisation.report().replace("\n", "\n  "))
    result = baret_edit(unet, scheduler, inversion, target, uncond)
    for name in ("edit", "transition", "reconstruction"):
        _save_image(vae_decode(vae, getattr(result, name))[0], out / f"baret_{name}.png")


def run_diffusers_stylediffusion(out: Path, unet, vae, scheduler, size: int, steps: int, source, uncond) -> None:
    """StyleDiffusion on the diffusers host: value-embedding inversion (direct; 10 iterations per step at most on
    the random model), then the P2Plus edit towards a second random prompt."""
    import torch

    from .hosts.diffusers_batch import vae_decode, vae_encode
    from .hosts.diffusers_stylediffusion import stylediffusion_edit, value_invert
    from .testbed.images import source_scene

    latent = vae_encode(vae, source_scene(size, size).image)
    inversion = value_invert(unet, scheduler, latent, source, uncond, steps=steps, max_iterations=10)
    print("StyleDiffusion value inversion:\n  " + inversion.report().replace("\n", "\n  "))
    target = source + 0.5 * torch.randn(source.shape, generator=torch.Generator().manual_seed(1))
    result = stylediffusion_edit(unet, scheduler, inversion, source, target, uncond)
    for name, latent in (("edit", result.latent), ("source", result.reconstruction)):
        _save_image(vae_decode(vae, latent)[0], out / f"stylediffusion_{name}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for images and masks")
    parser.add_argument("--checkpoint", type=Path, help="a real SD1.x checkpoint (.safetensors); needs ComfyUI")
    parser.add_argument("--host", choices=["auto", "comfy", "diffusers"], default="auto")
    parser.add_argument("--model", choices=["world", "tiny"], default="world",
                        help="world: the shapes world's trained checkpoints, with contact sheets scored against "
                             "the renderer (either host); tiny: the random-weight tiny model")
    parser.add_argument("--size", type=int, default=128, help="image size in pixels (tiny model: 128)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.out = args.out.resolve()  # ComfyUI's SaveImage refuses a relative output folder
    args.out.mkdir(parents=True, exist_ok=True)

    from .testbed.comfy_env import bootstrap_comfyui, find_comfyui

    use_comfy = args.host == "comfy" or (args.host == "auto" and find_comfyui() is not None)
    if args.checkpoint is not None and not use_comfy:
        sys.exit("--checkpoint needs a ComfyUI checkout (set COMFYUI_PATH).")
    if use_comfy:
        bootstrap_comfyui()
        if args.model == "world" and args.checkpoint is None:
            run_world_comfy(args.out, args.steps)
        else:
            run_comfy(args.out, args.checkpoint, args.size, args.steps)
    elif args.model == "world":
        run_world_diffusers(args.out, args.steps)
    else:
        run_diffusers(args.out, args.size, args.steps)
    print(f"done: outputs in {args.out}")


if __name__ == "__main__":
    main()

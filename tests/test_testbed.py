"""The tiny-model test bed: synthetic images, tiny SAM, tiny ComfyUI checkpoint parts, host parity,
and the in-process workflow runner."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from realedit.testbed import images

# ----------------------------------------------------------------------------------------------
# Synthetic images (no ComfyUI)
# ----------------------------------------------------------------------------------------------


def test_scenes_are_comfy_image_and_mask_tensors() -> None:
    for scene in (images.source_scene(), images.reference_scene()):
        assert scene.image.shape == (1, 128, 128, 3) and scene.image.dtype == torch.float32
        assert scene.mask.shape == (1, 128, 128) and scene.mask.dtype == torch.float32
        assert 0.0 <= float(scene.image.min()) and float(scene.image.max()) <= 1.0
        assert set(scene.mask.unique().tolist()) == {0.0, 1.0}
    disc = images.source_scene().mask
    assert float(disc.mean()) == pytest.approx(math.pi * 0.25**2, rel=0.03)


def test_scenes_are_deterministic_and_distinct() -> None:
    a, b = images.source_scene(), images.source_scene()
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)
    ref = images.reference_scene()
    assert not torch.equal(a.mask, ref.mask)
    # The object is red in the source and blue in the reference.
    src_obj = a.image[0][a.mask[0].bool()].mean(0)
    ref_obj = ref.image[0][ref.mask[0].bool()].mean(0)
    assert src_obj[0] > src_obj[2] and ref_obj[2] > ref_obj[0]
    assert images.batch(a.image, ref.image).shape == (2, 128, 128, 3)


# ----------------------------------------------------------------------------------------------
# Tiny SAM (no ComfyUI)
# ----------------------------------------------------------------------------------------------


def test_tiny_sam_runs_the_automatic_mask_generator() -> None:
    from realedit.testbed.sam import make_tiny_sam
    from segment_anything import SamAutomaticMaskGenerator

    sam = make_tiny_sam(seed=0)
    assert not sam.training
    twin = make_tiny_sam(seed=0).state_dict()
    assert all(torch.equal(value, twin[key]) for key, value in sam.state_dict().items())
    image = (images.source_scene(64, 64).image[0].numpy() * 255).astype("uint8")
    # Random weights predict poor masks: accept them all so filtering, NMS and RLE all run.
    generator = SamAutomaticMaskGenerator(sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    with torch.no_grad():
        masks = generator.generate(image)
    assert isinstance(masks, list) and masks
    assert masks[0]["segmentation"].shape == (64, 64)


# ----------------------------------------------------------------------------------------------
# Tiny ComfyUI CLIP / VAE / checkpoint
# ----------------------------------------------------------------------------------------------


def test_tiny_clip_uses_the_bundled_tokenizer(comfy) -> None:
    from realedit.testbed.comfy_models import make_tiny_clip
    from transformers import CLIPTokenizer

    clip = make_tiny_clip(seed=0)
    tokens = clip.tokenize("a photo of a cat")
    ids = [token for token, _weight in tokens["l"][0]]
    import comfy.sd1_clip

    bundled = CLIPTokenizer.from_pretrained(str(Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"))
    expected = bundled("a photo of a cat")["input_ids"]
    assert expected[0] == 49406 and expected[-1] == 49407
    assert ids[: len(expected)] == expected and len(ids) == 77
    cond = clip.encode_from_tokens(tokens)
    assert cond.shape == (1, 77, 64) and torch.isfinite(cond).all()
    assert torch.equal(cond, make_tiny_clip(seed=0).encode_from_tokens(tokens))
    assert not torch.equal(cond, make_tiny_clip(seed=1).encode_from_tokens(tokens))


@pytest.mark.parametrize(("family", "pooled"), [("sd2", 64), ("sdxl", 1280)])
def test_tiny_clip_other_families(comfy, family: str, pooled: int) -> None:
    from realedit.testbed.comfy_models import make_tiny_clip

    clip = make_tiny_clip(seed=0, family=family)
    cond, pooled_output = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True)
    assert cond.shape == (1, 77, 64) and pooled_output.shape == (1, pooled)


def test_tiny_vae_round_trip_shapes(comfy) -> None:
    from realedit.testbed.comfy_models import make_tiny_vae

    vae = make_tiny_vae(seed=0)
    image = images.source_scene().image
    with torch.inference_mode():  # as ComfyUI's executor runs VAEEncode/VAEDecode
        latent = vae.encode(image)
        decoded = vae.decode(latent)
        again = make_tiny_vae(seed=0).encode(image)
    assert latent.shape == (1, 4, 16, 16) and torch.isfinite(latent).all()
    assert decoded.shape == (1, 128, 128, 3)
    assert 0.0 <= float(decoded.min()) and float(decoded.max()) <= 1.0
    assert torch.equal(latent, again)


def test_tiny_checkpoint_parts(comfy) -> None:
    import comfy.model_patcher
    import comfy.sd
    from realedit.testbed.comfy_models import make_tiny_checkpoint

    model, clip, vae = make_tiny_checkpoint("sd1", seed=0)
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)


# ----------------------------------------------------------------------------------------------
# Host parity: the same random weights in ComfyUI and diffusers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "ip2p"])
def test_unet_parity_comfy_vs_diffusers(comfy, family: str) -> None:
    from realedit.testbed.comfy_models import make_tiny_unet
    from realedit.testbed.diffusers_models import sdxl_added_cond
    from realedit.testbed.parity import comfy_unet_to_diffusers, sdxl_comfy_y

    model = make_tiny_unet(family, seed=3)
    unet = comfy_unet_to_diffusers(model, family)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8 if family == "ip2p" else 4, 16, 16, generator=g)
    context = torch.randn(2, 77, 64, generator=g)
    t = torch.tensor([999.0, 21.0])
    added = sdxl_added_cond(2) if family == "sdxl" else None
    y = sdxl_comfy_y(added["text_embeds"], added["time_ids"]) if added else None
    with torch.no_grad():
        ours = model.model.diffusion_model(x, timesteps=t, context=context, y=y)
        theirs = unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    assert ours.shape == theirs.shape == (2, 4, 16, 16)
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-4


def test_parity_conversion_reports_mismatch(comfy) -> None:
    from realedit.testbed.comfy_models import make_tiny_unet
    from realedit.testbed.parity import ParityError, comfy_unet_to_diffusers

    with pytest.raises(ParityError, match="differ"):
        comfy_unet_to_diffusers(make_tiny_unet("sd1"), "sd2")  # 1x1-conv vs linear proj_in/proj_out


# ----------------------------------------------------------------------------------------------
# In-process workflow runner
# ----------------------------------------------------------------------------------------------

TXT2IMG = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 7, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
}


def test_runner_executes_core_workflow_on_tiny_checkpoint(comfy, tmp_path: Path) -> None:
    from realedit.testbed.comfy_runner import run_workflow

    first = run_workflow(TXT2IMG, outputs=["8", "3"], output_dir=tmp_path)
    image = first["8"][0]
    assert image.shape == (1, 128, 128, 3) and torch.isfinite(image).all()
    assert first["3"][0]["samples"].shape == (1, 4, 16, 16)
    assert first.ui["9"]["images"][0]["type"] == "temp"  # PreviewImage ran too
    second = run_workflow(TXT2IMG, outputs=["8"], output_dir=tmp_path)
    assert torch.equal(image, second["8"][0])
    assert TXT2IMG["4"]["class_type"] == "CheckpointLoaderSimple"  # the workflow is not modified


def test_runner_reports_comfy_errors(comfy) -> None:
    from realedit.testbed.comfy_runner import WorkflowError, run_workflow

    bad = dict(TXT2IMG, **{"3": {**TXT2IMG["3"], "inputs": {**TXT2IMG["3"]["inputs"], "sampler_name": "nope"}}})
    with pytest.raises(WorkflowError, match="sampler_name") as validation:
        run_workflow(bad, outputs=["8"])
    assert validation.value.stage == "validation" and validation.value.node_id == "3"

    # An override replaces any node; a 3-channel latent makes the 4-channel UNet fail in KSampler.
    wrong_latent = ({"samples": torch.ones(1, 3, 16, 16)},)
    with pytest.raises(WorkflowError, match="channels") as execution:
        run_workflow(TXT2IMG, outputs=["3"], overrides={"5": wrong_latent}, run_output_nodes=False)
    assert execution.value.stage == "execution" and execution.value.class_type == "KSampler"


def test_runner_loads_the_pack_through_comfy(comfy) -> None:
    from realedit.testbed.comfy_runner import PackNotAvailableError, load_pack

    try:
        registered = load_pack()
    except PackNotAvailableError as ex:
        pytest.skip(str(ex))
    import nodes

    assert registered and all(name in nodes.NODE_CLASS_MAPPINGS for name in registered)

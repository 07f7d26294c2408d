"""The trained toy diffusion model's data and training loop (testbed/toy_diffusion.py), cheaply."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def toy(comfy):
    from realedit.testbed import toy_diffusion

    return toy_diffusion


def test_every_caption_reads_back_from_its_render(toy):
    check = toy.renderer_check()
    assert (check.colour, check.position, check.samples) == (1.0, 1.0, len(toy.ALL_CAPTIONS))


def test_jittered_renders_still_read_as_their_caption(toy):
    captions = list(toy.ALL_CAPTIONS)
    latents = toy.render(captions, random.Random(0))
    assert [toy.read_latent(x) for x in latents] == [(c.colour, c.position) for c in captions]


def test_toy_latent_is_user_space_of_a_unit_variance_render(toy):
    caption = toy.Caption("red", "square", "left")
    latent = toy.toy_latent(caption)
    assert latent.shape == (1, 4, toy.LATENT_SIZE, toy.LATENT_SIZE)
    assert torch.allclose(toy.LATENT_FORMAT.process_in(latent), toy.render([caption]), atol=1e-6)
    assert caption.text == "a red square on the left"
    assert 0.9 < toy.render(list(toy.ALL_CAPTIONS)).std().item() < 1.1


def test_cache_key_follows_the_config(toy):
    config = toy.DEFAULT_CONFIG
    assert config.key() == dataclasses.replace(config).key()
    assert config.key() != dataclasses.replace(config, train_steps=config.train_steps + 1).key()


def test_a_few_training_steps_lower_the_eps_loss(toy):
    from realedit.testbed.comfy_models import make_tiny_clip

    config = dataclasses.replace(toy.DEFAULT_CONFIG, batch=8, warmup=2)
    model, clip = toy.make_toy_unet(config), make_tiny_clip(config.clip_seed)
    embeddings, _ = toy.caption_embeddings(clip)
    x0, context = toy.render(list(toy.ALL_CAPTIONS[:16])), embeddings[:16]
    schedule, unet = toy.alphas_cumprod(model), model.model.diffusion_model

    def held_out_loss() -> float:
        with torch.no_grad():
            return toy.eps_loss(unet, schedule, x0, context, torch.Generator().manual_seed(1)).item()

    before = held_out_loss()
    log = toy.train(model, clip, config, steps=30, log=None)
    assert len(log.losses) == 1 and log.final_loss < before
    assert held_out_loss() < 0.8 * before

"""Small helpers for ComfyUI-host tests (imported after the `comfy` fixture bootstrapped ComfyUI)."""

from __future__ import annotations

import torch

LATENT_HW = (16, 16)  # 128x128 images: every attention layer is small on the CPU


def conditioning(family: str, seed: int, tokens: int = 77) -> list:
    """A random CONDITIONING of the tiny models' width (64), with SDXL's pooled output when needed."""
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
    return [[torch.randn(1, tokens, 64, generator=g), extra]]


def sample(model, family: str = "sd1", *, steps: int = 4, cfg: float = 7.0, sampler: str = "euler",
           scheduler: str = "normal", seed: int = 0, uncond_tokens: int = 77,
           latent_hw: tuple[int, int] = LATENT_HW) -> torch.Tensor:
    """ComfyUI's own sampling entry point (what KSampler calls) on random conditioning."""
    import comfy.sample

    latent = torch.zeros(1, 4, *latent_hw)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler, scheduler,
        conditioning(family, 1), conditioning(family, 2, uncond_tokens), latent,
        seed=seed, disable_pbar=True,
    )


def miniature_world_with_data(cache, monkeypatch, **changes):
    """A miniature shapes-world config (8 VAE scenes, 12 training scenes, batches of 4; ``changes`` on top) whose
    VAE and data stages are trained into the stage cache at ``cache``, made the session's ``REALEDIT_CACHE``."""
    import dataclasses

    from realedit.testbed.shapes_world import training
    from realedit.testbed.shapes_world.config import DEFAULT_CONFIG

    settings = dict(vae_pool=8, vae_steps=2, vae_batch=2, vae_crop=64, dataset_scenes=12, unet_batch=4)
    config = dataclasses.replace(DEFAULT_CONFIG, **{**settings, **changes})
    monkeypatch.setenv("REALEDIT_CACHE", str(cache))
    training.stage_vae(config, log=lambda line: None)
    training.stage_data(config, log=lambda line: None)
    return config

"""BARET on the diffusers host (the Python API), and agreement with the ComfyUI host on the same weights."""

from __future__ import annotations

import pytest
import torch
from realedit.attention.baret import BaretControls

STEPS, ITERATIONS, LR = 3, 2, 2e-2


@pytest.fixture(scope="module")
def hosts(comfy):
    """The tiny smooth SD1 UNet in both hosts, one random photo latent and two random prompts."""
    import comfy_helpers
    from realedit.testbed.comfy_models import make_tiny_unet
    from realedit.testbed.diffusers_models import make_ddim_scheduler
    from realedit.testbed.parity import comfy_unet_to_diffusers

    model = make_tiny_unet("sd1", output_scale=0.01)
    unet = comfy_unet_to_diffusers(model, "sd1")
    target, negative = comfy_helpers.conditioning("sd1", 1), comfy_helpers.conditioning("sd1", 2)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    return model, unet, make_ddim_scheduler(), latent, target, negative


def _ttis_both(hosts, **kw):
    from realedit.hosts import comfy_autograd, diffusers_baret

    model, unet, scheduler, latent, target, negative = hosts
    settings = dict(steps=STEPS, iterations=ITERATIONS, lr=LR, eps=0.0, delta=0.0, **kw)
    ours = comfy_autograd.ttis_invert(model, latent, target, negative, **settings)
    theirs = diffusers_baret.ttis_invert(unet, scheduler, model.model.process_latent_in(latent), target[0][0],
                                         negative[0][0], **settings)
    return ours, theirs


def test_comfy_and_diffusers_agree_on_ttis_losses(hosts):
    """Same weights, same latent (diffusers takes the scaled latent ComfyUI makes with process_latent_in):
    every iteration's loss agrees to 1e-3 relative (fp32 kernels differ between the UNet implementations)."""
    ours, theirs = _ttis_both(hosts)
    assert torch.allclose(ours.sigmas, theirs.sigmas, rtol=1e-5)
    for a, b in zip(ours.optimisation.losses, theirs.optimisation.losses):
        assert a == pytest.approx(b, rel=1e-3)
    for a, b in zip(ours.embeddings, theirs.embeddings):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_comfy_and_diffusers_agree_on_the_baret_edit(hosts):
    from realedit.hosts.comfy_baret import baret_edit as comfy_edit
    from realedit.hosts.diffusers_baret import baret_edit as diffusers_edit

    model, unet, scheduler, _, target, negative = hosts
    ours, theirs = _ttis_both(hosts)
    controls = BaretControls()
    a = comfy_edit(model, ours, target, negative, controls=controls)
    b = diffusers_edit(unet, scheduler, theirs, target[0][0], negative[0][0], controls=controls)
    for name in ("edit", "transition", "reconstruction"):
        x, y = model.model.process_latent_in(getattr(a, name)), getattr(b, name)
        assert float((x - y).norm() / y.norm()) < 1e-3, name


def test_diffusers_null_text_leaves_the_weights_untouched_and_without_grad(hosts):
    from realedit.hosts.diffusers_baret import null_text_invert

    model, unet, scheduler, latent, target, negative = hosts
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    flags = [p.requires_grad for p in unet.parameters()]
    inversion = null_text_invert(unet, scheduler, latent, target[0][0], negative[0][0], steps=2, iterations=2)
    assert inversion.branch == "uncond" and len(inversion.embeddings) == 2
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert [p.requires_grad for p in unet.parameters()] == flags
    assert all(p.grad is None for p in unet.parameters())
    assert not any(e.requires_grad for e in inversion.embeddings)
    from realedit.hosts.diffusers import HookedAttnProcessor

    assert not any(isinstance(p, HookedAttnProcessor) for p in unet.attn_processors.values())  # taken off


def test_diffusers_edit_refuses_another_target_negative_or_cfg_than_ttis_used(hosts):
    from realedit.attention.baret import BaretError
    from realedit.hosts.diffusers_baret import baret_edit, ttis_invert

    model, unet, scheduler, latent, target, negative = hosts
    inversion = ttis_invert(unet, scheduler, model.model.process_latent_in(latent), target[0][0], negative[0][0],
                            steps=2, iterations=1)
    other = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(9))
    with pytest.raises(BaretError, match="target prompt"):
        baret_edit(unet, scheduler, inversion, other, negative[0][0])
    with pytest.raises(BaretError, match="negative prompt"):
        baret_edit(unet, scheduler, inversion, target[0][0], other)
    with pytest.raises(BaretError, match="cfg is 3"):
        baret_edit(unet, scheduler, inversion, target[0][0], negative[0][0], cfg=3.0)

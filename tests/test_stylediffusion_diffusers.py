"""StyleDiffusion on the diffusers host (the Python API), and agreement with the ComfyUI host on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
from realedit.attention.hooks import ChainHook, RowInfo
from realedit.attention.stylediffusion import (
    CrossMapRecorder,
    LiveValue,
    P2PlusControls,
    StyleDiffusionError,
    attention_loss,
    map_target_call,
)

STEPS, ITERATIONS = 3, 3


@pytest.fixture(scope="module")
def hosts(comfy):
    """The tiny smooth SD1 UNet in both hosts, one random photo latent and three random prompts."""
    import comfy_helpers
    from realedit.testbed.comfy_models import make_tiny_unet
    from realedit.testbed.diffusers_models import make_ddim_scheduler
    from realedit.testbed.parity import comfy_unet_to_diffusers

    model = make_tiny_unet("sd1", output_scale=0.01)
    unet = comfy_unet_to_diffusers(model, "sd1")
    conds = [comfy_helpers.conditioning("sd1", seed) for seed in (1, 3, 2)]  # source, target, negative
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    return model, unet, make_ddim_scheduler(), latent, *conds


def _invert_both(hosts, **kw):
    from realedit.hosts import comfy_stylediffusion, diffusers_stylediffusion

    model, unet, scheduler, latent, source, _, negative = hosts
    settings = dict(steps=STEPS, max_iterations=ITERATIONS, **kw)
    ours = comfy_stylediffusion.value_invert(model, latent, source, negative, **settings)
    theirs = diffusers_stylediffusion.value_invert(unet, scheduler, model.model.process_latent_in(latent),
                                                   source[0][0], negative[0][0], **settings)
    return ours, theirs


@pytest.mark.parametrize("map_downscale", [4, 2])
def test_comfy_and_diffusers_agree_on_every_iterations_losses(hosts, map_downscale):
    """Same weights and latent: every iteration's loss and its attention part agree to 1e-3 relative (fp32
    kernels differ between the two UNet implementations), and so do the learned A_s, B_s; with the attention
    term on the official layers (4) and on others (2)."""
    ours, theirs = _invert_both(hosts, map_downscale=map_downscale)
    assert ours.iterations == theirs.iterations
    for a, b in zip(ours.losses, theirs.losses):
        assert a == pytest.approx(b, rel=1e-3)
    for a, b in zip(ours.attention_losses, theirs.attention_losses):
        assert a == pytest.approx(b, rel=1e-3)
    for a, b in zip((*ours.scales, *ours.shifts), (*theirs.scales, *theirs.shifts)):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_comfy_and_diffusers_agree_on_the_p2plus_edit(hosts):
    from realedit.hosts.comfy_stylediffusion import stylediffusion_edit as comfy_edit
    from realedit.hosts.diffusers_stylediffusion import stylediffusion_edit as diffusers_edit

    model, unet, scheduler, _, source, target, negative = hosts
    ours, theirs = _invert_both(hosts)
    controls = P2PlusControls(tau_u=0.5)
    a = comfy_edit(model, ours, source, target, negative, controls=controls)
    b = diffusers_edit(unet, scheduler, theirs, source[0][0], target[0][0], negative[0][0], controls=controls)
    for x, y in ((a.latent, b.latent), (a.reconstruction, b.reconstruction)):
        x = model.model.process_latent_in(x)
        assert float((x - y).norm() / y.norm()) < 1e-3


def test_identity_value_input_leaves_the_unet_output_bit_for_bit_and_uncond_rows_never_change(hosts):
    from realedit.hosts.diffusers import DiffusersHost

    _, unet, _, latent, source, _, negative = hosts
    context = torch.cat([negative[0][0], source[0][0]])
    rows = RowInfo.from_chunks(["uncond", "cond"], 1)
    live = LiveValue()
    live.value = source[0][0] * torch.ones(1, 77, 64) + torch.zeros(1, 77, 64)
    x = torch.cat([latent, latent])
    with torch.no_grad():
        plain = unet(x, 500, context).sample
        with DiffusersHost(unet, ChainHook(), value_input=live) as host:
            same = host.predict_noise(x, 500, context, rows=rows)
            live.value = torch.randn(1, 77, 64)
            other = host.predict_noise(x, 500, context, rows=rows)
    assert torch.equal(same, plain)
    assert not torch.allclose(other[1], plain[1]) and torch.equal(other[0], plain[0])  # the uncond row never changes


def test_the_weights_are_untouched_without_grad_and_processors_restored(hosts):
    from realedit.hosts.diffusers import HookedAttnProcessor
    from realedit.hosts.diffusers_stylediffusion import value_invert

    _, unet, scheduler, latent, source, _, negative = hosts
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    flags = [p.requires_grad for p in unet.parameters()]
    value_invert(unet, scheduler, latent, source[0][0], negative[0][0], steps=2, max_iterations=2)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert [p.requires_grad for p in unet.parameters()] == flags
    assert all(p.grad is None for p in unet.parameters())
    assert not any(isinstance(p, HookedAttnProcessor) for p in unet.attn_processors.values())


def test_the_official_map_pairing_is_exact_on_a_label_blind_unet(hosts):
    """With the time embedding zeroed the UNet ignores the timestep label: at the exact trajectory latent z_{N-s}
    and A = 1, B = 0 the maps equal those of inversion call N - s (sd:746, 809), not of the label's call N - 1 - s."""
    import copy

    from realedit.hosts.diffusers import DiffusersHost
    from realedit.hosts.diffusers_baret import branch_denoiser
    from realedit.hosts.diffusers_sampling import ddim_invert, use_schedule

    _, unet, scheduler, latent, source, _, _ = hosts
    blind = copy.deepcopy(unet)
    with torch.no_grad():
        blind.time_embedding.linear_2.weight.zero_()
        blind.time_embedding.linear_2.bias.zero_()
    steps, recorder, live = 4, CrossMapRecorder(4), LiveValue()
    targets = []
    with DiffusersHost(blind, recorder, self_attention=False, value_input=live) as host, torch.no_grad():
        recorder.active = True
        inversion = ddim_invert(host, scheduler, latent, source[0][0], steps=steps,
                                callback=lambda i, x: targets.append(recorder.take()))
        denoise = branch_denoiser(host, scheduler, steps)
        use_schedule(host, inversion.sampling_sigmas, scheduler.alphas_cumprod)
        live.value = source[0][0]
        for s in range(1, steps):
            denoise(inversion.latent_for_edit_step(s), float(inversion.sampling_sigmas[s]), source[0][0], "cond")
            maps = recorder.take()
            official = attention_loss(maps, targets[map_target_call(s, steps)]).item()
            by_label = attention_loss(maps, targets[steps - 1 - s]).item()
            assert official < 1e-10 < by_label, (s, official, by_label)


def test_a_foreign_cross_attention_processor_is_refused_with_the_value_input(hosts):
    from diffusers.models.attention_processor import AttnProcessor
    from realedit.hosts.diffusers import DiffusersHost

    _, unet, _, latent, source, _, _ = hosts
    other = type(unet)(**unet.config)
    other.set_attn_processor(AttnProcessor())
    live = LiveValue()
    with DiffusersHost(other, ChainHook(), value_input=live) as host, torch.no_grad():
        with pytest.raises(ValueError, match="AttnProcessor2_0"):
            host.predict_noise(latent, 500, source[0][0])


def test_bad_prompts_and_inversions_are_refused_by_name(hosts):
    from realedit.hosts.diffusers_baret import ttis_invert
    from realedit.hosts.diffusers_edit import specref_edit
    from realedit.hosts.diffusers_stylediffusion import stylediffusion_edit, value_invert

    _, unet, scheduler, latent, source, target, negative = hosts
    with pytest.raises(StyleDiffusionError, match="154 tokens"):
        value_invert(unet, scheduler, latent, torch.zeros(1, 154, 64), negative[0][0], steps=2)
    inversion = value_invert(unet, scheduler, latent, source[0][0], negative[0][0], steps=2, max_iterations=1)
    with pytest.raises(ValueError, match="StyleDiffusion Edit Sampler"):
        specref_edit(unet, scheduler, inversion, source[0][0], target[0][0], negative[0][0])
    ttis = ttis_invert(unet, scheduler, latent, target[0][0], negative[0][0], steps=2, iterations=1)
    with pytest.raises(StyleDiffusionError, match="Target-Text Inversion"):
        stylediffusion_edit(unet, scheduler, ttis, source[0][0], target[0][0], negative[0][0])
    with pytest.raises(StyleDiffusionError, match="76 tokens"):
        stylediffusion_edit(unet, scheduler, inversion, source[0][0], target[0][0][:, :76], negative[0][0])
    assert math.isfinite(inversion.final_losses[0])

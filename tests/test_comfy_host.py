"""The ComfyUI adapter: hooks see the right layers, grids, steps and rows, and change nothing by
themselves. Runs ComfyUI's own samplers on tiny random-weight UNets."""

from __future__ import annotations

import copy

import pytest
import torch
from realedit.attention.hooks import HookShapeError
from realedit.attention.math import attention, map_attention_chunks
from realedit.attention.probe import ProbeHook

pytestmark = pytest.mark.comfy

SD1_GRIDS_16 = [16, 16, 8, 8, 4, 4, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16]
SDXL_GRIDS_16 = [8] * 4 + [4] * 4 + [4] * 2 + [4] * 6 + [8] * 6


@pytest.fixture(scope="module")
def env(comfy):
    import comfy_helpers
    from realedit.hosts import comfy as host
    from realedit.testbed.comfy_models import make_tiny_unet

    return host, make_tiny_unet, comfy_helpers


@pytest.fixture(scope="module")
def sd1(env):
    return env[1]("sd1")


def _declining(ctx_log: list):
    def hook(q, k, v, ctx):
        ctx_log.append(ctx)
        return None

    return hook


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_declining_hook_is_bit_identical_to_unpatched_sampling(env, family):
    host, make, helpers = env
    model = make(family)
    plain = helpers.sample(model, family)
    seen = []
    patched = helpers.sample(host.install_hook(model, _declining(seen)), family)
    assert seen, "the hook was never called"
    assert torch.equal(plain, patched)


@pytest.mark.parametrize("chunked", [False, True])
def test_core_attention_matches_host_attention_on_every_layer(env, sd1, chunked):
    host, _, helpers = env
    errors: dict[tuple[int, str], float] = {}

    def hook(q, k, v, ctx):
        if chunked:  # a small budget forces several query chunks on the 16x16 layers
            ours = map_attention_chunks(q, k, v, ctx.heads, max_elements=4096)
        else:
            ours = attention(q, k, v, ctx.heads)
        reference = ctx.host_attention(q, k, v)
        err = ((ours - reference).norm() / reference.norm()).item()
        errors[(ctx.layer.index, ctx.kind)] = max(err, errors.get((ctx.layer.index, ctx.kind), 0.0))
        return ours

    helpers.sample(host.install_hook(sd1, hook), steps=2)
    assert sorted(errors) == [(i, kind) for i in range(16) for kind in ("cross", "self")]
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("family, grids, heads, dim_head", [
    ("sd1", SD1_GRIDS_16, [8] * 16, None),  # SD1.x: 8 heads whatever the width
    ("sd2", SD1_GRIDS_16, None, 16),  # SD2.x: fixed head width
    ("sdxl", SDXL_GRIDS_16, None, 16),
])
def test_layers_grids_and_heads_follow_the_unet(env, family, grids, heads, dim_head):
    host, make, helpers = env
    model = make(family)
    layers = host.discover_layers(model)
    assert [layer.index for layer in layers] == list(range(len(grids)))
    seen = []
    helpers.sample(host.install_hook(model, _declining(seen)), family, steps=1)
    first_call = {}
    for ctx in seen:
        first_call.setdefault((ctx.layer.index, ctx.kind), ctx)
    # call order: each layer's self-attention then its cross-attention, layers in UNet order
    order = list(dict.fromkeys((c.layer.index, c.kind) for c in seen))
    assert order == [(i, k) for i in range(len(grids)) for k in ("self", "cross")]
    for (index, _kind), ctx in first_call.items():
        assert ctx.grid == (grids[index], grids[index])
        if heads is not None:
            assert ctx.heads == heads[index]
        if dim_head is not None:
            assert ctx.dim_head == dim_head
    stages = [layer.stage for layer in layers]
    assert stages == sorted(stages, key=["down", "mid", "up"].index)


def test_token_grid_of_odd_latent_sizes(env, sd1):
    host, _, helpers = env
    seen = []
    helpers.sample(host.install_hook(sd1, _declining(seen)), steps=1, latent_hw=(18, 14))
    grids = {ctx.layer.index: ctx.grid for ctx in seen}
    assert grids[0] == (18, 14) and grids[2] == (9, 7) and grids[4] == (5, 4) and grids[6] == (3, 2)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [4, 7])
def test_step_index_maps_each_model_call_to_its_step(env, sd1, sampler, steps):
    host, _, helpers = env
    seen = []
    scheduler = "ddim_uniform" if sampler == "ddim" else "normal"
    helpers.sample(host.install_hook(sd1, _declining(seen)), steps=steps, sampler=sampler, scheduler=scheduler)
    import comfy.samplers

    # ddim_uniform can give one step more than asked; the hook must follow the real schedule.
    sigmas = comfy.samplers.calculate_sigmas(sd1.get_model_object("model_sampling"), scheduler, steps)
    total = len(sigmas) - 1
    assert total in (steps, steps + 1)
    per_call = [ctx.step for ctx in seen if ctx.layer.index == 0 and ctx.kind == "self"]
    assert per_call == list(range(total))
    assert {ctx.total_steps for ctx in seen} == {total}


def test_step_index_of_intermediate_sigmas(comfy):
    from realedit.hosts.comfy import sigma_to_step

    schedule = torch.tensor([10.0, 5.0, 2.0, 0.0])
    assert sigma_to_step(torch.tensor([5.0]), schedule) == (1, 3)
    assert sigma_to_step(torch.tensor([3.0]), schedule) == (1, 3)  # heun's second evaluation
    assert sigma_to_step(torch.tensor([2.0]), schedule.flip(0)) == (1, 3)  # ascending: inversion
    assert sigma_to_step(torch.tensor([10.0]), schedule.flip(0)) == (3, 3)  # last label when inverting
    assert sigma_to_step(None, schedule) == (None, None)


@pytest.mark.parametrize("cfg, uncond_tokens, expected_calls", [
    (7.0, 77, [("uncond", "cond")]),  # batched together
    (1.0, 77, [("cond",)]),  # ComfyUI skips the uncond pass at cfg 1
    (7.0, 385, [("uncond",), ("cond",)]),  # different lengths: separate calls
])
def test_cond_and_uncond_rows_are_identified(env, sd1, cfg, uncond_tokens, expected_calls):
    host, _, helpers = env
    calls = []

    def hook(q, k, v, ctx):
        if ctx.layer.index == 0 and ctx.kind == "cross" and ctx.step == 0:
            calls.append((ctx.rows, v))
        return None

    helpers.sample(host.install_hook(sd1, hook), steps=1, cfg=cfg, uncond_tokens=uncond_tokens)
    kinds = [rows.kind for rows, _ in calls]
    assert sorted(kinds) == sorted(expected_calls)
    # Check each row's values really come from its own prompt: v = to_v(context) of that prompt.
    to_v = sd1.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_v
    contexts = {
        "cond": helpers.conditioning("sd1", 1)[0][0],
        "uncond": helpers.conditioning("sd1", 2, uncond_tokens)[0][0],
    }
    for rows, v in calls:
        for row, kind in enumerate(rows.kind):
            expected = to_v(contexts[kind])[0]
            assert torch.allclose(v[row, : expected.shape[0]], expected, atol=1e-5), (kind, row)
            assert rows.slot[row] == 0


def test_foreign_replace_patch_still_runs_and_original_model_is_untouched(env, sd1):
    host, _, helpers = env
    foreign_calls = []

    def foreign(q, k, v, extra_options):
        foreign_calls.append(extra_options["block"])
        return torch.zeros_like(q)  # a visible effect: cross-attention output zeroed

    with_foreign = sd1.clone()
    with_foreign.set_model_attn2_replace(foreign, "input", 1)
    before = copy.deepcopy(with_foreign.model_options)
    expected = helpers.sample(with_foreign, steps=2)

    ours = host.install_hook(with_foreign, _declining([]))
    foreign_calls.clear()
    assert torch.equal(helpers.sample(ours, steps=2), expected)
    assert foreign_calls, "the foreign patch did not run under ours"
    assert with_foreign.model_options.keys() == before.keys()
    assert with_foreign.model_options["transformer_options"]["patches_replace"]["attn2"] == {("input", 1): foreign}
    assert "attn1" not in with_foreign.model_options["transformer_options"]["patches_replace"]
    assert host.installed_patches(with_foreign) == [] and host.installed_patches(ours)


def test_clone_shares_hook_state_instead_of_copying_it(env, sd1):
    host, _, helpers = env
    probe = ProbeHook()
    patched = host.install_hook(sd1, probe)
    cloned = patched.clone()
    assert all(p.hook is probe for p in host.installed_patches(cloned))
    helpers.sample(cloned, steps=1)
    assert probe.records


def test_rerunning_gives_identical_output_and_probe_resets_per_run(env, sd1):
    host, _, helpers = env
    probe = ProbeHook()
    patched = host.install_hook(sd1, probe)
    first = helpers.sample(patched, steps=3)
    first_records = list(probe.records)
    second = helpers.sample(patched, steps=3)
    assert torch.equal(first, second)
    assert probe.records == first_records  # reset at the start of the run, not accumulated
    assert "16 layers" in probe.summary() and "steps seen: [0, 1, 2] of [3]" in probe.summary()


def test_wrong_hook_output_shape_names_the_layer(env, sd1):
    host, _, helpers = env

    def bad(q, k, v, ctx):
        return q[:, :1] if ctx.layer.index == 3 else None

    with pytest.raises(HookShapeError, match="layer 3 .*self-attention"):
        helpers.sample(host.install_hook(sd1, bad), steps=1)


def test_model_without_transformer_blocks_is_refused_by_name(env):
    host = env[0]

    class NotAUnet:
        class model:
            diffusion_model = torch.nn.Linear(1, 1)

    with pytest.raises(host.UnsupportedModelError, match="Linear.*not a Stable Diffusion UNet"):
        host.install_hook(NotAUnet(), _declining([]))

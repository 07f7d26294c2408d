"""The diffusers adapter: hooks see the right layers, grids, steps and rows, and change nothing by
themselves. Runs diffusers' own UNet2DConditionModel (tiny random weights) and DDIM scheduler."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import AttnProcessor2_0
from realedit.attention.hooks import HookShapeError, RowInfo
from realedit.attention.math import attention, map_attention_chunks
from realedit.attention.probe import ProbeHook
from realedit.hosts import diffusers as host
from realedit.testbed.diffusers_models import (
    make_ddim_scheduler,
    make_tiny_diffusers_unet,
    sdxl_added_cond,
)

SD1_GRIDS_16 = [16, 16, 8, 8, 4, 4, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16]
SDXL_GRIDS_16 = [8] * 4 + [4] * 4 + [4] * 2 + [4] * 6 + [8] * 6
TOKENS = 7  # prompt length: keeps cross-attention tiny


@pytest.fixture(scope="module")
def unets() -> dict:
    return {family: make_tiny_diffusers_unet(family) for family in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="module")
def sd1(unets):
    return unets["sd1"]


def _inputs(family: str, batch: int = 2, hw: tuple[int, int] = (16, 16), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    kwargs = {
        "sample": torch.randn(batch, 4, *hw, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, TOKENS, 64, generator=g),
    }
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = sdxl_added_cond(batch)
    return kwargs


@torch.no_grad()
def _run(unet, inputs: dict) -> torch.Tensor:
    return unet(**inputs).sample


def _declining(log: list):
    def hook(q, k, v, ctx):  # records the context; returning nothing declines
        log.append(ctx)

    return hook


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_declining_hook_is_bit_identical_and_uninstall_restores_processors(unets, family):
    unet, inputs = unets[family], _inputs(family)
    originals = unet.attn_processors
    plain = _run(unet, inputs)
    seen = []
    with host.DiffusersHost(unet, _declining(seen)):
        patched = _run(unet, inputs)
    assert seen, "the hook was never called"
    assert torch.equal(plain, patched)
    restored = unet.attn_processors
    assert restored.keys() == originals.keys()
    assert all(restored[name] is proc for name, proc in originals.items())
    assert torch.equal(_run(unet, inputs), plain)


def test_explicit_install_and_uninstall(sd1):
    originals = sd1.attn_processors
    installed = host.install_hook(sd1, _declining([]))
    assert installed.installed
    assert all(isinstance(p, host.HookedAttnProcessor) for p in sd1.attn_processors.values())
    installed.uninstall()
    assert not installed.installed
    assert all(sd1.attn_processors[name] is proc for name, proc in originals.items())
    installed.uninstall()  # a second uninstall is a no-op


def test_self_or_cross_only(sd1):
    seen = []
    with host.DiffusersHost(sd1, _declining(seen), cross_attention=False):
        _run(sd1, _inputs("sd1"))
    assert {ctx.kind for ctx in seen} == {"self"}
    assert sum(isinstance(p, host.HookedAttnProcessor) for p in sd1.attn_processors.values()) == 0


@pytest.mark.parametrize("chunked", [False, True])
def test_core_attention_matches_host_attention_on_every_layer(sd1, chunked):
    errors: dict[tuple[int, str], float] = {}
    chunks_used = []

    def hook(q, k, v, ctx):
        if chunked:  # a small budget forces several query chunks on every layer
            budget = 4096
            chunks_used.append(q.shape[1] > budget // (q.shape[0] * ctx.heads * k.shape[1]))
            ours = map_attention_chunks(q, k, v, ctx.heads, max_elements=budget)
        else:
            ours = attention(q, k, v, ctx.heads)
        reference = ctx.host_attention(q, k, v)
        err = ((ours - reference).norm() / reference.norm()).item()
        errors[(ctx.layer.index, ctx.kind)] = max(err, errors.get((ctx.layer.index, ctx.kind), 0.0))
        return ours

    inputs = _inputs("sd1")
    plain = _run(sd1, inputs)
    with host.DiffusersHost(sd1, hook):
        hooked = _run(sd1, inputs)
    assert sorted(errors) == [(i, kind) for i in range(16) for kind in ("cross", "self")]
    assert max(errors.values()) < 1e-5, errors
    assert ((hooked - plain).norm() / plain.norm()).item() < 1e-5
    if chunked:
        assert any(chunks_used)


@pytest.mark.parametrize("family, grids, heads, dim_head", [
    ("sd1", SD1_GRIDS_16, [8] * 16, None),  # SD1.x: 8 heads whatever the width
    ("sd2", SD1_GRIDS_16, None, 16),  # SD2.x: fixed head width
    ("sdxl", SDXL_GRIDS_16, None, 16),
])
def test_layers_grids_and_heads_follow_the_unet(unets, family, grids, heads, dim_head):
    unet = unets[family]
    layers = host.discover_layers(unet)
    assert [layer.index for layer in layers] == list(range(len(grids)))
    assert [2 ** (layer.downscale.bit_length() - 1) for layer in layers] == [layer.downscale for layer in layers]
    seen, widths = [], []

    def hook(q, k, v, ctx):
        seen.append(ctx)
        widths.append(q.shape[-1])

    with host.DiffusersHost(unet, hook):
        _run(unet, _inputs(family))
    # call order: each layer's self-attention then its cross-attention, layers in UNet order
    assert [(c.layer.index, c.kind) for c in seen] == [(i, k) for i in range(len(grids)) for k in ("self", "cross")]
    for ctx, width in zip(seen, widths):
        assert ctx.grid == (grids[ctx.layer.index],) * 2
        assert ctx.heads * ctx.dim_head == width == (32 if ctx.layer.downscale == 1 else 64)
        if heads is not None:
            assert ctx.heads == heads[ctx.layer.index]
        if dim_head is not None:
            assert ctx.dim_head == dim_head
    stages = [layer.stage for layer in layers]
    assert stages == sorted(stages, key=["down", "mid", "up"].index)


def test_sd1_layer_keys_are_module_paths(sd1):
    layers = host.discover_layers(sd1)
    assert layers[0].host_key == ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0)
    assert layers[6].host_key == ("mid_block", "attentions", 0, "transformer_blocks", 0)
    assert layers[6].stage == "mid" and layers[6].downscale == 8
    assert layers[15].host_key == ("up_blocks", 3, "attentions", 2, "transformer_blocks", 0)
    for layer in layers:
        path = ".".join(map(str, layer.host_key))
        assert hasattr(sd1.get_submodule(path), "attn2")


@pytest.mark.parametrize("family, expected", [
    ("sd1", {0: (18, 14), 2: (9, 7), 4: (5, 4), 6: (3, 2), 7: (5, 4), 10: (9, 7), 13: (18, 14)}),
    ("sdxl", {0: (9, 7), 4: (5, 4), 8: (5, 4), 10: (5, 4), 16: (9, 7)}),
])
def test_token_grid_of_odd_latent_sizes(unets, family, expected):
    unet, seen = unets[family], []
    with host.DiffusersHost(unet, _declining(seen)):
        _run(unet, _inputs(family, batch=1, hw=(18, 14)))
    grids = {ctx.layer.index: ctx.grid for ctx in seen}
    assert {i: grids[i] for i in expected} == expected
    assert all(ctx.grid[0] * ctx.grid[1] == ctx.tokens for ctx in seen)


@pytest.mark.parametrize("steps", [4, 7])
def test_step_index_follows_a_ddim_loop(sd1, steps):
    scheduler = make_ddim_scheduler()
    scheduler.set_timesteps(steps)
    seen = []
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, TOKENS, 64)
    with torch.no_grad(), host.DiffusersHost(sd1, _declining(seen), schedule=scheduler.timesteps):
        for t in scheduler.timesteps:
            x = scheduler.step(sd1(x, t, context).sample, t, x).prev_sample
    per_call = [ctx.step for ctx in seen if ctx.layer.index == 0 and ctx.kind == "self"]
    assert per_call == list(range(steps))
    assert {ctx.total_steps for ctx in seen} == {steps}
    assert all(ctx.step == per_call[i // 32] for i, ctx in enumerate(seen))  # 16 layers x 2 per call


def test_explicit_step_wins_and_defaults_to_unknown(sd1):
    seen = []
    with host.DiffusersHost(sd1, _declining(seen)) as hooked, torch.no_grad():
        hooked.predict_noise(torch.randn(1, 4, 8, 8), 999, torch.randn(1, TOKENS, 64))
        assert {(c.step, c.total_steps) for c in seen} == {(None, None)}
        seen.clear()
        hooked.predict_noise(torch.randn(1, 4, 8, 8), 999, torch.randn(1, TOKENS, 64), step=3, total_steps=10)
        assert {(c.step, c.total_steps) for c in seen} == {(3, 10)}
        assert hooked.step is None and hooked.total_steps is None  # predict_noise overrides per call only


def test_timestep_to_step_of_intermediate_and_ascending_schedules():
    schedule = [999.0, 749.0, 499.0, 249.0]
    assert host.timestep_to_step(749.0, schedule) == (1, 4)
    assert host.timestep_to_step(600.0, schedule) == (1, 4)  # a second-order scheduler's midpoint
    assert host.timestep_to_step(499.0, schedule[::-1]) == (1, 4)  # ascending: inversion
    assert host.timestep_to_step(5.0, schedule) == (None, 4)
    assert host.timestep_to_step(None, schedule) == (None, None)


def _first_cross_calls(calls: list):
    def hook(q, k, v, ctx):
        if ctx.layer.index == 0 and ctx.kind == "cross":
            calls.append((ctx.rows, v))

    return hook


@pytest.mark.parametrize("per_chunk", [1, 2])
def test_uncond_and_cond_rows_are_reported(sd1, per_chunk):
    calls = []
    g = torch.Generator().manual_seed(1)
    uncond, cond = torch.randn(per_chunk, TOKENS, 64, generator=g), torch.randn(per_chunk, TOKENS, 64, generator=g)
    x = torch.randn(per_chunk, 4, 16, 16, generator=g)
    with host.DiffusersHost(sd1, _first_cross_calls(calls)) as hooked, torch.no_grad():
        hooked.rows = RowInfo.from_chunks(["uncond", "cond"], per_chunk)
        sd1(torch.cat([x, x]), 500, torch.cat([uncond, cond]))
    (rows, v), = calls
    assert rows.kind == ("uncond",) * per_chunk + ("cond",) * per_chunk
    assert rows.slot == tuple(range(per_chunk)) * 2
    # each row's values come from its own prompt: v = to_v(context) of that row
    to_v = sd1.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v
    contexts = {"uncond": uncond, "cond": cond}
    for row, (kind, slot) in enumerate(zip(rows.kind, rows.slot)):
        assert torch.allclose(v[row], to_v(contexts[kind][slot]), atol=1e-5), (kind, slot)


def test_cond_only_calls_and_per_call_rows(sd1):
    calls = []
    with host.DiffusersHost(sd1, _first_cross_calls(calls)) as hooked, torch.no_grad():
        hooked.predict_noise(torch.randn(2, 4, 8, 8), 500, torch.randn(2, TOKENS, 64))
        hooked.predict_noise(torch.randn(1, 4, 8, 8), 500, torch.randn(1, TOKENS, 64),
                             rows=RowInfo(("uncond",), (0,)))
        assert hooked.rows is None
    assert [rows for rows, _ in calls] == [RowInfo(("cond", "cond"), (0, 1)), RowInfo(("uncond",), (0,))]


def test_rows_of_the_wrong_length_are_refused(sd1):
    with host.DiffusersHost(sd1, _declining([])) as hooked, torch.no_grad():
        hooked.rows = RowInfo.from_chunks(["uncond", "cond"], 1)
        with pytest.raises(ValueError, match="2 rows .* batch of 3"):
            sd1(torch.randn(3, 4, 8, 8), 500, torch.randn(3, TOKENS, 64))


def test_wrong_hook_output_shape_names_the_layer(sd1):
    def bad(q, k, v, ctx):
        return q[:, :1] if ctx.layer.index == 3 else None

    with host.DiffusersHost(sd1, bad), pytest.raises(HookShapeError, match="layer 3 .*self-attention"):
        _run(sd1, _inputs("sd1"))
    assert not any(isinstance(p, host.HookedAttnProcessor) for p in sd1.attn_processors.values())


class _ZeroCross(AttnProcessor2_0):
    """A foreign processor with a visible effect: cross-attention output zeroed."""

    calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        _ZeroCross.calls += 1
        return torch.zeros_like(hidden_states)


def test_foreign_processor_runs_when_the_hook_declines(sd1):
    inputs = _inputs("sd1")
    originals = sd1.attn_processors
    sd1.set_attn_processor(_ZeroCross())
    try:
        expected = _run(sd1, inputs)
        _ZeroCross.calls = 0
        with host.DiffusersHost(sd1, _declining([])):
            assert torch.equal(_run(sd1, inputs), expected)
        assert _ZeroCross.calls == 16
        with host.DiffusersHost(sd1, lambda q, k, v, ctx: ctx.host_attention(q, k, v)):
            answered = _run(sd1, inputs)
        assert not torch.allclose(answered, expected)  # the hook's answer replaced the foreign output
        assert torch.allclose(answered, _run_with(sd1, originals, inputs), rtol=1e-4, atol=1e-5)
    finally:
        sd1.set_attn_processor(dict(originals))


def _run_with(unet, processors: dict, inputs: dict) -> torch.Tensor:
    current = unet.attn_processors
    unet.set_attn_processor(dict(processors))
    try:
        return _run(unet, inputs)
    finally:
        unet.set_attn_processor(dict(current))


def test_probe_resets_per_install_and_summarises(sd1):
    probe = ProbeHook()
    for _ in range(2):
        with host.DiffusersHost(sd1, probe, schedule=[999, 500]) as hooked, torch.no_grad():
            for t in (999, 500):
                hooked.predict_noise(torch.randn(1, 4, 16, 16), t, torch.randn(1, TOKENS, 64))
        assert len(probe.records) == 2 * 32
    assert "16 layers" in probe.summary() and "steps seen: [0, 1] of [2]" in probe.summary()


def test_non_unet_is_refused_by_name():
    with pytest.raises(host.UnsupportedModelError, match="Linear.*not a diffusers UNet"):
        host.DiffusersHost(torch.nn.Linear(1, 1), _declining([]))


@pytest.mark.parametrize("options, four_d, cross", [
    ({"qk_norm": "layer_norm"}, False, False),
    ({"cross_attention_norm": "layer_norm", "cross_attention_dim": 24}, False, True),
    ({"norm_num_groups": 8, "residual_connection": True, "rescale_output_factor": 2.0}, True, False),
    ({"spatial_norm_dim": 4, "residual_connection": True}, True, False),
])
def test_processor_follows_attn_processor_2_0_options(sd1, options, four_d, cross):
    """Options SD UNets do not use (q/k norms, norm_cross, group/spatial norms, residuals, 4-D input)
    are handled exactly as AttnProcessor2_0 handles them."""
    from diffusers.models.attention_processor import Attention

    with torch.random.fork_rng():
        torch.manual_seed(0)
        attn = Attention(query_dim=32, heads=2, dim_head=16, **options).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 6, 5, generator=g) if four_d else torch.randn(2, 30, 32, generator=g)
    kwargs = {"encoder_hidden_states": torch.randn(2, 7, 24, generator=g)} if cross else {}
    if "spatial_norm_dim" in options:
        kwargs["temb"] = torch.randn(2, 4, 6, 5, generator=g)
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, x, **kwargs)
        layer = host.discover_layers(sd1)[0]
        seen: list = []
        hooked = host.DiffusersHost(sd1, _declining(seen))
        assert torch.equal(host.HookedAttnProcessor(hooked, layer, "self", AttnProcessor2_0())(attn, x, **kwargs),
                           expected)
        assert seen[0].grid == ((6, 5) if four_d else (30, 1)) and seen[0].rows.kind == ("cond", "cond")
        hooked.hook = lambda q, k, v, ctx: attention(q, k, v, ctx.heads)
        ours = host.HookedAttnProcessor(hooked, layer, "self", AttnProcessor2_0())(attn, x, **kwargs)
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_masked_calls_skip_the_hook_with_a_warning(sd1):
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=32, heads=2, dim_head=16, cross_attention_dim=24).eval()
    x, context = torch.randn(2, 30, 32), torch.randn(2, 7, 24)
    mask = torch.zeros(2, 1, 7)
    mask[:, :, 5:] = -1e4
    hooked = host.DiffusersHost(sd1, lambda q, k, v, ctx: pytest.fail("the hook ran on a masked call"))
    processor = host.HookedAttnProcessor(hooked, host.discover_layers(sd1)[0], "cross", AttnProcessor2_0())
    with torch.no_grad(), pytest.warns(UserWarning, match="attention mask"):
        out = processor(attn, x, context, attention_mask=mask)
    assert torch.equal(out, AttnProcessor2_0()(attn, x, context, attention_mask=mask))

"""The attention benchmark's measures (bench/bench_world_attention.py): the slope that says whether an edit follows
its reference, and the hook that switches an attention kind off, on diffusers' tiny UNet."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from realedit.hosts.diffusers import DiffusersHost, discover_layers
from realedit.testbed.diffusers_models import make_tiny_diffusers_unet

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_world_attention.py"
REFS = torch.tensor([[10.0, 200, 30], [250, 140, 190], [130, 130, 20], [200, 90, 120], [90, 150, 200]])


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_world_attention", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_follow_is_one_for_edits_that_take_the_reference_colour_and_zero_for_edits_that_ignore_it(bench):
    assert bench.follow(REFS.clone(), REFS) == pytest.approx(1.0)
    assert bench.follow(REFS + 17.0, REFS) == pytest.approx(1.0)  # a constant shift of every edit
    assert bench.follow(torch.full_like(REFS, 128.0), REFS) == pytest.approx(0.0)  # the same edit whatever the ref
    assert bench.follow(0.5 * REFS + 64, REFS) == pytest.approx(0.5)  # half of the way
    assert bench.follow(REFS.flip(0), REFS) == pytest.approx(0.32, abs=0.01)  # varying, but not with the reference


def test_describe_tells_stripes_from_their_mean_colour(bench):
    stripes = torch.zeros(8, 8, 3)
    stripes[::2] = torch.tensor([0.9, 0.15, 0.2])
    stripes[1::2] = torch.tensor([0.2, 0.78, 0.86])
    flat = stripes.mean((0, 1)).expand(8, 8, 3)  # the stripes' mean colour, flat
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:6, 2:6] = True
    striped, plain = bench.describe(stripes, region), bench.describe(flat, region)
    assert torch.allclose(striped[:3], plain[:3], atol=1e-3)  # the same mean colour
    assert striped[3:].min() > 80 and plain[3:].max() < 1e-3  # told apart by the spread (8-bit units)
    assert bench.describe(stripes, ~region)[3:].min() > 80  # only the region's pixels count


def test_sr_layers_are_the_reference_features_nodes_default_window(bench):
    layers = discover_layers(make_tiny_diffusers_unet("sd1"))
    chosen = bench.sr_layers(layers)
    finest = sorted({layer.downscale for layer in layers})[:2]
    assert chosen == {layer.index for layer in layers if layer.stage == "up" and layer.downscale in finest}
    assert chosen and all(layers[i].stage == "up" for i in chosen)


@torch.no_grad()
def test_switching_off_changes_only_what_it_names(bench):
    unet = make_tiny_diffusers_unet("sd1")
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500), torch.randn(2, 7, 64, generator=g))
    plain = unet(*inputs).sample
    seen: dict[str | None, list[tuple[str, int, bool]]] = {}
    outputs: dict[str | None, torch.Tensor] = {}
    for which in (None, *bench.SWITCHED_OFF):
        switch = bench.Switch(frozenset({13, 14, 15}))
        switch.off = which

        def hook(q, k, v, ctx, switch=switch, which=which):
            out = switch(q, k, v, ctx)
            seen.setdefault(which, []).append((ctx.kind, ctx.layer.index, out is not None))
            if out is not None:
                assert torch.count_nonzero(out) == 0 and out.shape == (*q.shape[:2], v.shape[2])
            return out

        with DiffusersHost(unet, hook) as host:
            outputs[which] = host.predict_noise(*inputs)
    assert torch.equal(outputs[None], plain)  # declining every call is the unhooked UNet, bit for bit
    assert {(kind, index) for kind, index, off in seen[bench.SWITCHED_OFF[0]] if off} == {
        ("self", 13), ("self", 14), ("self", 15)}
    assert {kind for kind, _, off in seen[bench.SWITCHED_OFF[1]] if off} == {"self"}
    assert all(off == (kind == "self") for kind, _, off in seen[bench.SWITCHED_OFF[1]])
    assert all(off == (kind == "cross") for kind, _, off in seen[bench.SWITCHED_OFF[2]])
    for which in bench.SWITCHED_OFF:
        assert not torch.allclose(outputs[which], plain)

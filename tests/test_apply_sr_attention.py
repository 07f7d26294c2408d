"""RealEdit Apply SR-Attention: SpecRef's SR-attention (Eq. 2-3) on a MODEL clone used by ComfyUI's own
samplers, through ``comfy.sample.sample`` (what KSampler calls) on the tiny SD1 UNet. The node itself, with
ComfyUI's KSampler in a workflow, is tested in test_specref_nodes.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from specref_helpers import relative_error as _rel

pytestmark = pytest.mark.comfy
STEPS = 5
WORD = (2,)  # token position of the "target word" in the random conditioning


@dataclasses.dataclass
class Setup:
    model: object
    positive: list
    negative: list
    features: object  # ReferenceFeatures, stored, fp32


@pytest.fixture(scope="module")
def setup(comfy) -> Setup:
    import comfy_helpers
    from realedit.hosts.comfy_sampling import reference_features
    from realedit.inversion.bank import BankSettings
    from realedit.testbed.comfy_models import make_tiny_unet

    model = make_tiny_unet("sd1")
    cond = [comfy_helpers.conditioning("sd1", seed) for seed in (1, 2, 3)]
    reference = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    features = reference_features(model, reference, cond[2], BankSettings(dtype=torch.float32), steps=STEPS)
    return Setup(model, cond[0], cond[1], features)


def _sample(s: Setup, model=None, steps: int = STEPS, batch: int = 1, **kwargs) -> torch.Tensor:
    import comfy.sample

    latent = torch.zeros(batch, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model or s.model, noise, steps, 7.5, "euler", "ddim_uniform", s.positive, s.negative,
                               latent, seed=0, disable_pbar=True, **kwargs)


def _apply(s: Setup, features=None, **controls):
    from realedit.attention.specref import SpecRefControls
    from realedit.hosts.comfy_sr import apply_sr_attention

    return apply_sr_attention(s.model, features or s.features, SpecRefControls(**{"target_positions": WORD,
                                                                                   **controls}))


def test_empty_mt_is_bit_identical_and_the_input_model_stays_unpatched(setup):
    from realedit.attention.settings import SpecRefSettings
    from realedit.hosts.comfy import installed_patches

    plain = _sample(setup)
    patched, hook = _apply(setup, settings=SpecRefSettings(mt_threshold=1.0))  # M_t = 0 everywhere
    assert torch.equal(_sample(setup, patched), plain)
    assert hook.stats.empty_mt > 0 and hook.stats.applied == 0
    assert installed_patches(setup.model) == [] and len(installed_patches(patched)) == 32
    assert torch.equal(_sample(setup), plain)


def test_reference_features_change_the_output_and_a_rerun_repeats_it(setup):
    plain = _sample(setup)
    patched, hook = _apply(setup)
    first = _sample(setup, patched)
    layers, steps = len(setup.features.layers), len(setup.features.steps)
    assert hook.stats.applied == layers * steps and hook.stats.missing_reference == 0
    assert not torch.equal(first, plain) and torch.isfinite(first).all()
    assert torch.equal(_sample(setup, patched), first)  # M_t's running mean restarts with every run
    both, hook = _apply(setup, sr_uncond_shared_kv=True)
    assert not torch.equal(_sample(setup, both), first) and hook.stats.applied == layers * steps


def test_own_kv_with_full_masks_is_plain_sampling(setup):
    """K_ref/V_ref = the sampler's own K/V at each step, M_t = M_s = 1: Eq. 2-3 give plain self-attention.
    Any offset between the sampler's steps and the bank's edit steps would read another step's K/V."""
    from realedit.hosts.comfy import install_hook
    from realedit.inversion.bank import ReferenceBank

    own = ReferenceBank(sorted(setup.features.layers), range(STEPS), STEPS, torch.float32, None)

    def record(q, k, v, ctx):
        if ctx.kind == "self" and own.wants(ctx.layer.index, ctx.step):
            (row,) = ctx.rows.rows("cond", 0)
            own.put(ctx.layer.index, ctx.step, k[row], v[row])

    record.__deepcopy__ = lambda memo: record
    plain = _sample(setup, install_hook(setup.model, record))
    assert len(own.entries) == len(own.layers) * STEPS
    features = dataclasses.replace(setup.features, bank=own)
    patched, hook = _apply(setup, features, target_positions=None, target_mask=torch.ones(16, 16))
    out = _sample(setup, patched)
    assert hook.stats.applied == len(own.layers) * STEPS
    assert _rel(out, plain) < 1e-5  # stated tolerance: masked vs unmasked SDPA, float rounding only


def test_each_latent_of_a_batch_gets_its_own_mt(setup):
    """M_t comes from each conditional row's own map: a batch of two equals each latent sampled alone."""
    import comfy.sample

    patched, hook = _apply(setup)
    pair = _sample(setup, patched, batch=2)
    latent = torch.zeros(2, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 0)
    alone = [comfy.sample.sample(patched, noise[i : i + 1], STEPS, 7.5, "euler", "ddim_uniform", setup.positive,
                                 setup.negative, latent[:1], seed=0, disable_pbar=True) for i in (0, 1)]
    for i in (0, 1):
        assert _rel(pair[i : i + 1], alone[i]) < 1e-5  # batched vs single kernels: float rounding only
    assert not torch.equal(hook.mt_mask(0, (16, 16)), torch.zeros(16, 16))


def test_schedule_mismatch_is_refused_and_a_slice_maps_by_sigma(setup):
    from realedit.attention.specref import ScheduleMismatchError
    from realedit.inversion.bank import ReferenceBank

    patched, hook = _apply(setup)
    with pytest.raises(ScheduleMismatchError, match="same steps and scheduler as RealEdit Reference Features"):
        _sample(setup, patched, steps=STEPS + 2)
    assert hook.stats.applied == 0  # refused before the first model call

    reads: list[int] = []

    class SpyBank(ReferenceBank):
        def get(self, layer, step):
            reads.append(step)
            return super().get(layer, step)

    spy = SpyBank(sorted(setup.features.layers), setup.features.steps, STEPS, torch.float32, None)
    spy.entries = setup.features.bank.entries
    patched, _ = _apply(setup, dataclasses.replace(setup.features, bank=spy))
    _sample(setup, patched, start_step=2)  # KSamplerAdvanced-style: steps 2..4 of the same schedule
    assert sorted(set(reads)) == [2, 3, 4]


def test_bad_features_are_refused(setup):
    from realedit.attention.specref import SpecRefError
    from realedit.testbed.comfy_models import make_tiny_unet

    live = dataclasses.replace(setup.features, mode="live", bank=None)
    with pytest.raises(SpecRefError, match="needs stored REF_FEATURES"):
        _apply(setup, live)
    other = make_tiny_unet("sd1", seed=1)
    from realedit.attention.specref import SpecRefControls
    from realedit.hosts.comfy_sr import apply_sr_attention

    with pytest.raises(ValueError, match="REF_FEATURES was made with a different model"):
        apply_sr_attention(other, setup.features, SpecRefControls(target_positions=WORD))
    with pytest.raises(SpecRefError, match="needs M_t"):
        _apply(setup, target_positions=None)


def test_schedule_offset_matches_by_sigma():
    from realedit.attention.specref import schedule_offset

    edit = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.3, 0.0])  # a 5-step schedule, edit steps 0-4
    assert schedule_offset(edit, edit) == 0
    assert schedule_offset(edit[2:], edit) == 2  # KSamplerAdvanced start_at_step 2
    assert schedule_offset(torch.tensor([7.0, 3.0, 0.0]), edit) == 1  # end_at_step with force_full_denoise
    assert schedule_offset(edit * 1.00001, edit) == 0  # float noise of another device / dtype
    assert schedule_offset(edit * 1.01, edit) is None  # another scheduler
    assert schedule_offset(torch.tensor([14.6, 9.0, 7.0, 3.0, 1.0, 0.3, 0.0]), edit) is None  # more steps
    assert schedule_offset(torch.tensor([0.0]), edit) is None  # nothing to evaluate

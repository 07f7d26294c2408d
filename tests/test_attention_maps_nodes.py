"""RealEdit Attention Map Recorder + RealEdit Word Attention Map on the tiny SD1 checkpoint (real CLIP
tokenizer): the recorder leaves sampling bit-identical, and the word's MASK equals the map computed
directly from the probabilities captured during the same KSampler run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.comfy
STEPS = 4
TEXT = "a photo of a tiger, on the grass."
TIGER = [5]  # BOS a photo of a tiger: the comma after the word is its own token (6)
LAYERS_AT_4 = 5  # SD1.x transformer blocks at 1/4 of the latent: 2 encoder + 3 decoder (the 16x16 at 512 px)


class Capture:
    """Test hook: head-averaged probabilities of the conditional rows of the 4x-downscaled cross layers."""

    def __init__(self) -> None:
        self.calls: dict[int, list[torch.Tensor]] = {}

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, ctx):
        from realedit.attention.math import attention_probs

        if ctx.kind == "cross" and ctx.layer.downscale == 4:
            for slot in sorted(set(ctx.rows.slot)):
                (row,) = ctx.rows.rows("cond", slot)
                probs = attention_probs(q[row : row + 1], k[row : row + 1], ctx.heads).mean(1)[0]  # (q, 77)
                self.calls.setdefault(slot, []).append(probs)
        return None


@pytest.fixture(scope="module")
def parts(comfy):
    from realedit.nodes.specref import encode
    from realedit.testbed.comfy_models import make_tiny_checkpoint

    model, clip, _ = make_tiny_checkpoint("sd1")
    return model, clip, encode(clip, TEXT), encode(clip, "blurry")


def _sample(model, positive, negative, batch: int = 2) -> torch.Tensor:
    import comfy.sample

    latent = torch.zeros(batch, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 3)
    return comfy.sample.sample(model, noise, STEPS, 7.5, "euler", "normal", positive, negative, latent, seed=3,
                               disable_pbar=True)


def _recorder(model, downscale: int = 4):
    from realedit.nodes.attention_maps import AttentionMapRecorder

    return AttentionMapRecorder.execute(model, downscale, 0.0, 1.0).result


def _word_map(store, clip, after, words="tiger", size="image", normalize="min-max", threshold=0.0, text=TEXT):
    from realedit.nodes.attention_maps import WordAttentionMap

    return WordAttentionMap.execute(store, clip, text, words, {"samples": after}, size, normalize, threshold).result[0]


def test_recorder_leaves_sampling_bit_identical_and_the_model_unpatched(parts):
    from realedit.hosts.comfy import installed_patches

    model, _, positive, negative = parts
    plain = _sample(model, positive, negative)
    recording, store = _recorder(model)
    assert torch.equal(_sample(recording, positive, negative), plain)
    assert store.recorded_slots() == [0, 1] and store.grid == (4, 4)
    assert installed_patches(model) == [] and len(installed_patches(recording)) == 16  # cross-attention only


def test_word_map_equals_direct_computation_from_captured_maps(parts):
    from realedit.attention.tokens import word_token_indices
    from realedit.hosts.comfy import install_hook
    from realedit.nodes.specref import clip_tokenizer

    model, clip, positive, negative = parts
    assert word_token_indices(TEXT, "tiger", clip_tokenizer(clip)) == TIGER
    capture = Capture()
    recording, store = _recorder(install_hook(model, capture))  # the recorder wraps the capture hook
    after = _sample(recording, positive, negative)
    mask = _word_map(store, clip, after)
    assert mask.shape == (2, 128, 128)
    expected = []
    for slot in (0, 1):
        mean = torch.stack(capture.calls[slot]).mean(0)  # (16 queries, 77) over layers and steps
        word = mean[:, TIGER].sum(-1).reshape(4, 4)
        word = (word - word.min()) / (word.max() - word.min())
        expected.append(F.interpolate(word[None, None], size=(128, 128), mode="bilinear")[0, 0])
    expected = torch.stack(expected)
    assert len(capture.calls[0]) == LAYERS_AT_4 * STEPS  # every layer of that grid, every step, averaged
    torch.testing.assert_close(mask, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(mask[0], mask[1])  # one map per latent of the batch
    binary = _word_map(store, clip, after, threshold=0.5)
    assert torch.equal(binary, (mask > 0.5).float()) and 0 < binary.mean() < 1
    small = _word_map(store, clip, after, size="latent", normalize="none")
    assert small.shape == (2, 16, 16) and float(small.max()) < 1.0  # raw probabilities
    capture.calls.clear()
    again = _sample(recording, positive, negative)  # a second run: the maps are that run's alone
    torch.testing.assert_close(_word_map(store, clip, again), mask, rtol=0, atol=1e-6)
    assert len(capture.calls[0]) == LAYERS_AT_4 * STEPS


def test_word_map_bad_inputs_are_named(parts):
    from realedit.attention.tokens import PromptTooLongError, TokenLookupError

    model, clip, positive, negative = parts
    recording, store = _recorder(model)
    after = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match="no attention maps were recorded"):
        _word_map(store, clip, after)
    _sample(recording, positive, negative, batch=1)
    with pytest.raises(TokenLookupError, match="'zebra' is not in the prompt"):
        _word_map(store, clip, after, words="zebra")
    with pytest.raises(TokenLookupError, match="no words given"):
        _word_map(store, clip, after, words=" , ")
    with pytest.raises(PromptTooLongError, match="one CLIP chunk"):
        _word_map(store, clip, after, text="tiger " * 80)
    with pytest.raises(ValueError, match="no attention layers at map_downscale 3.*downscales \\[1, 2, 4, 8\\]"):
        _recorder(model, downscale=3)


def test_word_mask_normalisations_and_flat_maps():
    from realedit.attention.maps import word_mask

    maps = torch.zeros(2, 77, 2, 2)
    maps[0, 5] = torch.tensor([[0.1, 0.2], [0.3, 0.5]])
    maps[0, 6] = torch.tensor([[0.1, 0.0], [0.0, 0.0]])
    raw = word_mask(maps, [5, 6], (2, 2), normalize="none")
    assert torch.allclose(raw[0], torch.tensor([[0.2, 0.2], [0.3, 0.5]]))
    assert torch.allclose(word_mask(maps, [5, 6], (2, 2), normalize="max")[0], raw[0] / 0.5)
    assert torch.allclose(word_mask(maps, [5, 6], (2, 2))[0], (raw[0] - 0.2) / 0.3)
    assert torch.equal(word_mask(maps, [5, 6], (2, 2), threshold=0.5)[0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(word_mask(maps, [5], (4, 4))[1], torch.zeros(4, 4))  # slot 1: no attention at all
    with pytest.raises(ValueError, match="normalize"):
        word_mask(maps, [5], (2, 2), normalize="softmax")

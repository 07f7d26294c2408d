"""Unit tests of the host-free attention core: tokens, maps, P2P, LocalBlend, SR-attention, settings."""

from __future__ import annotations

import dataclasses
import re
import zlib

import pytest
import torch
from realedit.attention.hooks import AttentionContext, LayerInfo, RowInfo
from realedit.attention.local_blend import LocalBlend, blend, local_blend_mask
from realedit.attention.maps import CrossAttentionStore, MapStoreError, word_map
from realedit.attention.math import attention, attention_probs, map_attention_chunks
from realedit.attention.p2p import P2PHook, Refine, Replace, Reweight
from realedit.attention.settings import P2PSettings, SpecRefSettings, describe, in_window, window_steps
from realedit.attention.sr_attention import resize_mask_to_grid, sr_attention
from realedit.attention.tokens import (
    PromptTooLongError,
    TokenLookupError,
    from_hf_tokenizer,
    refine_alignment,
    replace_mapper,
    reweight_scale,
    word_positions,
    word_token_indices,
)

HEADS, DIM = 2, 4


def fake_tokenize(text: str) -> list[tuple[int, str]]:
    """CLIP-like: lower-case, words and punctuation apart, words over 4 letters in two BPE pieces."""
    pieces: list[str] = []
    for word in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()):
        cut = len(word) // 2 if len(word) > 4 else len(word)
        pieces += [word[:cut], word[cut:] + "</w>"] if cut < len(word) else [word + "</w>"]
    return [(zlib.crc32(p.encode()) % 40000 + 1, p) for p in pieces]


def make_ctx(kind: str = "cross", grid: tuple[int, int] = (4, 4), downscale: int = 4, index: int = 3,
             chunks: tuple[str, ...] = ("uncond", "cond"), per_chunk: int = 2, step: int | None = 0,
             total: int | None = 10) -> AttentionContext:
    return AttentionContext(
        layer=LayerInfo(index, "down", downscale, ("input", index)),
        kind=kind, grid=grid, heads=HEADS, dim_head=DIM,
        rows=RowInfo.from_chunks(chunks, per_chunk), step=step, total_steps=total,
    )


def qkv(batch: int, q_tokens: int, k_tokens: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, n, HEADS * DIM, generator=g) for n in (q_tokens, k_tokens, k_tokens))


# -- tokens ----------------------------------------------------------------------------------------
def test_word_positions_bos_offset_multi_piece_and_punctuation():
    prompt = "A tiger, sitting on a tiger-striped mat."
    # tokens: a | ti ger | , | sitt ing | on | a | ti ger | - | stri ped | mat | .
    assert word_positions(prompt, "a", fake_tokenize) == [1, 8]
    assert word_positions(prompt, "tiger", fake_tokenize) == [2, 3, 9, 10]
    assert word_positions(prompt, "Tiger,", fake_tokenize) == [2, 3, 9, 10]
    assert word_positions(prompt, "sitting", fake_tokenize) == [5, 6]
    assert word_positions(prompt, "mat!", fake_tokenize) == [14]
    assert word_token_indices(prompt, "mat, on", fake_tokenize) == [7, 14]


def test_word_lookup_errors():
    with pytest.raises(TokenLookupError, match="its words are: a, cat, sitting"):
        word_positions("a cat, sitting.", "dog", fake_tokenize)
    with pytest.raises(TokenLookupError, match="not in the prompt"):
        word_positions("a tiger", "ger", fake_tokenize)  # a BPE piece is not a word
    with pytest.raises(TokenLookupError, match="no letters"):
        word_positions("a cat", "...", fake_tokenize)
    with pytest.raises(PromptTooLongError, match="76 tokens"):
        word_positions(" ".join(["cat"] * 76), "cat", fake_tokenize)
    assert word_positions(" ".join(["cat"] * 75), "cat", fake_tokenize)[-1] == 75


def test_from_hf_tokenizer_duck_typed():
    class Hf:
        def __init__(self):
            self.vocab = {"a</w>": 1, "cat</w>": 2}

        def encode(self, text, add_special_tokens=True):
            assert not add_special_tokens
            return [self.vocab[w + "</w>"] for w in text.split()]

        def convert_ids_to_tokens(self, ids):
            inv = {v: k for k, v in self.vocab.items()}
            return [inv[i] for i in ids]

    assert word_positions("a cat", "cat", from_hf_tokenizer(Hf())) == [2]


def test_replace_mapper_identity_swap_and_length_change():
    src = fake_tokenize("a cat sitting on a mat")
    assert torch.equal(replace_mapper(src, src), torch.eye(77))
    assert torch.equal(replace_mapper(src, fake_tokenize("a dog sitting on a mat")), torch.eye(77))
    m = replace_mapper(src, fake_tokenize("a tiger sitting on a mat"))  # cat (1 token) -> ti ger (2)
    assert m[2, 2] == m[2, 3] == 0.5 and m[2].sum() == 1
    assert m[3, 4] == m[4, 5] == 1  # "sitting" (2 pieces) stays aligned after the longer word
    assert m[8, 9] == 1  # EOS
    assert (m.sum(0) > 0).all()  # every target token gets some source column
    with pytest.raises(TokenLookupError, match="Refine"):
        replace_mapper(src, fake_tokenize("a big cat sitting on a mat"))


def test_refine_alignment_inserted_word():
    mapper, alphas = refine_alignment(fake_tokenize("a cat sitting"), fake_tokenize("a fluffy cat sitting"))
    # target: BOS a flu ffy cat sitt ing EOS | source: BOS a cat sitt ing EOS
    assert mapper[:8].tolist() == [0, 1, 0, 0, 2, 3, 4, 5]
    assert alphas[:8].tolist() == [1, 1, 0, 0, 1, 1, 1, 1]
    assert mapper[8].item() == 6 and alphas[8:].eq(1).all()


def test_reweight_scales_exactly_the_chosen_columns():
    g = torch.Generator().manual_seed(1)
    src, edit = (torch.rand(1, HEADS, 5, 77, generator=g) for _ in range(2))
    scale = reweight_scale([3, 4], [2.0, 0.5])
    out = Reweight(scale)(src, edit)
    assert torch.equal(out[..., 3], src[..., 3] * 2) and torch.equal(out[..., 4], src[..., 4] * 0.5)
    others = [i for i in range(77) if i not in (3, 4)]
    assert torch.equal(out[..., others], src[..., others])
    tiled = Reweight(scale)(src.repeat(1, 1, 1, 2), edit.repeat(1, 1, 1, 2))  # context repeated to 154
    assert torch.equal(tiled, out.repeat(1, 1, 1, 2))


# -- P2P -------------------------------------------------------------------------------------------
def test_replace_identical_prompts_gives_source_probs():
    tokens = fake_tokenize("a photo of a cat")
    g = torch.Generator().manual_seed(2)
    src, edit = (torch.rand(1, HEADS, 5, 77, generator=g) for _ in range(2))
    assert torch.equal(Replace.from_tokens(tokens, tokens)(src, edit), src)

    hook = P2PHook(Replace.from_tokens(tokens, tokens))
    ctx = make_ctx(chunks=("uncond", "cond"))  # rows: uncond 0, uncond 1, cond 0 (src), cond 1 (edit)
    q, k, v = qkv(4, 16, 77)
    out = hook(q, k, v, ctx)
    src_probs = attention_probs(q[2:3], k[2:3], HEADS)  # (1, heads, q, k)
    expected_edit = (src_probs @ v[3:4].view(1, 77, HEADS, DIM).transpose(1, 2)).transpose(1, 2).reshape(1, 16, -1)
    torch.testing.assert_close(out[3:4], expected_edit, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:3], attention(q[:3], k[:3], v[:3], HEADS), rtol=0, atol=1e-5)


def test_refine_keeps_edit_probs_on_new_tokens():
    mapper, alphas = refine_alignment(fake_tokenize("a cat"), fake_tokenize("a fluffy cat"))
    g = torch.Generator().manual_seed(3)
    src, edit = (torch.rand(1, 1, 3, 77, generator=g) for _ in range(2))
    out = Refine(mapper, alphas)(src, edit)
    assert torch.equal(out[..., 2:4], edit[..., 2:4])  # flu ffy: new
    assert torch.equal(out[..., 4], src[..., 2]) and torch.equal(out[..., 1], src[..., 1])  # cat, a


def test_cross_window_is_int_frac_n_and_declines_outside():
    hook = P2PHook(Replace(torch.eye(77)), P2PSettings(cross_replace=0.8))
    active = [hook.cross_active(make_ctx(step=s, total=10)) for s in range(10)]
    assert active == [True] * 8 + [False] * 2
    q, k, v = qkv(4, 16, 77)
    assert hook(q, k, v, make_ctx(step=8)) is None
    assert hook(q, k, v, make_ctx(step=None, total=None)) is None  # unknown step: never act blind
    assert window_steps(0.8, 50) == (0, 40) and window_steps((0.2, 0.6), 50) == (10, 30)
    assert in_window(3, (0.2, 0.6), 10) and not in_window(6, (0.2, 0.6), 10)


def test_self_replace_only_small_layers_and_in_window():
    hook = P2PHook(None, P2PSettings(self_replace=0.4))
    q, k, v = qkv(2, 32 * 32, 32 * 32, seed=4)
    ctx = make_ctx("self", grid=(32, 32), downscale=2, chunks=("cond",), step=3)
    out = hook(q, k, v, ctx)
    torch.testing.assert_close(out[1:], attention(q[:1], k[:1], v[1:], HEADS), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:1], attention(q[:1], k[:1], v[:1], HEADS), rtol=0, atol=1e-6)
    assert hook(q, k, v, make_ctx("self", grid=(32, 32), downscale=2, chunks=("cond",), step=4)) is None
    big = make_ctx("self", grid=(64, 64), downscale=1, chunks=("cond",), step=0)
    assert hook(*qkv(2, 64 * 64, 64 * 64), big) is None
    uncond_only = make_ctx("self", grid=(32, 32), downscale=2, chunks=("uncond",), step=0)
    assert hook(q, k, v, uncond_only) is None  # P2P edits conditional rows only


def test_self_replace_runs_through_the_host_attention_when_given():
    calls = []

    def host(q, k, v):
        calls.append((q, k))
        return attention(q, k, v, HEADS)

    q, k, v = qkv(2, 16, 16, seed=19)
    ctx = dataclasses.replace(make_ctx("self", chunks=("cond",)), host_attention=host)
    out = P2PHook()(q, k, v, ctx)
    assert len(calls) == 1 and torch.equal(calls[0][0][1], q[0]) and torch.equal(calls[0][1][1], k[0])
    torch.testing.assert_close(out[:1], attention(q[:1], k[:1], v[:1], HEADS), rtol=0, atol=1e-6)


def test_p2p_edit_row_without_source_row_is_an_error():
    ctx = AttentionContext(LayerInfo(0, "down", 4, ()), "self", (4, 4), HEADS, DIM,
                           RowInfo(("cond",), (1,)), 0, 10)
    with pytest.raises(ValueError, match="both paths"):
        P2PHook()(*qkv(1, 16, 16), ctx)


# -- maps ------------------------------------------------------------------------------------------
def test_store_running_mean_equals_manual_mean():
    store = CrossAttentionStore(downscales=(4,))
    manual = {0: [], 1: []}
    for step in range(3):
        for index, downscale in ((3, 4), (4, 4), (5, 2)):
            q, k, v = qkv(4, 16, 77, seed=10 * step + index)
            ctx = make_ctx(index=index, downscale=downscale, step=step)
            out = store(q, k, v, ctx)
            if downscale != 4:
                assert out is None
                continue
            torch.testing.assert_close(out, attention(q, k, v, HEADS), rtol=0, atol=1e-5)
            probs = attention_probs(q, k, HEADS).mean(1)  # (batch, q, k)
            for slot in (0, 1):
                manual[slot].append(probs[2 + slot].t().reshape(77, 4, 4))  # cond rows only
    maps = store.maps("cond")
    assert maps.shape == (2, 77, 4, 4) and store.count("cond", 0) == 6
    for slot in (0, 1):
        torch.testing.assert_close(maps[slot], torch.stack(manual[slot]).mean(0), rtol=0, atol=1e-6)
    with pytest.raises(MapStoreError):
        store.maps("uncond")
    q, k, v = qkv(4, 16, 77)
    store(q, k, v, make_ctx(step=0))  # step went back: a new run
    assert store.count("cond", 0) == 1


def test_chunked_capture_equals_unchunked():
    q, k, v = qkv(4, 64, 77, seed=5)
    ctx = make_ctx(grid=(8, 8))
    whole, chunked = CrossAttentionStore(), CrossAttentionStore(max_elements=4 * HEADS * 77 * 5)
    out_whole, out_chunked = whole(q, k, v, ctx), chunked(q, k, v, ctx)
    torch.testing.assert_close(out_whole, out_chunked, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole.maps(), chunked.maps(), rtol=0, atol=1e-7)


def test_store_folds_repeated_context_and_word_map_normalises():
    q, k, v = qkv(4, 16, 77, seed=6)
    plain, folded = CrossAttentionStore(), CrossAttentionStore()
    plain(q, k, v, make_ctx())
    folded(q, k.repeat(1, 2, 1), v.repeat(1, 2, 1), make_ctx())
    torch.testing.assert_close(plain.maps(), folded.maps(), rtol=0, atol=1e-6)
    m = plain.word_map(1, [2, 3])
    assert m.shape == (4, 4) and m.min() == 0 and m.max() == 1
    assert torch.equal(word_map(torch.ones(77, 4, 4), [2]), torch.zeros(4, 4))  # flat: no attention


def test_p2p_hook_records_the_maps_the_edit_used():
    """Inside the cross-replace window the edit row's recorded map is the one it used after Replace (the
    source row's map: official P2P / SpecRef read M_t and LocalBlend there); outside it, its own."""
    store = CrossAttentionStore()
    hook = P2PHook(Replace.from_tokens(fake_tokenize("a cat"), fake_tokenize("a dog")), store=store)
    q, k, v = qkv(4, 16, 77, seed=7)

    def row_map(row: int) -> torch.Tensor:
        return attention_probs(q[row : row + 1], k[row : row + 1], HEADS).mean(1)[0].t().reshape(77, 4, 4)

    hook(q, k, v, make_ctx(step=0))
    source, own = row_map(2), row_map(3)  # cond rows: slot 0 (source), slot 1 (edit)
    assert not torch.allclose(source, own, atol=1e-3)
    torch.testing.assert_close(store.maps("cond", [1])[0], source, rtol=0, atol=1e-6)
    store.reset()
    assert hook(q, k, v, make_ctx(step=9)) is not None  # outside the window, still recording
    torch.testing.assert_close(store.maps("cond", [1])[0], own, rtol=0, atol=1e-6)


def test_sr_rows_keep_their_own_self_attention_inside_sr_windows():
    """Eq. 3 and the official SpecRef code: in SR-attention's layers and steps the edit row's O_self is its
    own attention Attn(Q~, K~) V~ (no P2P self-replacement under it); in other layers P2P replaces as usual."""
    from realedit.attention.specref import SpecRefControls, SpecRefHook, StoredReference
    from realedit.inversion.bank import ReferenceBank

    q, k, v = qkv(4, 16, 16, seed=21)
    _, k_ref, v_ref = qkv(1, 16, 16, seed=22)
    bank = ReferenceBank([3], range(10), 10, torch.float32, None)
    bank.put(3, 0, k_ref[0], v_ref[0])
    half = torch.zeros(4, 4)
    half[:2] = 1.0  # M_t: the first 8 query tokens
    settings = SpecRefSettings(p2p=P2PSettings(self_replace=1.0))
    hook = SpecRefHook(SpecRefControls(settings=settings, target_mask=half), StoredReference(bank))
    own = attention(q[3:4], k[3:4], v[3:4], HEADS)[0]  # the edit cond row (slot 1)
    replaced = attention(q[2:3], k[2:3], v[3:4], HEADS)[0]  # P2P: the source row's maps on the edit's V
    inside = hook(q, k, v, make_ctx(kind="self", index=3, step=0))
    assert hook.stats.applied == 1
    torch.testing.assert_close(inside[3, 8:], own[8:], rtol=0, atol=1e-6)  # M_t = 0: O_self, the own one
    assert not torch.allclose(inside[3, 8:], replaced[8:], atol=1e-3)
    outside = hook(q, k, v, make_ctx(kind="self", index=4, step=0))  # a layer SR-attention does not touch
    torch.testing.assert_close(outside[3], replaced, rtol=0, atol=1e-6)


def test_a_reference_mask_of_another_aspect_ratio_than_the_reference_photo_warns(caplog):
    """It used to be stretched onto the photo without a word (almost always the wrong mask connected)."""
    from realedit.attention.specref import SpecRefControls, SpecRefHook, StoredReference
    from realedit.inversion.bank import ReferenceBank

    bank = ReferenceBank([3], range(10), 10, torch.float32, None)
    for mask_hw, warns in (((32, 32), False), ((64, 64), False), ((32, 64), True), ((48, 32), True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="realedit"):
            SpecRefHook(SpecRefControls(target_mask=torch.ones(4, 4), ref_mask=torch.ones(*mask_hw)),
                        StoredReference(bank, latent_hw=(4, 4)))
        assert any("reference mask is" in r.getMessage() for r in caplog.records) == warns, mask_hw


# -- LocalBlend ------------------------------------------------------------------------------------
def test_local_blend_mask_and_exact_outside():
    maps = torch.zeros(2, 77, 4, 4)
    maps[0, 2, 0, 0] = 1.0  # source word at the top-left cell
    maps[1, 3, 3, 3] = 0.5  # target word at the bottom-right cell
    mask = local_blend_mask(maps, [[2], [3]], (8, 8))
    assert mask.shape == (8, 8) and mask[:4, :4].all() and mask[4:, 4:].all()
    assert not mask[:4, 4:].any() and not mask[4:, :4].any()
    g = torch.Generator().manual_seed(8)
    x_src, x_edit = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    out = blend(x_src, x_edit, mask)
    assert torch.equal(out[..., ~mask], x_src[..., ~mask]) and torch.equal(out[..., mask], x_edit[..., mask])
    soft = blend(x_src, x_edit, mask.float())
    assert torch.equal(soft[..., ~mask], x_src[..., ~mask])


def test_local_blend_schedule_and_store():
    lb = LocalBlend(positions=[[2], [2]])
    assert [lb.blends_at(s, 10) for s in range(10)] == [False] * 2 + [True] * 8
    store = CrossAttentionStore()
    q, k, v = qkv(4, 16, 77, seed=9)
    store(q, k, v, make_ctx())
    x_src, x_edit = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)
    same, none = lb(x_src, x_edit, store, 1, 10)
    assert same is x_edit and none is None
    out, mask = lb(x_src, x_edit, store, 2, 10)
    assert mask.any() and torch.equal(out[..., ~mask], x_src[..., ~mask])


def test_local_blend_subtract_words_take_their_region_out_unpooled():
    """Official P2P option (substruct_words): default off; the subtracted words' map, without the max-pool
    and at its own threshold, is removed from the blend mask."""
    store = CrossAttentionStore()
    maps = torch.zeros(2, 77, 4, 4)
    maps[:, 2, 1:3, 1:3] = 1.0  # blend word: the central 2x2 cells (3x3-pooled to all 16)
    maps[:, 5, 1, 1] = 1.0  # subtracted word: one cell
    store.maps = lambda kind, slots: maps  # the store's running means, as LocalBlend reads them
    plain = LocalBlend([[2], [2]]).mask(store, (4, 4))
    assert plain.all()
    sub = LocalBlend([[2], [2]], subtract=[[5], [5]]).mask(store, (4, 4))
    assert not sub[1, 1] and int(sub.sum()) == 15  # only the word's own cell: not max-pooled
    assert LocalBlend([[2], [2]], subtract=[[5], [5]], subtract_threshold=1.0).mask(store, (4, 4)).all()
    assert torch.equal(LocalBlend([[2], [2]], subtract=[[], []]).mask(store, (4, 4)), plain)


def test_sr_layers_restrict_sr_attention_to_a_subset_of_the_reference_layers():
    """Official option: an explicit layer list or range (its examples use three decoder layers)."""
    from realedit.attention.specref import SpecRefControls, SpecRefError, SpecRefHook, StoredReference, parse_layers
    from realedit.inversion.bank import ReferenceBank

    assert parse_layers("13-15") == {13, 14, 15} and parse_layers("10, 13-14") == {10, 13, 14}
    assert parse_layers("  ") is None
    for bad in ("a", "15-13", "1--2"):
        with pytest.raises(SpecRefError, match="sr_layers"):
            parse_layers(bad)
    bank = ReferenceBank([3, 4], range(10), 10, torch.float32, None)
    _, k_ref, v_ref = qkv(1, 16, 16, seed=23)
    for layer in (3, 4):
        bank.put(layer, 0, k_ref[0], v_ref[0])
    q, k, v = qkv(4, 16, 16, seed=24)
    controls = SpecRefControls(settings=SpecRefSettings(p2p=P2PSettings(self_replace=0.0)),
                               target_mask=torch.ones(4, 4), sr_layers=[4])
    hook = SpecRefHook(controls, StoredReference(bank))
    assert hook(q, k, v, make_ctx(kind="self", index=3)) is None  # in the bank, not chosen: host attention
    assert hook(q, k, v, make_ctx(kind="self", index=4)) is not None and hook.stats.applied == 1
    with pytest.raises(SpecRefError, match=r"layers \[7\] are not among the layers the reference features hold"):
        SpecRefHook(dataclasses.replace(controls, sr_layers=[4, 7]), StoredReference(bank))


def test_masks_resize_bilinear_by_default_and_nearest_on_request():
    mask = torch.zeros(8, 8)
    mask[2:6, 3:5] = 1.0
    nearest = resize_mask_to_grid(mask, (3, 3), 0.5, mode="nearest")
    expected = torch.nn.functional.interpolate(mask[None, None], size=(3, 3), mode="nearest").reshape(9) > 0.5
    assert torch.equal(nearest, expected)
    assert not torch.equal(nearest, resize_mask_to_grid(mask, (3, 3), 0.5))
    assert SpecRefSettings().mask_resize == "bilinear" and "nearest" in describe(SpecRefSettings, "mask_resize")
    with pytest.raises(ValueError, match="mask_resize"):
        SpecRefSettings(mask_resize="bicubic")


# -- SR-attention ----------------------------------------------------------------------------------
def test_sr_attention_mt_zero_is_o_self_exactly():
    q, k, v = qkv(2, 16, 16, seed=11)
    _, k_ref, v_ref = qkv(1, 16, 16, seed=12)
    m_s = torch.ones(16, dtype=torch.bool)
    res = sr_attention(q, k, v, k_ref, v_ref, HEADS, m_s, torch.zeros(16))
    assert torch.equal(res.output, attention(q, k, v, HEADS)) and res.fallback is None
    o_self = torch.randn(2, 16, HEADS * DIM)
    partial = torch.zeros(16)
    partial[:4] = 0.7
    res = sr_attention(q, k, v, k_ref, v_ref, HEADS, m_s, partial, o_self=o_self)
    assert torch.equal(res.output[:, 4:], o_self[:, 4:]) and not torch.equal(res.output[:, :4], o_self[:, :4])


def test_sr_attention_identity_of_eq_2_3():
    q, k, v = qkv(2, 16, 16, seed=13)
    res = sr_attention(q, k, v, k, v, HEADS, torch.ones(16, dtype=torch.bool), torch.ones(16, dtype=torch.bool))
    torch.testing.assert_close(res.output, attention(q, k, v, HEADS), rtol=0, atol=1e-5)


def test_sr_attention_masked_keys_only():
    q, k, v = qkv(1, 16, 16, seed=14)
    _, k_ref, v_ref = qkv(1, 9, 9, seed=15)
    m_s = torch.zeros(9, dtype=torch.bool)
    m_s[2:5] = True
    res = sr_attention(q, k, v, k_ref, v_ref, HEADS, m_s, torch.ones(16))
    expected = attention(q, k_ref[:, 2:5], v_ref[:, 2:5], HEADS)
    torch.testing.assert_close(res.output, expected, rtol=0, atol=1e-5)


def test_sr_attention_rows_without_allowed_key_fall_back():
    q, k, v = qkv(2, 16, 16, seed=16)
    _, k_ref, v_ref = qkv(1, 16, 16, seed=17)
    m_s = torch.ones(2, 16, 16, dtype=torch.bool)
    m_s[1, 5] = False  # query 5 of row 1 sees no reference key
    m_t = torch.ones(16)
    res = sr_attention(q, k, v, k_ref, v_ref, HEADS, m_s, m_t)
    assert not res.output.isnan().any() and res.fallback_count == 1 and res.fallback[1, 5]
    torch.testing.assert_close(res.output[1, 5], attention(q, k, v, HEADS)[1, 5], rtol=0, atol=0)
    with pytest.raises(ValueError, match="empty everywhere"):
        sr_attention(q, k, v, k_ref, v_ref, HEADS, torch.zeros(16, dtype=torch.bool), m_t)


def test_resize_mask_to_grid():
    mask = torch.zeros(64, 64)
    mask[:32, :32] = 1
    small = resize_mask_to_grid(mask, (4, 4))
    assert small.shape == (16,) and small.view(4, 4)[:2, :2].all() and small.sum() == 4
    dot = torch.zeros(1, 64, 64)
    dot[0, 10, 10] = 1  # too small to survive a 0.5 threshold at 4x4
    kept = resize_mask_to_grid(dot, (4, 4))
    assert kept.shape == (1, 16) and kept.sum() == 1 and kept[0, 0]
    assert not resize_mask_to_grid(dot, (4, 4), keep_nonempty=False).any()
    assert not resize_mask_to_grid(torch.zeros(8, 8), (4, 4)).any()


# -- settings --------------------------------------------------------------------------------------
def test_settings_defaults_and_validation():
    s = SpecRefSettings()
    # self_replace 0.6: the official SpecRef script's value (was 0.4)
    assert (s.p2p.cross_replace, s.p2p.self_replace, s.p2p.self_replace_max_tokens) == (0.8, 0.6, 1024)
    assert "official SpecRef script" in describe(P2PSettings, "self_replace")
    assert (s.p2p.blend_threshold, s.p2p.blend_start, s.mt_threshold, s.ms_threshold) == (0.3, 0.2, 0.5, 0.5)
    assert s.map_downscale == 4 and "0.8" in describe(P2PSettings, "cross_replace")
    with pytest.raises(ValueError):
        P2PSettings(cross_replace=1.5)
    with pytest.raises(ValueError):
        SpecRefSettings(mt_threshold=-0.1)


def test_map_attention_chunks_fn_sees_all_rows():
    """The store's recorder composes with map_attention_chunks as P2PHook uses it."""
    q, k, v = qkv(4, 16, 77, seed=18)
    store = CrossAttentionStore(kinds=("cond", "uncond"))
    fn = store.recorder(make_ctx())
    out = map_attention_chunks(q, k, v, HEADS, fn, max_elements=4 * HEADS * 77 * 3)
    torch.testing.assert_close(out, attention(q, k, v, HEADS), rtol=0, atol=1e-5)
    assert store.recorded_slots("uncond") == [0, 1] and store.recorded_slots("cond") == [0, 1]

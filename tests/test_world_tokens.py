"""The shapes world's token table (the diffusers host's tokenizer for the world, offline) against ComfyUI's
bundled SD1 tokenizer, and the batch manifest the diffusers-host demo runs."""

from __future__ import annotations

import random

import pytest
import torch
from realedit.testbed.shapes_world import tokens
from realedit.testbed.shapes_world.edits import EDIT_KINDS, instruction, random_edit
from realedit.testbed.shapes_world.scene import random_scene


def _world_texts(n: int = 300) -> list[str]:
    """Seeded captions and instructions of every edit kind, both scenes of each pair."""
    rng, texts = random.Random(7), [""]
    for _ in range(n):
        scene = random_scene(rng, two_objects=0.5, unnamed=0.3, textured=0.3)
        edit = random_edit(scene, rng, EDIT_KINDS)
        texts += [scene.caption(), instruction(scene, edit)]
    return texts


def test_the_committed_table_is_comfyuis_tokenizer_on_the_world_vocabulary(comfy):
    import comfy.sd1_clip

    hf = comfy.sd1_clip.SD1Tokenizer().clip_l.tokenizer
    assert tokens.TABLE_FILE.read_text() == tokens.table_json(tokens.build_table(hf))


def test_world_texts_get_comfyuis_token_ids_and_padding(comfy):
    """For every text the world writes: BOS, the tokens, EOS, EOS padding to 77, as CLIPTextEncode gets them."""
    import comfy.sd1_clip

    tokenizer = comfy.sd1_clip.SD1Tokenizer()
    for text in _world_texts():
        theirs = [token for token, _ in tokenizer.tokenize_with_weights(text)["l"][0]]
        assert tokens.clip_ids(text)[0].tolist() == theirs, text


def test_pieces_carry_clips_word_end_marks_for_word_positions():
    from realedit.attention.tokens import word_positions

    text = "make the circle on the left blue"
    assert [piece for _, piece in tokens.tokenize(text)] == [w + "</w>" for w in text.split()]
    assert word_positions(text, "circle", tokens.tokenize) == [3]  # BOS at 0


def test_every_world_text_is_in_the_vocabulary_and_other_words_are_refused_by_name():
    for text in _world_texts():
        assert tokens.clip_ids(text).shape == (1, 77)
    with pytest.raises(ValueError, match="no word 'dog'"):
        tokens.tokenize("a red dog on the left")


def test_the_diffusers_demos_world_manifest_is_valid_and_its_segments_tile_the_image(tmp_path):
    """Every row passes the batch runner's validation; ZONE's segments partition the image; Keep's stand-in
    differs from the true edit everywhere it was shifted, and each row is scored as its workflow's task."""
    from realedit.batching.manifest import validate
    from realedit.testbed.shapes_world.demo_tasks import PAIR
    from realedit.testbed.shapes_world.world_batch import WORKFLOW_OF, segments, write_world_manifest

    manifest, tasks = write_world_manifest(tmp_path, steps=4)
    rows, problems = validate(manifest)
    assert problems == [] and [r.method for r in rows] == list(WORKFLOW_OF)
    assert {k: t.stem for k, t in tasks.items()} == WORKFLOW_OF
    total = torch.stack(segments(PAIR)).sum(0)
    torch.testing.assert_close(total, torch.ones_like(total))

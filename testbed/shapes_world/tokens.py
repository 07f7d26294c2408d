"""The world's texts as CLIP token ids without ComfyUI's tokenizer files (for the diffusers host offline).

The world's captions and instructions use a closed vocabulary (:func:`vocabulary`: the scene's names and
the templates' words). ``world_tokens.json`` holds the CLIP BPE tokens of each of those words, exactly as
ComfyUI's bundled SD1 tokenizer (transformers' ``CLIPTokenizer`` on ``comfy/sd1_tokenizer``) gives them;
:func:`build_table` writes it from that tokenizer and a test checks the committed table against it, and
:func:`tokenize` against the tokenizer on seeded captions and instructions. A word outside the vocabulary
is refused by name: this is the world's tokenizer, not CLIP's.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ...attention.settings import CLIP_CHUNK
from .scene import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, TEXTURES

TABLE_FILE = Path(__file__).resolve().parent / "world_tokens.json"
BOS, EOS = 49406, 49407  # CLIP's <|startoftext|>, <|endoftext|> (SD1 pads with the latter, as ComfyUI does)
# The templates' own words (scene.caption, scene.Obj.phrase, edits.instruction, edits._name).
TEMPLATE_WORDS = ("a", "the", "and", "on", "in", "into", "to", "of", "background", "make", "turn", "remove",
                  "move", "add", "bigger", "smaller", "look", "like", "reference", ",")
_WORD = re.compile(r"[a-z]+|[^\sa-z]")  # CLIP's pattern, restricted to what the vocabulary holds


def vocabulary() -> list[str]:
    """Every word a world caption or instruction can hold, sorted."""
    names = (*SHAPES, *COLOURS, *POSITIONS, *SIZES, *BACKGROUNDS, *TEXTURES)
    return sorted(set(TEMPLATE_WORDS) | set(names))


def build_table(hf_tokenizer: Any) -> dict[str, list[list[int | str]]]:
    """``{word: [[id, piece], ...]}`` from a transformers ``CLIPTokenizer`` (ComfyUI's ``SD1Tokenizer`` holds
    one as ``.tokenizer``)."""
    table = {}
    for word in vocabulary():
        ids = hf_tokenizer(word, add_special_tokens=False)["input_ids"]
        table[word] = [[i, piece] for i, piece in zip(ids, hf_tokenizer.convert_ids_to_tokens(ids))]
    return table


def table_json(table: dict[str, list[list[int | str]]]) -> str:
    """The committed file's text: one word per line."""
    lines = [f"{json.dumps(word)}: {json.dumps(pieces)}" for word, pieces in sorted(table.items())]
    return "{\n" + ",\n".join(lines) + "\n}\n"


@cache
def _table() -> dict[str, list[tuple[int, str]]]:
    return {w: [(int(i), str(p)) for i, p in pieces] for w, pieces in json.loads(TABLE_FILE.read_text()).items()}


def tokenize(text: str) -> list[tuple[int, str]]:
    """CLIP's BPE tokens ``(id, piece)`` of a world text, without BOS/EOS (an ``attention.tokens.Tokenizer``)."""
    table, tokens = _table(), []
    for word in _WORD.findall(text.lower()):
        if word not in table:
            raise ValueError(f"RealEdit: the shapes world's tokenizer has no word {word!r} (in {text!r}); its "
                             f"texts use only: {', '.join(table)}")
        tokens += table[word]
    return tokens


def clip_ids(text: str) -> torch.Tensor:
    """``(1, 77)`` ids as ComfyUI's SD1 tokenizer pads them: BOS, the tokens, EOS, then EOS to 77."""
    ids = [BOS, *(i for i, _ in tokenize(text)), EOS]
    if len(ids) > CLIP_CHUNK:
        raise ValueError(f"RealEdit: {text!r} is {len(ids) - 2} tokens; the world's texts fit one 75-token chunk")
    return torch.tensor([ids + [EOS] * (CLIP_CHUNK - len(ids))])

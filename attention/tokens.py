"""Words -> CLIP token positions, and Prompt-to-Prompt's token alignments between two prompts.

A tokenizer is any callable ``str -> [(token_id, token_text), ...]`` giving the BPE tokens of a text
*without* BOS/EOS. CLIP's BPE marks the last token of each word with ``</w>`` (a sentencepiece
tokenizer's ``▁`` word-start marker is understood too). Positions count BOS at 0, as the
cross-attention keys of one 77-token chunk do.

The alignments follow the P2P paper (Hertz et al. 2022, Sec. 3.2): *word swap* maps each source token
to the target token at the same place (a word of a different BPE length spreads its attention evenly
over the other word's tokens); *adding a phrase* aligns the two token sequences globally and keeps
the source attention on the common tokens (the alphas), the edit's own attention on new ones.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .settings import CLIP_CHUNK

Token = tuple[int, str]
Tokenizer = Callable[[str], list[Token]]

MAX_PROMPT_TOKENS = CLIP_CHUNK - 2  # one chunk: BOS + 75 + EOS
_PUNCT = string.punctuation + "“”‘’«»…"
_BOS, _EOS = -1, -2  # sentinel ids for the alignment


class TokenLookupError(ValueError):
    """A word is not in the prompt, or the prompt cannot be indexed."""


class WordNotFoundError(TokenLookupError):
    """The word does not occur (as whole words) in the prompt."""


class PromptTooLongError(TokenLookupError):
    """The prompt does not fit in one 77-token CLIP chunk."""


def from_hf_tokenizer(tokenizer: Any) -> Tokenizer:
    """Adapt a Hugging Face (CLIP) tokenizer: ``encode`` without special tokens + token texts."""

    def tokenize(text: str) -> list[Token]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return list(zip(ids, tokenizer.convert_ids_to_tokens(ids)))

    return tokenize


def _strip(word: str) -> str:
    return word.strip(_PUNCT + string.whitespace)


def prompt_words(prompt: str) -> list[str]:
    """The prompt's words, punctuation stripped (for messages)."""
    return [w for w in (_strip(x) for x in prompt.split()) if w]


def check_prompt_length(label: str, tokens: Sequence[Token]) -> None:
    """Raise :class:`PromptTooLongError` when ``tokens`` overflow one 77-token chunk.

    ``label`` names the prompt in the message, e.g. ``"the prompt 'a cat'"``.
    """
    if len(tokens) > MAX_PROMPT_TOKENS:
        raise PromptTooLongError(
            f"RealEdit: {label} has {len(tokens)} tokens; word positions are only defined "
            f"within one CLIP chunk of {MAX_PROMPT_TOKENS} tokens (77 with BOS/EOS). Shorten the prompt."
        )


def _ends_word(text: str) -> bool:
    return text.endswith("</w>")


def _starts_word(text: str) -> bool:
    return text.startswith("▁")


def _marked(tokens: Sequence[Token]) -> str | None:
    """Which word-boundary convention the tokens use: "end" (CLIP), "start" (sentencepiece) or None."""
    if any(_ends_word(t) for _, t in tokens):
        return "end"
    if any(_starts_word(t) for _, t in tokens):
        return "start"
    return None


def word_units(tokens: Sequence[Token]) -> list[list[int]]:
    """Group token indices (0-based, no BOS) into words by the BPE word markers.

    Without markers every token is its own word.
    """
    marker = _marked(tokens)
    units: list[list[int]] = []
    for i, (_, text) in enumerate(tokens):
        new_word = not units or marker is None or (
            _ends_word(tokens[i - 1][1]) if marker == "end" else _starts_word(text)
        )
        if new_word:
            units.append([i])
        else:
            units[-1].append(i)
    return units


def _find_word(tokens: Sequence[Token], query: Sequence[Token]) -> list[int]:
    """Token indices (0-based) of every occurrence of ``query`` made of whole word units."""
    units = word_units(tokens)
    starts, ends = {u[0] for u in units}, {u[-1] for u in units}
    ids, want = [t[0] for t in tokens], [t[0] for t in query]
    found: list[int] = []
    for s in range(len(ids) - len(want) + 1):
        e = s + len(want) - 1
        if ids[s : e + 1] == want and s in starts and e in ends:
            found.extend(range(s, e + 1))
    return found


def word_positions(prompt: str, word: str, tokenize: Tokenizer) -> list[int]:
    """Token positions (BOS = 0) of every occurrence of ``word`` in ``prompt``.

    Punctuation around the word is ignored and case follows the tokenizer (CLIP lower-cases). A word
    the tokenizer splits into several BPE tokens gives all of them.
    """
    tokens = tokenize(prompt)
    check_prompt_length(f"the prompt {prompt!r}", tokens)
    clean = _strip(word)
    if not clean:
        raise TokenLookupError(f"RealEdit: {word!r} has no letters to look up in the prompt {prompt!r}.")
    query = tokenize(clean)
    found = _find_word(tokens, query) if query else []
    if not found:
        raise WordNotFoundError(
            f"RealEdit: the word {clean!r} is not in the prompt {prompt!r}; its words are: "
            f"{', '.join(prompt_words(prompt)) or '(none)'}."
        )
    return [i + 1 for i in found]


def word_token_indices(prompt: str, words: str | Sequence[str], tokenize: Tokenizer) -> list[int]:
    """Sorted token positions (BOS = 0) of all ``words`` in ``prompt``, every occurrence.

    ``words`` is a list of words or one string of words separated by spaces or commas.
    """
    if isinstance(words, str):
        words = words.replace(",", " ").split()
    if not words:
        raise TokenLookupError(f"RealEdit: no words given to look up in the prompt {prompt!r}.")
    positions = {p for w in words for p in word_positions(prompt, w, tokenize)}
    return sorted(positions)


def _ids(tokens: Sequence[Token] | Sequence[int]) -> list[int]:
    return [t[0] if isinstance(t, tuple) else int(t) for t in tokens]


def replace_mapper(src_tokens: Sequence[Token], tgt_tokens: Sequence[Token],
                   max_len: int = CLIP_CHUNK) -> torch.Tensor:
    """P2P word-swap mapper M (max_len, max_len): target probs = source probs @ M (P2P Sec. 3.2).

    Both prompts must have the same number of words. Words of equal BPE length map token to token; a
    word of a different length spreads the sum of its source tokens' probabilities evenly over the
    target word's tokens. Unlike P2P's reference code, tokens after a length-changing word stay
    aligned with their counterparts (P2P falls back to position-to-position there).
    """
    check_prompt_length("the source prompt", src_tokens)
    check_prompt_length("the target prompt", tgt_tokens)
    src_units, tgt_units = word_units(src_tokens), word_units(tgt_tokens)
    if len(src_units) != len(tgt_units):
        raise TokenLookupError(
            f"RealEdit: Replace (word swap) needs prompts with the same number of words; the source has "
            f"{len(src_units)} and the target {len(tgt_units)}. Use Refine to add or remove words."
        )
    mapper = torch.zeros(max_len, max_len)
    mapper[0, 0] = 1.0  # BOS
    i = j = 1
    for su, tu in zip(src_units, tgt_units):
        src, tgt = torch.arange(i, i + len(su)), torch.arange(j, j + len(tu))
        if len(su) == len(tu):
            mapper[src, tgt] = 1.0
        else:
            mapper[src[:, None], tgt[None, :]] = 1.0 / len(tu)
        i, j = i + len(su), j + len(tu)
    for offset in range(max_len - j):  # EOS and padding, kept aligned
        mapper[min(i + offset, max_len - 1), j + offset] = 1.0
    return mapper


def _lcs_table(x: Sequence[int], y: Sequence[int]) -> list[list[int]]:
    """Needleman-Wunsch scores with gap 0, match +1, mismatch -1 (P2P's scoring)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for a in range(1, len(x) + 1):
        for b in range(1, len(y) + 1):
            diag = table[a - 1][b - 1] + (1 if x[a - 1] == y[b - 1] else -1)
            table[a][b] = max(diag, table[a - 1][b], table[a][b - 1])
    return table


def _align(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """For each position of ``y``, the aligned position of ``x`` or -1 (global alignment)."""
    table = _lcs_table(x, y)
    match = [-1] * len(y)
    a, b = len(x), len(y)
    while a > 0 and b > 0:
        if x[a - 1] == y[b - 1] and table[a][b] == table[a - 1][b - 1] + 1:
            match[b - 1] = a - 1
            a, b = a - 1, b - 1
        elif table[a][b] == table[a - 1][b]:
            a -= 1
        else:
            b -= 1
    return match


def refine_alignment(src_tokens: Sequence[Token] | Sequence[int], tgt_tokens: Sequence[Token] | Sequence[int],
                     max_len: int = CLIP_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """P2P Refine alignment: ``mapper`` (max_len,) long and ``alphas`` (max_len,) float.

    Target position ``p`` takes the source probabilities of column ``mapper[p]`` where ``alphas[p]`` is
    1 (a token both prompts share, globally aligned with BOS/EOS included), and keeps its own where
    it is 0 (a new token): A_edit = A_src[..., mapper] * alphas + A_edit * (1 - alphas).
    """
    x, y = [_BOS, *_ids(src_tokens), _EOS], [_BOS, *_ids(tgt_tokens), _EOS]
    for seq in (x, y):
        if len(seq) > max_len:
            raise PromptTooLongError(f"RealEdit: a prompt has {len(seq) - 2} tokens; Refine works within "
                                     f"one chunk of {max_len - 2}.")
    match = _align(x, y)
    mapper = torch.zeros(max_len, dtype=torch.long)
    alphas = torch.ones(max_len)
    for p, m in enumerate(match):
        mapper[p], alphas[p] = max(m, 0), float(m >= 0)
    for p in range(len(y), max_len):  # padding after EOS, kept aligned
        mapper[p] = min(len(x) + p - len(y), max_len - 1)
    return mapper, alphas


def reweight_scale(positions: Sequence[int], factors: float | Sequence[float],
                   max_len: int = CLIP_CHUNK) -> torch.Tensor:
    """P2P Reweight equalizer (max_len,): ``factors`` at ``positions``, 1 elsewhere."""
    scale = torch.ones(max_len)
    values = [factors] * len(positions) if isinstance(factors, (int, float)) else list(factors)
    if len(values) != len(positions):
        raise ValueError(f"RealEdit: {len(positions)} token positions but {len(values)} reweight factors.")
    for p, f in zip(positions, values):
        scale[p] = float(f)
    return scale

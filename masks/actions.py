"""Instruction -> editing action ("add" / "remove" / "change") by verb rules (ZONE Sec. 4.2, Eq. 5).

The paper classifies the instruction with a small MLP on CLIP text embeddings (appendix B); the
official code applies it per token and picks the label in an unintended way (METHODS.md, ZONE).
These rules replace it:

* Words are matched whole, case-insensitive, ignoring punctuation ("Remove the cup!" and
  "take-away the cup" both match), multi-word phrases included ("take away", "get rid of").
  Inflected forms count too ("removed", "removing", "took away", "getting rid of").
* A removal verb anywhere in the instruction wins: "remove" is the one action that changes the
  pipeline (Eq. 5's beta 0.2 and Region-IoU on the original image).
* Otherwise the earliest add or change verb decides; no recognised verb means "change".
* A verb right after a determiner ("the place", "a change") is read as a noun; one right after a
  negation ("don't remove", "without removing") is skipped.

Only "remove" versus the rest matters downstream (beta is 0.01 for both "add" and "change"), so the
add/change lists are deliberately short; the user override covers the rest.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

Action = Literal["add", "remove", "change"]
ACTIONS: tuple[str, ...] = get_args(Action)
OVERRIDE_CHOICES: tuple[str, ...] = ("auto", *ACTIONS)
DEFAULT_ACTION: Action = "change"

# Base forms; METHODS.md's lists first, then a few unambiguous synonyms (the paper's appendix
# examples include "attach a remote" -> add and "get off his tie" -> remove).
REMOVE_WORDS: tuple[str, ...] = (
    "remove", "delete", "erase", "take away", "get rid of",
    "eliminate", "take out", "take off", "get off", "disappear", "vanish",
)
ADD_WORDS: tuple[str, ...] = ("add", "put", "give", "place", "include", "insert", "attach")
CHANGE_WORDS: tuple[str, ...] = (
    "change", "make", "turn", "replace", "swap", "switch", "convert", "transform",
    "paint", "color", "colour", "recolor", "recolour",
)
ACTION_WORDS: dict[str, tuple[str, ...]] = {"remove": REMOVE_WORDS, "add": ADD_WORDS, "change": CHANGE_WORDS}

_DETERMINERS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "my", "your", "his", "her", "its", "our",
    "their", "some", "any", "every", "each",
})
_NEGATIONS = frozenset({"not", "t", "never", "no", "without"})  # "t" is what "don't" leaves
_NOT_A_VERB_AFTER = _DETERMINERS | _NEGATIONS
_IRREGULAR: dict[str, tuple[str, ...]] = {
    "put": ("put", "puts", "putting"),
    "give": ("give", "gives", "gave", "given", "giving"),
    "take": ("take", "takes", "took", "taken", "taking"),
    "get": ("get", "gets", "got", "gotten", "getting"),
    "make": ("make", "makes", "made", "making"),
    "swap": ("swap", "swaps", "swapped", "swapping"),
}


def _verb_forms(verb: str) -> tuple[str, ...]:
    """Base, 3rd person, past and -ing forms of a regular (or listed irregular) English verb."""
    if verb in _IRREGULAR:
        return _IRREGULAR[verb]
    if verb.endswith("e"):
        return verb, verb + "s", verb + "d", verb[:-1] + "ing"
    third = verb + ("es" if verb.endswith(("s", "sh", "ch", "x")) else "s")
    return verb, third, verb + "ed", verb + "ing"


def _phrase_forms(phrase: str) -> list[tuple[str, ...]]:
    """Token sequences of a (multi-word) phrase, inflecting its first word."""
    head, *rest = phrase.split()
    return [(form, *rest) for form in _verb_forms(head)]


_PATTERNS: dict[str, list[tuple[str, ...]]] = {
    action: [seq for phrase in words for seq in _phrase_forms(phrase)]
    for action, words in ACTION_WORDS.items()
}


def tokenize(instruction: str) -> list[str]:
    """Lower-case letter runs: punctuation, digits and hyphens separate words."""
    return re.findall(r"[a-z]+", instruction.lower())


def _is_verb_use(tokens: list[str], start: int) -> bool:
    """False when the match follows a determiner (noun use) or a negation."""
    return start == 0 or tokens[start - 1] not in _NOT_A_VERB_AFTER


def _first_match(tokens: list[str], patterns: list[tuple[str, ...]]) -> int | None:
    """Token index of the earliest verb use of any pattern, or None."""
    for start in range(len(tokens)):
        for seq in patterns:
            if tuple(tokens[start:start + len(seq)]) == seq and _is_verb_use(tokens, start):
                return start
    return None


def parse_action(value: str | None, *, label: str = "the 'action' input",
                 hint: str = "connect RealEdit Instruction Action's output, or leave it unconnected for 'change'",
                 ) -> Action:
    """An action name, validated: case and surrounding spaces are ignored, None means DEFAULT_ACTION.

    Raises a ValueError naming ``label`` and listing the actions, with ``hint`` on what to do.
    """
    name = str(value if value is not None else DEFAULT_ACTION).strip().lower()
    if name not in ACTIONS:
        raise ValueError(f"RealEdit: {label} is {value!r}; expected one of {', '.join(ACTIONS)} ({hint}).")
    return name  # type: ignore[return-value]


def _normalise_override(override: str | None) -> Action | None:
    """None / "auto" / "" -> None; otherwise the validated action."""
    if override is None or override.strip().lower() in ("", "auto"):
        return None
    return parse_action(override, label="the action override",
                        hint="or 'auto' to read the action from the instruction")


def classify_action(instruction: str, override: str | None = None) -> Action:
    """The action of an instruction: the override when given, else the verb rules above.

    ``override``: None or "auto" reads the instruction; "add" / "remove" / "change" is returned as is.
    An instruction without a word (empty, punctuation or digits only) is refused, override or not: it is
    always a mistake (IP2P would run with the empty text and the action would silently be "change").
    """
    tokens = tokenize(instruction or "")
    if not tokens:
        raise ValueError(f"RealEdit: the instruction {instruction!r} has no words (empty, or only punctuation or "
                         "digits); InstructPix2Pix would edit with an empty text. Type the edit, e.g. 'make his tie "
                         "blue'.")
    forced = _normalise_override(override)
    if forced is not None:
        return forced
    if _first_match(tokens, _PATTERNS["remove"]) is not None:
        return "remove"
    add_at = _first_match(tokens, _PATTERNS["add"])
    change_at = _first_match(tokens, _PATTERNS["change"])
    if add_at is not None and (change_at is None or add_at < change_at):
        return "add"
    return DEFAULT_ACTION


def action_tooltip() -> str:
    """Tooltip text listing the rules and the word lists."""
    return (
        "add / remove / change, from the instruction's verbs (whole words, any case, inflections "
        "count). remove: " + ", ".join(REMOVE_WORDS) + ". add: " + ", ".join(ADD_WORDS)
        + ". change: " + ", ".join(CHANGE_WORDS) + ", or no recognised verb. A removal verb anywhere "
        "wins, else the first add/change verb; after 'the/a/his...' a word counts as a noun, after "
        "'not/don't/without' as negated. Rules replace ZONE's MLP classifier (METHODS.md); "
        "'auto' uses them, any other choice overrides."
    )

"""Defaults of the attention controls (SpecRef and Prompt-to-Prompt): the one place they are set.

:data:`DOCS` says what each field does and where its default comes from, so node tooltips and docs
can quote it instead of repeating numbers. Step windows are fractions of the sampling steps
counted from the first denoising step, P2P style: a fraction ``f`` of ``N`` steps covers steps
``0 .. int(f * N) - 1``; a pair ``(a, b)`` covers ``int(a * N) .. int(b * N) - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

StepFraction = float | tuple[float, float]

CLIP_CHUNK = 77  # BOS + 75 tokens + EOS
MASK_RESIZE_MODES = ("bilinear", "nearest")


def window_steps(frac: StepFraction, total: int) -> tuple[int, int]:
    """First and one-past-last step index of a window, ``int(frac * N)`` as in P2P."""
    start, end = (0.0, frac) if isinstance(frac, (int, float)) else frac
    return int(start * total), int(end * total)


def in_window(step: int | None, frac: StepFraction, total: int | None) -> bool:
    """Whether sampling step ``step`` (0-based) of ``total`` lies in the window ``frac``.

    ``False`` when the step is unknown (a call outside sampling): controls never act blind.
    """
    if step is None or total is None:
        return False
    start, end = window_steps(frac, total)
    return start <= step < end


def _check_fraction(name: str, value: StepFraction) -> None:
    pair = (0.0, value) if isinstance(value, (int, float)) else value
    if len(pair) != 2 or not 0.0 <= pair[0] <= pair[1] <= 1.0:
        raise ValueError(f"RealEdit: {name} must be a fraction in [0, 1] or a (start, end) pair of them, "
                         f"got {value!r}.")


@dataclass(frozen=True)
class P2PSettings:
    """Prompt-to-Prompt controls (Hertz et al. 2022) as the SpecRef editing stage uses them.

    Field documentation (with each default's origin) is in :data:`DOCS`.
    """

    cross_replace: StepFraction = 0.8
    self_replace: StepFraction = 0.6
    self_replace_max_tokens: int = 32 * 32
    blend_threshold: float = 0.3
    blend_start: float = 0.2

    def __post_init__(self) -> None:
        _check_fraction("cross_replace", self.cross_replace)
        _check_fraction("self_replace", self.self_replace)
        _check_fraction("blend_start", self.blend_start)
        check_unit("blend_threshold", self.blend_threshold)
        if self.self_replace_max_tokens < 0:
            raise ValueError("RealEdit: self_replace_max_tokens must be >= 0.")


@dataclass(frozen=True)
class SpecRefSettings:
    """SpecRef's SR-attention masks (Eq. 2-3) and the cross-attention maps they come from."""

    p2p: P2PSettings = field(default_factory=P2PSettings)
    mt_threshold: float = 0.5
    ms_threshold: float = 0.5
    map_downscale: int = 4
    mask_resize: str = "bilinear"

    def __post_init__(self) -> None:
        if self.mask_resize not in MASK_RESIZE_MODES:
            raise ValueError(f"RealEdit: mask_resize must be one of {', '.join(MASK_RESIZE_MODES)}, got "
                             f"{self.mask_resize!r}.")
        check_unit("mt_threshold", self.mt_threshold)
        check_unit("ms_threshold", self.ms_threshold)
        if self.map_downscale < 1:
            raise ValueError(f"RealEdit: map_downscale must be >= 1, got {self.map_downscale}.")


def check_unit(name: str, value: float, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` unless ``value`` lies in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise error(f"RealEdit: {name} must be in [0, 1], got {value}.")


DOCS: dict[str, str] = {
    "cross_replace": "Fraction of steps with cross-attention replacement (Replace/Refine/Reweight). "
    "Default 0.8: P2P's examples and METHODS.md.",
    "self_replace": "Fraction of steps in which the edit takes the source's self-attention maps (0 = off). "
    "Default 0.6: the official SpecRef script's value (P2P's examples use 0.4-0.8). Not applied to the rows "
    "SR-attention mixes, in its layers and steps (official code; Eq. 3).",
    "self_replace_max_tokens": "Self-attention replacement only in layers with at most this many query "
    "tokens (P2P: 32x32 on a 64x64 latent).",
    "blend_threshold": "LocalBlend: threshold on the max-normalised word map (P2P default 0.3).",
    "blend_start": "LocalBlend: blend after every step from this fraction of the steps on (P2P: 0.2).",
    "p2p": "P2P controls of the edit.",
    "mt_threshold": "M_t: threshold on the min-max normalised target-word map after resizing (Eq. 3). "
    "Default 0.5 (METHODS.md); the official examples use 0.2-0.5.",
    "ms_threshold": "M_s: threshold on the reference mask after bilinear resizing to each layer's grid "
    "(Eq. 2). Default 0.5.",
    "map_downscale": "Cross-attention maps are read from layers at this downscale of the latent: 4 gives "
    "P2P's 16x16 maps on a 64x64 SD1.x latent.",
    "mask_resize": "How M_s and M_t are resized to each layer's token grid before thresholding: bilinear "
    "(default, METHODS.md; antialiased when shrinking) or nearest (an option of the official code).",
}


def with_origin(value: Any, origin: str) -> Any:
    """A dataclass field with a default and the default's origin (for tooltips; see :func:`field_origin`)."""
    return field(default=value, metadata={"origin": origin})


def field_origin(settings: type, name: str) -> str:
    """Where the default of a :func:`with_origin` field of the dataclass ``settings`` comes from."""
    for f in fields(settings):
        if f.name == name:
            return f.metadata["origin"]
    raise KeyError(f"{settings.__name__} has no field {name!r}")


def describe(settings: type, name: str) -> str:
    """The documentation of a settings field, with its default's origin (for node tooltips)."""
    if name not in {f.name for f in fields(settings)}:
        raise KeyError(f"{settings.__name__} has no field {name!r}")
    return DOCS[name]

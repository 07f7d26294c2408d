"""What each batch method takes: its manifest fields, the override keys it accepts and its settings.

One :class:`MethodSpec` per method name. ``settings(overrides)`` builds the method's settings from the
pack's own dataclasses (:class:`~..attention.settings.SpecRefSettings` / :class:`P2PSettings`,
:class:`~..inversion.baret_settings.BaretSettings`, :class:`~..attention.baret.BaretControls`,
:class:`~..masks.settings.ZoneSettings`, keep-pixels' ``KeepSettings``), so a default lives in one place
and a bad value is refused by the dataclass that owns it, at validation time, before any model loads.
No model, no diffusers import here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..attention.baret import BaretControls
from ..attention.settings import P2PSettings, SpecRefSettings
from ..inversion.baret_settings import BARET_DEFAULTS
from ..masks.settings import DEFAULT_MASK_LAYERS, DEFAULT_MASK_ROWS, MASK_LAYER_CHOICES, MASK_ROW_CHOICES, ZONE_DEFAULTS

EDIT_MODES = ("auto", "replace", "refine", "none")  # P2P cross-attention control (nodes' edit_mode, no reweight)
ZONE_FALLBACKS = ("rough", "error")


class UnavailableMethodError(ValueError):
    """A method the manifest names that this installation cannot run (yet)."""


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _pick(overrides: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if k in names}


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"RealEdit: {name} must be one of {', '.join(choices)}, got {value!r}.")
    return value


def _steps(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"RealEdit: steps must be an integer >= 2, got {value!r}.")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"RealEdit: {name} must be a number, got {value!r}.")
    return float(value)


# -- settings objects ------------------------------------------------------------------------------------
_P2P_KEYS = _names(P2PSettings)
_SPECREF_KEYS = tuple(n for n in _names(SpecRefSettings) if n != "p2p")


@dataclass(frozen=True)
class P2PRun:
    """A two-path (SpecRef / Prompt-to-Prompt) edit: its settings object and the run-level knobs."""

    steps: int
    cfg: float
    settings: SpecRefSettings
    edit_mode: str = "auto"
    sr_uncond_shared_kv: bool = False
    self_replace_uncond: bool = False


@dataclass(frozen=True)
class NullTextRun(P2PRun):
    """null-text inversion (``BaretSettings``' null-text names) + the two-path P2P edit."""

    null_text_iterations: int = BARET_DEFAULTS.null_text_iterations
    null_text_lr: float = BARET_DEFAULTS.null_text_lr  # at the first step; it decays as lr * (1 - s / 100)
    early_stop_eps: float = BARET_DEFAULTS.early_stop_eps
    early_stop_delta: float = BARET_DEFAULTS.early_stop_delta


@dataclass(frozen=True)
class BaretRun:
    """BARET: TTIS knobs (``BaretSettings`` names) and the edit's :class:`BaretControls`."""

    steps: int
    cfg: float
    ttis_iterations: int
    ttis_lr: float
    early_stop_eps: float
    early_stop_delta: float
    controls: BaretControls


@dataclass(frozen=True)
class ZoneRun:
    """ZONE (``ZoneSettings`` names): IP2P sampling and M_b (rows without an edit), then the mask pipeline."""

    steps: int = ZONE_DEFAULTS.steps
    text_cfg: float = ZONE_DEFAULTS.text_cfg
    image_cfg: float = ZONE_DEFAULTS.image_cfg
    mask_threshold: float = ZONE_DEFAULTS.mask_threshold
    mask_rows: str = DEFAULT_MASK_ROWS  # the IP2P Edit Mask node's options
    mask_layers: str = DEFAULT_MASK_LAYERS
    fft_d0: float = ZONE_DEFAULTS.fft_d0
    fft_threshold: float = ZONE_DEFAULTS.fft_threshold
    blend_alpha: float = ZONE_DEFAULTS.blend_alpha
    fallback: str = "rough"


@dataclass(frozen=True)
class KeepRun:
    """keep-pixels: its ``KeepSettings`` (the dataclass lives in ``masks.keep``) with the row's overrides."""

    settings: Any


def _p2p_run(o: Mapping[str, Any], default_steps: int) -> P2PRun:
    p2p = P2PSettings(**_pick(o, _P2P_KEYS))
    settings = SpecRefSettings(p2p=p2p, **_pick(o, _SPECREF_KEYS))
    return P2PRun(steps=_steps(o.get("steps", default_steps)), cfg=_number("cfg", o.get("cfg", 7.5)),
                  settings=settings, edit_mode=_choice("edit_mode", o.get("edit_mode", "auto"), EDIT_MODES),
                  **_pick(o, ("sr_uncond_shared_kv", "self_replace_uncond")))


def _nulltext_run(o: Mapping[str, Any], default_steps: int) -> NullTextRun:
    base = dataclasses.replace(BARET_DEFAULTS, **_pick(o, ("null_text_iterations", "null_text_lr", "early_stop_eps",
                                                           "early_stop_delta")))  # BaretSettings validates
    run = _p2p_run(o, default_steps)
    return NullTextRun(**{f.name: getattr(run, f.name) for f in fields(P2PRun)},
                       null_text_iterations=base.null_text_iterations, null_text_lr=base.null_text_lr,
                       early_stop_eps=base.early_stop_eps, early_stop_delta=base.early_stop_delta)


def _baret_run(o: Mapping[str, Any], default_steps: int) -> BaretRun:
    controls = BaretControls(**_pick(o, _names(BaretControls)))
    base = dataclasses.replace(BARET_DEFAULTS, **_pick(o, ("ttis_iterations", "ttis_lr", "early_stop_eps",
                                                           "early_stop_delta")))  # BaretSettings validates
    return BaretRun(steps=_steps(o.get("steps", default_steps)), cfg=_number("cfg", o.get("cfg", base.cfg)),
                    ttis_iterations=base.ttis_iterations, ttis_lr=base.ttis_lr, early_stop_eps=base.early_stop_eps,
                    early_stop_delta=base.early_stop_delta, controls=controls)


_ZONE_NUMBERS = ("text_cfg", "image_cfg", "mask_threshold", "fft_d0", "fft_threshold", "blend_alpha")


def _zone_run(o: Mapping[str, Any], default_steps: int) -> ZoneRun:
    run = ZoneRun(steps=_steps(o.get("steps", default_steps)),
                  **{k: _number(k, v) for k, v in _pick(o, _ZONE_NUMBERS).items()},
                  fallback=_choice("fallback", o.get("fallback", "rough"), ZONE_FALLBACKS),
                  mask_rows=_choice("mask_rows", o.get("mask_rows", ZoneRun.mask_rows), tuple(MASK_ROW_CHOICES)),
                  mask_layers=_choice("mask_layers", o.get("mask_layers", ZoneRun.mask_layers),
                                      tuple(MASK_LAYER_CHOICES)))
    if not 0.0 <= run.blend_alpha <= 1.0:
        raise ValueError(f"RealEdit: blend_alpha must lie in [0, 1], got {run.blend_alpha}.")
    if not -1.0 <= run.mask_threshold <= 1.0:  # M_b thresholds a difference of two [0, 1] maps (the node's range)
        raise ValueError(f"RealEdit: mask_threshold must lie in [-1, 1], got {run.mask_threshold}.")
    return run


def zone_needs_ip2p(raw: Mapping[str, Any]) -> bool:
    """A zone row without an edited image samples InstructPix2Pix from its instruction (and reads M_b)."""
    return not raw.get("edited")


def _zone_check(raw: Mapping[str, Any]) -> list[str]:
    if raw.get("edited") and not raw.get("mask"):
        return ["method 'zone' with an edited image needs its rough mask M_b (mask); or drop edited to sample "
                "InstructPix2Pix from the instruction"]
    if not raw.get("edited") and not raw.get("instruction"):
        return ["method 'zone' needs an instruction (InstructPix2Pix samples the edit), or edited + mask"]
    return []


def keep_pixels_api() -> tuple[Callable[..., Any], type] | None:
    """``(keep_unedited, KeepSettings)`` when this installation has them (``realedit.masks.keep``), else None."""
    try:
        from ..masks import keep  # added by the keep-pixels work; absent on older trees
    except ImportError:
        return None
    return keep.keep_unedited, keep.KeepSettings


def _keep_run(o: Mapping[str, Any], default_steps: int) -> KeepRun:
    api = keep_pixels_api()
    if api is None:
        raise UnavailableMethodError("RealEdit: method 'keep-pixels' needs realedit.masks.keep_unedited, which "
                                     "this installation does not have yet; update RealEdit.")
    return KeepRun(dataclasses.replace(api[1](), **o))  # KeepSettings refuses unknown fields and bad values


def _keep_keys() -> tuple[str, ...]:
    api = keep_pixels_api()
    return _names(api[1]) if api is not None else ()


# -- the table ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """A method's manifest contract.

    ``images``: path fields that are photos (RGB); ``masks``: path fields that are masks; ``required``:
    fields a row must fill; ``same_size``: path fields that must match the ``image`` field's size;
    ``word_fields``: (words field, prompt field) pairs whose words must occur in that prompt.
    """

    name: str
    summary: str
    required: tuple[str, ...]
    images: tuple[str, ...]
    masks: tuple[str, ...]
    same_size: tuple[str, ...]
    word_fields: tuple[tuple[str, str], ...]
    keys: Callable[[], tuple[str, ...]]
    build: Callable[[Mapping[str, Any], int], Any]
    default_steps: int = 50
    runs_model: Callable[[Mapping[str, Any]], bool] = lambda raw: True  # sampling: sides multiples of 8
    needs_ip2p: Callable[[Mapping[str, Any]], bool] = lambda raw: False  # an InstructPix2Pix UNet as well
    check: Callable[[Mapping[str, Any]], list[str]] = lambda raw: []  # rules between fields
    available: Callable[[], bool] = lambda: True

    def settings(self, overrides: Mapping[str, Any], default_steps: int | None = None) -> Any:
        """The method's settings with ``overrides``; unknown keys and bad values raise ValueError."""
        unknown = sorted(set(overrides) - set(self.keys()))
        if unknown:
            raise ValueError(f"RealEdit: unknown setting(s) {', '.join(unknown)} for method {self.name!r}; "
                             f"known: {', '.join(self.keys()) or '(none)'}.")
        return self.build(overrides, default_steps or self.default_steps)


_P2P_ALL = ("steps", "cfg", "edit_mode", *_P2P_KEYS, *_SPECREF_KEYS)
_GT = ("ground_truth",)

METHODS: dict[str, MethodSpec] = {
    "specref": MethodSpec(
        "specref", "SpecRef: replace an object with the one in a reference photo (DDIM inversions + two-path edit)",
        required=("image", "prompt", "target", "reference", "word"),
        images=("image", "reference", *_GT), masks=("reference_mask",), same_size=_GT,
        word_fields=(("word", "target"), ("blend_words", "target")),
        keys=lambda: (*_P2P_ALL, "sr_uncond_shared_kv", "self_replace_uncond"), build=_p2p_run,
        default_steps=50),
    "baret": MethodSpec(
        "baret", "BARET: target-text inversion, then reconstruction / transition / edit in one batch",
        required=("image", "target"), images=("image", *_GT), masks=(), same_size=_GT, word_fields=(),
        keys=lambda: ("steps", "cfg", "ttis_iterations", "ttis_lr", "early_stop_eps", "early_stop_delta",
                      *_names(BaretControls)),
        build=_baret_run, default_steps=BARET_DEFAULTS.steps),
    "nulltext-p2p": MethodSpec(
        "nulltext-p2p", "null-text inversion + Prompt-to-Prompt (the classic real-image pipeline)",
        required=("image", "prompt", "target"), images=("image", *_GT), masks=(), same_size=_GT,
        word_fields=(("blend_words", "target"),),
        keys=lambda: (*_P2P_ALL, "self_replace_uncond", "null_text_iterations", "null_text_lr", "early_stop_eps",
                      "early_stop_delta"),
        build=_nulltext_run, default_steps=BARET_DEFAULTS.steps),
    "zone": MethodSpec(
        "zone", "ZONE: InstructPix2Pix edit and M_b from the instruction (or a given edit and M_b), Region-IoU, "
        "FFT edge smoother, exact composite",
        required=("image",), images=("image", "edited", *_GT), masks=("mask", "segments"),
        same_size=("edited", "mask", "segments", *_GT), word_fields=(),
        keys=lambda: ("steps", *_ZONE_NUMBERS, "mask_rows", "mask_layers", "fallback"), build=_zone_run,
        default_steps=ZONE_DEFAULTS.steps,
        runs_model=zone_needs_ip2p, needs_ip2p=zone_needs_ip2p, check=_zone_check),
    "keep-pixels": MethodSpec(
        "keep-pixels", "keep the original's pixels wherever another editor's output did not mean to change them",
        required=("image", "edited"), images=("image", "edited", *_GT), masks=("mask", "segments"),
        same_size=("mask", "segments", *_GT), word_fields=(), keys=_keep_keys, build=_keep_run,
        runs_model=lambda raw: False,
        available=lambda: keep_pixels_api() is not None),
}

RESERVED = {"stylediffusion": "RealEdit: method 'stylediffusion' is reserved; its Python API does not exist yet."}

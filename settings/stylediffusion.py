"""StyleDiffusion defaults in one place (Li et al. 2023; official code sen-mao/StyleDiffusion @07b388a).

Nodes read default values *and* the tooltip text naming each value's origin from here (``origin(name)``),
so a default changes in one line. Citations ``sd:N`` are lines of the official ``stylediffusion.py``,
``R:N`` of its README (shared/papers/stylediffusion-official-code.md). Where the official code and the
paper differ we follow the code and say so in the origin text.

Step windows are fractions of the sampling steps counted from the first denoising step, P2P style:
``f`` covers steps ``0 .. int(f * N) - 1`` (:func:`realedit.attention.settings.window_steps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..attention.settings import check_unit, field_origin
from ..attention.settings import with_origin as _d

Parameterisation = Literal["direct", "clip"]
PARAMETERISATIONS: tuple[Parameterisation, ...] = ("direct", "clip")


@dataclass(frozen=True)
class StyleDiffusionSettings:
    """Every StyleDiffusion default, with its origin in the field metadata."""

    # Inversion (official code; the paper gives no numbers).
    steps: int = _d(30, "official code: 30 DDIM steps (sd:29)")
    cfg: float = _d(7.5, "official code: CFG 7.5 in the inversion loss and the edit (sd:795-814, pu:87-100)")
    inversion_guidance: float = _d(1.0, "official code: DDIM inversion with the source prompt, guidance 1 "
                                   "(sd:712-727)")
    iteration_base: float = _d(100.0, "official code: at most ceil(100 e^(-0.1 s)) iterations at step s "
                               "(100, 91 ... 6; 1015 over 30 steps; sd:772, 982)")
    iteration_decay: float = _d(0.1, "official code: the per-step cap decays as e^(-0.1 s) (sd:772)")
    lr: float = _d(1e-2, "official code: Adam lr 1e-2 * (1 - s / 100) at step s (sd:783), null-text's schedule")
    lr_horizon: int = _d(100, "official code: the lr reaches 0 after 100 steps (1 - s / 100, sd:783)")
    early_stop_eps: float = _d(1e-5, "official code: a step stops once its loss (attention term included) "
                               "< 1e-5 + 2e-5 s (sd:823)")
    early_stop_delta: float = _d(2e-5, "official code: threshold growth 2e-5 per step (sd:823)")
    attention_weight: float = _d(1.0, "official code: the attention-map MSE is added with weight 1 "
                                 "(sd:795-814, 978); 0 turns the regularisation off (ablation)")
    map_downscale: int = _d(4, "official code: the maps of the five 16x16 cross-attention layers (input 7-8, "
                            "output 3-5 of SD1.x at 512 px; sd:731-733); we select them by resolution (latent / 4)")
    parameterisation: Parameterisation = _d(
        "direct", "ours: 'direct' learns A_s, B_s from A = 1, B = 0 (plain DDIM + CFG at the start) when no "
        "CLIP_VISION is connected, a documented deviation; 'clip' is the official per-step mapping network "
        "M_s(F) from CLIP image features (sd:563-573, 609-614)")
    seed: int = _d(0, "ours: seeds the mapping network's random initialisation (PyTorch's default init, as the "
                   "official step 0; sd:563-573) so a re-run repeats itself")
    # Editing (P2Plus); README values, not argparse's (R:111 vs sd:988-991).
    tau_v: float = _d(0.5, "official README (R:111): the target row takes c_tgt * A_s + B_s while s < tau_v N, "
                      "then c_tgt (sd:466-476, 923-925); the script's argparse defaults differ "
                      "(.6/.6/.8/.5, sd:988-991)")
    tau_c: float = _d(0.6, "official README (R:111): P2P cross-attention replacement while s < int(tau_c N)")
    tau_s: float = _d(0.6, "official README (R:111): P2P self-attention map replacement while s < int(tau_s N), "
                      "in layers of at most 32x32 queries")
    tau_u: float = _d(0.0, "official README (R:111): P2Plus, the target's unconditional self-attention maps := "
                      "the source's while s < int(tau_u N) (sd:209-260); 0 = off, .5 for big structure changes")
    pin_source: bool = _d(False, "official code: the source row runs free from z_T with its learned values "
                          "(pu:87-100); True pins it to the DDIM trajectory as our SpecRef sampler does")
    blend_threshold: float = _d(0.3, "official code: LocalBlend threshold 0.3 (sd:39-91)")
    blend_start: float = _d(0.2, "official code: LocalBlend from step int(0.2 N) on (sd:39-91)")
    reweight_factor: float = _d(2.0, "official examples: Reweight x2 (x8 once; data/*editing.csv)")
    self_replace_max_tokens: int = _d(32 * 32, "official code / P2P: self-attention maps only in layers of at "
                                      "most 32x32 queries")

    def __post_init__(self) -> None:
        for name in ("steps", "lr_horizon", "map_downscale"):
            if getattr(self, name) < 1:
                raise ValueError(f"RealEdit: {name} must be >= 1, got {getattr(self, name)}.")
        if not self.lr > 0 or not self.iteration_base >= 1 or self.iteration_decay < 0:
            raise ValueError("RealEdit: the learning rate must be > 0, the iteration base >= 1 and the decay >= 0.")
        if self.early_stop_eps < 0 or self.early_stop_delta < 0 or self.attention_weight < 0:
            raise ValueError("RealEdit: early-stop eps/delta and the attention weight must be >= 0.")
        for name in ("tau_v", "tau_c", "tau_s", "tau_u", "blend_threshold", "blend_start"):
            check_unit(name, getattr(self, name))
        if self.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"RealEdit: parameterisation must be one of {PARAMETERISATIONS}, "
                             f"got {self.parameterisation!r}.")


def iteration_cap(step: int, base: float = 100.0, decay: float = 0.1) -> int:
    """The official per-step iteration cap ceil(base * e^(-decay * s)) (sd:772): 100, 91, 82 ... at s = 0, 1, 2."""
    return max(1, math.ceil(base * math.exp(-decay * step)))


SD_DEFAULTS = StyleDiffusionSettings()


def origin(name: str) -> str:
    """Where a StyleDiffusion default comes from (tooltip text)."""
    return field_origin(StyleDiffusionSettings, name)

"""A rough edit mask M_b without an InstructPix2Pix model: where the aligned edit differs from the original.

Edit models change every pixel a little (the VAE round trip, a global colour and brightness drift) and
the edited region a lot. The change map separates the two:

1. Both images are reduced to at most ``working_size`` pixels on the long side (antialiased): M_b is a
   rough mask (ZONE's comes from a 64x64 attention grid), refined later by Region-IoU and the smoother.
   ``keep_unedited`` reduces the edit before undoing its alignment, at the working size
   (:func:`aligned_working_planes`): the two orders of resampling differ by interpolation only, and the
   full-size warp is not needed for M_b.
2. **Global colour matching**: a 3x4 affine colour transform edited -> original (gain, cross-talk and
   offset per channel) fitted by iteratively reweighted least squares with Tukey weights on the colour
   residual, so the edited region does not take part in the fit (Reinhard-style mean/std transfer is the
   diagonal special case; the full affine also absorbs hue and saturation drift). A fit that is not
   plausible drift is dropped: a near-singular map (:func:`plausible_drift`), or one that moves the typical
   colour further than the threshold (:func:`drift_reach`). On a picture of few colours an affine map can send
   edited colours back onto the original ones (a background made black, an object recoloured); undoing
   such a fit would undo the edit, while leaving a true drift in place at worst marks more as changed.
3. **Perceptual difference**: CIE76 Delta E (Euclidean distance in CIE L*a*b*, kornia's formulas) between the
   original and the colour-matched edit, smoothed with a Gaussian (``blur_sigma``). Delta E is in the
   units users know (about 2.3 is a just-noticeable difference; a recoloured object is 20-80).
4. M_b = (Delta E > threshold) inside the pixels the aligned edit covers, then a morphological clean-up:
   an opening (``open_kernel``) removes specks of texture noise, a closing plus hole filling
   (``close_kernel``, :func:`~.fft_smooth.close_and_fill`) joins the parts of one edit, and connected
   regions smaller than ``min_region`` of the image are dropped. The mask is brought back to full size
   with pixel-centre nearest sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from scipy import ndimage

from .align import TUKEY_C, Alignment, _level_size, warp_reduced
from .composite import all_true, any_true
from .fft_smooth import close_and_fill, square_dilation, square_erosion

IDENTITY_COLOUR = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)  # (3, 4)
RIDGE = 1e-4  # ridge towards the identity, per unit of weight
FIT_PIXELS = 16384  # pixels the colour fit samples (a regular stride over the valid ones)


@dataclass(frozen=True)
class ChangeSettings:
    """The change map's knobs (see the module docstring); sizes are pixels at ``working_size``."""

    threshold: float = 10.0  # Delta E (CIE76)
    working_size: int = 256
    blur_sigma: float = 1.0
    open_kernel: int = 3
    close_kernel: int = 7
    min_region: float = 0.0005  # fraction of the image


@dataclass(frozen=True)
class ChangeMap:
    """M_b and what it came from."""

    mask: torch.Tensor  # (H, W) bool, full size
    delta_e: torch.Tensor  # (h, w) float, Delta E at the working size (after the blur), for preview
    colour_transform: torch.Tensor  # (3, 4): original ~ colour_transform @ [r, g, b, 1] of the edit
    colour_note: str = ""  # why a colour fit was dropped (colour_drift)

    @property
    def coverage(self) -> float:
        return float(self.mask.float().mean())


def _planes(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) -> (1, 3, h, w) float32 at ``size`` (antialiased bilinear)."""
    x = image[..., :3].permute(2, 0, 1)[None].float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def colour_drift(source: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, iterations: int = 12,
                 max_delta_e: float | None = None) -> tuple[torch.Tensor, str]:
    """A (3, 4) affine colour transform M with target ~ M [source; 1], robust to a local edit, and why a fit was
    dropped ("" when it was not).

    Args:
        source, target: (1, 3, h, w) images (the edit and the original).
        valid: (h, w) bool, the pixels that may take part.
        max_delta_e: drift moves the typical colour less far (the change map's threshold: a colour moved
            further is edited by its own measure); a fit that moves it further (:func:`drift_reach`) explains an
            edit away, as an affine map can on a picture of few colours (a background made beige mapped back
            onto grey), and is dropped.
    IRLS: least squares, then Tukey weights on the residual's length scaled by its median (MAD), until the
    transform moves less than 1e-4 (a strongly edited region takes several rounds to drop out). A fit that is
    not drift (:func:`plausible_drift`, ``max_delta_e``) gives the identity.
    """
    stride = max(1, valid.numel() // FIT_PIXELS)
    keep = valid.reshape(-1)[::stride]
    src = source[0].reshape(3, -1)[:, ::stride][:, keep].T  # (P, 3), a strided sample of the valid pixels
    dst = target[0].reshape(3, -1)[:, ::stride][:, keep].T
    if src.shape[0] < 16:
        return IDENTITY_COLOUR.clone(), ""
    design = torch.cat([src, torch.ones(src.shape[0], 1)], 1).double()  # (P, 4)
    dst = dst.double()
    weight = torch.ones(src.shape[0], 1, dtype=torch.float64)
    prior = IDENTITY_COLOUR.double().T  # (4, 3): the ridge pulls undetermined directions to the identity
    transform = IDENTITY_COLOUR.double()
    for _ in range(iterations):
        ridge = RIDGE * float(weight.sum())
        normal = (design * weight).T @ design + ridge * torch.eye(4, dtype=torch.float64)  # (4, 4)
        previous = transform
        transform = torch.linalg.solve(normal, (design * weight).T @ dst + ridge * prior).T  # (3, 4)
        if float((transform - previous).abs().max()) < 1e-4:
            break
        residual = (design @ transform.T - dst).square().sum(1, keepdim=True).sqrt()  # (P, 1)
        sigma = max(1.4826 * float(residual.median()), 1e-4)
        u = (residual / (TUKEY_C * sigma)).clamp(max=1)
        weight = (1 - u * u) ** 2
        if float(weight.sum()) < 8:
            break
    transform = transform.float()
    if not plausible_drift(transform):
        return IDENTITY_COLOUR.clone(), "a near-singular fit (few colours), not drift: not undone"
    if max_delta_e is not None and (reach := drift_reach(src, transform)) > max_delta_e:
        return IDENTITY_COLOUR.clone(), (f"the fit would move the typical colour by Delta E {reach:.0f} > "
                                         f"{max_delta_e:g}: an edit, not drift; not undone")
    return transform, ""


def drift_reach(colours: torch.Tensor, transform: torch.Tensor) -> float:
    """How far a colour transform (3, 4) moves the colours (P, 3) of a picture: the median CIE76 Delta E between
    each colour and its image (drift moves the typical colour a few units; a background recoloured and mapped
    back, tens)."""
    matched = (colours @ transform[:, :3].T + transform[:, 3]).clamp(0, 1)  # (P, 3)
    before, after = (c.T[None, :, :, None] for c in (colours, matched))  # (1, 3, P, 1): images of P x 1 pixels
    moved = delta_e(before, after)  # (P, 1)
    return float(moved.median())


def plausible_drift(transform: torch.Tensor) -> bool:
    """Whether a fitted (3, 4) colour transform looks like an edit model's drift: an invertible linear part
    with a determinant in [1/4, 4] and offsets under 0.5. With few distinct colours (a flat background, a
    logo) an affine map can send an edited colour onto the original one; such a fit is not drift."""
    det = float(torch.linalg.det(transform[:, :3].double()))
    return 0.25 <= det <= 4.0 and float(transform[:, 3].abs().max()) < 0.5


def apply_colour_transform(image: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """M [rgb; 1] for every pixel of an (H, W, 3) image, clamped to [0, 1], in the image's dtype."""
    rgb = image[..., :3].float()
    out = rgb @ transform[:, :3].T.to(rgb.device) + transform[:, 3].to(rgb.device)  # (H, W, 3)
    return out.clamp(0, 1).to(image.dtype)


def working_planes(original: torch.Tensor, edited: torch.Tensor, valid: torch.Tensor | None,
                   working_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both images as (1, 3, h, w) CPU planes at most ``working_size`` on the long side, and the (h, w) bool
    mask of pixels inside ``valid`` (a convex region: where a warped edit has data)."""
    height, width = original.shape[:2]
    size = _level_size(height, width, working_size)
    small_o, small_e = _planes(original, size).cpu(), _planes(edited, size).cpu()
    if valid is None or all_true(valid):
        return small_o, small_e, torch.ones(size, dtype=torch.bool)
    # pixel centres sampled, then one eroded ring: the valid region of a similarity warp is convex, so a small
    # pixel whose centre and neighbours' centres are valid covers valid full-size pixels only
    centres = F.interpolate(valid.float()[None, None].cpu(), size=size, mode="nearest-exact")[0, 0] > 0.5
    return small_o, small_e, square_erosion(centres, 3)


def reduced_pair(original: torch.Tensor, edited: torch.Tensor,
                 working_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both (H, W, 3) images as (1, 3, h, w) CPU planes at most ``working_size`` on the long side; the edit
    not yet aligned (:func:`aligned_working_planes` warps it there)."""
    size = _level_size(*original.shape[:2], working_size)
    return _planes(original, size).cpu(), _planes(edited, size).cpu()


def aligned_working_planes(reduced: tuple[torch.Tensor, torch.Tensor], alignment: Alignment,
                           full_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`working_planes` of the original and the aligned edit from :func:`reduced_pair`: the edit is
    reduced first and warped at the working size (:func:`~.align.warp_reduced`), so the full-size warp is
    never needed for M_b. The valid mask is the reduced warp's, eroded by one ring as above."""
    small_o, small_e = reduced
    warped, inside = warp_reduced(small_e, alignment, full_size)
    return small_o, warped, inside if all_true(inside) else square_erosion(inside, 3)


# CIE XYZ of linear sRGB (D65), each row divided by the D65 white point's component (kornia's constants).
_SRGB_TO_XYZ_D65 = torch.tensor([[0.412453, 0.357580, 0.180423],
                                 [0.212671, 0.715160, 0.072169],
                                 [0.019334, 0.119193, 0.950227]]) / torch.tensor([[0.95047], [1.0], [1.08883]])
_LAB_EPSILON = 0.008856


def _lab_f(image: torch.Tensor) -> torch.Tensor:
    """f(X/Xn), f(Y/Yn), f(Z/Zn) of CIE L*a*b* for (B, 3, h, w) sRGB in [0, 1] (L* = 116 f_Y - 16,
    a* = 500 (f_X - f_Y), b* = 200 (f_Y - f_Z)); kornia's ``rgb_to_lab`` formulas and constants."""
    linear = torch.where(image > 0.04045, ((image + 0.055).clamp(min=0.0) / 1.055).pow(2.4), image / 12.92)
    xyz = torch.einsum("ck,bkhw->bchw", _SRGB_TO_XYZ_D65.to(image), linear)  # normalised by the white point
    return torch.where(xyz > _LAB_EPSILON, xyz.clamp(min=_LAB_EPSILON).pow(1 / 3), 7.787 * xyz + 4.0 / 29.0)


def delta_e(original: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """CIE76 Delta E between two (1, 3, h, w) sRGB images in [0, 1] -> (h, w).

    Computed from the differences of f (the L*a*b* transfer) without assembling L*a*b*: the same values
    as kornia's ``rgb_to_lab`` then a Euclidean distance, up to float rounding, in half the time."""
    f = _lab_f(torch.cat([original, edited]))  # (2, 3, h, w)
    d = f[0] - f[1]  # (3, h, w): f_X, f_Y, f_Z differences
    return torch.sqrt((116.0 * d[1]).square() + (500.0 * (d[0] - d[1])).square() + (200.0 * (d[1] - d[2])).square())


def opening(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Morphological opening of an (h, w) bool mask by a ``kernel`` x ``kernel`` square."""
    return square_dilation(square_erosion(mask, kernel), kernel)


def drop_small_regions(mask: torch.Tensor, min_pixels: int) -> torch.Tensor:
    """Remove 8-connected regions with fewer than ``min_pixels`` pixels (scipy.ndimage.label)."""
    if min_pixels <= 1 or not any_true(mask):
        return mask
    labels, count = ndimage.label(mask.cpu().numpy(), structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return torch.from_numpy(keep[labels]).to(mask.device)


def change_mask(original: torch.Tensor, edited: torch.Tensor, valid: torch.Tensor | None = None,
                settings: ChangeSettings | None = None, match_colours: bool = True) -> ChangeMap:
    """M_b of an aligned pair (module docstring).

    Args:
        original, edited: (H, W, 3) float in [0, 1], one size (``edited`` already aligned).
        valid: (H, W) bool, where the aligned edit has data (default: everywhere); M_b stays inside it.
        settings: :class:`ChangeSettings`.
        match_colours: fit and undo the global colour transform first (off: compare the colours as they are).
    """
    settings = settings or ChangeSettings()
    planes = working_planes(original, edited, valid, settings.working_size)
    change = change_map_of_planes(planes, tuple(original.shape[:2]), settings, match_colours)
    if valid is not None and tuple(change.delta_e.shape) != tuple(valid.shape):
        change = replace(change, mask=change.mask & valid.cpu())
    return replace(change, mask=change.mask.to(original.device))


def change_map_of_planes(planes: tuple[torch.Tensor, torch.Tensor, torch.Tensor], full_size: tuple[int, int],
                         settings: ChangeSettings, match_colours: bool = True) -> ChangeMap:
    """Steps 2-4 of the module docstring on :func:`working_planes` (original, edit, valid at the working
    size); the mask comes back at ``full_size`` (CPU), inside the valid pixels of the working size."""
    small_o, small_e, small_valid = planes
    size = tuple(small_o.shape[-2:])
    transform, note = (colour_drift(small_e, small_o, small_valid, max_delta_e=settings.threshold)
                       if match_colours else (IDENTITY_COLOUR, ""))
    matched = torch.einsum("ck,kp->cp", transform[:, :3], small_e[0].reshape(3, -1)) + transform[:, 3:]
    matched = matched.reshape(1, 3, *size).clamp(0, 1)  # (1, 3, h, w)
    difference = delta_e(small_o, matched)[None, None]
    if settings.blur_sigma > 0:
        radius = max(int(3 * settings.blur_sigma + 0.5), 1)
        difference = gaussian_blur2d(difference, (2 * radius + 1,) * 2, (settings.blur_sigma,) * 2,
                                     border_type="replicate")
    difference = difference[0, 0]
    mask = (difference > settings.threshold) & small_valid
    mask = opening(mask, settings.open_kernel) if settings.open_kernel > 1 else mask
    mask = close_and_fill(mask, settings.close_kernel) & small_valid if settings.close_kernel > 1 else mask
    mask = drop_small_regions(mask, int(settings.min_region * size[0] * size[1]))
    if size != tuple(full_size):  # back to full size
        mask = F.interpolate(mask.float()[None, None], size=full_size, mode="nearest-exact")[0, 0] > 0.5
    return ChangeMap(mask=mask, delta_e=difference, colour_transform=transform, colour_note=note)

"""Global alignment of an edited image onto its original: translation, scale and a small rotation.

Edit models (Qwen-Image-Edit, Flux Kontext, InstructPix2Pix, SDEdit...) often return the picture shifted
or zoomed by a few pixels. Before comparing pixels, the edit is registered onto the original with a
similarity transform about the image centre c (pixel coordinates p = (x, y), centres of pixels at
integers):

    p_edited = c + s R(theta) (p_original - c) + t,        t = (t_x, t_y) in pixels

estimated on the BT.601 luma in two stages:

1. **Phase correlation** (Kuglin & Hudson 1975) on a Hann-windowed copy at most ``coarse_size`` pixels
   on the long side: the normalised cross-power spectrum's inverse FFT peaks at the translation, found to
   a fraction of a pixel with a parabola through the peak and its neighbours. It finds shifts of any
   size (up to ``max_shift``) without an initial guess.
2. **Robust Lucas-Kanade** (Gauss-Newton on the similarity, Baker & Matthews 2004, with the ESM gradient
   of Benhimane & Malis 2004: the mean of both images' gradients) on a pyramid up to ``fine_size``
   pixels, with a gain and an offset of the luma in the model (the global colour drift of edit models)
   and Tukey weights on the residual, so the edited region itself does not pull the fit. This refines
   the translation to well under a tenth of a pixel and estimates s and theta (a few per cent and a few
   degrees, the range edit models drift in; log-polar Fourier-Mellin would find larger ones, which no
   edit model produces).

The transform is reported (:class:`Alignment`) and undone on the full-size edit with
``torch.nn.functional.grid_sample`` (:func:`warp_to_original`). A transform that correlates (at least
``min_score``) but leaves the allowed range (another framing, a small crop) is refused with a
:class:`AlignmentError` naming the fix; a zoom or crop too large for the search to lock onto (1.5x and
more on our synthetic textures; up to 1.4x is found and refused) correlates less and counts as unverified,
below. The identity is kept, and the edit's pixels used as they are (no
resampling), when the transform moves no pixel by ``identity_tolerance``, when most pixels are the
original's own (an inpainting output), when the original is too flat to register, when the transform found
matches no better than none (structure in one direction only), and when nothing correlates ``min_score``
or more (:data:`UNVERIFIED`: a new background or the only object removed leaves little luma in common, as
does another photo; the report says so, and the change map then covers the picture where it is another).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .composite import bounding_box
from .fft_smooth import LUMA_BT601

TUKEY_C = 4.685  # Tukey biweight constant (95% efficiency on Gaussian residuals)
MAD_SCALE = 1.4826  # median absolute deviation -> standard deviation for Gaussian residuals
CONVERGED = 0.005  # pixels of the level: an update moving no pixel further ends the level
UNTOUCHED = 0.5  # share of bit-identical pixels above which the edit kept the original's grid (inpainting)
MIN_CONTRAST = 0.01  # luma standard deviation below which an image has nothing to register
MIN_SIDE = 16  # images with a shorter side are not aligned (too little to register)


class AlignmentError(ValueError):
    """The original and the edited image could not be registered onto each other."""


@dataclass(frozen=True)
class AlignSettings:
    """How :func:`estimate_alignment` searches (all sizes in pixels of the long side)."""

    estimate_scale: bool = True  # False: translation only
    coarse_size: int = 256  # phase correlation
    fine_size: int = 384  # finest Lucas-Kanade level
    max_shift: float = 0.15  # fraction of the shorter side
    max_scale_change: float = 0.15  # |s - 1|
    max_rotation: float = 10.0  # degrees
    min_score: float = 0.3  # correlation of the aligned luma with the original's (robust, see score)
    identity_tolerance: float = 0.02  # pixels of displacement anywhere in the image


@dataclass(frozen=True)
class Alignment:
    """The similarity p_edited = c + s R(theta) (p_original - c) + t, in full-size pixels."""

    shift: tuple[float, float]  # (t_x, t_y): where the original's content moved to in the edit
    scale: float  # s
    rotation: float  # theta, degrees, counter-clockwise in (x right, y down) pixel axes
    score: float  # robust correlation of the aligned luma with the original's (1: identical up to gain)
    score_before: float  # the same without alignment
    identity: bool  # below the tolerance, or no better than none: no resampling
    note: str = ""  # why the identity was kept, when it was not measured as one

    def max_displacement(self, height: int, width: int) -> float:
        """Largest displacement the transform gives any pixel of an image of this size, in pixels."""
        return _max_displacement(self.shift, self.scale, self.rotation, height, width)

    def describe(self) -> str:
        if self.note == OFF:
            return "alignment: off"
        if self.note.startswith(UNVERIFIED):
            return (f"alignment: {self.note} (best {self.score:.3f}): the edit changed most of the picture, or it "
                    "is not an edit of 'original'; the edit is used on its own grid")
        if self.identity:
            return f"alignment: none needed ({self.note or 'below tolerance'}; correlation {self.score:.3f})"
        return (f"alignment: shift x {self.shift[0]:+.2f} px, y {self.shift[1]:+.2f} px, scale {self.scale:.4f}, "
                f"rotation {self.rotation:+.2f} deg (correlation {self.score_before:.3f} -> {self.score:.3f})")


OFF = "off"
UNVERIFIED = "unverified"  # note of an identity kept because no registration was trustworthy
IDENTITY = Alignment(shift=(0.0, 0.0), scale=1.0, rotation=0.0, score=1.0, score_before=1.0, identity=True)
NOT_ALIGNED = Alignment(shift=(0.0, 0.0), scale=1.0, rotation=0.0, score=1.0, score_before=1.0, identity=True,
                        note=OFF)  # what keep_unedited reports when alignment is turned off


def _max_displacement(shift: tuple[float, float], scale: float, rotation: float, height: int, width: int) -> float:
    a = scale * math.cos(math.radians(rotation)) - 1.0
    b = scale * math.sin(math.radians(rotation))
    corner = math.hypot((width - 1) / 2, (height - 1) / 2)
    return math.hypot(*shift) + math.hypot(a, b) * corner


def gray(image: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) -> (H, W) BT.601 luma, float32."""
    weights = torch.tensor(LUMA_BT601, dtype=torch.float32, device=image.device)
    return image[..., :3].float() @ weights


def _resize(plane: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) -> ``size`` with antialiased bilinear sampling (pixel centres map linearly)."""
    if tuple(plane.shape) == tuple(size):
        return plane
    return F.interpolate(plane[None, None], size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0]


def _level_size(height: int, width: int, long_side: int, short_min: int = 32) -> tuple[int, int]:
    """An image size with at most ``long_side`` on the long side, but at least ``short_min`` (or the image's
    own) on the short side, so a very elongated image keeps enough pixels across to register."""
    factor = min(1.0, max(long_side / max(height, width), short_min / min(height, width)))
    return max(round(height * factor), 1), max(round(width * factor), 1)


def _normalise(plane: torch.Tensor) -> torch.Tensor:
    return (plane - plane.mean()) / plane.std().clamp(min=1e-6)


def _hann(height: int, width: int, device: torch.device) -> torch.Tensor:
    wy = torch.hann_window(height, periodic=False, device=device)
    wx = torch.hann_window(width, periodic=False, device=device)
    return wy[:, None] * wx[None, :]  # (H, W)


def _parabola_offset(left: float, centre: float, right: float) -> float:
    """Vertex of the parabola through (-1, left), (0, centre), (1, right), clipped to [-0.5, 0.5]."""
    denom = left - 2.0 * centre + right
    if denom >= 0:  # not a maximum
        return 0.0
    return max(-0.5, min(0.5, 0.5 * (left - right) / denom))


def phase_correlation(original: torch.Tensor, edited: torch.Tensor) -> tuple[float, float, float]:
    """(t_x, t_y, peak): the translation of ``edited`` relative to ``original``, both (H, W) luma.

    R = F_e conj(F_o) / |F_e conj(F_o)|; its inverse FFT peaks at t (edited(p) = original(p - t)).
    Sub-pixel: a parabola through the peak and its neighbours on each axis. ``peak`` is the correlation
    surface's maximum (1 for a pure circular shift, near 0 for unrelated images).
    """
    height, width = original.shape
    window = _hann(height, width, original.device)
    f_o = torch.fft.rfft2(_normalise(original) * window)
    f_e = torch.fft.rfft2(_normalise(edited) * window)
    cross = f_e * f_o.conj()
    surface = torch.fft.irfft2(cross / cross.abs().clamp(min=1e-12), s=(height, width))  # (H, W)
    flat = int(torch.argmax(surface))
    iy, ix = divmod(flat, width)
    peak = float(surface[iy, ix])
    dy = _parabola_offset(float(surface[iy - 1, ix]), peak, float(surface[(iy + 1) % height, ix]))
    dx = _parabola_offset(float(surface[iy, ix - 1]), peak, float(surface[iy, (ix + 1) % width]))
    ty = iy + dy if iy <= height // 2 else iy + dy - height  # wrap to signed shifts
    tx = ix + dx if ix <= width // 2 else ix + dx - width
    return tx, ty, peak


def affine_theta(shift: tuple[float, float], a: float, b: float, height: int, width: int) -> torch.Tensor:
    """The (1, 2, 3) ``affine_grid`` matrix (align_corners=True) of p_e = c + [[1+a, -b], [b, 1+a]] (p - c) + t.

    Normalised coordinates are u = (x - c_x) / h_x with h_x = (W - 1) / 2 (and v likewise), so
    u_e = (1+a) u - b (h_y/h_x) v + t_x/h_x and v_e = b (h_x/h_y) u + (1+a) v + t_y/h_y.
    """
    hx, hy = max((width - 1) / 2, 0.5), max((height - 1) / 2, 0.5)
    return torch.tensor([[[1 + a, -b * hy / hx, shift[0] / hx],
                          [b * hx / hy, 1 + a, shift[1] / hy]]], dtype=torch.float32)


Box = tuple[slice, slice]  # rows, columns of an (H, W) grid


def _sampling_grid(theta: torch.Tensor, height: int, width: int, device: torch.device,
                   box: Box | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``affine_grid(theta, align_corners=True)`` as two broadcast sums, (1, H, W, 2) (a third of its cost), and
    the (H, W) bool mask of sampling positions inside the image; with ``box``, the same values on the box's
    rows and columns only, (1, h, w, 2) and (h, w) (bit for bit the box of the whole grid)."""
    u = torch.linspace(-1.0, 1.0, width, device=device) if width > 1 else torch.zeros(1, device=device)
    v = torch.linspace(-1.0, 1.0, height, device=device) if height > 1 else torch.zeros(1, device=device)
    if box is not None:
        v, u = v[box[0]], u[box[1]]
    t = theta[0].tolist()
    grid = torch.empty(1, v.numel(), u.numel(), 2, device=device)  # written in place: no temporaries to stack
    gu, gv = grid[0, ..., 0], grid[0, ..., 1]  # (h, w) views
    torch.add((t[0][0] * u)[None, :], (t[0][1] * v + t[0][2])[:, None], out=gu)
    torch.add((t[1][0] * u)[None, :], (t[1][1] * v + t[1][2])[:, None], out=gv)
    inside = (gu.abs() <= 1.0 + 1e-6) & (gv.abs() <= 1.0 + 1e-6)
    return grid, inside


def _warp_planes(planes: torch.Tensor, theta: torch.Tensor, mode: str,
                 box: Box | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (C, H, W) ``planes`` at the transform's positions: the warped planes and the (H, W) bool mask of
    positions inside the image (where the edit has data); with ``box``, on that box of the output grid only."""
    channels, height, width = planes.shape
    grid, inside = _sampling_grid(theta, height, width, planes.device, box)  # (1, h, w, 2), (h, w)
    warped = F.grid_sample(planes[None], grid, mode=mode, padding_mode="border", align_corners=True)[0]
    return warped, inside


def _gradients(plane: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences of an (H, W) plane, zero on the border rows/columns."""
    gx, gy = torch.zeros_like(plane), torch.zeros_like(plane)
    gx[:, 1:-1] = (plane[:, 2:] - plane[:, :-2]) / 2
    gy[1:-1, :] = (plane[2:, :] - plane[:-2, :]) / 2
    return gx, gy


def _robust_sigma(residual: torch.Tensor, weight: torch.Tensor) -> float:
    """MAD estimate of the residual's scale over the valid pixels, from a strided subsample of at most about
    16k pixels (the median is the cost; the estimate only sets the Tukey weights' width)."""
    stride = max(1, residual.numel() // 16384)
    values = residual.reshape(-1)[::stride]
    values = values[weight.reshape(-1)[::stride] > 0].abs()
    return max(MAD_SCALE * float(values.median()) if values.numel() else 0.0, 1e-4)


def _tukey(residual: torch.Tensor, sigma: float) -> torch.Tensor:
    u = (residual / (TUKEY_C * sigma)).clamp(-1, 1)
    return (1 - u * u) ** 2


@dataclass
class _Params:
    """Similarity (a, b, t_x, t_y) in a level's pixels plus luma gain and offset (original ~ gain * edit + offset)."""

    a: float = 0.0
    b: float = 0.0
    tx: float = 0.0
    ty: float = 0.0
    gain: float = 1.0
    offset: float = 0.0


def _lucas_kanade(original: torch.Tensor, edited: torch.Tensor, p: _Params, iterations: int,
                  estimate_scale: bool) -> _Params:
    """Robust Gauss-Newton on one pyramid level, (H, W) normalised luma planes; updates and returns ``p``."""
    height, width = original.shape
    ys = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) centred coordinates
    go_x, go_y = _gradients(original)
    border = torch.zeros(height, width, dtype=torch.bool)
    border[2:-2, 2:-2] = True
    for _ in range(iterations):
        warped, inside = _warp_planes(edited[None], affine_theta((p.tx, p.ty), p.a, p.b, height, width), "bilinear")
        warped = warped[0]
        valid = (inside & border).float()
        residual = p.gain * warped + p.offset - original  # (H, W)
        sigma = _robust_sigma(residual, valid)
        weight = valid * _tukey(residual, sigma)
        gw_x, gw_y = _gradients(warped)
        # the normal equations from every other row and column on large levels: a quarter of the cost
        step_px = 2 if height * width > 65536 else 1
        sub = (slice(None, None, step_px), slice(None, None, step_px))
        gx = p.gain * (gw_x[sub] + go_x[sub]) / 2  # ESM gradient
        gy = p.gain * (gw_y[sub] + go_y[sub]) / 2
        columns = [gx, gy, warped[sub], torch.ones_like(gx)]  # d r / d (t_x, t_y, gain, offset)
        if estimate_scale:
            x, y = xx[sub], yy[sub]
            columns += [gx * x + gy * y, -gx * y + gy * x]  # d r / d (a, b)
        jac = torch.stack(columns).reshape(len(columns), -1)  # (K, pixels)
        weighted = jac * weight[sub].reshape(1, -1)
        hessian = weighted @ jac.T  # (K, K)
        rhs = weighted @ residual[sub].reshape(-1)  # (K,)
        try:
            step = torch.linalg.solve(hessian.double() + 1e-9 * torch.eye(len(columns), dtype=torch.float64),
                                      -rhs.double())
        except RuntimeError:
            break
        dtx, dty, dgain, doffset = (float(v) for v in step[:4])
        p.tx, p.ty, p.gain, p.offset = p.tx + dtx, p.ty + dty, p.gain + dgain, p.offset + doffset
        da = db = 0.0
        if estimate_scale:
            da, db = float(step[4]), float(step[5])
            p.a, p.b = p.a + da, p.b + db
        if not all(math.isfinite(v) for v in (p.tx, p.ty, p.a, p.b)):
            break
        if math.hypot(dtx, dty) + math.hypot(da, db) * max(height, width) / 2 < CONVERGED:
            break
    return p


def _score(original: torch.Tensor, warped: torch.Tensor, weight: torch.Tensor) -> float:
    """Weighted correlation of two planes (weights: Tukey inliers of the residual), in [-1, 1], times the
    fraction of the weight mass that stayed (so a fit that explains only a sliver of the image scores low)."""
    total = float(weight.sum())
    if total <= 0:
        return 0.0
    mo = (original * weight).sum() / total
    mw = (warped * weight).sum() / total
    do, dw = original - mo, warped - mw
    cov = (do * dw * weight).sum()
    var = ((do * do * weight).sum() * (dw * dw * weight).sum()).sqrt().clamp(min=1e-12)
    return float(cov / var) * total / float((weight > 0).numel())


def _robust_score(original: torch.Tensor, warped: torch.Tensor, valid: torch.Tensor) -> float:
    """:func:`_score` with Tukey weights on the residual of two normalised planes over ``valid``: the same
    measure before and after alignment."""
    weight = valid.float()
    residual = warped - original
    return _score(original, warped, weight * _tukey(residual, _robust_sigma(residual, weight)))


def estimate_alignment(original: torch.Tensor, edited: torch.Tensor,
                       settings: AlignSettings | None = None) -> Alignment:
    """Estimate the similarity that maps the original's pixel grid onto the edit (module docstring).

    Args:
        original, edited: (H, W, 3) images of one size, float in [0, 1].
        settings: search ranges and sizes (:class:`AlignSettings`).

    Raises:
        AlignmentError: the transform found correlates (``score >= min_score``) but leaves the allowed range
            (``max_shift``, ``max_scale_change``, ``max_rotation``).
    """
    settings = settings or AlignSettings()
    height, width = original.shape[:2]
    if min(height, width) < MIN_SIDE:
        return IDENTITY
    step = max(1, min(height, width) // 256)  # a grid of >= 256 x 256 pixels estimates the share, cheaply
    sample = (slice(None, None, step), slice(None, None, step))
    untouched = float((original[sample] == edited[sample]).all(dim=-1).float().mean())
    if untouched > UNTOUCHED:
        return Alignment((0.0, 0.0), 1.0, 0.0, score=1.0, score_before=1.0, identity=True,
                         note=f"{untouched:.0%} of the pixels are the original's own")
    luma_o, luma_e = gray(original).cpu(), gray(edited).cpu()
    if float(luma_o.std()) < MIN_CONTRAST:
        return Alignment((0.0, 0.0), 1.0, 0.0, score=1.0, score_before=1.0, identity=True,
                         note="the original is too flat to register")
    levels = sorted({_level_size(height, width, s) for s in (128, 256, settings.fine_size)
                     if s <= max(settings.fine_size, 128)}, reverse=True)  # finest first
    pyramid = [(_resize(luma_o, levels[0]), _resize(luma_e, levels[0]))]
    for size in levels[1:]:  # each level from the next finer one (cheaper than from the full image)
        pyramid.append((_resize(pyramid[-1][0], size), _resize(pyramid[-1][1], size)))
    coarse = _level_size(height, width, settings.coarse_size)
    # the smallest level at least as large as the coarse size (levels run finest first)
    source = next((pair for pair, size in zip(reversed(pyramid), reversed(levels)) if size[0] >= coarse[0]),
                  pyramid[0])
    tx, ty, _ = phase_correlation(_resize(source[0], coarse), _resize(source[1], coarse))
    # pixel units of the coarse level -> of the full image (per axis: sizes round independently)
    p = _Params(tx=tx * width / coarse[1], ty=ty * height / coarse[0])
    for (level_h, level_w), (plane_o, plane_e) in zip(reversed(levels), reversed(pyramid)):
        fy, fx = level_h / height, level_w / width
        o, e = _normalise(plane_o), _normalise(plane_e)
        level = _Params(p.a, p.b, p.tx * fx, p.ty * fy, p.gain, p.offset)
        level = _lucas_kanade(o, e, level, iterations=12, estimate_scale=settings.estimate_scale)
        p = _Params(level.a, level.b, level.tx / fx, level.ty / fy, level.gain, level.offset)
    o, e = _normalise(pyramid[0][0]), _normalise(pyramid[0][1])  # the finest level
    fy, fx = levels[0][0] / height, levels[0][1] / width
    theta = affine_theta((p.tx * fx, p.ty * fy), p.a, p.b, *levels[0])
    warped, inside = _warp_planes(e[None], theta, "bilinear")
    border = torch.zeros_like(inside)
    border[2:-2, 2:-2] = True
    score_before = _robust_score(o, e, border)
    finite = all(math.isfinite(v) for v in (p.tx, p.ty, p.a, p.b))
    score = _robust_score(o, warped[0], inside & border) if finite else -math.inf
    score = score if math.isfinite(score) else -math.inf  # a diverged fit: no transform
    if max(score, score_before) < settings.min_score:  # no registration to trust, in range or not
        return Alignment((0.0, 0.0), 1.0, 0.0, score=max(score, score_before), score_before=score_before,
                         identity=True, note=f"{UNVERIFIED}: no transform correlates {settings.min_score:g} or more")
    if score_before >= score:  # e.g. structure in one direction only (a ramp): the fit drifted along it
        return Alignment((0.0, 0.0), 1.0, 0.0, score=score_before, score_before=score_before, identity=True,
                         note="no transform matched better than none")
    scale = math.hypot(1 + p.a, p.b)
    rotation = math.degrees(math.atan2(p.b, 1 + p.a))
    _check_range(p, scale, rotation, height, width, settings)
    moved = _max_displacement((p.tx, p.ty), scale, rotation, height, width)
    return Alignment(shift=(p.tx, p.ty), scale=scale, rotation=rotation, score=score, score_before=score_before,
                     identity=moved < settings.identity_tolerance)


def _check_range(p: _Params, scale: float, rotation: float, height: int, width: int,
                 settings: AlignSettings) -> None:
    """Refuse a registration that correlates (``score >= min_score``) but moves the picture further than edit
    models do: another framing or a crop, with the reason and the fix."""
    fix = ("Check that 'edited' is an edit of 'original' (same photo, same framing), or turn alignment off "
           "for an edit that recomposes the whole picture.")
    limit = settings.max_shift * min(height, width)
    if max(abs(p.tx), abs(p.ty)) > limit:
        raise AlignmentError(f"RealEdit: 'edited' seems shifted by ({p.tx:+.1f}, {p.ty:+.1f}) px against "
                             f"'original', beyond the {limit:.0f} px allowed. {fix}")
    if abs(scale - 1) > settings.max_scale_change or abs(rotation) > settings.max_rotation:
        raise AlignmentError(f"RealEdit: 'edited' seems scaled by {scale:.3f} and rotated by {rotation:+.1f} deg "
                             f"against 'original', beyond the range edit models drift in. {fix}")


def _theta(alignment: Alignment, height: int, width: int) -> torch.Tensor:
    """``affine_theta`` of the alignment on an image of ``height`` x ``width`` pixels (its full size, or a
    reduced copy: the shift scales with each axis, the similarity about the centre does not change)."""
    a = alignment.scale * math.cos(math.radians(alignment.rotation)) - 1.0
    b = alignment.scale * math.sin(math.radians(alignment.rotation))
    return affine_theta(alignment.shift, a, b, height, width)


def warp_to_original(edited: torch.Tensor, alignment: Alignment, mode: str = "bilinear",
                     box: Box | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo ``alignment`` on an (H, W, C) edit: (the aligned edit on the original's grid, (H, W) bool mask of
    pixels that came from inside the edit). The identity returns ``edited`` itself and an all-true mask.

    Bilinear by default (a quarter of bicubic's cost at 1024 px; bicubic is clamped to [0, 1]); pixels whose
    source lies outside the edit take the nearest border value and are marked False in the mask. With
    ``box`` (rows, columns), only that part of the result, (h, w, C) and (h, w): bit for bit the same pixels
    as the box of the whole warp, at the box's cost.
    """
    height, width = edited.shape[:2]
    if alignment.identity:
        crop = edited if box is None else edited[box]
        return crop, torch.ones(crop.shape[:2], dtype=torch.bool, device=edited.device)
    planes = edited.permute(2, 0, 1).float()  # (C, H, W)
    warped, inside = _warp_planes(planes, _theta(alignment, height, width), mode, box)
    if mode == "bicubic":
        warped = warped.clamp(0, 1)
    return warped.permute(1, 2, 0).to(edited.dtype), inside


def warp_reduced(planes: torch.Tensor, alignment: Alignment,
                 full_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo ``alignment`` (found on images of ``full_size``) on a reduced copy of the edit, (1, C, h, w):
    the warped planes (bilinear) and the (h, w) bool mask of pixels whose centre samples inside the edit.
    Shifts scale with the size on each axis; the pixels are not those of the full warp reduced, but close
    (the two orders of resampling differ by interpolation only)."""
    height, width = planes.shape[-2:]
    fy, fx = height / full_size[0], width / full_size[1]
    scaled = replace(alignment, shift=(alignment.shift[0] * fx, alignment.shift[1] * fy))
    if scaled.identity:
        return planes, torch.ones(height, width, dtype=torch.bool, device=planes.device)
    warped, inside = _warp_planes(planes[0].float(), _theta(scaled, height, width), "bilinear")
    return warped[None], inside


class AlignedEdit:
    """The edit on the original's grid, warped only where it is read: the pipeline reads a box of it (the
    edge smoother and the composite), a reduced copy (the change map) and the validity of a few boxes; the
    whole warp (the node's "aligned" output) is computed once, on first use. Every read equals the same part
    of ``warp_to_original(edited, alignment)``.

    (Warping the whole edit on a second thread beside the pipeline was tried: 15% faster with torch on one
    thread, 10% slower with torch on every core, as ComfyUI runs it; not kept.)"""

    def __init__(self, edited: torch.Tensor, alignment: Alignment) -> None:
        self.edited = edited  # (H, W, 3), not warped
        self.alignment = alignment
        self._full: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def identity(self) -> bool:
        return self.alignment.identity

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the aligned edit (H, W, 3), the (H, W) bool mask of pixels with data), computed once."""
        if self._full is None:
            self._full = warp_to_original(self.edited, self.alignment)
        return self._full

    def crop(self, box: Box) -> torch.Tensor:
        """The aligned edit on ``box``, (h, w, 3): from the whole warp when it exists, else warped alone."""
        if self._full is not None or self.identity:
            return self.full()[0][box]
        return warp_to_original(self.edited, self.alignment, box=box)[0]

    def restrict(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask & valid`` for an (H, W) bool mask, the validity computed on the mask's bounding box only."""
        box = None if self.identity else bounding_box(mask, margin=0)
        if box is None:
            return mask
        height, width = self.edited.shape[:2]
        _, inside = _sampling_grid(_theta(self.alignment, height, width), height, width, mask.device, box)
        out = mask.clone()
        out[box] &= inside
        return out

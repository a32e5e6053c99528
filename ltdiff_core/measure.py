"""Physics measurements on CT images: edge MTF, edge overshoot, NPS, noise std.

Used by the phantom tests, by evaluation and by benchmarks, so they work on any HU image,
synthetic or real. Frequencies are in line pairs per cm (lp/cm); distances in mm.

MTF method: an edge spread function (ESF) is built by binning pixels by their signed distance
to an edge in 0.1-pixel bins (oversampling, as in the slanted-edge method), differentiated to a
line spread function (LSF) and Fourier transformed. Two edge geometries are supported:
``"disc"`` (circular edge of a round object: distance to the fitted centre minus its radius,
i.e. a radial ESF) and ``"line"`` (slanted straight edge: distance to a line fitted through the
per-row edge positions). The result is the presampled MTF: it includes the pixel aperture of
the image and is not corrected for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage


@dataclass
class EdgeMTF:
    """Result of an edge measurement."""

    distance_mm: np.ndarray  # ESF sample positions (negative = bright side)
    esf: np.ndarray
    lsf: np.ndarray
    freqs: np.ndarray  # lp/cm
    mtf: np.ndarray

    @property
    def mtf50(self) -> float:
        return mtf_at(self.freqs, self.mtf, 0.5)

    @property
    def mtf10(self) -> float:
        return mtf_at(self.freqs, self.mtf, 0.1)

    @property
    def peak(self) -> float:
        return float(np.max(self.mtf))

    @property
    def overshoot(self) -> float:
        return overshoot(self.distance_mm, self.esf)


def _disc_distance(image: np.ndarray, centre: tuple[float, float] | None) -> tuple[np.ndarray, float]:
    """Signed distance (px) to the circular edge of the largest object differing from the border."""
    lo, hi = np.percentile(image, [5, 95])
    border = np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]))
    inside = image > (lo + hi) / 2 if border < (lo + hi) / 2 else image < (lo + hi) / 2
    lab, n = ndimage.label(inside)
    if n == 0:
        raise ValueError("no edge object found")
    sizes = ndimage.sum(inside, lab, range(1, n + 1))
    obj = lab == (1 + int(np.argmax(sizes)))
    if centre is None:
        centre = ndimage.center_of_mass(obj)
    radius = np.sqrt(obj.sum() / np.pi)
    yy, xx = np.indices(image.shape)
    return np.hypot(yy - centre[0], xx - centre[1]) - radius, radius


def _line_distance(image: np.ndarray) -> np.ndarray:
    """Signed distance (px) to a straight edge fitted through per-row gradient centroids."""
    gy, gx = np.gradient(image.astype(np.float64))
    transpose = np.abs(gy).mean() > np.abs(gx).mean()
    img, g = (image.T, np.abs(gy.T)) if transpose else (image, np.abs(gx))
    cols = np.arange(img.shape[1])
    w = g.sum(axis=1)
    rows = np.nonzero(w > 0.2 * np.median(w[w > 0]))[0]
    pos = (g[rows] * cols).sum(axis=1) / w[rows]
    slope, offset = np.polyfit(rows, pos, 1)
    yy, xx = np.indices(img.shape)
    d = (xx - (slope * yy + offset)) / np.hypot(1.0, slope)
    left = img[d < -3].mean() if np.any(d < -3) else 0.0
    right = img[d > 3].mean() if np.any(d > 3) else 0.0
    d = d if left > right else -d  # bright side negative, like the disc
    return d.T if transpose else d


def edge_mtf(
    image: np.ndarray,
    pixel_mm: float,
    *,
    kind: Literal["disc", "line"] = "disc",
    centre: tuple[float, float] | None = None,
    half_width_mm: float = 15.0,
    bin_px: float = 0.1,
    mask: np.ndarray | None = None,
) -> EdgeMTF:
    """Measure the presampled MTF of a 2D image across a circular or straight edge.

    ``half_width_mm`` limits the ESF to that distance on each side of the edge (for a disc it
    is also capped at 90 % of the radius); ``mask`` optionally restricts the pixels used.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError("edge_mtf expects a 2D image")
    if kind == "disc":
        dist, radius = _disc_distance(img, centre)
        half_width_mm = min(half_width_mm, 0.9 * radius * pixel_mm)
    elif kind == "line":
        dist = _line_distance(img)
    else:
        raise ValueError(f"unknown edge kind {kind!r}")
    half_px = half_width_mm / pixel_mm
    sel = np.abs(dist) <= half_px
    if mask is not None:
        sel &= mask
    edges = np.arange(-half_px, half_px + bin_px, bin_px)
    idx = np.digitize(dist[sel], edges) - 1
    nb = len(edges) - 1
    ok = (idx >= 0) & (idx < nb)
    counts = np.bincount(idx[ok], minlength=nb)
    sums = np.bincount(idx[ok], weights=img[sel][ok], minlength=nb)
    centres = 0.5 * (edges[:-1] + edges[1:])
    filled = counts > 0
    if filled.sum() < 10:
        raise ValueError("too few pixels near the edge")
    esf = np.interp(centres, centres[filled], sums[filled] / counts[filled])
    lsf = np.gradient(esf, centres * pixel_mm)
    lsf = lsf * _tukey(len(lsf), 0.25)
    total = lsf.sum()
    if total == 0:
        raise ValueError("flat image: no edge contrast")
    lsf = lsf / total
    n_fft = max(8192, 1 << int(np.ceil(np.log2(len(lsf)))))
    mtf = np.abs(np.fft.rfft(lsf, n=n_fft))
    freqs = np.fft.rfftfreq(n_fft, d=bin_px * pixel_mm / 10.0)
    keep = freqs <= 0.5 * 10.0 / pixel_mm * np.sqrt(2.0)
    return EdgeMTF(centres * pixel_mm, esf, lsf, freqs[keep], mtf[keep])


def _tukey(n: int, alpha: float) -> np.ndarray:
    """Tukey window: flat centre, cosine tapers; damps noise at the ESF ends."""
    x = np.linspace(0.0, 1.0, n)
    w = np.ones(n)
    edge = alpha / 2
    lo, hi = x < edge, x > 1 - edge
    w[lo] = 0.5 * (1 + np.cos(np.pi * (x[lo] / edge - 1)))
    w[hi] = 0.5 * (1 + np.cos(np.pi * ((x[hi] - 1) / edge + 1)))
    return w


def mtf_at(freqs: np.ndarray, mtf: np.ndarray, level: float) -> float:
    """Frequency (lp/cm) of the first downward crossing of ``level`` (linear interpolation).

    A crossing needs a sample at or above ``level`` followed by one below it, so levels
    above 1 work on boosted (sharp-kernel) MTFs; NaN when there is none.
    """
    m = np.asarray(mtf)
    down = np.nonzero((m[:-1] >= level) & (m[1:] < level))[0]
    if len(down) == 0:
        return float("nan")
    i = int(down[0]) + 1
    f0, f1, m0, m1 = freqs[i - 1], freqs[i], m[i - 1], m[i]
    return float(f0 + (m0 - level) * (f1 - f0) / (m0 - m1))


def mtf50(freqs: np.ndarray, mtf: np.ndarray) -> float:
    return mtf_at(freqs, mtf, 0.5)


def mtf10(freqs: np.ndarray, mtf: np.ndarray) -> float:
    return mtf_at(freqs, mtf, 0.1)


def overshoot(distance_mm: np.ndarray, esf: np.ndarray, plateau_mm: float = 4.0) -> float:
    """Edge overshoot on the bright side as a fraction of the edge step.

    Plateaus are the median ESF further than ``plateau_mm`` from the edge on each side; the
    overshoot is how far the ESF maximum on the bright side rises above its plateau.
    """
    d = np.asarray(distance_mm)
    e = np.asarray(esf)
    a, b = np.median(e[d < -plateau_mm]), np.median(e[d > plateau_mm])
    bright_neg = a > b
    high, low = (a, b) if bright_neg else (b, a)
    side = d < 0 if bright_neg else d > 0
    return float(max(0.0, (e[side].max() - high) / (high - low)))


def _detrend(roi: np.ndarray, order: int) -> np.ndarray:
    """Remove the mean (order 0) or a fitted polynomial surface of order 1 or 2."""
    roi = roi.astype(np.float64)
    if order == 0:
        return roi - roi.mean()
    ny, nx = roi.shape
    y, x = np.mgrid[0:ny, 0:nx]
    y, x = y.ravel() / ny - 0.5, x.ravel() / nx - 0.5
    cols = [np.ones_like(x), x, y] + ([x * x, y * y, x * y] if order >= 2 else [])
    a = np.stack(cols, axis=1)
    coef, *_ = np.linalg.lstsq(a, roi.ravel(), rcond=None)
    return roi - (a @ coef).reshape(ny, nx)


def nps_2d(
    rois: Sequence[np.ndarray] | np.ndarray, pixel_mm: float, detrend: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2D noise power spectrum of equally sized ROIs in HU^2 mm^2.

    Returns ``(nps, fy, fx)`` with zero frequency centred (fftshift) and frequencies in lp/cm.
    ``detrend`` is the polynomial order removed per ROI (0 = mean, 1 = plane, 2 = quadratic),
    so slow background trends do not leak into the low frequencies.
    """
    stack = np.asarray(rois, dtype=np.float64)
    if stack.ndim == 2:
        stack = stack[None]
    _, ny, nx = stack.shape
    spec = np.zeros((ny, nx))
    for roi in stack:
        spec += np.abs(np.fft.fft2(_detrend(roi, detrend))) ** 2
    nps = spec / len(stack) * pixel_mm * pixel_mm / (nx * ny)
    fy = np.fft.fftshift(np.fft.fftfreq(ny, d=pixel_mm / 10.0))
    fx = np.fft.fftshift(np.fft.fftfreq(nx, d=pixel_mm / 10.0))
    return np.fft.fftshift(nps), fy, fx


def nps_radial(
    rois: Sequence[np.ndarray] | np.ndarray, pixel_mm: float, detrend: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged NPS ``(f, nps)`` up to Nyquist, one bin per frequency step, DC excluded."""
    nps, fy, fx = nps_2d(rois, pixel_mm, detrend)
    fr = np.hypot(fy[:, None], fx[None, :])
    step = max(fy[1] - fy[0], fx[1] - fx[0])
    idx = np.rint(fr / step).astype(int)
    n_bins = int(np.floor(min(abs(fy[0]), abs(fx[0])) / step)) + 1
    ok = idx < n_bins
    counts = np.bincount(idx[ok], minlength=n_bins)
    sums = np.bincount(idx[ok], weights=nps[ok], minlength=n_bins)
    f = np.arange(n_bins) * step
    return f[1:], (sums / np.maximum(counts, 1))[1:]


def nps_peak_frequency(f: np.ndarray, nps: np.ndarray, smooth_bins: int = 3) -> float:
    """Frequency (lp/cm) of the NPS maximum after a short moving average against bin noise."""
    k = np.ones(smooth_bins) / smooth_bins
    return float(f[int(np.argmax(np.convolve(nps, k, mode="same")))])


nps_peak = nps_peak_frequency


def noise_std(image: np.ndarray, mask: np.ndarray, detrend: bool = False) -> float:
    """Standard deviation of ``image`` inside ``mask``; ``detrend`` removes a fitted plane first."""
    img = np.asarray(image, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if m.sum() < 2:
        raise ValueError("mask holds fewer than two pixels")
    vals = img[m]
    if detrend:
        idx = np.nonzero(m)
        coords = np.stack([np.ones(len(vals))] + [c.astype(np.float64) for c in idx], axis=1)
        coef, *_ = np.linalg.lstsq(coords, vals, rcond=None)
        vals = vals - coords @ coef
    return float(np.std(vals, ddof=1))

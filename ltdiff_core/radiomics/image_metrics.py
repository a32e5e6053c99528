"""Image-level agreement of a candidate with the standard image (all in HU, on the paired grid).

Conventions (also in ``docs/evaluation.md``):

* RMSE over all voxels; PSNR = 20 log10(``DATA_RANGE_HU`` / RMSE) with a fixed 2000 HU range
  (the CT window [-1000, 1000]) so values are comparable between cases and sites.
* SSIM per axial slice with an 11-tap-equivalent Gaussian window (sigma 1.5 px), K1 0.01,
  K2 0.03, both images clipped to [-1000, 1000] HU and the same 2000 HU data range; mean over slices.
* Uniform regions: square patches whose mean lies in soft tissue [-200, 300] HU in the
  *standard* image and whose structure score (plane-detrended std of the standard low-passed
  with a 2 mm Gaussian) is at most 10 HU: flat at the 2 mm scale, whatever the noise level. Noise std and NPS use the same patches for every
  method; the NPS peak is in lp/cm.
* Edge MTF50: circular-edge method of ``ltdiff_core.measure.edge_mtf`` on each tumour's
  largest slice, when the tumour/background contrast in the standard is >= 100 HU. Without
  a usable edge the metric is reported as skipped with the reason.
* Structure check: each tumour's mean HU must be within 10 HU of the standard's; outside
  the tumours (dilated by 3 px) the difference map is low-passed (Gaussian, sigma 2 mm) and
  its mean, std and 99th percentile of |low-pass difference| are reported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ltdiff_core import measure

DATA_RANGE_HU = 2000.0
SSIM_SIGMA_PX = 1.5
SOFT_TISSUE_HU = (-200.0, 300.0)
TUMOUR_TOL_HU = 10.0
EDGE_MIN_CONTRAST_HU = 100.0
LOWPASS_SIGMA_MM = 2.0
STRUCTURE_SIGMA_MM = 2.0
STRUCTURE_MAX_HU = 10.0


def check_same_grid(standard: np.ndarray, candidate: np.ndarray) -> None:
    """Refuse images that are not on one grid (a mismatched pair)."""
    if np.shape(standard) != np.shape(candidate):
        raise ValueError(f"standard and candidate images differ in shape: {np.shape(standard)} vs "
                         f"{np.shape(candidate)}; the pair is mismatched")


def rmse(standard: np.ndarray, candidate: np.ndarray) -> float:
    check_same_grid(standard, candidate)
    d = np.asarray(candidate, np.float64) - np.asarray(standard, np.float64)
    return float(np.sqrt(np.mean(d * d)))


def psnr(standard: np.ndarray, candidate: np.ndarray, data_range: float = DATA_RANGE_HU) -> float:
    e = rmse(standard, candidate)
    return float("inf") if e == 0 else float(20.0 * np.log10(data_range / e))


def ssim(standard: np.ndarray, candidate: np.ndarray, data_range: float = DATA_RANGE_HU) -> float:
    """Mean SSIM over axial slices (Wang et al. 2004, Gaussian window)."""
    check_same_grid(standard, candidate)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    std3 = standard if np.ndim(standard) == 3 else np.asarray(standard)[None]
    cand3 = candidate if np.ndim(candidate) == 3 else np.asarray(candidate)[None]
    for s, c in zip(std3, cand3):
        x = np.clip(s.astype(np.float64), -1000, 1000)
        y = np.clip(c.astype(np.float64), -1000, 1000)
        f = lambda a: ndimage.gaussian_filter(a, SSIM_SIGMA_PX, truncate=3.5)  # noqa: E731
        mx, my = f(x), f(y)
        sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        vals.append(m.mean())
    return float(np.mean(vals))


@dataclass
class UniformPatches:
    """Positions ``(z, y, x)`` of the top-left corner of square uniform patches."""

    size: int
    corners: list[tuple[int, int, int]]

    def cut(self, image: np.ndarray) -> np.ndarray:
        s = self.size
        return np.stack([image[z, y:y + s, x:x + s] for z, y, x in self.corners]).astype(np.float64)


def find_uniform_patches(standard: np.ndarray, pixel_mm: float, size: int = 32) -> UniformPatches:
    """Least-structured soft-tissue patches of the standard image (see module docstring).

    Structure is scored on the standard low-passed with a ``STRUCTURE_SIGMA_MM`` Gaussian: that
    removes most of the (high-frequency) noise, which would otherwise hide anatomy in the score.
    """
    zn, yn, xn = standard.shape
    size = min(size, yn // 2, xn // 2)
    sigma = STRUCTURE_SIGMA_MM / pixel_mm
    full = np.ones((size, size), bool)
    cand: list[tuple[int, int, int]] = []
    scores: list[float] = []
    for z in range(zn):
        smooth = ndimage.gaussian_filter(standard[z].astype(np.float64), sigma)
        for y in range(0, yn - size + 1, size):
            for x in range(0, xn - size + 1, size):
                if SOFT_TISSUE_HU[0] <= standard[z, y:y + size, x:x + size].mean() <= SOFT_TISSUE_HU[1]:
                    cand.append((z, y, x))
                    scores.append(measure.noise_std(smooth[y:y + size, x:x + size], full, detrend=True))
    return UniformPatches(size, [c for c, s in zip(cand, scores) if s <= STRUCTURE_MAX_HU])


def noise_and_nps(image: np.ndarray, patches: UniformPatches, pixel_mm: float) -> dict[str, Any]:
    """Noise std (mean of plane-detrended patch stds) and NPS peak frequency in uniform patches."""
    if not patches.corners:
        return {"skipped": "no uniform soft-tissue region found in the standard image"}
    stack = patches.cut(image)
    full = np.ones(stack.shape[1:], bool)
    noise = float(np.mean([measure.noise_std(p, full, detrend=True) for p in stack]))
    f, nps = measure.nps_radial(stack, pixel_mm)
    return {"noise_std_hu": noise, "nps_peak_lpcm": measure.nps_peak_frequency(f, nps),
            "n_patches": len(patches.corners), "patch_px": patches.size}


def tumour_edge_mtf50(image: np.ndarray, tumour: np.ndarray, pixel_mm: float,
                      reference: np.ndarray) -> tuple[float | None, str | None]:
    """MTF50 (lp/cm) across the edge of a tumour on its largest slice, or (None, reason)."""
    areas = tumour.sum(axis=(1, 2))
    z = int(np.argmax(areas))
    if areas[z] < 20:
        return None, "tumour too small for an edge measurement"
    r = np.sqrt(areas[z] / np.pi)
    cy, cx = ndimage.center_of_mass(tumour[z])
    h = int(np.ceil(2.5 * r))
    y0, x0 = int(round(cy)) - h, int(round(cx)) - h
    if y0 < 0 or x0 < 0 or y0 + 2 * h + 1 > image.shape[1] or x0 + 2 * h + 1 > image.shape[2]:
        return None, "tumour too close to the image border"
    win = (z, slice(y0, y0 + 2 * h + 1), slice(x0, x0 + 2 * h + 1))
    m = tumour[win]
    ring = ndimage.binary_dilation(m, iterations=max(2, int(r // 2))) & ~ndimage.binary_dilation(m, iterations=2)
    contrast = abs(float(reference[win][m].mean() - reference[win][ring].mean()))
    if contrast < EDGE_MIN_CONTRAST_HU:
        return None, f"tumour/background contrast {contrast:.0f} HU < {EDGE_MIN_CONTRAST_HU:.0f} HU"
    try:
        res = measure.edge_mtf(image[win], pixel_mm, kind="disc", centre=(cy - y0, cx - x0))
    except ValueError as e:
        return None, f"edge measurement failed: {e}"
    v = res.mtf50
    return (None, "MTF never falls below 0.5") if not np.isfinite(v) else (float(v), None)


def structure_check(standard: np.ndarray, candidate: np.ndarray, tumours: list[np.ndarray],
                    spacing: tuple[float, float, float]) -> dict[str, Any]:
    """Tumour mean-HU agreement and low-pass difference statistics outside tumours."""
    check_same_grid(standard, candidate)
    diffs = []
    for t in tumours:
        if t.any():
            diffs.append(float(candidate[t].mean() - standard[t].mean()))
    outside = np.ones(standard.shape, bool)
    for t in tumours:
        outside &= ~ndimage.binary_dilation(t, structure=np.ones((1, 3, 3), bool), iterations=3)
    d = candidate.astype(np.float64) - standard.astype(np.float64)
    sig = (0.0, LOWPASS_SIGMA_MM / spacing[1], LOWPASS_SIGMA_MM / spacing[2])
    low = ndimage.gaussian_filter(d, sig)
    return {
        "tumour_mean_diff_hu": diffs,
        "tumours_within_tol": int(sum(abs(x) <= TUMOUR_TOL_HU for x in diffs)),
        "n_tumours": len(diffs),
        "tol_hu": TUMOUR_TOL_HU,
        "outside_diff_mean_hu": float(d[outside].mean()),
        "outside_diff_std_hu": float(d[outside].std()),
        "outside_lowpass_abs_p99_hu": float(np.percentile(np.abs(low[outside]), 99)),
    }


def image_metrics(standard: np.ndarray, candidate: np.ndarray, spacing: tuple[float, float, float],
                  tumours: list[np.ndarray], patches: UniformPatches) -> dict[str, Any]:
    """All image metrics of one candidate volume against the standard volume."""
    check_same_grid(standard, candidate)
    out: dict[str, Any] = {"rmse_hu": rmse(standard, candidate), "psnr_db": psnr(standard, candidate),
                           "ssim": ssim(standard, candidate)}
    out["noise"] = noise_and_nps(candidate, patches, spacing[1])
    edges, reasons = [], []
    for i, t in enumerate(tumours):
        v, why = tumour_edge_mtf50(candidate, t, spacing[1], standard)
        if v is None:
            reasons.append(f"tumour {i}: {why}")
        else:
            edges.append(v)
    if not tumours:
        reasons.append("no tumour masks (SEG) in this case: no edge to measure")
    out["mtf50_lpcm"] = edges
    out["mtf50_skipped"] = reasons
    out["structure"] = structure_check(standard, candidate, tumours, spacing)
    return out

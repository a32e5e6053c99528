"""Gradient-oriented histogram (GOH) features, which PyRadiomics does not provide.

For every in-plane pixel of the ROI the gradient (central differences in physical units,
computed on the full image so ROI-border pixels see their real neighbours) gives a magnitude
``m`` and an orientation ``theta`` folded to ``[0, pi)`` (an edge and its polarity-reversed
copy point the same way). The histogram has ``N_BINS`` bins; bin ``k`` is centred on
``k * pi / N_BINS`` so an exactly horizontal or vertical gradient falls in the middle of a bin,
and each pixel votes with its magnitude. 3-D ROIs pool the in-plane gradients of all their
slices (CT slices are usually much thicker than the pixel size).
"""
from __future__ import annotations

import numpy as np

N_BINS = 8
FEATURES = (
    "Entropy",
    "Uniformity",
    "DominantShare",
    "CircularVariance",
    "MeanMagnitude",
    "MagnitudeStd",
)


def inplane_gradients(image: np.ndarray, pixel_mm: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Gradient (gy, gx) in HU/mm of a 2-D slice or of every slice of a ``(Z, Y, X)`` volume."""
    img = np.asarray(image, dtype=np.float64)
    dy, dx = pixel_mm
    gy = np.gradient(img, dy, axis=-2)
    gx = np.gradient(img, dx, axis=-1)
    return gy, gx


def orientation_histogram(gy: np.ndarray, gx: np.ndarray, mask: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Magnitude-weighted, normalised histogram of gradient orientations in ``[0, pi)``."""
    m = np.hypot(gy[mask], gx[mask])
    theta = np.mod(np.arctan2(gy[mask], gx[mask]), np.pi)
    width = np.pi / n_bins
    idx = np.floor((theta + width / 2) / width).astype(np.int64) % n_bins
    hist = np.bincount(idx, weights=m, minlength=n_bins).astype(np.float64)
    total = hist.sum()
    return hist / total if total > 0 else np.full(n_bins, 1.0 / n_bins)


def goh_features(image: np.ndarray, mask: np.ndarray, pixel_mm: tuple[float, float],
                 n_bins: int = N_BINS) -> dict[str, float]:
    """GOH statistics of the ROI ``mask`` in ``image`` (2-D or ``(Z, Y, X)``, same shape)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != np.shape(image):
        raise ValueError(f"mask shape {mask.shape} differs from image shape {np.shape(image)}")
    if not mask.any():
        raise ValueError("empty ROI mask")
    gy, gx = inplane_gradients(image, pixel_mm)
    p = orientation_histogram(gy, gx, mask, n_bins)
    m = np.hypot(gy[mask], gx[mask])
    theta = np.arctan2(gy[mask], gx[mask])
    # Axial data on [0, pi): doubling the angle makes opposite directions coincide.
    total = m.sum()
    resultant = np.abs(np.sum(m * np.exp(2j * theta))) / total if total > 0 else 0.0
    nz = p[p > 0]
    return {
        "Entropy": float(-np.sum(nz * np.log2(nz))),
        "Uniformity": float(np.sum(p ** 2)),
        "DominantShare": float(p.max()),
        "CircularVariance": float(1.0 - resultant),
        "MeanMagnitude": float(m.mean()),
        "MagnitudeStd": float(m.std()),
    }

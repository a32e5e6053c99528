"""Per-slice descriptors of the input's noise, the denoiser's series-level condition.

Why: the target's noise level relative to the linear first guess varies from case to case, and
on paired data most of that variation follows how the *input* was reconstructed (its IR
strength), which reshapes the input's noise power spectrum (``python -m ltdiff_train.target_noise``
measures both). A latent denoiser conditioned only on the latents mostly ignored it; these three
numbers give it the input's noise level and spectral shape explicitly, through the time embedding.

Measured in flat soft tissue of one slice (so a slice's result never depends on which other
slices are processed with it, as streaming needs). A slice without enough flat tissue gets the
training mean (0 after standardisation). Everything is in pixels of the model grid (the
Standardizer resamples to the training pixel spacing first) and in HU, so nothing here depends
on one simulator.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

#: Names of the descriptors, in channel order (stored in checkpoints).
NAMES: tuple[str, ...] = ("log_noise_hu", "band_hi_mid", "band_mid_lo")
FLAT_HU = (-200.0, 200.0)
FLAT_ACTIVITY_HU = 30.0
MIN_FLAT_PIXELS = 200
CLIP = 4.0  # standardised descriptors are clipped to +-CLIP: never extrapolate far outside training


def high_pass(x: np.ndarray, sigma_px: float = 3.0) -> np.ndarray:
    """The image minus its Gaussian blur: noise and fine texture."""
    return x - gaussian_filter(x, sigma_px)


def flat_mask(hu: np.ndarray) -> np.ndarray:
    """Soft tissue with no edge within a few pixels: where the image's variation is noise."""
    hu = hu.astype(np.float64, copy=False)
    activity = gaussian_filter(np.abs(high_pass(hu)), 3.0)
    flat = (activity < FLAT_ACTIVITY_HU) & (hu > FLAT_HU[0]) & (hu < FLAT_HU[1])
    return gaussian_filter(flat.astype(np.float64), 3.0) > 0.99


def describe_slice(hu: np.ndarray) -> np.ndarray:
    """``NAMES`` for one ``(Y, X)`` HU slice; NaN where the slice has too little flat tissue."""
    hu = np.asarray(hu, dtype=np.float64)
    m = flat_mask(hu)
    if int(m.sum()) < MIN_FLAT_PIXELS:
        return np.full(len(NAMES), np.nan)
    s07, s15, s3 = (gaussian_filter(hu, s) for s in (0.7, 1.5, 3.0))
    hi, mid, lo = (float(np.mean(d[m] ** 2)) for d in (hu - s07, s07 - s15, s15 - s3))
    noise = float(np.sqrt(np.mean((hu - s3)[m] ** 2)))
    eps = 1e-6
    return np.array([np.log(max(noise, eps)), np.log((hi + eps) / (mid + eps)), np.log((mid + eps) / (lo + eps))])


def describe(hu_slices: np.ndarray) -> np.ndarray:
    """``(N, len(NAMES))`` raw descriptors of ``(N, Y, X)`` HU slices."""
    return np.stack([describe_slice(s) for s in np.asarray(hu_slices)])


def standardise(raw: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Training-standardised descriptors; NaN (no flat tissue) becomes the training mean."""
    z = (np.asarray(raw, dtype=np.float64) - shift) / np.maximum(scale, 1e-6)
    return np.clip(np.nan_to_num(z, nan=0.0), -CLIP, CLIP).astype(np.float32)


def statistics(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over training slices, ignoring slices without flat tissue."""
    raw = np.asarray(raw, dtype=np.float64)
    ok = np.all(np.isfinite(raw), axis=1)
    if ok.sum() < 2:
        raise ValueError("fewer than two training slices have enough flat soft tissue for the noise condition")
    return raw[ok].mean(0).astype(np.float32), raw[ok].std(0).clip(1e-3).astype(np.float32)

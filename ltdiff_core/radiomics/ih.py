"""Intensity-histogram (IH) features on fixed-bin-width discretised intensities (IBSI family).

PyRadiomics computes only entropy and uniformity on the discretised image; the reference
papers' IH class (as in IBSI) describes the whole discretised histogram. Bins have the same
width as PyRadiomics' ``binWidth`` but an absolute origin (bin ``k`` holds
``[k * w, (k + 1) * w)`` HU), so histogram statistics stay comparable between ROIs whose
minimum differs. Values are bin indices (unit: bins).
"""
from __future__ import annotations

import numpy as np

FEATURES = (
    "Mean", "Variance", "Skewness", "Kurtosis", "Median", "Minimum", "10Percentile",
    "90Percentile", "Maximum", "Mode", "InterquartileRange", "Range", "MeanAbsoluteDeviation",
    "RobustMeanAbsoluteDeviation", "MedianAbsoluteDeviation", "CoefficientOfVariation",
    "QuartileCoefficientOfDispersion", "Entropy", "Uniformity", "MaxHistogramGradient",
    "MaxHistogramGradientIntensity", "MinHistogramGradient", "MinHistogramGradientIntensity",
)


def discretise(values: np.ndarray, bin_width: float) -> np.ndarray:
    """Absolute fixed-width bin index of each value."""
    return np.floor(np.asarray(values, dtype=np.float64) / bin_width).astype(np.int64)


def ih_features(values: np.ndarray, bin_width: float) -> dict[str, float]:
    """IH statistics of the ROI voxel values (1-D array of HU)."""
    x = discretise(values, bin_width).astype(np.float64)
    if x.size == 0:
        raise ValueError("empty ROI")
    mu = x.mean()
    sd = x.std()
    p10, p25, med, p75, p90 = np.percentile(x, [10, 25, 50, 75, 90])
    levels, counts = np.unique(x, return_counts=True)
    p = counts / counts.sum()
    robust = x[(x >= p10) & (x <= p90)]
    if levels.size > 1:
        grad = np.gradient(counts.astype(np.float64))
    else:
        grad = np.zeros(1)
    skew = float(np.mean((x - mu) ** 3) / sd ** 3) if sd > 0 else 0.0
    kurt = float(np.mean((x - mu) ** 4) / sd ** 4 - 3.0) if sd > 0 else 0.0
    return {
        "Mean": float(mu),
        "Variance": float(sd ** 2),
        "Skewness": skew,
        "Kurtosis": kurt,
        "Median": float(med),
        "Minimum": float(x.min()),
        "10Percentile": float(p10),
        "90Percentile": float(p90),
        "Maximum": float(x.max()),
        "Mode": float(levels[np.argmax(counts)]),
        "InterquartileRange": float(p75 - p25),
        "Range": float(x.max() - x.min()),
        "MeanAbsoluteDeviation": float(np.mean(np.abs(x - mu))),
        "RobustMeanAbsoluteDeviation": float(np.mean(np.abs(robust - robust.mean()))),
        "MedianAbsoluteDeviation": float(np.mean(np.abs(x - med))),
        "CoefficientOfVariation": float(sd / mu) if mu != 0 else float("nan"),
        "QuartileCoefficientOfDispersion": float((p75 - p25) / (p75 + p25)) if (p75 + p25) != 0 else float("nan"),
        "Entropy": float(-np.sum(p * np.log2(p))),
        "Uniformity": float(np.sum(p ** 2)),
        "MaxHistogramGradient": float(grad.max()),
        "MaxHistogramGradientIntensity": float(levels[np.argmax(grad)]),
        "MinHistogramGradient": float(grad.min()),
        "MinHistogramGradientIntensity": float(levels[np.argmin(grad)]),
    }

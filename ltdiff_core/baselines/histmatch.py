"""Histogram matching baseline: map a source image's HU quantiles onto a reference histogram.

The reference histogram must come from *other* images than the standard of the case being
processed (in the evaluation: the pooled standard-kernel histograms of all other cases), or the
baseline would see the answer. Histograms use 1 HU bins over ``HU_RANGE``; the mapping is
monotone quantile mapping ``x -> F_ref^-1(F_src(x))`` with mid-rank CDFs, linear in between.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

HU_RANGE = (-2048, 4096)
_EDGES = np.arange(HU_RANGE[0], HU_RANGE[1] + 1, 1.0)


def hu_histogram(volume: np.ndarray) -> np.ndarray:
    """Counts of one volume in 1 HU bins over ``HU_RANGE`` (values outside are clipped in)."""
    v = np.clip(np.asarray(volume, np.float64).ravel(), HU_RANGE[0], HU_RANGE[1] - 1e-6)
    return np.histogram(v, bins=_EDGES)[0].astype(np.float64)


class HistogramMatcher:
    """Quantile mapping onto a fixed reference histogram."""

    def __init__(self, reference_counts: np.ndarray):
        ref = np.asarray(reference_counts, np.float64)
        if ref.shape != (len(_EDGES) - 1,) or ref.sum() <= 0:
            raise ValueError("reference histogram must be non-empty 1 HU counts over HU_RANGE")
        self.reference = ref
        self._ref_cdf, self._ref_x = _cdf_points(ref)

    @classmethod
    def from_volumes(cls, volumes: Iterable[np.ndarray]) -> "HistogramMatcher":
        """Reference = pooled histogram of the given volumes (each voxel weighs the same)."""
        total = None
        for v in volumes:
            h = hu_histogram(v)
            total = h if total is None else total + h
        if total is None:
            raise ValueError("histogram matching needs at least one reference volume "
                             "(other cases' standard images); none given")
        return cls(total)

    def apply(self, volume: np.ndarray) -> np.ndarray:
        """The volume with its own HU distribution mapped onto the reference distribution."""
        src = np.asarray(volume, np.float32)
        cdf, xs = _cdf_points(hu_histogram(src))
        q = np.interp(src.ravel(), xs, cdf)
        out = np.interp(q, self._ref_cdf, self._ref_x)
        return out.reshape(src.shape).astype(np.float32)


def _cdf_points(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mid-rank CDF values at the centres of the occupied bins (strictly increasing)."""
    occ = np.flatnonzero(counts > 0)
    c = counts[occ]
    cdf = (np.cumsum(c) - 0.5 * c) / c.sum()
    centres = _EDGES[occ] + 0.5
    return cdf, centres

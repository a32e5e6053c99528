"""Agreement metrics between a standard and a candidate feature table: Lin's CCC and RE.

Definitions (also in ``docs/evaluation.md``):

* CCC (Lin 1989) per feature across ROIs, population moments:
  ``2 cov(s, c) / (var(s) + var(c) + (mean(s) - mean(c))**2)``.
* A feature whose values are constant in both tables (zero variance in both) has no defined
  agreement across ROIs; it is excluded and counted as ``n_constant``.
* Group-wise CCC of a class: every feature of the class is z-scored with the *standard's*
  mean and std over ROIs (so both tables share one affine map), then all (ROI, feature) values
  of the class are pooled into one vector per table and a single CCC is computed.
* RE per ROI is ``|f_std - f_cand| / |f_std|``; the RE of a feature is the mean over ROIs.
  A feature is reproducible if its RE < 0.15.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RE_THRESHOLD = 0.15
MIN_ROIS = 3


def _check_pair(std: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Refuse to compare arrays that do not describe the same ROIs (mismatched pairs)."""
    s = np.asarray(std, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    if s.shape != c.shape:
        raise ValueError(
            f"standard and candidate must have the same shape (same ROIs and features), "
            f"got {s.shape} vs {c.shape}: the pair is mismatched"
        )
    return s, c


def ccc(std: np.ndarray, cand: np.ndarray) -> float:
    """Lin's concordance correlation coefficient of two equally long 1-D samples.

    Returns NaN when both samples are constant (0/0: agreement undefined).
    """
    s, c = _check_pair(std, cand)
    s, c = s.ravel(), c.ravel()
    if s.size < 2:
        raise ValueError(f"CCC needs at least 2 paired values, got {s.size}")
    ms, mc = s.mean(), c.mean()
    vs, vc = s.var(), c.var()
    cov = np.mean((s - ms) * (c - mc))
    den = vs + vc + (ms - mc) ** 2
    if den == 0.0:
        return float("nan")
    return float(2.0 * cov / den)


def relative_error(std: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Per-value RE ``|s - c| / |s|``; 0 where both are 0, inf where only ``s`` is 0."""
    s, c = _check_pair(std, cand)
    diff = np.abs(s - c)
    with np.errstate(divide="ignore", invalid="ignore"):
        re = diff / np.abs(s)
    re = np.where((s == 0) & (diff == 0), 0.0, re)
    return re


@dataclass
class FeatureAgreement:
    """Per-feature agreement of one candidate table with the standard table."""

    names: list[str]
    ccc: np.ndarray        # NaN where excluded
    re: np.ndarray         # mean RE over ROIs, NaN where excluded
    constant: np.ndarray   # bool: zero variance in both tables
    undefined: np.ndarray  # bool: fewer than MIN_ROIS finite paired values


def feature_agreement(names: list[str], std: np.ndarray, cand: np.ndarray) -> FeatureAgreement:
    """CCC and RE for every feature column of ``(n_rois, n_features)`` tables.

    Non-finite values (a PyRadiomics feature can be NaN on a tiny ROI) drop that ROI for that
    feature only; features left with fewer than ``MIN_ROIS`` ROIs are marked undefined.
    """
    s, c = _check_pair(std, cand)
    if s.ndim != 2 or s.shape[1] != len(names):
        raise ValueError(f"tables must be (n_rois, {len(names)}), got {s.shape}")
    n = len(names)
    out_ccc = np.full(n, np.nan)
    out_re = np.full(n, np.nan)
    constant = np.zeros(n, bool)
    undefined = np.zeros(n, bool)
    for j in range(n):
        ok = np.isfinite(s[:, j]) & np.isfinite(c[:, j])
        if ok.sum() < MIN_ROIS:
            undefined[j] = True
            continue
        sj, cj = s[ok, j], c[ok, j]
        if np.ptp(sj) == 0 and np.ptp(cj) == 0:
            constant[j] = True
            continue
        out_ccc[j] = ccc(sj, cj)
        out_re[j] = float(np.mean(relative_error(sj, cj)))
    return FeatureAgreement(list(names), out_ccc, out_re, constant, undefined)


def groupwise_ccc(std: np.ndarray, cand: np.ndarray) -> float:
    """CCC of one class: features z-scored by the standard's mean/std, then pooled.

    Features whose standard std is 0 or that contain non-finite values are left out; NaN if
    nothing is left.
    """
    s, c = _check_pair(std, cand)
    if s.ndim != 2:
        raise ValueError(f"group-wise CCC needs (n_rois, n_features) tables, got {s.shape}")
    keep = np.all(np.isfinite(s), axis=0) & np.all(np.isfinite(c), axis=0)
    sd = s.std(axis=0)
    keep &= sd > 0
    if not keep.any() or s.shape[0] < 2:
        return float("nan")
    mu = s[:, keep].mean(axis=0)
    zs = (s[:, keep] - mu) / sd[keep]
    zc = (c[:, keep] - mu) / sd[keep]
    return ccc(zs.ravel(), zc.ravel())


def summarize(values: np.ndarray) -> dict[str, float | int]:
    """Mean ± population std and n of the finite values (the paper-style cell)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def re_curve(re: np.ndarray, xs: np.ndarray | None = None) -> dict[str, list[float]]:
    """Number of features with RE <= x for x in [0, 1] (features with NaN RE are ignored)."""
    if xs is None:
        xs = np.linspace(0.0, 1.0, 101)
    r = np.asarray(re, dtype=np.float64)
    r = r[~np.isnan(r)]
    counts = [int(np.count_nonzero(r <= x)) for x in xs]
    return {"x": [float(x) for x in xs], "count": counts}


def reproducible_share(re: np.ndarray, threshold: float = RE_THRESHOLD) -> dict[str, float | int]:
    """Share (and count) of features with RE < threshold among features with a defined RE."""
    r = np.asarray(re, dtype=np.float64)
    r = r[~np.isnan(r)]
    n_rep = int(np.count_nonzero(r < threshold))
    share = float(n_rep / r.size) if r.size else float("nan")
    return {"share": share, "n_reproducible": n_rep, "n": int(r.size), "threshold": threshold}

"""Hierarchical bootstrap confidence intervals and paired method comparisons.

Why: a difference of 0.02 in a class's mean CCC on a few cases can be noise. Every interval here
comes from one set of resamples shared by all methods, so differences are *paired*: the same
drawn cases and ROIs (and the same drawn sampler seeds) enter every method's statistic.

Resampling (one replicate): draw as many cases as there are (cases with at least one ROI in the
set) with replacement; for every drawn case draw as many of *its* ROIs as it has, with
replacement. A replicate is stored as integer ROI weights ``W[b, i]`` (how often ROI ``i`` was
drawn): the weighted moments are exactly those of the resampled table, so Lin's CCC of every
feature of every replicate is a handful of matrix products. Sampler seeds are a crossed level:
each replicate also draws ``S`` of the ``S`` seed indices with replacement (one draw shared by
every method) and a method's statistic is the mean over the drawn seeds of its per-seed statistic.

Statistics per method: each class's mean CCC over its features (features excluded as in
:func:`~ltdiff_core.radiomics.metrics.feature_agreement`: fewer than ``MIN_ROIS`` finite ROIs, or
constant in both tables) and the share of features with mean RE < 0.15, overall and per class.
Intervals are percentile intervals (2.5 %, 97.5 %). Verdict of a paired difference
``method - reference``: ``better`` when the interval lies above 0, ``worse`` when below, ``tied``
when it contains 0; ``undefined`` when fewer than 95 % of the replicates give a finite difference.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .classes import ALL_CLASSES, class_index
from .metrics import MIN_ROIS, RE_THRESHOLD

ALPHA = 0.05
MIN_FINITE_SHARE = 0.95
# Variance (in units of the feature's full-sample scale squared) below which a resampled feature
# counts as constant: rounding of the moment sums, never a real spread.
_CONST_TOL = 1e-12


def hierarchical_weights(case_of_roi: Sequence[int], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n_rois)`` draw counts: cases with replacement, then each drawn case's ROIs.

    Drawing ``k`` copies of a case and ``n_c`` ROIs per copy is one multinomial draw of
    ``k * n_c`` ROIs from that case, so the loop runs over cases, not over replicates.
    """
    case_of_roi = np.asarray(case_of_roi)
    cases, inverse = np.unique(case_of_roi, return_inverse=True)
    n_cases = len(cases)
    weights = np.zeros((n_boot, len(case_of_roi)), dtype=np.int64)
    if n_cases == 0 or n_boot == 0:
        return weights
    drawn = rng.integers(0, n_cases, size=(n_boot, n_cases))
    copies = np.stack([np.count_nonzero(drawn == c, axis=1) for c in range(n_cases)], axis=1)
    for c in range(n_cases):
        members = np.flatnonzero(inverse == c)
        n_c = len(members)
        weights[:, members] = rng.multinomial(copies[:, c] * n_c, np.full(n_c, 1.0 / n_c))
    return weights


def seed_weights(n_seeds: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n_seeds)``: share of each seed index among ``n_seeds`` draws with replacement."""
    drawn = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    counts = np.stack([np.count_nonzero(drawn == s, axis=1) for s in range(n_seeds)], axis=1)
    return counts / float(n_seeds)


@dataclass
class ReplicateStats:
    """Statistics of one candidate table under each weight row: arrays over replicates."""

    class_ccc: np.ndarray   # (B, n_classes) mean CCC of the class's defined features (NaN if none)
    re_share: np.ndarray    # (B,) share of defined features with RE < threshold
    class_re: np.ndarray    # (B, n_classes) the same share within each class


def replicate_stats(names: list[str], std: np.ndarray, cand: np.ndarray, weights: np.ndarray,
                    threshold: float = RE_THRESHOLD) -> ReplicateStats:
    """Per-replicate class mean CCC and RE<threshold shares (vectorised over features and replicates)."""
    s = np.asarray(std, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    if s.shape != c.shape or s.ndim != 2 or s.shape[1] != len(names):
        raise ValueError(f"tables must both be (n_rois, {len(names)}), got {s.shape} and {c.shape}")
    w = np.asarray(weights, dtype=np.float64)
    ok = np.isfinite(s) & np.isfinite(c)
    okf = ok.astype(np.float64)
    # Centre and scale each feature once (CCC is invariant to one affine map applied to both
    # tables); keeps the moment sums well conditioned. Constant-in-both features become all zero.
    n_ok = okf.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.where(n_ok > 0, np.where(ok, s, 0.0).sum(axis=0) / np.maximum(n_ok, 1), 0.0)
        sd_s = np.sqrt(np.where(ok, (s - mu) ** 2, 0.0).sum(axis=0) / np.maximum(n_ok, 1))
        sd_c = np.sqrt(np.where(ok, (c - mu) ** 2, 0.0).sum(axis=0) / np.maximum(n_ok, 1))
    scale = np.maximum(sd_s, sd_c)
    scale = np.where(scale > 0, scale, 1.0)
    zs = np.where(ok, (s - mu) / scale, 0.0)
    zc = np.where(ok, (c - mu) / scale, 0.0)
    # RE per value |s - c| / |s| (0 if both 0, inf if only s is 0); its mean over the drawn ROIs.
    diff = np.abs(np.where(ok, s - c, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        re = diff / np.abs(np.where(ok, s, 1.0))
    re = np.where(ok & (s == 0) & (diff == 0), 0.0, re)
    inf = ok & np.isinf(re)
    re_fin = np.where(ok & ~inf, re, 0.0)
    # every weighted sum in one matrix product: (B, N) @ (N, 8 F)
    f = s.shape[1]
    sums = w @ np.concatenate([okf, zs, zc, zs * zs, zc * zc, zs * zc, re_fin, inf.astype(np.float64)], axis=1)
    n, s_s, s_c, s_ss, s_cc, s_sc, s_re, n_inf = (sums[:, k * f:(k + 1) * f] for k in range(8))
    with np.errstate(invalid="ignore", divide="ignore"):
        ms = s_s / n
        mc = s_c / n
        vs = np.maximum(s_ss / n - ms * ms, 0.0)
        vc = np.maximum(s_cc / n - mc * mc, 0.0)
        cov = s_sc / n - ms * mc
        den = vs + vc + (ms - mc) ** 2
        ccc = 2.0 * cov / den
        re_mean = np.where(n_inf > 0, np.inf, s_re / n)
    undefined = n < MIN_ROIS
    constant = (vs <= _CONST_TOL) & (vc <= _CONST_TOL)
    excluded = undefined | constant
    ccc = np.where(excluded, np.nan, ccc)
    defined = ~excluded
    good = defined & (re_mean < threshold)

    idx = class_index(names)
    n_b = w.shape[0]
    class_ccc = np.full((n_b, len(ALL_CLASSES)), np.nan)
    class_re = np.full((n_b, len(ALL_CLASSES)), np.nan)
    for k, cls in enumerate(ALL_CLASSES):
        j = np.asarray(idx[cls], dtype=int)
        if j.size == 0:
            continue
        cnt = defined[:, j].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            class_ccc[:, k] = np.where(cnt > 0, np.nansum(ccc[:, j], axis=1) / cnt, np.nan)
            class_re[:, k] = np.where(cnt > 0, good[:, j].sum(axis=1) / cnt, np.nan)
    n_def = defined.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        re_share = np.where(n_def > 0, good.sum(axis=1) / n_def, np.nan)
    return ReplicateStats(class_ccc, re_share, class_re)


def _stack(stats: ReplicateStats) -> np.ndarray:
    """One ``(B, 2 n_classes + 1)`` array: class CCCs, class RE shares, overall RE share."""
    return np.concatenate([stats.class_ccc, stats.class_re, stats.re_share[:, None]], axis=1)


def stat_labels() -> list[tuple[str, str]]:
    """(kind, class) of every column of the stacked statistics; class "all" for the overall share."""
    return ([("ccc", c) for c in ALL_CLASSES] + [("re_share", c) for c in ALL_CLASSES] + [("re_share", "all")])


def method_replicates(names: list[str], std: np.ndarray, cands: Sequence[np.ndarray], weights: np.ndarray,
                      seed_w: np.ndarray) -> np.ndarray:
    """``(B, n_stats)`` statistics of one method with one table per seed index.

    ``cands[s]`` is the method's table for seed index ``s`` (a seed-independent method passes
    the same array for every index; it is then computed once). ``seed_w[b, s]`` weights the
    per-seed statistics of replicate ``b`` (rows sum to 1).
    """
    cache: dict[int, np.ndarray] = {}
    out = None
    for s, cand in enumerate(cands):
        key = id(cand)
        if key not in cache:
            cache[key] = _stack(replicate_stats(names, std, cand, weights))
        term = seed_w[:, s:s + 1] * cache[key]
        term = np.where(seed_w[:, s:s + 1] == 0, 0.0, term)  # a seed not drawn adds nothing, even NaN
        out = term if out is None else out + term
    assert out is not None
    return out


def interval(values: np.ndarray, alpha: float = ALPHA) -> tuple[float, float, int]:
    """Percentile interval of the finite replicate values, and how many were finite."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi), int(v.size)


def verdict(lo: float, hi: float, n_finite: int, n_boot: int) -> str:
    """better / worse / tied from the paired interval; undefined when too few replicates are finite."""
    if n_boot == 0 or n_finite < MIN_FINITE_SHARE * n_boot or not (np.isfinite(lo) and np.isfinite(hi)):
        return "undefined"
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "tied"


def _cells(point: np.ndarray, reps: np.ndarray, n_boot: int, paired: bool) -> dict[str, dict[str, dict]]:
    """Nest the stacked columns as ``{"ccc": {class: cell}, "re_share": {class|"all": cell}}``."""
    out: dict[str, dict[str, dict]] = {"ccc": {}, "re_share": {}}
    for k, (kind, cls) in enumerate(stat_labels()):
        lo, hi, n_fin = interval(reps[:, k])
        cell = {"estimate": float(point[k]), "low": lo, "high": hi, "n_finite": n_fin}
        if paired:
            cell["verdict"] = verdict(lo, hi, n_fin, n_boot)
        out[kind][cls] = cell
    return out


def bootstrap_comparison(names: list[str], std: np.ndarray, cands: dict[str, Sequence[np.ndarray]],
                         case_of_roi: Sequence[int], *, n_boot: int, seed: int,
                         reference: str | None) -> dict:
    """CIs of every method's statistics and paired CIs of every method minus ``reference``.

    ``cands[m]`` holds one table per seed index (same count for every method). Point estimates
    use every ROI once and the mean over seeds; replicates as in the module docstring.
    """
    n_seeds = {len(v) for v in cands.values()}
    if len(n_seeds) != 1:
        raise ValueError(f"every method needs the same number of seed tables, got {sorted(n_seeds)}")
    n_s = n_seeds.pop()
    if reference is not None and reference not in cands:
        raise ValueError(f"reference method {reference!r} is not among {list(cands)}")
    rng = np.random.default_rng(seed)
    weights = hierarchical_weights(case_of_roi, n_boot, rng)
    seed_w = seed_weights(n_s, n_boot, rng)
    ones = np.ones((1, len(case_of_roi)))
    mean_w = np.full((1, n_s), 1.0 / n_s)
    points = {m: method_replicates(names, std, t, ones, mean_w)[0] for m, t in cands.items()}
    reps = {m: method_replicates(names, std, t, weights, seed_w) for m, t in cands.items()}
    out = {"methods": {m: _cells(points[m], reps[m], n_boot, paired=False) for m in cands}}
    if reference is not None:
        out["paired"] = {m: _cells(points[m] - points[reference], reps[m] - reps[reference], n_boot, paired=True)
                         for m in cands if m != reference}
    return out


def per_seed_points(names: list[str], std: np.ndarray, tables: Sequence[np.ndarray]) -> list[dict[str, dict]]:
    """Each seed's point estimates (``{"ccc": {class: v}, "re_share": {class|"all": v}}``)."""
    ones = np.ones((1, std.shape[0]))
    out = []
    for t in tables:
        row = _stack(replicate_stats(names, std, t, ones))[0]
        cell: dict[str, dict] = {"ccc": {}, "re_share": {}}
        for k, (kind, cls) in enumerate(stat_labels()):
            cell[kind][cls] = float(row[k])
        out.append(cell)
    return out

"""Turn per-ROI feature tables into the report's numbers: CCC/RE per ROI set, method and class.

ROI sets: ``tumour2d`` (per-slice tumour ROIs), ``tumour3d`` (one per tumour), one set per HU
range (``hu[lo,hi]``), ``random2d`` (all HU-range ROIs) and ``all2d`` (tumour2d + random2d).
The headline set is ``tumour2d`` (the papers' tumour ROIs) when it has at least ``MIN_ROIS``
ROIs, otherwise ``all2d`` (e.g. real data without a SEG).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .classes import ALL_CLASSES, class_index
from .metrics import MIN_ROIS, feature_agreement, groupwise_ccc, re_curve, reproducible_share, summarize


def roi_sets(groups: list[str]) -> dict[str, np.ndarray]:
    """Row indices of every ROI set, given the group label of each row."""
    g = np.asarray(groups, dtype=object)
    rng_groups = sorted({x for x in groups if x.startswith("hu[")}, key=lambda s: float(s[3:].split(",")[0]))
    sets = {"tumour2d": np.flatnonzero(g == "tumour2d"), "tumour3d": np.flatnonzero(g == "tumour3d")}
    for rg in rng_groups:
        sets[rg] = np.flatnonzero(g == rg)
    sets["random2d"] = np.flatnonzero(np.isin(g, rng_groups)) if rng_groups else np.zeros(0, int)
    sets["all2d"] = np.flatnonzero(g != "tumour3d")
    return sets


def headline_set(sets: dict[str, np.ndarray]) -> str:
    """The ROI set the paper-style table is built on (see module docstring)."""
    return "tumour2d" if len(sets["tumour2d"]) >= MIN_ROIS else "all2d"


def agreement(names: list[str], std: np.ndarray, cand: np.ndarray, per_feature: bool = False) -> dict[str, Any]:
    """Per-class CCC summary, group-wise CCC and RE statistics of one candidate on one ROI set."""
    if std.shape[0] < MIN_ROIS:
        return {"n_rois": int(std.shape[0]), "skipped": f"fewer than {MIN_ROIS} ROIs"}
    fa = feature_agreement(names, std, cand)
    idx = class_index(names)
    classes: dict[str, Any] = {}
    for c in ALL_CLASSES:
        j = np.asarray(idx[c], dtype=int)
        if j.size == 0:
            continue
        cell = summarize(fa.ccc[j])
        cell["n_constant"] = int(fa.constant[j].sum())
        cell["n_undefined"] = int(fa.undefined[j].sum())
        cell["group_ccc"] = groupwise_ccc(std[:, j], cand[:, j])
        cell["re_reproducible"] = reproducible_share(fa.re[j])
        classes[c] = cell
    out: dict[str, Any] = {
        "n_rois": int(std.shape[0]),
        "classes": classes,
        "re_reproducible": reproducible_share(fa.re),
        "re_curve": re_curve(fa.re),
        "n_features": len(names),
        "n_constant": int(fa.constant.sum()),
        "n_undefined": int(fa.undefined.sum()),
    }
    if per_feature:
        out["features"] = {n: {"ccc": _f(fa.ccc[k]), "re": _f(fa.re[k])} for k, n in enumerate(names)}
    return out


def _f(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None

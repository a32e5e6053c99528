"""Hierarchical bootstrap: exactness of the weighted statistics, pairing, verdicts, resampling levels."""
from __future__ import annotations

import numpy as np
import pytest

from ltdiff_core.radiomics.aggregate import agreement
from ltdiff_core.radiomics.bootstrap import (
    bootstrap_comparison,
    hierarchical_weights,
    interval,
    replicate_stats,
    seed_weights,
    stat_labels,
    verdict,
)
from ltdiff_core.radiomics.classes import ALL_CLASSES
from ltdiff_core.radiomics.metrics import feature_agreement, reproducible_share

NAMES = ["goh_Entropy", "gradient_firstorder_Mean", "original_glcm_Contrast", "original_glcm_Idm",
         "original_glrlm_RunEntropy", "original_firstorder_Mean", "original_firstorder_Median",
         "ih_Variance", "original_firstorder_Entropy", "original_ngtdm_Busyness",
         "original_glszm_ZoneEntropy", "original_gldm_DependenceEntropy"]


def _tables(n_cases: int = 6, per_case: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standard table with case effects, a close candidate, and the case of every ROI."""
    rng = np.random.default_rng(seed)
    case = np.repeat(np.arange(n_cases), per_case)
    effect = rng.normal(0, 1, (n_cases, len(NAMES)))[case]
    std = 10 + effect + rng.normal(0, 1, (len(case), len(NAMES)))
    cand = std + rng.normal(0, 0.3, std.shape)
    return std, cand, case


def test_point_estimate_equals_the_report_agreement():
    std, cand, _ = _tables()
    std[:, 1] = 4.0
    cand[:, 1] = 4.0                      # constant in both: excluded
    cand[3, 2] = np.nan                   # one missing value: that ROI dropped for that feature
    std[5, 4] = 0.0                       # RE infinite for that feature
    std[:, 7] *= 0.01                     # small-valued feature: RE large
    ref = agreement(NAMES, std, cand)
    fa = feature_agreement(NAMES, std, cand)
    st = replicate_stats(NAMES, std, cand, np.ones((1, std.shape[0])))
    for k, cls in enumerate(ALL_CLASSES):
        assert st.class_ccc[0, k] == pytest.approx(ref["classes"][cls]["mean"], abs=1e-10)
        assert st.class_re[0, k] == pytest.approx(ref["classes"][cls]["re_reproducible"]["share"], abs=1e-12)
    assert st.re_share[0] == pytest.approx(reproducible_share(fa.re)["share"], abs=1e-12)
    assert np.isinf(fa.re[4])


def test_weights_give_the_statistics_of_the_resampled_table():
    std, cand, case = _tables()
    w = hierarchical_weights(case, 5, np.random.default_rng(3))
    st = replicate_stats(NAMES, std, cand, w)
    for b in range(5):
        rows = np.repeat(np.arange(len(case)), w[b])
        ref = agreement(NAMES, std[rows], cand[rows])
        for k, cls in enumerate(ALL_CLASSES):
            assert st.class_ccc[b, k] == pytest.approx(ref["classes"][cls]["mean"], abs=1e-9)
        assert st.re_share[b] == pytest.approx(ref["re_reproducible"]["share"], abs=1e-12)


def test_hierarchical_resampling_draws_cases_first():
    # case 0 has 2 ROIs, case 1 has 10: drawing 2 cases then n_c ROIs per drawn case gives a
    # replicate of 4 (0,0), 12 (0,1) or 20 (1,1) ROIs with probabilities 1/4, 1/2, 1/4; a flat ROI
    # resample would always have 12.
    case = np.array([0] * 2 + [1] * 10)
    w = hierarchical_weights(case, 4000, np.random.default_rng(1))
    totals = w.sum(axis=1)
    assert set(np.unique(totals)) == {4, 12, 20}
    share = {t: np.mean(totals == t) for t in (4, 12, 20)}
    assert share[4] == pytest.approx(0.25, abs=0.03)
    assert share[12] == pytest.approx(0.5, abs=0.03)
    assert share[20] == pytest.approx(0.25, abs=0.03)
    # ROIs of a case are drawn only as a multiple of that case's size
    assert np.all(w[:, :2].sum(axis=1) % 2 == 0) and np.all(w[:, 2:].sum(axis=1) % 10 == 0)
    # a replicate with all weight in one case happens half the time
    assert np.mean((w[:, :2].sum(axis=1) == 0) | (w[:, 2:].sum(axis=1) == 0)) == pytest.approx(0.5, abs=0.03)


def test_seed_weights_are_shares_of_drawn_seeds():
    v = seed_weights(3, 200, np.random.default_rng(0))
    assert v.shape == (200, 3)
    assert np.allclose(v.sum(axis=1), 1.0)
    assert set(np.unique(np.rint(v * 3))) <= {0, 1, 2, 3}


def test_paired_difference_of_a_method_with_itself_is_exactly_zero_and_tied():
    std, cand, case = _tables()
    res = bootstrap_comparison(NAMES, std, {"a": [cand], "b": [cand.copy()]}, case, n_boot=200, seed=0,
                               reference="a")
    for kind, cls in stat_labels():
        cell = res["paired"]["b"][kind][cls]
        assert (cell["estimate"], cell["low"], cell["high"]) == (0.0, 0.0, 0.0)
        assert cell["verdict"] == "tied"


def test_added_bias_is_worse_with_the_interval_excluding_zero():
    std, cand, case = _tables()
    biased = cand + 0.8 * std.std(axis=0)     # a systematic offset of 0.8 SD in every feature
    res = bootstrap_comparison(NAMES, std, {"ours": [cand], "biased": [biased]}, case, n_boot=300, seed=0,
                               reference="ours")
    for cls in ("GOH", "GLCM", "GLRLM", "ID", "IH", "NID"):
        cell = res["paired"]["biased"]["ccc"][cls]
        assert cell["high"] < 0 and cell["verdict"] == "worse", (cls, cell)
        ci = res["methods"]["biased"]["ccc"][cls]
        assert ci["low"] <= ci["estimate"] <= ci["high"]
    # and the other way round it is better
    res2 = bootstrap_comparison(NAMES, std, {"ours": [cand], "biased": [biased]}, case, n_boot=300, seed=0,
                                reference="biased")
    assert res2["paired"]["ours"]["ccc"]["GLCM"]["verdict"] == "better"


def test_bootstrap_is_reproducible_with_a_seed():
    std, cand, case = _tables()
    other = cand + np.random.default_rng(9).normal(0, 0.3, cand.shape)
    run = lambda s: bootstrap_comparison(NAMES, std, {"a": [cand], "b": [other]}, case, n_boot=100, seed=s,
                                         reference="a")
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_seeds_are_averaged_and_a_seed_independent_method_is_unaffected():
    std, cand, case = _tables()
    rng = np.random.default_rng(2)
    draws = [cand + rng.normal(0, 0.5, cand.shape) for _ in range(3)]
    res = bootstrap_comparison(NAMES, std, {"det": [cand] * 3, "sto": draws}, case, n_boot=50, seed=0,
                               reference="det")
    single = bootstrap_comparison(NAMES, std, {"det": [cand]}, case, n_boot=50, seed=0, reference=None)
    # point estimate of a seed-independent method does not depend on the number of seeds
    assert res["methods"]["det"]["ccc"]["GLCM"]["estimate"] == pytest.approx(
        single["methods"]["det"]["ccc"]["GLCM"]["estimate"], abs=1e-12)
    per_seed = [bootstrap_comparison(NAMES, std, {"x": [d]}, case, n_boot=1, seed=0, reference=None)
                ["methods"]["x"]["ccc"]["GLCM"]["estimate"] for d in draws]
    assert res["methods"]["sto"]["ccc"]["GLCM"]["estimate"] == pytest.approx(np.mean(per_seed), abs=1e-12)


def test_interval_and_verdict_rules():
    assert interval(np.array([np.nan, 1.0, 1.0]))[2] == 2
    assert verdict(0.01, 0.2, 1000, 1000) == "better"
    assert verdict(-0.2, -0.01, 1000, 1000) == "worse"
    assert verdict(-0.01, 0.2, 1000, 1000) == "tied"
    assert verdict(0.0, 0.0, 1000, 1000) == "tied"
    assert verdict(0.1, 0.2, 900, 1000) == "undefined"


def test_unknown_reference_is_refused():
    std, cand, case = _tables()
    with pytest.raises(ValueError, match="reference"):
        bootstrap_comparison(NAMES, std, {"a": [cand]}, case, n_boot=10, seed=0, reference="ours")

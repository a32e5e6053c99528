"""CCC / RE on hand-computed cases, GOH on synthetic gradients, ROI placement, histogram matching."""
from __future__ import annotations

import numpy as np
import pytest

from ltdiff_core.baselines.histmatch import HistogramMatcher, hu_histogram
from ltdiff_core.radiomics.goh import N_BINS, goh_features, inplane_gradients, orientation_histogram
from ltdiff_core.radiomics.image_metrics import psnr, rmse, ssim, structure_check
from ltdiff_core.radiomics.methods import MethodError, leave_one_out_matcher, method_names, resolve
from ltdiff_core.radiomics.metrics import (
    ccc,
    feature_agreement,
    groupwise_ccc,
    re_curve,
    relative_error,
    reproducible_share,
)
from ltdiff_core.radiomics.rois import HU_RANGES, disc, local_disc_mean, random_rois, range_group


# --- CCC ------------------------------------------------------------------------------------

def test_ccc_identical_is_one():
    x = np.array([3.0, -1.0, 7.5, 2.0])
    assert ccc(x, x) == pytest.approx(1.0)


def test_ccc_hand_computed_shift():
    # means 2 and 3, both population variances 2/3, covariance 2/3: 2(2/3) / (2/3 + 2/3 + 1) = 4/7
    assert ccc([1, 2, 3], [2, 3, 4]) == pytest.approx(4 / 7)


def test_ccc_hand_computed_scaled_copy():
    # c = 2 s: var 2/3 and 8/3, cov 4/3, mean gap 2: (8/3) / (2/3 + 8/3 + 4) = 4/11 (correlation is 1)
    assert ccc([1, 2, 3], [2, 4, 6]) == pytest.approx(4 / 11)
    assert np.corrcoef([1, 2, 3], [2, 4, 6])[0, 1] == pytest.approx(1.0)


def test_ccc_anti_concordant():
    assert ccc([0, 1], [1, 0]) == pytest.approx(-1.0)


def test_ccc_refuses_different_lengths():
    with pytest.raises(ValueError, match="mismatched"):
        ccc([1, 2, 3], [1, 2])


def test_ccc_both_constant_is_undefined():
    assert np.isnan(ccc([5, 5, 5], [5, 5, 5]))


# --- RE ---------------------------------------------------------------------------------------

def test_relative_error_hand_computed():
    re = relative_error([2.0, -4.0, 0.0, 0.0], [1.0, -5.0, 0.0, 3.0])
    assert re[:3] == pytest.approx([0.5, 0.25, 0.0])
    assert np.isinf(re[3])


def test_feature_agreement_excludes_and_counts_constant_features():
    std = np.array([[1.0, 7.0, 10.0], [2.0, 7.0, 20.0], [3.0, 7.0, 30.0], [4.0, 7.0, 40.0]])
    cand = std.copy()
    cand[:, 2] *= 1.1  # RE 0.1 for every ROI
    fa = feature_agreement(["a", "b", "c"], std, cand)
    assert fa.constant.tolist() == [False, True, False]
    assert np.isnan(fa.ccc[1]) and np.isnan(fa.re[1])
    assert fa.ccc[0] == pytest.approx(1.0)
    assert fa.re[2] == pytest.approx(0.1)
    share = reproducible_share(fa.re)
    assert share["n"] == 2 and share["n_reproducible"] == 2


def test_feature_agreement_refuses_mismatched_tables():
    with pytest.raises(ValueError, match="mismatched"):
        feature_agreement(["a"], np.zeros((4, 1)), np.zeros((5, 1)))


def test_re_mean_over_rois_and_threshold():
    std = np.array([[1.0], [2.0], [4.0]])
    cand = np.array([[1.1], [2.4], [4.0]])  # per-ROI RE 0.1, 0.2, 0.0 -> mean 0.1
    fa = feature_agreement(["f"], std, cand)
    assert fa.re[0] == pytest.approx(0.1)
    assert reproducible_share(fa.re)["share"] == 1.0
    assert reproducible_share(fa.re, threshold=0.05)["share"] == 0.0


def test_re_curve_counts():
    curve = re_curve(np.array([0.0, 0.1, 0.5, 2.0, np.nan]), xs=np.array([0.0, 0.1, 0.49, 1.0]))
    assert curve["count"] == [1, 2, 2, 3]


def test_groupwise_ccc_hand_computed():
    std = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    assert groupwise_ccc(std, std) == pytest.approx(1.0)
    cand = std.copy()
    cand[:, 1] += 10.0  # one standard deviation... in z units k = 10/sd = sqrt(3/2)
    # pooled z (units of k): s = [-1,0,1,-1,0,1], c = [-1,0,1,0,1,2]
    # var_s 2/3, var_c 11/12, mean gap 1/2, cov 2/3 -> (4/3) / (2/3 + 11/12 + 1/4) = 8/11
    assert groupwise_ccc(std, cand) == pytest.approx(8 / 11)


# --- GOH --------------------------------------------------------------------------------------

def _disc_mask(n: int, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    return np.hypot(yy, xx) <= r


def test_goh_horizontal_ramp_single_bin():
    img = np.tile(np.arange(64, dtype=float) * 10.0, (64, 1))
    mask = _disc_mask(64, 20)
    gy, gx = inplane_gradients(img, (0.7, 0.7))
    p = orientation_histogram(gy, gx, mask)
    assert p[0] == pytest.approx(1.0)
    f = goh_features(img, mask, (0.7, 0.7))
    assert f["DominantShare"] == pytest.approx(1.0)
    assert f["Entropy"] == pytest.approx(0.0)
    assert f["CircularVariance"] == pytest.approx(0.0, abs=1e-12)
    assert f["MeanMagnitude"] == pytest.approx(10.0 / 0.7)


def test_goh_rotation_moves_dominant_bin():
    img = np.tile(np.arange(64, dtype=float) * 10.0, (64, 1))
    mask = _disc_mask(64, 20)
    rot = np.rot90(img)
    gy, gx = inplane_gradients(rot, (0.7, 0.7))
    p = orientation_histogram(gy, gx, mask)
    assert int(np.argmax(p)) == N_BINS // 2
    assert p[N_BINS // 2] == pytest.approx(1.0)


def test_goh_cone_uniform_orientations():
    n = 201
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    cone = np.hypot(yy, xx) * 5.0
    mask = _disc_mask(n, 90) & ~_disc_mask(n, 5)
    f = goh_features(cone, mask, (1.0, 1.0))
    gy, gx = inplane_gradients(cone, (1.0, 1.0))
    p = orientation_histogram(gy, gx, mask)
    assert np.max(np.abs(p - 1 / N_BINS)) < 0.01
    assert f["Entropy"] == pytest.approx(np.log2(N_BINS), abs=0.01)
    assert f["CircularVariance"] > 0.98


def test_goh_refuses_mask_of_other_shape():
    with pytest.raises(ValueError, match="shape"):
        goh_features(np.zeros((8, 8)), np.ones((7, 8), bool), (1.0, 1.0))


# --- ROIs ------------------------------------------------------------------------------------

def _three_tissue_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vol = np.full((3, 128, 128), -650.0, np.float32)
    vol[:, :, 43:86] = 60.0
    vol[:, :, 86:] = 550.0
    vol += rng.normal(0, 40, vol.shape).astype(np.float32)
    yy, xx = np.mgrid[:128, :128]
    tumour = np.zeros(vol.shape, bool)
    tumour[:, (yy - 64) ** 2 + (xx - 64) ** 2 <= 49] = True
    vol[tumour] = -20.0
    return vol, tumour


def test_random_rois_deterministic_inside_ranges_and_off_tumours():
    vol, tumour = _three_tissue_volume()
    spacing = (1.5, 0.7, 0.7)
    a = random_rois(vol, spacing, [tumour], case_name="case1", seed=3, max_per_range=4)
    b = random_rois(vol, spacing, [tumour], case_name="case1", seed=3, max_per_range=4)
    c = random_rois(vol, spacing, [tumour], case_name="case1", seed=4, max_per_range=4)
    assert [r.name for r in a] == [r.name for r in b]
    assert [r.name for r in a] != [r.name for r in c]
    assert {r.group for r in a} == {range_group(lo, hi) for lo, hi in HU_RANGES}
    for r in a:
        lo, hi = next((lo, hi) for lo, hi in HU_RANGES if range_group(lo, hi) == r.group)
        full = r.full_mask(vol.shape)
        assert lo <= vol[full].mean() <= hi
        assert not (full & tumour).any()
        assert full.sum() == disc(7.0, spacing[1:]).sum()
    lm = local_disc_mean(vol, disc(7.0, spacing[1:]))
    assert lm.shape == vol.shape


def test_random_rois_of_one_range_do_not_overlap():
    vol, tumour = _three_tissue_volume()
    rois = random_rois(vol, (1.5, 0.7, 0.7), [tumour], case_name="x", seed=0, max_per_range=6)
    for g in {r.group for r in rois}:
        masks = [r.full_mask(vol.shape) for r in rois if r.group == g]
        assert np.max(np.sum(masks, axis=0)) == 1


# --- histogram matching ------------------------------------------------------------------------

def test_histmatch_maps_onto_reference_distribution():
    rng = np.random.default_rng(1)
    ref = rng.normal(100, 80, (4, 64, 64))
    src = rng.normal(0, 20, (2, 64, 64))
    out = HistogramMatcher.from_volumes([ref]).apply(src)
    assert out.shape == src.shape
    assert abs(out.mean() - 100) < 5 and abs(out.std() - 80) < 5
    assert np.all(np.diff(out.ravel()[np.argsort(src.ravel())]) >= 0)  # monotone


def test_histmatch_never_uses_the_cases_own_standard():
    rng = np.random.default_rng(2)
    source = rng.normal(0, 30, (2, 32, 32))
    targets = [rng.normal(m, 50, (2, 32, 32)) for m in (-100, 0, 200)]
    hists = [hu_histogram(t) for t in targets]
    out = leave_one_out_matcher(hists, 1).apply(source)
    changed = list(hists)
    changed[1] = hu_histogram(targets[1] + 500.0)  # the case's own standard changes
    assert np.array_equal(leave_one_out_matcher(changed, 1).apply(source), out)
    other = list(hists)
    other[0] = hu_histogram(targets[0] + 500.0)  # another case's standard changes
    assert not np.array_equal(leave_one_out_matcher(other, 1).apply(source), out)


def test_histmatch_needs_another_case():
    with pytest.raises(MethodError, match="other cases"):
        leave_one_out_matcher([hu_histogram(np.zeros((1, 4, 4)))], 0)


# --- methods registry -------------------------------------------------------------------------

def test_method_names_and_missing_checkpoint(tmp_path):
    assert method_names(["identity", "ours"], [2, 8]) == ["identity", "ours", "ours@2", "ours@8"]
    with pytest.raises(MethodError, match="unknown method"):
        method_names(["nope"], [])
    missing = tmp_path / "linear.safetensors"
    with pytest.raises(MethodError, match=str(missing)):
        resolve(["identity", "linear"], linear=missing)
    assert [s.name for s in resolve(["identity", "histmatch"])] == ["identity", "histmatch"]


# --- image metrics ----------------------------------------------------------------------------

def test_image_metrics_hand_values_and_refusal():
    a = np.zeros((2, 16, 16))
    b = a + 20.0
    assert rmse(a, b) == pytest.approx(20.0)
    assert psnr(a, b) == pytest.approx(20 * np.log10(2000 / 20))
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) < 1.0
    with pytest.raises(ValueError, match="mismatched"):
        rmse(a, np.zeros((2, 16, 15)))


def test_structure_check_tumour_tolerance():
    std = np.zeros((1, 32, 32))
    t = np.zeros(std.shape, bool)
    t[0, 10:16, 10:16] = True
    cand = std.copy()
    cand[t] += 15.0
    s = structure_check(std, cand, [t], (1.0, 1.0, 1.0))
    assert s["tumour_mean_diff_hu"] == [pytest.approx(15.0)]
    assert s["tumours_within_tol"] == 0
    assert s["outside_lowpass_abs_p99_hu"] < 15.0

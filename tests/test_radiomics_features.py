"""PyRadiomics + GOH + IH extraction on small synthetic ROIs, and the class mapping of every name."""
from __future__ import annotations

import numpy as np
import pytest

from ltdiff_core.radiomics.classes import ALL_CLASSES, class_index, feature_class
from ltdiff_core.radiomics.features import extract, task_for
from ltdiff_core.radiomics.ih import discretise, ih_features
from ltdiff_core.radiomics.rois import tumour_rois

SPACING = (1.5, 0.7, 0.7)


@pytest.fixture(scope="module")
def blob_case() -> tuple[np.ndarray, list]:
    rng = np.random.default_rng(0)
    vol = rng.normal(-700, 40, (3, 48, 48)).astype(np.float32)
    yy, xx = np.mgrid[:48, :48]
    tumour = np.zeros(vol.shape, bool)
    tumour[:, (yy - 24) ** 2 + (xx - 24) ** 2 <= 64] = True
    vol[tumour] = rng.normal(30, 25, int(tumour.sum()))
    return vol, tumour_rois([tumour])


@pytest.fixture(scope="module")
def table(blob_case):
    vol, rois = blob_case
    return extract([task_for(vol, r, SPACING) for r in rois], progress=False)


def test_every_extracted_feature_has_exactly_one_class(table):
    idx = class_index(table.names)
    assigned = sorted(j for cols in idx.values() for j in cols)
    assert assigned == list(range(len(table.names)))
    assert all(len(idx[c]) > 0 for c in ALL_CLASSES)
    assert not any("shape" in n for n in table.names)
    assert {feature_class(n) for n in table.names if n.startswith("gradient_")} == {"GOH"}
    assert feature_class("original_firstorder_Entropy") == "IH"
    assert feature_class("original_firstorder_Mean") == "ID"


def test_shape_and_unknown_features_are_refused():
    for name in ("original_shape2D_Elongation", "original_shape_Sphericity", "wavelet-LL_glcm_Idm", "bogus"):
        with pytest.raises(KeyError):
            feature_class(name)


def test_extraction_2d_and_3d_and_deterministic(blob_case, table):
    vol, rois = blob_case
    assert [r.group for r in rois] == ["tumour3d", "tumour2d", "tumour2d", "tumour2d"]
    assert table.values.shape == (len(rois), len(table.names))
    assert np.isfinite(table.values[:, [table.names.index("original_glcm_Contrast")]]).all()
    again = extract([task_for(vol, r, SPACING) for r in rois], progress=False, jobs=2)
    assert again.names == table.names
    np.testing.assert_array_equal(again.values, table.values)
    mean = table.values[:, table.names.index("original_firstorder_Mean")]
    for k, r in enumerate(rois):
        assert mean[k] == pytest.approx(vol[r.full_mask(vol.shape)].mean(), rel=1e-5)


def test_features_follow_the_image(blob_case, table):
    vol, rois = blob_case
    noisier = vol + np.random.default_rng(5).normal(0, 60, vol.shape).astype(np.float32)
    other = extract([task_for(noisier, r, SPACING) for r in rois], progress=False)
    var = table.names.index("original_firstorder_Variance")
    assert np.all(other.values[:, var] > table.values[:, var])


def test_ih_features_absolute_bins():
    vals = np.array([0.0, 10.0, 30.0, 60.0, 60.0, -5.0])
    assert discretise(vals, 25).tolist() == [0, 0, 1, 2, 2, -1]
    f = ih_features(vals, 25)
    assert f["Mode"] == 0.0  # ties go to the lowest bin
    assert f["Minimum"] == -1 and f["Maximum"] == 2 and f["Range"] == 3
    assert f["Uniformity"] == pytest.approx((2 / 6) ** 2 * 2 + (1 / 6) ** 2 * 2)

"""Pairing: slice matching by position along the normal, tolerance and refusals."""
from __future__ import annotations

import numpy as np
import pytest

from ltdiff_core.dicomio import PairingError, pair_series, read_series
from ltdiff_core.dicomio.pairing import default_tolerance
from ltdiff_core.dicomio.uids import make_uid
from ltdiff_core.dicomio.writer import StudyInfo, slice_positions

SHAPE = (6, 32, 32)
SPACING = (1.5, 0.7, 0.7)


def _positions(shape=SHAPE, spacing=SPACING, shift=0.0, start=0):
    pos = slice_positions(shape, spacing)
    pos[:, 2] += shift + start * spacing[0]
    return pos


def _pair(ct_series, tmp_path, b_kwargs, tol_mm=None, a_kwargs=None):
    ct_series(shape=SHAPE, folder="a", **(a_kwargs or {}))
    ct_series(kernel="Bl64", folder="b", **{"shape": SHAPE, **b_kwargs})
    return read_series(tmp_path / "a"), read_series(tmp_path / "b")


def test_pairs_identical_geometry_one_to_one(ct_series, tmp_path):
    a, b = _pair(ct_series, tmp_path, {})
    assert pair_series(a, b) == [(i, i) for i in range(SHAPE[0])]
    assert default_tolerance(a, b) == pytest.approx(0.375)


def test_pairs_overlapping_ranges_and_small_rounding(ct_series, tmp_path):
    # b starts two slices later and carries 0.2 mm of rounding: only the overlap pairs.
    a, b = _pair(ct_series, tmp_path, {"positions": _positions(shift=0.2, start=2)})
    assert pair_series(a, b) == [(i + 2, i) for i in range(SHAPE[0] - 2)]


def test_pairs_thin_with_thick_slices(ct_series, tmp_path):
    # 3 mm slices against 1.5 mm slices: every other thin slice has a partner.
    thick = (3, 32, 32)
    a, b = _pair(ct_series, tmp_path, {"shape": thick, "spacing": (3.0, 0.7, 0.7),
                                       "positions": _positions(thick, (3.0, 0.7, 0.7), shift=-0.75)})
    za, zb = a.slice_locations, b.slice_locations
    pairs = pair_series(a, b)
    assert len(pairs) == 3
    assert all(abs(za[i] - zb[j]) < 1e-6 for i, j in pairs)


def test_tolerance_is_respected(ct_series, tmp_path):
    a, b = _pair(ct_series, tmp_path, {"positions": _positions(shift=0.5)})
    with pytest.raises(PairingError, match=r"only 0 of 6/6 slices match within 0\.375 mm"):
        pair_series(a, b)
    assert len(pair_series(a, b, tol_mm=0.6)) == SHAPE[0]


def test_min_matches(ct_series, tmp_path):
    a, b = _pair(ct_series, tmp_path, {"positions": _positions(start=4)})
    assert pair_series(a, b) == [(4, 0), (5, 1)]
    with pytest.raises(PairingError, match="only 2 of 6/6 slices match.*need 3"):
        pair_series(a, b, min_matches=3)


def test_refuses_other_frame_of_reference(ct_series, tmp_path):
    other = StudyInfo(study_uid=make_uid(), frame_of_reference_uid=make_uid())
    a, b = _pair(ct_series, tmp_path, {"study": other})
    with pytest.raises(PairingError, match="FrameOfReferenceUID differs"):
        pair_series(a, b)


def test_refuses_other_orientation_and_lists_every_problem(ct_series, tmp_path):
    coronal = np.array([[-11.0, 1.5 * k, 11.0] for k in range(SHAPE[0])])  # normal is +y
    a, b = _pair(ct_series, tmp_path, {"orientation": (1, 0, 0, 0, 0, -1), "positions": coronal,
                                       "spacing": (1.5, 0.8, 0.8), "shape": (6, 32, 40)})
    with pytest.raises(PairingError) as info:
        pair_series(a, b)
    message = str(info.value)
    for problem in ("ImageOrientationPatient differs", "PixelSpacing differs", "Rows/Columns differ"):
        assert problem in message


def test_refuses_shifted_in_plane_grid(ct_series, tmp_path):
    shifted = _positions()
    shifted[:, 0] += 3.0  # 3 mm lateral shift: same slices, different pixels
    a, b = _pair(ct_series, tmp_path, {"positions": shifted})
    with pytest.raises(PairingError, match="in-plane origin differs"):
        pair_series(a, b)


def test_closest_partner_wins(ct_series, tmp_path):
    # One b slice sits between two a slices, nearer to the second: it must pair with that one.
    pos_b = _positions(shape=(1, 32, 32))
    pos_b[0, 2] = slice_positions(SHAPE, SPACING)[3, 2] - 0.3
    a, b = _pair(ct_series, tmp_path, {"shape": (1, 32, 32), "positions": pos_b}, tol_mm=1.0)
    assert pair_series(a, b, tol_mm=1.0) == [(3, 0)]
    assert np.isclose(b.spacing[0], 1.5)

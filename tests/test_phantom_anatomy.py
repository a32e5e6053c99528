"""Phantom anatomy: determinism, tissue HU, tumours, z-consistency, thickness and crop geometry."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ltdiff_core.phantom import LABELS, chest_truth, generate_case
from ltdiff_core.phantom import anatomy as an

NAME = {v: k for k, v in LABELS.items()}
LUNG_LIKE = [NAME[n] for n in ("lung", "lung_vessel", "airway_wall", "airway_lumen")] + list(range(17, 22))


def _truth(seed: int, n: int = 4, size: int = 128, thickness: float = 1.5):
    return chest_truth(np.random.default_rng(seed), n, thickness, size=size)


@pytest.fixture(scope="module")
def small():
    return _truth(11)


@pytest.fixture(scope="module")
def full_slice():
    return _truth(5, n=1, size=512)


def _tissue_mean(truth: np.ndarray, labels: np.ndarray, name: str) -> float:
    """Mean HU over the label's interior (1-pixel erosion per slice keeps partial volume out)."""
    m = labels == NAME[name]
    m = np.stack([ndimage.binary_erosion(s) for s in m])
    assert m.sum() > 20, name
    return float(truth[m].mean())


def test_same_seed_is_bit_identical_and_other_seed_differs(small):
    truth, labels, vol = small
    truth2, labels2, vol2 = _truth(11)
    assert np.array_equal(truth, truth2) and np.array_equal(labels, labels2)
    assert all(np.array_equal(a, b) for a, b in zip(vol.masks, vol2.masks))
    assert vol.tumours == vol2.tumours
    other, _, _ = _truth(12)
    assert not np.array_equal(truth, other)


def test_shapes_types_and_label_names(small):
    truth, labels, vol = small
    assert truth.shape == labels.shape == (4, 128, 128)
    assert truth.dtype == np.float32 and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= set(LABELS)
    assert len(vol.slice_z_mm) == 4 and np.allclose(np.diff(vol.slice_z_mm), 1.5)


def test_full_slice_tissue_hu(full_slice):
    truth, labels, _ = full_slice
    assert truth.shape == (1, 512, 512)
    assert abs(_tissue_mean(truth, labels, "lung") + 860) < 80
    assert abs(_tissue_mean(truth, labels, "fat") + 100) < 25
    assert abs(_tissue_mean(truth, labels, "muscle") - 50) < 20
    assert abs(_tissue_mean(truth, labels, "air") + 1000) < 5
    cortex = truth[labels == NAME["cortical_bone"]]
    assert np.percentile(cortex, 90) >= 850
    assert 120 < _tissue_mean(truth, labels, "cancellous_bone") < 400
    lung = truth[labels == NAME["lung"]]
    assert 15 < np.std(lung) < 150  # textured, not flat


def test_lung_posterior_denser(full_slice):
    truth, labels, _ = full_slice
    lung = np.stack([ndimage.binary_erosion(s, iterations=3) for s in labels == NAME["lung"]])[0]
    rows = np.nonzero(lung)[0]
    mid = np.median(rows)
    anterior = truth[0][lung & (np.arange(512)[:, None] < mid)].mean()
    posterior = truth[0][lung & (np.arange(512)[:, None] > mid)].mean()
    assert posterior > anterior + 5


def test_tumours_inside_lungs_and_span_slices():
    for seed in (1, 2, 3, 4):
        truth, labels, vol = _truth(seed, n=4, size=128)
        assert 1 <= len(vol.masks) <= 3 and len(vol.tumours) == len(vol.masks)
        for mask, info in zip(vol.masks, vol.tumours):
            assert info["type"] in ("solid", "part_solid", "ground_glass")
            assert 6.0 <= info["radius_mm"] <= 20.0
            assert mask.any(axis=(1, 2)).sum() >= 2
            ring = np.stack([ndimage.binary_dilation(s, iterations=3) & ~s for s in mask])
            assert np.isin(labels[ring], LUNG_LIKE).mean() > 0.9
            assert np.isin(labels[mask], list(range(17, 22))).mean() > 0.8


def test_tumour_type_hu():
    seen = set()
    for seed in range(1, 30):
        truth, labels, vol = _truth(seed, n=2, size=96)
        for mask, info in zip(vol.masks, vol.tumours):
            core = np.stack([ndimage.binary_erosion(s, iterations=2) for s in mask])
            if core.sum() < 30:
                continue
            if info["type"] == "solid" and not (info["cavitation"] or info["calcifications"]):
                vals = truth[core & (labels == NAME["tumour_solid"])]
                assert -20 < vals.mean() < 70 and 5 < vals.std() < 60
                seen.add("solid")
            elif info["type"] == "ground_glass":
                vals = truth[core]
                assert -850 < vals.mean() < -250
                seen.add("ground_glass")
        if seen == {"solid", "ground_glass"}:
            break
    assert seen == {"solid", "ground_glass"}


def test_solid_tumours_dominate_the_mix():
    from ltdiff_core.phantom import tumours as tm

    rng = np.random.default_rng(0)
    draws = [tm.sample_tumour(r) for r in rng.spawn(400)]
    solid = [t for t in draws if t.kind == "solid"]
    assert len(solid) / len(draws) > 0.55
    assert np.mean([t.radius_mm >= 10 for t in solid]) > 0.6
    assert all(6 <= t.radius_mm <= 20 for t in draws)


def test_adjacent_slices_correlate(small):
    truth, _, _ = small
    for a, b in zip(truth[:-1], truth[1:]):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


def test_thickness_keeps_body_and_tumour():
    _, lab1, vol1 = _truth(7, n=1, size=512, thickness=1.0)
    _, lab3, vol3 = _truth(7, n=1, size=512, thickness=3.0)
    body1, body3 = lab1[0] > 0, lab3[0] > 0
    assert (body1 ^ body3).sum() / body1.sum() < 0.01
    assert vol1.tumours[0]["centre_mm"] == vol3.tumours[0]["centre_mm"]
    assert vol1.tumours[0]["radius_mm"] == vol3.tumours[0]["radius_mm"]


def test_crop_is_centred_on_first_tumour_at_full_resolution():
    size = 96
    _, labels, vol = _truth(3, n=3, size=size)
    _, labels_full, vol_full = _truth(3, n=3, size=512)
    r0, c0 = vol.crop_origin
    assert np.array_equal(labels, labels_full[:, r0:r0 + size, c0:c0 + size])
    cy, cx = ndimage.center_of_mass(vol.masks[0].any(axis=0))
    assert abs(cy - size / 2) < 8 and abs(cx - size / 2) < 8


def test_sub_slice_count_grows_with_thickness():
    counts = [an.sub_slice_count(t) for t in (1.0, 1.5, 3.0, 5.0)]
    assert counts == sorted(counts) and counts[0] >= 2 and counts[-1] > counts[0]


def test_generate_case_pairs_and_metadata():
    case = generate_case(21, n_slices=3, size=96)
    again = generate_case(21, n_slices=3, size=96)
    assert np.array_equal(case.br40, again.br40) and np.array_equal(case.bl64, again.bl64)
    assert case.br40.shape == case.bl64.shape == case.truth.shape == case.labels.shape == (3, 96, 96)
    assert np.array_equal(case.br40, np.rint(case.br40))
    assert case.spacing == (1.5, 0.7, 0.7)
    meta = case.meta
    assert meta["seed"] == 21 and meta["size"] == 96 and meta["thickness_mm"] == 1.5
    assert {"noise_br40_hu", "ir_strength_a", "ir_strength_b"} <= set(meta["acquisition"])
    assert len(case.tumour_masks) == len(case.tumour_info) == len(meta["tumours"]) >= 1
    assert case.label_names[NAME["lung"]] == "lung"


def test_every_case_gets_a_tumour_even_when_large_ones_do_not_fit() -> None:
    """Large spiculated tumours that find no room are shrunk, never dropped to zero tumours."""
    from ltdiff_core.phantom import anatomy as A

    for seed in range(12):
        body_rng, seg_rng, tum_rng, _, _ = np.random.default_rng(seed).spawn(5)
        chest = A.sample_chest(body_rng)
        A.build_segments(chest, seg_rng)
        placed = A.place_tumours(chest, tum_rng, half_slab_mm=15.0)
        assert 1 <= len(placed) <= 3
        for t in placed:
            assert t.radius_mm >= 6.0 - 1e-9
            assert A._sphere_in_lung(chest, t.centre_mm, t.extent_mm + 2.0)

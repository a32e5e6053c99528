"""Fits weigh tissue: the body found from the image, spectra through a smooth window inside it.

Slices stored as scanners write them (clipped at -1024 HU, a patient table under the body,
PixelPaddingValue outside the reconstruction circle) must give the same fitted kernel filter as
the same slices without those; a fit over the whole slice does not (the padding's and the
table's edges are identical in both kernels and pull the fitted sharpening towards 1)."""
from __future__ import annotations

import numpy as np
import pytest

from ltdiff_core.body import body_mask, tissue_window
from ltdiff_core.linear_filter import LinearFilterFitter
from ltdiff_core.phantom import generate

PADDING_HU = -2000.0


def as_stored(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pair as a scanner stores it, and the table's mask."""
    a, b = a.copy(), b.copy()
    y, x = np.mgrid[:a.shape[0], :a.shape[1]]
    bottom = int(np.where((a > -500).any(axis=1))[0].max())
    table = (y > bottom + 8) & (y < bottom + 20) & (np.abs(x - a.shape[1] / 2) < 0.4 * a.shape[1])
    outside = (y - a.shape[0] / 2) ** 2 + (x - a.shape[1] / 2) ** 2 > (a.shape[0] / 2) ** 2
    for img in (a, b):
        img[table] += 1200.0
        np.clip(img, -1024.0, None, out=img)
        img[outside] = PADDING_HU
    return a, b, table


def band_gain(fitter: LinearFilterFitter) -> np.ndarray:
    """|H| averaged over 1 lp/cm bands from 0 to 8 lp/cm."""
    f = fitter.fit(with_residual=False)
    h = np.hypot(f.h_real, f.h_imag)
    return np.array([h[(f.freq_lpcm >= lo) & (f.freq_lpcm < lo + 1)].mean() for lo in range(8)])


@pytest.fixture(scope="module")
def case():  # type: ignore[no-untyped-def]
    return generate("scanner", 3, 3, rescan=None)


def test_body_mask_keeps_lungs_and_leaves_out_table_and_padding(case) -> None:  # type: ignore[no-untyped-def]
    a, _, table = as_stored(case.br40[1], case.bl64[1])
    m = body_mask(a, pixel_mm=case.spacing[1:])
    assert not (m & table).any()
    assert not m[a == PADDING_HU].any()
    lung = case.labels[1] == next(k for k, v in case.label_names.items() if "lung" in v.lower())
    assert m[lung].mean() > 0.99  # lungs are inside the body, though below -500 HU
    w = tissue_window(a, case.spacing[1:])
    assert w[~m].max() < 0.02  # the window's edge lies inside the outline
    assert w[m].max() == pytest.approx(1.0, abs=1e-6)


def test_window_of_a_crop_that_is_all_tissue_is_one() -> None:
    rng = np.random.default_rng(0)
    crop = 40.0 + 20.0 * rng.standard_normal((64, 64))
    assert np.allclose(tissue_window(crop, (0.7, 0.7)), 1.0)
    assert not tissue_window(np.full((32, 32), -1000.0), (0.7, 0.7)).any()


def test_body_window_fit_is_the_same_with_clip_table_and_padding(case) -> None:  # type: ignore[no-untyped-def]
    px = case.spacing[1:]
    gains = {}
    for window in ("body", None):
        clean, stored = LinearFilterFitter(window=window), LinearFilterFitter(window=window)
        for z in range(case.br40.shape[0]):
            clean.add(case.br40[z], case.bl64[z], px)
            a, b, _ = as_stored(case.br40[z], case.bl64[z])
            stored.add(a, b, px)
        gains[window] = band_gain(stored) / band_gain(clean)
    print("band gain stored/clean, 0-8 lp/cm:", {str(k): np.round(v, 3).tolist() for k, v in gains.items()})
    assert np.abs(gains["body"] - 1.0).max() < 0.03
    assert np.abs(gains[None] - 1.0).max() > 0.03  # the whole-slice fit is pulled towards 1

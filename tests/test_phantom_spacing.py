"""The scanner phantom at another pixel spacing keeps the noise power spectrum of the same dose."""
from __future__ import annotations

import numpy as np
import pytest

from ltdiff_core import measure as M
from ltdiff_core.phantom import scanner

RADIUS_MM, FOV_MM = 45.0, 100.0


def _noise(pixel_mm: float) -> dict[str, np.ndarray]:
    n = int(round(FOV_MM / pixel_mm))
    yy, xx = (np.indices((n, n)) - (n - 1) / 2) * pixel_mm
    truth = np.where(yy**2 + xx**2 < RADIUS_MM**2, 0.0, -1000.0).astype(np.float32)[None].repeat(3, 0)
    clean = scanner.acquire(truth, pixel_mm, np.random.default_rng(0), noise_br40_hu=0.0, ir_strength=(0, 0))
    noisy = scanner.acquire(truth, pixel_mm, np.random.default_rng(1), noise_br40_hu=25.0, ir_strength=(0, 0))
    c, h = n // 2, int(round(20.0 / pixel_mm))  # a 40 mm square in the water
    return {k: (noisy[k] - clean[k])[:, c - h:c + h, c - h:c + h] for k in clean}


def _nps_at(noise: np.ndarray, pixel_mm: float, f0: float) -> float:
    f, nps = M.nps_radial(list(noise), pixel_mm)
    sel = np.abs(f - f0) < 0.6
    return float(nps[sel].mean())


def test_nps_is_kept_and_the_sharp_kernel_loses_what_lies_beyond_nyquist():
    fine, coarse = _noise(0.7), _noise(0.9)
    for k in ("Br40", "Bl64"):
        assert _nps_at(coarse[k], 0.9, 3.0) == pytest.approx(_nps_at(fine[k], 0.7, 3.0), rel=0.2), k
    assert coarse["Br40"].std() == pytest.approx(fine["Br40"].std(), rel=0.08)  # little Br40 power above 5.6 lp/cm
    assert coarse["Bl64"].std() < 0.95 * fine["Bl64"].std()

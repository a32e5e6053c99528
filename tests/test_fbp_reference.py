"""The fast image-domain scanner agrees with a projection + Poisson + FBP reference.

One 128^2 water disc at 0.7 mm. The FBP chain scans a 0.35 mm version of the object (so its
projector adds little blur of its own); the image-domain chain gets the 2x2 area average.
"""
import numpy as np
import pytest

from ltdiff_core import measure as M
from ltdiff_core.phantom import fbp, scanner

N, PIX = 128, 0.7


def _disc(n: int, pixel_mm: float, r_mm: float = 30.0, ss: int = 4) -> np.ndarray:
    c = (np.indices((n * ss, n * ss)) + 0.5) / ss * pixel_mm - n * pixel_mm / 2 - 0.21
    inside = (c[0] ** 2 + c[1] ** 2 < r_mm**2).reshape(n, ss, n, ss).mean(axis=(1, 3))
    return (-1000.0 + 1000.0 * inside).astype(np.float32)


@pytest.fixture(scope="module")
def chains():
    fine = _disc(2 * N, PIX / 2)
    coarse = fine.reshape(N, 2, N, 2).mean(axis=(1, 3))[None]
    clean_fbp = fbp.fbp_pair(fine, PIX / 2, np.random.default_rng(0), photons=None, recon_shape=(N, N))
    noisy_fbp = fbp.fbp_pair(fine, PIX / 2, np.random.default_rng(1), photons=2e5, recon_shape=(N, N))
    clean_img = scanner.acquire_pair(coarse, PIX, np.random.default_rng(0), noise_br40_hu=0.0, ir_strength=(0, 0))
    noisy_img = scanner.acquire_pair(coarse, PIX, np.random.default_rng(1), noise_br40_hu=16.0, ir_strength=(0, 0))
    return clean_fbp, noisy_fbp, [c[0] for c in clean_img], [n[0] for n in noisy_img]


def _inner() -> np.ndarray:
    yy, xx = np.indices((N, N)) - (N - 1) / 2
    return yy**2 + xx**2 < 25**2


def test_fbp_reconstructs_ct_numbers(chains):
    clean_fbp, *_ = chains
    for img in clean_fbp:
        assert abs(img[_inner()].mean()) < 8.0  # water
        assert img[:6, :6].mean() == pytest.approx(-1000.0, abs=5.0)  # air


def test_mtf50_agrees_per_kernel(chains):
    clean_fbp, _, clean_img, _ = chains
    for ref, model in zip(clean_fbp, clean_img):
        e_ref, e_model = M.edge_mtf(ref, PIX), M.edge_mtf(model, PIX)
        assert e_model.mtf50 == pytest.approx(e_ref.mtf50, rel=0.10)
        assert e_model.peak == pytest.approx(e_ref.peak, abs=0.06)


def test_noise_ratio_and_correlation_agree(chains):
    clean_fbp, noisy_fbp, clean_img, noisy_img = chains
    m = _inner()
    n_ref = [(n - c)[m] for n, c in zip(noisy_fbp, clean_fbp)]
    n_mod = [(n - c)[m] for n, c in zip(noisy_img, clean_img)]
    ratio_ref = n_ref[1].std() / n_ref[0].std()
    ratio_mod = n_mod[1].std() / n_mod[0].std()
    assert ratio_mod == pytest.approx(ratio_ref, rel=0.15)
    corr_ref = np.corrcoef(*n_ref)[0, 1]
    corr_mod = np.corrcoef(*n_mod)[0, 1]
    assert corr_mod == pytest.approx(corr_ref, abs=0.05)

"""Measurement functions checked against images whose MTF / NPS are known analytically."""
import numpy as np
import pytest

from ltdiff_core import measure as M

PIX = 0.7


def _edge_image(kind: str, n: int = 128, ss: int = 4) -> np.ndarray:
    """Area-averaged (ss x ss) disc of radius 30 px or a 5-degree slanted edge, 0 / 1000 HU."""
    yy, xx = (np.indices((n * ss, n * ss)) + 0.5) / ss - n / 2 - 0.3
    if kind == "disc":
        inside = yy**2 + xx**2 < 30.0**2
    else:
        a = np.deg2rad(5.0)
        inside = xx * np.cos(a) + yy * np.sin(a) < 0
    return 1000.0 * inside.reshape(n, ss, n, ss).mean(axis=(1, 3))


def _gauss_blur(img: np.ndarray, sigma_mm: float) -> np.ndarray:
    fy = np.fft.fftfreq(img.shape[0], d=PIX)[:, None]
    fx = np.fft.fftfreq(img.shape[1], d=PIX)[None, :]
    h = np.exp(-2 * np.pi**2 * sigma_mm**2 * (fx**2 + fy**2))
    return np.real(np.fft.ifft2(np.fft.fft2(img) * h))


@pytest.mark.parametrize("kind", ["disc", "line"])
def test_edge_mtf_matches_known_gaussian_blur(kind):
    sigma_mm = 0.6
    img = _gauss_blur(_edge_image(kind), sigma_mm)
    crop = img if kind == "disc" else img[16:-16, 16:-16]
    e = M.edge_mtf(crop, PIX, kind=kind)
    f = np.linspace(0, 7, 7001)  # lp/cm
    expected = np.exp(-2 * np.pi**2 * sigma_mm**2 * (f / 10) ** 2) * np.sinc(PIX / 10 * f)
    assert e.mtf50 == pytest.approx(M.mtf50(f, expected), rel=0.03)
    assert e.mtf10 == pytest.approx(M.mtf10(f, expected), rel=0.04)
    assert e.peak == pytest.approx(1.0, abs=0.01)
    assert e.overshoot < 0.01


def test_mtf_at_interpolates_first_crossing():
    f = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    mtf = np.array([1.0, 1.2, 0.8, 0.3, 0.0])
    assert M.mtf_at(f, mtf, 0.5) == pytest.approx(2.6)
    assert M.mtf_at(f, mtf, 1.1) == pytest.approx(1.25)
    assert np.isnan(M.mtf_at(f, mtf, -0.1))


def test_overshoot_of_synthetic_profile():
    d = np.linspace(-10, 10, 2001)
    esf = 100.0 / (1 + np.exp(d / 0.3))  # bright side at negative distance, step 100
    bump = 12.0 * np.exp(-(((d + 2.5) / 0.3) ** 2))  # inside the bright plateau
    assert M.overshoot(d, esf) == pytest.approx(0.0, abs=1e-6)
    assert M.overshoot(d, esf + bump) == pytest.approx(0.12, abs=0.01)
    assert M.overshoot(-d, esf + bump) == pytest.approx(0.12, abs=0.01)  # orientation-free


def test_nps_of_white_noise_is_flat_and_integrates_to_variance():
    rng = np.random.default_rng(3)
    rois = rng.normal(0, 20.0, size=(40, 64, 64))
    nps, fy, fx = M.nps_2d(rois, PIX, detrend=0)
    df = (fy[1] - fy[0]) / 10 * (fx[1] - fx[0]) / 10  # per mm^2
    assert nps.sum() * df == pytest.approx(400.0, rel=0.03)
    f, nr = M.nps_radial(rois, PIX)
    assert f.max() <= 10 / (2 * PIX) + 1e-9
    assert np.allclose(nr[3:], 400.0 * PIX * PIX, rtol=0.15)


def test_nps_detrend_removes_background_plane():
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:64, 0:64]
    noise = rng.normal(0, 10.0, size=(20, 64, 64))
    _, clean = M.nps_radial(noise, PIX)
    _, sloped = M.nps_radial(noise + 3.0 * x + 2.0 * y, PIX, detrend=1)
    _, sloped_mean_only = M.nps_radial(noise + 3.0 * x + 2.0 * y, PIX, detrend=0)
    assert sloped[0] == pytest.approx(clean[0], rel=0.3)
    assert sloped_mean_only[0] > 10 * clean[0]


def test_nps_peak_frequency_of_band_pass_noise():
    rng = np.random.default_rng(5)
    rois = rng.normal(size=(30, 64, 64))
    f = np.hypot(np.fft.fftfreq(64, d=PIX / 10)[:, None], np.fft.fftfreq(64, d=PIX / 10)[None, :])
    band = np.exp(-0.5 * ((f - 4.0) / 0.8) ** 2)
    shaped = np.real(np.fft.ifft2(np.fft.fft2(rois) * band))
    fr, nr = M.nps_radial(shaped, PIX)
    assert M.nps_peak_frequency(fr, nr) == pytest.approx(4.0, abs=0.35)


def test_noise_std_with_and_without_trend():
    rng = np.random.default_rng(6)
    y, x = np.mgrid[0:80, 0:80]
    img = rng.normal(0, 15.0, size=(80, 80)) + 2.0 * x
    mask = np.zeros_like(img, dtype=bool)
    mask[10:70, 10:70] = True
    assert M.noise_std(img, mask, detrend=True) == pytest.approx(15.0, rel=0.05)
    assert M.noise_std(img, mask) > 30.0
    with pytest.raises(ValueError):
        M.noise_std(img, np.zeros_like(mask))

"""The fitted radial filter recovers a known transfer function, across pixel sizes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ltdiff_core.linear_filter import LinearFilterFitter, LinearKernelFilter, radial_frequency


def true_h(f_lpcm: np.ndarray) -> np.ndarray:
    """A sharpening kernel-like transfer: boost around 4 lp/cm, roll-off above."""
    return (1.0 + 0.8 * np.exp(-((f_lpcm - 4.0) / 1.5) ** 2)) * np.exp(-((f_lpcm / 9.0) ** 4))


def apply_true(img: np.ndarray, px: tuple[float, float]) -> np.ndarray:
    """Exact periodic filtering (the truth the fitter must find)."""
    return np.fft.irfft2(np.fft.rfft2(img) * true_h(radial_frequency(img.shape, px)), s=img.shape)


def _pair(seed: int, n: int, px: tuple[float, float], noise: float = 0.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 40, (n, n))
    b = apply_true(a, px) + (rng.normal(0, noise, (n, n)) if noise else 0)
    return a.astype(np.float32), b.astype(np.float32)


def _fit(noise: float = 0.0, px=(0.7, 0.7)) -> LinearKernelFilter:
    fitter = LinearFilterFitter(f_max_lpcm=10.0, bin_lpcm=0.2, pad=0)
    for s in range(4):
        fitter.add(*_pair(s, 96, px, noise), px)
    return fitter.fit()


def test_recovers_known_transfer_function():
    filt = _fit()
    f = np.linspace(0.3, 7.0, 50)  # below Nyquist of 0.7 mm pixels (7.1 lp/cm)
    rmse = np.sqrt(np.mean((filt.transfer(f).real - true_h(f)) ** 2))
    assert rmse < 0.02, rmse
    assert np.abs(filt.transfer(f).imag).max() < 0.02


def test_applied_filter_reproduces_target_and_transfers_across_pixel_size():
    filt = _fit()
    # 1 mm pixels: every frequency of that grid lies inside the fitted range (<= 7.1 lp/cm)
    for px in [(0.7, 0.7), (1.0, 1.0)]:
        a, b = _pair(99, 128, px)
        filt.pad = 0  # periodic test images: compare with exact periodic filtering
        err = filt.apply(a, px) - b
        assert np.sqrt(np.mean(err**2)) < 0.03 * b.std(), px


def test_residual_nps_matches_added_white_noise():
    sigma, px = 10.0, (0.7, 0.7)
    filt = _fit(noise=sigma)
    # white noise of std s has NPS = s^2 * dx * dy at every frequency
    expected = sigma**2 * px[0] * px[1]
    band = (filt.freq_lpcm > 1) & (filt.freq_lpcm < 6)
    assert np.median(filt.residual_nps[band]) == pytest.approx(expected, rel=0.25)
    a, _ = _pair(5, 128, px)
    added = filt.apply(a, px, noise_seed=3) - filt.apply(a, px)
    assert added.std() == pytest.approx(sigma, rel=0.25)


def test_round_trip_through_tensors():
    filt = _fit()
    back = LinearKernelFilter.from_tensors(filt.to_tensors("linear"), "linear", pad=filt.pad)
    a, _ = _pair(7, 64, (0.7, 0.7))
    np.testing.assert_allclose(back.apply(a, (0.7, 0.7)), filt.apply(a, (0.7, 0.7)), atol=1e-3)


def test_no_data_is_an_error():
    with pytest.raises(ValueError, match="no paired slices"):
        LinearFilterFitter().fit()


def test_torch_fft_path_equals_the_scipy_path():
    """On an accelerator the filter runs its FFTs in torch.fft (run here on the CPU through the same
    code): the same output as the SciPy path to float32 rounding, for a slice, for a volume longer
    than one device stack, and for an odd matrix."""
    from ltdiff_core.linear_filter import DEVICE_STACK

    filt = _fit()
    filt.pad = 8
    rng = np.random.default_rng(3)
    vol = rng.normal(0, 100, (DEVICE_STACK + 5, 40, 37)).astype(np.float32)
    for x in (vol[0], vol):
        ref = filt.apply(x, (0.7, 0.8))
        got = filt.apply(x, (0.7, 0.8), device="cpu")
        assert got.shape == ref.shape and got.dtype == np.float32
        assert float(np.abs(got - ref).max()) < 1e-3
    assert float(np.abs(filt.apply(vol, (0.7, 0.8), device="cpu") - vol).max()) > 1.0  # it filtered


def test_linear_device_on_a_machine_without_gpu(tmp_path, monkeypatch):
    """The linear default picks CUDA only where there is one; on a CPU-only machine "auto" is the
    CPU without importing torch, and asking for CUDA is an error, not a silent CPU run."""
    import subprocess
    import sys

    from ltdiff_core import standardizer as st

    code = ("import sys; from ltdiff_core import Standardizer; s = Standardizer.from_checkpoint('linear'); "
            "print(s.device, 'torch' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.split() == ["cpu", "False"] or st.NVIDIA_DRIVER.exists()
    assert st.linear_device("cpu") == "cpu"
    driver = tmp_path / "version"
    driver.write_text("NVRM version: test\n")
    monkeypatch.setattr(st, "NVIDIA_DRIVER", driver)  # a driver file, but torch decides
    import torch

    assert st.linear_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            st.linear_device("cuda")


def test_standardizer_runs_the_linear_filter_on_a_torch_device():
    """A Standardizer given a torch device (here "cpu:0", the torch path on the CPU) gives the same
    HU as the default SciPy path and names its device (it goes into the output's provenance)."""
    from ltdiff_core import Standardizer

    vol = (np.random.default_rng(1).standard_normal((6, 40, 48)) * 50).astype(np.float32)
    ref = Standardizer.from_checkpoint("linear", device="cpu")
    dev = Standardizer.from_checkpoint("linear", device="cpu:0")
    assert (ref.device, dev.device) == ("cpu", "cpu:0") and dev.info.device == "cpu:0"
    assert float(np.abs(dev.standardize(vol, (1.0, 0.7, 0.7)) - ref.standardize(vol, (1.0, 0.7, 0.7))).max()) < 1e-3

"""Image-domain CT "scanner": one acquisition reconstructed with two kernels.

Why image domain: a physics FBP chain (``fbp.py``) costs seconds per slice; filtering the truth
and one shared white-noise field with each kernel's transfer functions costs milliseconds and,
as the FBP reference test checks, gives the same MTF and noise ratio.

Per slice, for kernel ``k`` with signal MTF ``M_k`` and noise shape ``N_k``::

    img_k = IFFT( FFT(truth) * M_k  +  c_k * FFT(sigma_map * white) * N_k )
    img_k = admire_like(img_k, strength_k)            # IR-like nonlinear step
    img_k = clip(round(img_k), int16)                 # int16 storage

The white field is the *same* for both kernels (same raw data), so their noise is correlated.
``sigma_map`` is a smooth attenuation-dependent noise map (higher behind long/dense paths,
lower in air outside the body), normalised to RMS 1 over soft tissue so that ``noise_br40_hu``
is the Br40 soft-tissue noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from . import kernels
from .ir import admire_like

#: Br40 soft-tissue noise (HU) at the reference dose; Bl64 gets ``NOISE_RATIO_BL64_BR40`` times it.
REFERENCE_NOISE_BR40_HU = 16.0
#: Linear attenuation of water (1/mm) at an effective energy of about 70 keV.
MU_WATER_PER_MM = 0.0192
#: Soft-tissue HU window used to normalise the noise map.
SOFT_TISSUE_HU = (-150.0, 150.0)
INT16_RANGE = (-32768.0, 32767.0)
_PAD = 16  # reflect padding (pixels) so that FFT wrap-around does not leak across a crop
_CHUNK = 8  # slices per FFT batch: bounds memory, and fixes the order of random draws


@dataclass
class AcquisitionParams:
    """Per-case acquisition settings (dose and the IR strength chosen for each series)."""

    noise_br40_hu: float
    ir_strength_a: float
    ir_strength_b: float

    @property
    def ir_strength(self) -> tuple[float, float]:
        return (self.ir_strength_a, self.ir_strength_b)


def sample_acquisition(rng: np.random.Generator) -> AcquisitionParams:
    """Draw dose and IR strengths for one case.

    Br40 soft-tissue noise lies in 15-40 HU with 70 % of cases in 20-30 HU (typical chest
    protocols, with a tail of low- and high-dose scans). IR strength is drawn uniformly in
    0-5 per kernel, independently, as sites pick the ADMIRE level per series.
    """
    if rng.random() < 0.7:
        noise = rng.uniform(20.0, 30.0)
    else:
        noise = rng.uniform(15.0, 40.0)
    s_a, s_b = rng.uniform(0.0, 5.0, size=2)
    return AcquisitionParams(float(noise), float(s_a), float(s_b))


@lru_cache(maxsize=8)
def _filters(shape: tuple[int, int], pixel_mm: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per kernel: (signal MTF, noise filter scaled to give 1 HU soft-tissue noise for Br40)."""
    f_half = kernels.radial_frequency(shape, pixel_mm, real=True)
    f_full = kernels.radial_frequency(shape, pixel_mm, real=False)
    out = {}
    for name in kernels.KERNELS:
        # std of unit white noise after filtering = RMS of the filter over the full FFT grid
        rms = float(np.sqrt(np.mean(kernels.noise_shape(name, f_full) ** 2)))
        target = 1.0 if name == "Br40" else kernels.NOISE_RATIO_BL64_BR40
        noise = (kernels.noise_shape(name, f_half) * (target / rms)).astype(np.float32)
        signal = kernels.kernel_transfer(name, f_half).astype(np.float32)
        out[name] = (signal, noise)
    return out


def _line_integral_mean_exp(mu: np.ndarray, pixel_mm: float, gamma: float) -> np.ndarray:
    """Mean over 4 directions of ``exp(gamma * line integral)`` through each pixel (one slice)."""
    ny, nx = mu.shape
    yy, xx = np.indices((ny, nx))
    acc = np.exp(gamma * mu.sum(axis=1) * pixel_mm)[:, None] + np.exp(gamma * mu.sum(axis=0) * pixel_mm)[None, :]
    for idx in ((yy + xx).ravel(), (yy - xx + nx - 1).ravel()):
        p = np.bincount(idx, weights=mu.ravel(), minlength=ny + nx - 1) * pixel_mm * np.sqrt(2.0)
        acc = acc + np.exp(gamma * p)[idx].reshape(ny, nx)
    return acc / 4.0


def noise_map(truth_hu: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Relative noise amplitude per pixel for one ``(Y, X)`` slice.

    Quantum noise variance along a ray grows like ``exp(line integral)``; angular tube-current
    modulation roughly takes the square root of that, hence ``gamma = 0.5``. The variance of a
    reconstructed pixel averages its rays over 4 directions. The map is smoothed, clipped to a
    sane range, and normalised to RMS 1 over soft tissue so the dose parameter means
    "soft-tissue noise".
    """
    mu = MU_WATER_PER_MM * np.clip(1.0 + truth_hu.astype(np.float64) / 1000.0, 0.0, None)
    var = _line_integral_mean_exp(mu, pixel_mm, gamma=0.5)
    sigma = ndimage.gaussian_filter(np.sqrt(var), sigma=4.0 / pixel_mm, mode="nearest")
    soft = (truth_hu > SOFT_TISSUE_HU[0]) & (truth_hu < SOFT_TISSUE_HU[1])
    ref = sigma[soft] if soft.mean() > 0.01 else sigma
    sigma = sigma / np.sqrt(np.mean(ref**2))
    return np.clip(sigma, 0.15, 3.0).astype(np.float32)


def _to_int16_hu(img: np.ndarray) -> np.ndarray:
    """Round and clip as int16 storage would, kept as float32 for downstream maths."""
    return np.clip(np.rint(img), *INT16_RANGE).astype(np.float32)


def acquire_pair(
    truth_hu: np.ndarray,
    pixel_mm: float,
    rng: np.random.Generator,
    *,
    noise_br40_hu: float,
    ir_strength: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruct ``truth_hu`` (Z, Y, X) as a (Br40, Bl64) pair of float32 integer-valued HU.

    ``noise_br40_hu`` is the Br40 soft-tissue noise before IR (0 disables noise);
    ``ir_strength`` is the IR level (0-5) of the Br40 and the Bl64 series.
    """
    truth = np.asarray(truth_hu, dtype=np.float32)
    if truth.ndim != 3:
        raise ValueError(f"truth_hu must be (Z, Y, X), got shape {truth.shape}")
    nz, ny, nx = truth.shape
    shape = (ny + 2 * _PAD, nx + 2 * _PAD)
    filt = _filters(shape, float(pixel_mm))
    out = {name: np.empty_like(truth) for name in kernels.KERNELS}
    smap_all = np.ones_like(truth)
    for z0 in range(0, nz, _CHUNK):
        block = truth[z0 : z0 + _CHUNK]
        padded = np.pad(block, ((0, 0), (_PAD, _PAD), (_PAD, _PAD)), mode="reflect")
        spec_t = sfft.rfft2(padded, workers=-1)
        spec_n = None
        if noise_br40_hu > 0:
            white = rng.standard_normal(padded.shape, dtype=np.float32)
            smap = np.stack([noise_map(s, pixel_mm) for s in padded])
            smap_all[z0 : z0 + _CHUNK] = smap[:, _PAD : _PAD + ny, _PAD : _PAD + nx]
            spec_n = sfft.rfft2(white * smap * np.float32(noise_br40_hu), workers=-1)
        for name in kernels.KERNELS:
            signal_f, noise_f = filt[name]
            spec = spec_t * signal_f
            if spec_n is not None:
                spec = spec + spec_n * noise_f
            img = sfft.irfft2(spec, s=shape, workers=-1)[:, _PAD : _PAD + ny, _PAD : _PAD + nx]
            out[name][z0 : z0 + _CHUNK] = img
    strengths = dict(zip(kernels.KERNELS, ir_strength))
    sigma0 = {"Br40": noise_br40_hu, "Bl64": noise_br40_hu * kernels.NOISE_RATIO_BL64_BR40}
    for name in kernels.KERNELS:
        if strengths[name] > 0 and noise_br40_hu > 0:
            local = smap_all * np.float32(sigma0[name])
            out[name] = admire_like(out[name], strengths[name], pixel_mm, local)
        out[name] = _to_int16_hu(out[name])
    return out["Br40"], out["Bl64"]

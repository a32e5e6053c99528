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


#: Pixel spacing at which ``noise_br40_hu`` and the Bl64/Br40 ratio are calibrated.
CALIBRATION_PIXEL_MM = 0.7


@lru_cache(maxsize=8)
def _filters(shape: tuple[int, int], pixel_mm: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per kernel: (signal MTF, noise filter scaled to give 1 HU soft-tissue noise for Br40 at 0.7 mm).

    The noise scale is fixed on the calibration grid (0.7 mm, same matrix) and carried to other
    spacings so that the noise power spectrum in HU^2 mm^2 stays that of the same dose: at
    0.9 mm the sharp kernel loses its power above the lower Nyquist frequency, as a real
    reconstruction on a coarser grid does, instead of being rescaled to the 0.7 mm noise std.
    """
    f_half = kernels.radial_frequency(shape, pixel_mm, real=True)
    f_cal = kernels.radial_frequency(shape, CALIBRATION_PIXEL_MM, real=False)
    out = {}
    for name in kernels.KERNELS:
        # std of unit white noise after filtering = RMS of the filter over the full FFT grid;
        # white noise of unit variance per pixel has NPS = pixel area, hence the spacing factor
        rms = float(np.sqrt(np.mean(kernels.noise_shape(name, f_cal) ** 2)))
        target = 1.0 if name == "Br40" else kernels.NOISE_RATIO_BL64_BR40
        scale = (target / rms) * (CALIBRATION_PIXEL_MM / pixel_mm)
        noise = (kernels.noise_shape(name, f_half) * scale).astype(np.float32)
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


#: Rescan modes: ``independent`` redraws the whole white field; ``split`` keeps the part of it
#: that the Br40 series determines (per frequency) and redraws the rest.
RESCAN_MODES: tuple[str, str] = ("independent", "split")
#: ``split`` rescan: Br40 determines the white field at a frequency where its noise power is
#: well above ``SPLIT_FLOOR_REL**2`` times its peak (1 % by default); below that it is redrawn.
#: (The int16 rounding floor alone would leave Br40 determining nearly everything, as it does
#: in a noiseless, linear world; the 1 % level stands for what IR and rounding really erase.)
SPLIT_FLOOR_REL = 0.1


@lru_cache(maxsize=8)
def _split_weight(shape: tuple[int, int], pixel_mm: float, floor_rel: float) -> np.ndarray:
    """Per-frequency share ``alpha`` of the white field that Br40 determines.

    With Br40 noise amplitude ``s(f) = N_br40(f)`` and a floor ``q = floor_rel * max s``, the
    posterior correlation of ``W(f)`` with what Br40 shows is ``alpha = s^2 / (s^2 + q^2)``; the
    ratio does not depend on the dose, so neither does the split.
    """
    f_half = kernels.radial_frequency(shape, pixel_mm, real=True)
    s2 = kernels.noise_shape("Br40", f_half) ** 2
    q2 = float(floor_rel) ** 2 * float(s2.max())
    return (s2 / (s2 + q2)).astype(np.float32)


def _rescan_white(white: np.ndarray, fresh: np.ndarray, mode: str, pixel_mm: float, floor_rel: float) -> np.ndarray:
    """White field of the rescan: ``fresh`` (independent) or ``alpha*W + sqrt(1-alpha^2)*fresh`` per frequency."""
    if mode == "independent":
        return fresh
    alpha = _split_weight(white.shape[-2:], float(pixel_mm), float(floor_rel))
    mixed = alpha * sfft.rfft2(white, workers=-1) + np.sqrt(1.0 - alpha**2) * sfft.rfft2(fresh, workers=-1)
    return sfft.irfft2(mixed, s=white.shape[-2:], workers=-1).astype(np.float32)


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
    out = acquire(truth_hu, pixel_mm, rng, noise_br40_hu=noise_br40_hu, ir_strength=ir_strength)
    return out["Br40"], out["Bl64"]


def acquire(
    truth_hu: np.ndarray,
    pixel_mm: float,
    rng: np.random.Generator,
    *,
    noise_br40_hu: float,
    ir_strength: tuple[float, float],
    rescan_rng: np.random.Generator | None = None,
    rescan_mode: str = "independent",
    split_floor_rel: float = SPLIT_FLOOR_REL,
) -> dict[str, np.ndarray]:
    """Br40 and Bl64 (and, with ``rescan_rng``, ``RESCAN``) reconstructions of one acquisition.

    The rescan is a second Bl64 image of the same truth, dose and IR strength whose white field
    comes from ``rescan_rng`` (see ``RESCAN_MODES``); ``rng`` is consumed exactly as without a
    rescan, so Br40 and Bl64 do not change when a rescan is asked for.
    """
    if rescan_mode not in RESCAN_MODES:
        raise ValueError(f"rescan_mode must be one of {RESCAN_MODES}, got {rescan_mode!r}")
    truth = np.asarray(truth_hu, dtype=np.float32)
    if truth.ndim != 3:
        raise ValueError(f"truth_hu must be (Z, Y, X), got shape {truth.shape}")
    nz, ny, nx = truth.shape
    shape = (ny + 2 * _PAD, nx + 2 * _PAD)
    filt = _filters(shape, float(pixel_mm))
    # (output name, kernel whose filters it uses)
    series = [(name, name) for name in kernels.KERNELS] + ([("RESCAN", "Bl64")] if rescan_rng is not None else [])
    out = {name: np.empty_like(truth) for name, _ in series}
    smap_all = np.ones_like(truth)
    for z0 in range(0, nz, _CHUNK):
        block = truth[z0 : z0 + _CHUNK]
        padded = np.pad(block, ((0, 0), (_PAD, _PAD), (_PAD, _PAD)), mode="reflect")
        spec_t = sfft.rfft2(padded, workers=-1)
        spec_n: dict[str, np.ndarray] = {}
        if noise_br40_hu > 0:
            white = rng.standard_normal(padded.shape, dtype=np.float32)
            smap = np.stack([noise_map(s, pixel_mm) for s in padded])
            smap_all[z0 : z0 + _CHUNK] = smap[:, _PAD : _PAD + ny, _PAD : _PAD + nx]
            spec_n["Br40"] = spec_n["Bl64"] = sfft.rfft2(white * smap * np.float32(noise_br40_hu), workers=-1)
            if rescan_rng is not None:
                fresh = rescan_rng.standard_normal(padded.shape, dtype=np.float32)
                white_r = _rescan_white(white, fresh, rescan_mode, pixel_mm, split_floor_rel)
                spec_n["RESCAN"] = sfft.rfft2(white_r * smap * np.float32(noise_br40_hu), workers=-1)
        for name, kernel in series:
            signal_f, noise_f = filt[kernel]
            spec = spec_t * signal_f
            if name in spec_n:
                spec = spec + spec_n[name] * noise_f
            img = sfft.irfft2(spec, s=shape, workers=-1)[:, _PAD : _PAD + ny, _PAD : _PAD + nx]
            out[name][z0 : z0 + _CHUNK] = img
    strengths = dict(zip(kernels.KERNELS, ir_strength))
    sigma0 = {"Br40": noise_br40_hu, "Bl64": noise_br40_hu * kernels.NOISE_RATIO_BL64_BR40}
    for name, kernel in series:
        if strengths[kernel] > 0 and noise_br40_hu > 0:
            local = smap_all * np.float32(sigma0[kernel])
            out[name] = admire_like(out[name], strengths[kernel], pixel_mm, local)
        out[name] = _to_int16_hu(out[name])
    return out

"""Physics reference: parallel-beam projection with Poisson noise and filtered back-projection.

Why: the fast image-domain scanner (``scanner.py``) is a model of this chain; this slow
reference lets a test check that the model's MTF and noise ratio are those of a real FBP with
the same kernel windows ``W_k``.

Chain per 2D slice: HU -> attenuation ``mu`` -> ray-driven line integrals (bilinear sampling
along rays, rays oversampled across the detector; a pixel-driven projector would create moiré
that the sharp kernel amplifies) -> pre-detection blur and detector aperture -> Poisson counts
-> log -> ramp x ``W_k`` filter -> back-projection with linear interpolation -> HU.

The pre-detection blur makes the chain's total signal MTF equal to the scanner's ``Sys(f)``
times the scanner's pixel aperture: it divides out the blur the discretisation already adds
(detector aperture, interpolation in projector and back-projector, truth pixel aperture).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from . import kernels
from .scanner import MU_WATER_PER_MM

RAY_OVERSAMPLE = 2  # sub-rays per detector bin
_VIEW_CHUNK = 16


def mu_from_hu(hu: np.ndarray) -> np.ndarray:
    """Linear attenuation (1/mm); air and below clip to 0."""
    return MU_WATER_PER_MM * np.clip(1.0 + np.asarray(hu, dtype=np.float64) / 1000.0, 0.0, None)


def hu_from_mu(mu: np.ndarray) -> np.ndarray:
    return 1000.0 * (np.asarray(mu) / MU_WATER_PER_MM - 1.0)


def _centred_coords(n: int, spacing: float) -> np.ndarray:
    return (np.arange(n) - (n - 1) / 2.0) * spacing


def forward_project(mu: np.ndarray, pixel_mm: float, angles: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Line integrals (views, len(s)) for rays at detector positions ``s`` (mm); ray-driven, bilinear."""
    ny, nx = mu.shape
    half = 0.5 * np.hypot(ny, nx) * pixel_mm
    t = np.arange(-half, half + 1e-9, pixel_mm)  # one sample per pixel along each ray
    out = np.empty((len(angles), len(s)))
    for i0 in range(0, len(angles), _VIEW_CHUNK):
        th = angles[i0 : i0 + _VIEW_CHUNK, None, None]
        x = s[None, :, None] * np.cos(th) - t[None, None, :] * np.sin(th)
        y = s[None, :, None] * np.sin(th) + t[None, None, :] * np.cos(th)
        rows = y / pixel_mm + (ny - 1) / 2.0
        cols = x / pixel_mm + (nx - 1) / 2.0
        vals = ndimage.map_coordinates(mu, [rows.ravel(), cols.ravel()], order=1, mode="constant", cval=0.0)
        out[i0 : i0 + _VIEW_CHUNK] = vals.reshape(rows.shape).sum(axis=2) * pixel_mm
    return out


def _pre_detection_filter(f: np.ndarray, det_mm: float, recon_mm: float, truth_mm: float) -> np.ndarray:
    """Blur before detection so that the whole chain's MTF is ``Sys * sinc(recon pixel)``."""
    f_per_cm = np.abs(f)
    existing = (
        np.sinc(det_mm / 10 * f_per_cm) ** 2  # linear interpolation in the back-projector
        * np.sinc(truth_mm / 10 * f_per_cm) ** 3  # truth pixel aperture and bilinear projector
    )
    wanted = kernels.sys_mtf(f_per_cm) * np.sinc(recon_mm / 10 * f_per_cm)
    # Sys already holds the detector aperture, so the result is point-sampled afterwards
    return np.clip(wanted / np.maximum(existing, 1e-6), 0.0, 1.0)


def ramlak_ramp(n_det: int, det_mm: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Frequency response of the discrete Ram-Lak ramp (Kak & Slaney), zero-padded to a power of
    two of at least ``2 * n_det``: ``(ramp, f in lp/cm, padded length)``. Both FBP chains (this
    reference and the second phantom generator) window this one ramp with their own kernels."""
    n_pad = 1 << int(np.ceil(np.log2(2 * n_det)))
    k = np.arange(n_pad)
    k = np.where(k > n_pad // 2, k - n_pad, k)
    h = np.zeros(n_pad)
    h[k == 0] = 1.0 / (4.0 * det_mm**2)
    odd = k % 2 == 1
    h[odd] = -1.0 / (np.pi * k[odd] * det_mm) ** 2
    ramp = np.real(np.fft.fft(h)) * det_mm
    return ramp, np.fft.fftfreq(n_pad, d=det_mm / 10.0), n_pad


def _ramlak_window_filter(n_det: int, det_mm: float, name: str) -> tuple[np.ndarray, int]:
    """Frequency response of the discrete Ram-Lak ramp times the kernel window."""
    ramp, f, n_pad = ramlak_ramp(n_det, det_mm)
    return ramp * kernels.kernel_window(name, f), n_pad


def back_project(sino: np.ndarray, angles: np.ndarray, det_mm: float, shape: tuple[int, int], pixel_mm: float) -> np.ndarray:
    """Pixel-driven back-projection with linear interpolation along the detector."""
    n_det = sino.shape[1]
    yy = _centred_coords(shape[0], pixel_mm)[:, None]
    xx = _centred_coords(shape[1], pixel_mm)[None, :]
    img = np.zeros(shape)
    for i, th in enumerate(angles):
        u = (xx * np.cos(th) + yy * np.sin(th)) / det_mm + (n_det - 1) / 2.0
        i0 = np.clip(np.floor(u).astype(int), 0, n_det - 2)
        w = np.clip(u - i0, 0.0, 1.0)
        img += (1.0 - w) * sino[i, i0] + w * sino[i, i0 + 1]
    return img * np.pi / len(angles)


def fbp_pair(
    truth_hu: np.ndarray,
    truth_pixel_mm: float,
    rng: np.random.Generator,
    *,
    photons: float | None,
    recon_shape: tuple[int, int],
    recon_pixel_mm: float = 0.7,
    det_mm: float = 0.7,
    n_views: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scan one 2D slice once and reconstruct it with Br40 and Bl64 (float32 HU, unrounded).

    ``truth_hu`` may be finer than the reconstruction grid (e.g. 0.35 mm for 0.7 mm images),
    which keeps the projector's own blur small. ``photons`` is the unattenuated count per
    detector bin and view (``None``: noiseless). ``n_views`` over 180 degrees defaults to
    ``ceil(pi * n_det)``, twice the usual ``pi/2 * n_det`` sampling requirement.
    """
    fov = max(recon_shape) * recon_pixel_mm * np.sqrt(2.0)
    n_det = int(np.ceil(fov / det_mm)) + 4
    n_views = n_views or int(np.ceil(np.pi * n_det))
    angles = np.linspace(0.0, np.pi, n_views, endpoint=False)
    sub_mm = det_mm / RAY_OVERSAMPLE
    n_sub = n_det * RAY_OVERSAMPLE
    # sub-rays start at the first bin centre, so every RAY_OVERSAMPLE-th one is a bin centre
    s_sub = (np.arange(n_sub) - RAY_OVERSAMPLE * (n_det - 1) / 2.0) * sub_mm
    p_fine = forward_project(mu_from_hu(truth_hu), truth_pixel_mm, angles, s_sub)
    n_pad = 1 << int(np.ceil(np.log2(2 * n_sub)))
    f = np.fft.rfftfreq(n_pad, d=sub_mm / 10.0)
    blur = _pre_detection_filter(f, det_mm, recon_pixel_mm, truth_pixel_mm)
    p_blur = np.fft.irfft(np.fft.rfft(p_fine, n=n_pad, axis=1) * blur, n=n_pad, axis=1)[:, :n_sub]
    p = p_blur[:, ::RAY_OVERSAMPLE][:, :n_det]  # detector bins: the aperture is in ``blur``
    if photons is not None:
        counts = rng.poisson(photons * np.exp(-p))
        p = -np.log(np.maximum(counts, 0.5) / photons)
    out = []
    for name in kernels.KERNELS:
        filt, n_pad_r = _ramlak_window_filter(n_det, det_mm, name)
        q = np.real(np.fft.ifft(np.fft.fft(p, n=n_pad_r, axis=1) * filt, axis=1))[:, :n_det]
        mu = back_project(q, angles, det_mm, recon_shape, recon_pixel_mm)
        out.append(hu_from_mu(mu).astype(np.float32))
    return out[0], out[1]

"""Radial Wiener-style kernel filter: the fast deterministic fallback and the bar to clear.

``H(f) = <B conj(A)> / <|A|^2>`` is estimated per radial frequency bin with ``f`` in lp/cm
(from the pixel spacing), so one fitted filter applies to any matrix and pixel size. Slices are
reflect-padded before the FFT, identically in fitting and applying, so the body outline does
not wrap around. The residual's radial NPS is kept for the optional "linear+noise" variant.

Fitting weighs tissue (``window="body"``, the default): each pair's spectra are taken through a
smooth window inside the body found from the source image (:mod:`ltdiff_core.body`), so air,
a patient table, pixels at the storage clip and PixelPaddingValue outside the reconstruction
circle, which look alike in both kernels, do not pull the fitted sharpening towards 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import fft as sfft

from ltdiff_core.body import tissue_window, windowed

PAD = 32
DEFAULT_BIN_LPCM = 0.1
STACK = 8  # slices per FFT call in a volume: fewer calls, bounded memory
DEVICE_STACK = 64  # slices per FFT call on an accelerator (torch.fft), 64 x 576^2 float32 = 85 MB


def _padded(img: np.ndarray, pad: int) -> np.ndarray:
    return np.pad(img, pad, mode="reflect") if pad else img


def radial_frequency(shape: tuple[int, int], pixel_mm: tuple[float, float]) -> np.ndarray:
    """|f| in lp/cm on an ``rfft2`` grid of ``shape`` with pixel size ``(dy, dx)`` mm."""
    fy = np.fft.fftfreq(shape[0], d=pixel_mm[0])[:, None]
    fx = np.fft.rfftfreq(shape[1], d=pixel_mm[1])[None, :]
    return np.sqrt(fy**2 + fx**2) * 10.0


@dataclass
class LinearKernelFilter:
    """Fitted transfer function on radial bins (centres in lp/cm) plus residual NPS."""

    freq_lpcm: np.ndarray
    h_real: np.ndarray
    h_imag: np.ndarray
    residual_nps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    pad: int = PAD
    _grids: dict = field(default_factory=dict, repr=False, compare=False)

    def transfer(self, f_lpcm: np.ndarray) -> np.ndarray:
        """Complex H at arbitrary radial frequencies (held constant beyond the fitted range)."""
        return np.interp(f_lpcm, self.freq_lpcm, self.h_real) + 1j * np.interp(f_lpcm, self.freq_lpcm, self.h_imag)

    def transfer_grid(self, shape: tuple[int, int], pixel_mm: tuple[float, float]) -> np.ndarray:
        """H on the ``rfft2`` grid of a padded slice, complex64; computed once per shape and spacing
        (interpolating it cost as much as the FFTs, and every slice of a series shares it)."""
        key = (tuple(int(n) for n in shape), float(pixel_mm[0]), float(pixel_mm[1]))
        grid = self._grids.get(key)
        if grid is None:
            grid = self.transfer(radial_frequency(key[0], key[1:])).astype(np.complex64)
            if len(self._grids) >= 8:  # a node sees few geometries; never grow without bound
                self._grids.clear()
            self._grids[key] = grid
        return grid

    def apply(self, hu: np.ndarray, pixel_mm: tuple[float, float], *, noise_seed: int | None = None,
              device: str | None = None) -> np.ndarray:
        """Filter a slice ``(Y, X)`` or volume ``(Z, Y, X)`` in HU; adds residual-NPS noise if seeded.

        Single precision (the float32 input's own precision; differences to a float64 FFT are
        below 0.01 HU). A volume's slices share one transfer grid and go through the FFT in small
        stacks; every slice's result is the same as filtering it alone. ``device`` (a torch
        device, e.g. ``"cuda"``) runs the FFTs there with ``torch.fft`` (not with ``noise_seed``);
        ``None`` runs them with SciPy on the CPU.
        """
        hu = np.asarray(hu, dtype=np.float32)
        p = self.pad
        if device is not None and noise_seed is None:
            return self._apply_stacked(hu[None], pixel_mm, device)[0] if hu.ndim == 2 else \
                self._apply_stacked(hu, pixel_mm, device)
        if hu.ndim == 3:
            if noise_seed is not None:
                return np.stack([self.apply(s, pixel_mm, noise_seed=noise_seed * 100003 + i) for i, s in enumerate(hu)])
            return self._apply_stacked(hu, pixel_mm, None)
        x = _padded(hu, p)
        spec = sfft.rfft2(x, workers=-1) * self.transfer_grid(x.shape, pixel_mm)
        if noise_seed is not None and self.residual_nps.size:
            spec = spec + self._noise_spectrum(x.shape, radial_frequency(x.shape, pixel_mm), pixel_mm, noise_seed)
        out = sfft.irfft2(spec, s=x.shape, workers=-1)
        return out[p:p + hu.shape[0], p:p + hu.shape[1]].astype(np.float32)

    def _apply_stacked(self, vol: np.ndarray, pixel_mm: tuple[float, float], device: str | None) -> np.ndarray:
        """A float32 volume through the FFT in stacks sharing one transfer grid: SciPy on the CPU
        (``device`` None, :data:`STACK` slices a call) or ``torch.fft`` on a torch device
        (:data:`DEVICE_STACK`); the padding and the grid are the same either way."""
        p = self.pad
        stack = STACK if device is None else DEVICE_STACK
        rows, cols = slice(p, p + vol.shape[1]), slice(p, p + vol.shape[2])
        out = np.empty_like(vol)
        h: Any = None
        for k in range(0, vol.shape[0], stack):
            x = np.pad(vol[k:k + stack], ((0, 0), (p, p), (p, p)), mode="reflect") if p else vol[k:k + stack]
            if device is None:
                h = self.transfer_grid(x.shape[1:], pixel_mm)
                y = sfft.irfft2(sfft.rfft2(x, workers=-1) * h, s=x.shape[1:], workers=-1)[:, rows, cols]
            else:
                import torch

                if h is None:
                    h = torch.from_numpy(self.transfer_grid(x.shape[1:], pixel_mm)).to(device)
                t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
                y = torch.fft.irfft2(torch.fft.rfft2(t) * h, s=x.shape[1:])[:, rows, cols].cpu().numpy()
            out[k:k + stack] = y
        return out

    def _noise_spectrum(self, shape, f, pixel_mm, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        white = sfft.rfft2(rng.standard_normal(shape), workers=-1)
        nps = np.maximum(np.interp(f, self.freq_lpcm, self.residual_nps), 0.0)
        return white * np.sqrt(nps / (pixel_mm[0] * pixel_mm[1]))

    def to_tensors(self, prefix: str = "linear") -> dict[str, np.ndarray]:
        return {f"{prefix}.freq_lpcm": self.freq_lpcm.astype(np.float32), f"{prefix}.h_real": self.h_real.astype(np.float32),
                f"{prefix}.h_imag": self.h_imag.astype(np.float32),
                f"{prefix}.residual_nps": self.residual_nps.astype(np.float32)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], prefix: str = "linear", pad: int = PAD) -> "LinearKernelFilter":
        g = lambda k: np.asarray(tensors[f"{prefix}.{k}"], dtype=np.float64)  # noqa: E731
        return cls(g("freq_lpcm"), g("h_real"), g("h_imag"), g("residual_nps"), pad)


class LinearFilterFitter:
    """Accumulates cross- and auto-spectra over paired slices, then solves per radial bin."""

    def __init__(self, f_max_lpcm: float = 10.0, bin_lpcm: float = DEFAULT_BIN_LPCM, pad: int = PAD,
                 window: str | None = "body") -> None:
        if window not in ("body", None):
            raise ValueError(f"window must be 'body' or None, got {window!r}")
        self.edges = np.arange(0.0, f_max_lpcm + bin_lpcm, bin_lpcm)
        self.pad = pad
        self.window = window
        n = len(self.edges) - 1
        self.cross = np.zeros(n, np.complex128)
        self.auto = np.zeros(n, np.float64)
        self.slices: list[tuple[np.ndarray, np.ndarray, tuple[float, float]]] = []

    def _bins(self, f: np.ndarray) -> np.ndarray:
        return np.clip(np.digitize(f, self.edges) - 1, 0, len(self.edges) - 2)

    def _window(self, a: np.ndarray, pixel_mm: tuple[float, float]) -> np.ndarray | None:
        return tissue_window(a, pixel_mm) if self.window == "body" else None

    def add(self, a: np.ndarray, b: np.ndarray, pixel_mm: tuple[float, float]) -> None:
        """Add one paired slice (HU, same grid); a slice with no body in it adds nothing."""
        w = self._window(a, pixel_mm)
        if w is not None and not w.any():
            return
        a64, b64 = (a.astype(np.float64), b.astype(np.float64)) if w is None else (windowed(a, w), windowed(b, w))
        xa, xb = _padded(a64, self.pad), _padded(b64, self.pad)
        fa, fb = sfft.rfft2(xa, workers=-1), sfft.rfft2(xb, workers=-1)
        w = np.ones(fa.shape)
        w[:, 1:(xa.shape[1] + 1) // 2] = 2.0  # rfft half-plane: count conjugate partners
        idx = self._bins(radial_frequency(xa.shape, pixel_mm)).ravel()
        self.cross += np.bincount(idx, (w * fb * np.conj(fa)).real.ravel(), len(self.auto)) + 1j * np.bincount(
            idx, (w * fb * np.conj(fa)).imag.ravel(), len(self.auto))
        self.auto += np.bincount(idx, (w * np.abs(fa) ** 2).ravel(), len(self.auto))
        self.slices.append((a, b, pixel_mm))

    def fit(self, with_residual: bool = True) -> LinearKernelFilter:
        """Solve H per bin (empty bins interpolated) and measure the residual's radial NPS."""
        centres = 0.5 * (self.edges[1:] + self.edges[:-1])
        ok = self.auto > 1e-9 * self.auto.max()  # a bin with no power (DC after the windowed mean is removed) is empty
        if not ok.any():
            raise ValueError("no paired slices were added")
        h = np.zeros_like(self.cross)
        h[ok] = self.cross[ok] / self.auto[ok]
        if self.window is not None:
            # The windowed spectra hold no mean (it is removed before windowing), and both kernels
            # keep a region's mean HU (water stays 0 HU): the transfer at 0 lp/cm is 1.
            h[0], ok[0] = 1.0, True
        hr = np.interp(centres, centres[ok], h[ok].real)
        hi = np.interp(centres, centres[ok], h[ok].imag)
        filt = LinearKernelFilter(centres, hr, hi, np.zeros(len(centres)), self.pad)
        if with_residual:
            filt.residual_nps = self._residual_nps(filt, centres)
        return filt

    def _residual_nps(self, filt: LinearKernelFilter, centres: np.ndarray) -> np.ndarray:
        acc = np.zeros(len(centres))
        cnt = np.zeros(len(centres))
        for a, b, px in self.slices:
            r = b.astype(np.float64) - filt.apply(a, px)
            w = self._window(a, px)
            if w is None:
                r -= r.mean()
                norm = r.size
            else:  # the residual of the tissue, its power per unit of window energy
                r = windowed(r, w)
                norm = float((w ** 2).sum())
            spec = np.abs(np.fft.rfft2(r)) ** 2 * (px[0] * px[1]) / norm
            idx = self._bins(radial_frequency(r.shape, px)).ravel()
            acc += np.bincount(idx, spec.ravel(), len(centres))
            cnt += np.bincount(idx, None, len(centres))
        ok = cnt > 0
        return np.interp(centres, centres[ok], acc[ok] / cnt[ok])

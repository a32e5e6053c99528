"""In-plane resampling of CT slices to a network's training pixel spacing and back.

Why: the networks learned the sharp kernel's texture per *pixel*; fed a 0.9 mm series they
would put that texture at 0.7/0.9 of its physical frequency. Resampling to the training grid
before the network and back afterwards keeps the texture where it belongs in lp/cm.

Method: DCT-II resizing (``scipy.fft.dctn``, orthonormal): the spectrum of the symmetric
extension is zero-padded (finer grid) or truncated (coarser grid). It is band-limited, so it
neither blurs the noise texture (as spline interpolation would) nor wraps edges around (as a
plain FFT would); going to a finer grid and back is the identity up to float rounding. The
physical extent is kept (pixel centres at ``(k + 1/2) * spacing``), so the effective spacing is
``n * spacing / round(n * spacing / target)``, within half a pixel over the image of the target.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import scipy.fft as sfft

#: Used when a checkpoint does not record the pixel spacing it was trained on.
DEFAULT_MODEL_PIXEL_MM = 0.7
#: Relative spacing difference below which a series is used as it is (rounding in headers).
RELATIVE_TOLERANCE = 0.02
#: In-plane spacings a Standardizer handles, relative to its training spacing (0.49-0.98 mm for a
#: 0.7 mm model): network methods are resampled to their grid, the linear filter works in lp/cm.
#: Beyond it the field of view or the resolution differ too much from what the model learned.
SUPPORTED_RATIO = (0.7, 1.4)
#: Slice thicknesses the 2-D models are applied to. Thickness changes the noise level, which the
#: QA gate checks on its own (``ltdiff_core.qa``); the output's noise and band power follow the
#: sharp kernel alike at 1, 1.5 and 5 mm (docs/model-design.md, "Spacing").
SUPPORTED_THICKNESS_MM = (0.9, 5.1)


def model_pixel_mm(metadata: Mapping[str, Any]) -> float:
    """Training pixel spacing recorded in checkpoint metadata (``training.pixel_mm``), else 0.7 mm."""
    value = (metadata.get("training") or {}).get("pixel_mm")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return DEFAULT_MODEL_PIXEL_MM
    return value if value > 0 else DEFAULT_MODEL_PIXEL_MM


def supported_geometry(metadata: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The geometry a checkpoint's Standardizer handles, as QA envelope ranges (``lo``/``hi`` in mm):
    wider than the training data's own geometry, because of the resampling above."""
    px = model_pixel_mm(metadata)
    lo, hi = SUPPORTED_RATIO
    return {"pixel_spacing_mm": {"lo": round(px * lo, 4), "hi": round(px * hi, 4)},
            "slice_thickness_mm": {"lo": SUPPORTED_THICKNESS_MM[0], "hi": SUPPORTED_THICKNESS_MM[1]}}


def needs_resampling(pixel_mm: Sequence[float], target_mm: float, tol: float = RELATIVE_TOLERANCE) -> bool:
    """True when either in-plane spacing differs from ``target_mm`` by more than ``tol`` (relative)."""
    return any(abs(float(p) / float(target_mm) - 1.0) > tol for p in pixel_mm)


def resize_inplane(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """DCT-resize the last two axes of ``image`` to ``out_hw`` (float32); mean values are kept."""
    x = np.asarray(image, dtype=np.float64)
    ny, nx = x.shape[-2:]
    my, mx = int(out_hw[0]), int(out_hw[1])
    if (my, mx) == (ny, nx):
        return x.astype(np.float32)
    if min(my, mx) < 1:
        raise ValueError(f"output size must be positive, got {out_hw}")
    coef = sfft.dctn(x, type=2, norm="ortho", axes=(-2, -1), workers=-1)
    out = np.zeros(x.shape[:-2] + (my, mx))
    ky, kx = min(ny, my), min(nx, mx)
    out[..., :ky, :kx] = coef[..., :ky, :kx]
    res = sfft.idctn(out, type=2, norm="ortho", axes=(-2, -1), workers=-1)
    return (res * np.sqrt((my * mx) / (ny * nx))).astype(np.float32)


Restore = Callable[[np.ndarray], np.ndarray]


def to_model_grid(
    volume: np.ndarray, spacing: Sequence[float], target_mm: float, tol: float = RELATIVE_TOLERANCE
) -> tuple[np.ndarray, tuple[float, ...], Restore]:
    """Resample ``volume`` (``(Z, Y, X)`` or ``(Y, X)``) in-plane to about ``target_mm``.

    Returns the resampled volume, its spacing (same length as ``spacing``, in-plane entries
    replaced by the effective spacing) and a function that maps an output on that grid back
    to the input's grid. Within ``tol`` nothing is resampled and ``restore`` is the identity.
    """
    sp = tuple(float(s) for s in spacing)
    if len(sp) not in (2, 3) or min(sp[-2:]) <= 0:
        raise ValueError(f"spacing must be (dz, dy, dx) or (dy, dx) in mm, got {spacing}")
    vol = np.asarray(volume)
    if vol.ndim not in (2, 3) or not needs_resampling(sp[-2:], target_mm, tol):
        return vol, sp, lambda out: out
    ny, nx = vol.shape[-2:]
    my = max(2, int(round(ny * sp[-2] / target_mm)))
    mx = max(2, int(round(nx * sp[-1] / target_mm)))
    new_sp = sp[:-2] + (ny * sp[-2] / my, nx * sp[-1] / mx)

    def restore(out: np.ndarray) -> np.ndarray:
        return resize_inplane(out, (ny, nx))

    return resize_inplane(vol, (my, mx)), new_sp, restore

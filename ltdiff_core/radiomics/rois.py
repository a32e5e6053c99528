"""Regions of interest: tumour masks (2-D per slice, 3-D per tumour) and random discs in HU ranges.

Random ROIs follow the reference papers: discs placed at random in four HU ranges. A disc
centre is eligible in a range when the *local mean of the standard image over the disc itself*
lies in the range (the disc mean is the smoothing; on real data there is no truth image, and
the standard is the reconstruction the features are compared against). Discs must lie fully
inside the image with a margin, must not touch any tumour mask, and discs of one range never
overlap each other. Sampling uses ``numpy.random.default_rng([seed, crc32(case name), range
index])``, so the same inputs always give the same ROIs, whatever the order of cases.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.signal import fftconvolve

HU_RANGES: tuple[tuple[int, int], ...] = ((-800, -300), (-100, 250), (10, 250), (300, 800))
MARGIN = 2  # pixels around an ROI kept in its box, so gradients at the border see real data


def range_group(lo: float, hi: float) -> str:
    """Name of the ROI group of one HU range."""
    return f"hu[{lo:g},{hi:g}]"


@dataclass(frozen=True)
class Roi:
    """One ROI: ``mask`` is defined inside the volume sub-box ``box`` (z, y, x slices)."""

    group: str
    name: str
    box: tuple[slice, slice, slice]
    mask: np.ndarray = field(repr=False)
    is3d: bool

    def full_mask(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The ROI as a boolean mask of the whole volume."""
        out = np.zeros(shape, bool)
        out[self.box] = self.mask
        return out


def _box(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...], margin: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(max(0, int(a) - m), min(s, int(b) + 1 + m)) for a, b, s, m in zip(lo, hi, shape, margin))


def tumour_rois(masks: list[np.ndarray], names: list[str] | None = None, min_pixels: int = 16) -> list[Roi]:
    """Per-slice 2-D ROIs (slices with at least ``min_pixels`` tumour pixels) and one 3-D ROI per tumour."""
    out: list[Roi] = []
    names = names or [f"tumour{i}" for i in range(len(masks))]
    for tname, m in zip(names, masks):
        m = np.asarray(m, bool)
        if m.sum() < min_pixels:
            continue
        idx = np.argwhere(m)
        box3 = _box(idx.min(0), idx.max(0), m.shape, (1, MARGIN, MARGIN))
        out.append(Roi("tumour3d", f"{tname}", box3, m[box3].copy(), True))
        for z in np.flatnonzero(m.sum(axis=(1, 2)) >= min_pixels):
            yx = np.argwhere(m[z])
            b = _box(yx.min(0), yx.max(0), m.shape[1:], (MARGIN, MARGIN))
            box = (slice(int(z), int(z) + 1), b[0], b[1])
            out.append(Roi("tumour2d", f"{tname}/z{int(z)}", box, m[box].copy(), False))
    return out


def disc(radius_mm: float, pixel_mm: tuple[float, float]) -> np.ndarray:
    """Boolean disc footprint of a physical radius on an anisotropic pixel grid."""
    dy, dx = pixel_mm
    ry, rx = int(radius_mm // dy), int(radius_mm // dx)
    y, x = np.mgrid[-ry:ry + 1, -rx:rx + 1]
    return (y * dy) ** 2 + (x * dx) ** 2 <= radius_mm ** 2


def local_disc_mean(image: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Mean of each slice over the disc centred on every pixel (float32, same shape)."""
    k = footprint.astype(np.float64) / footprint.sum()
    out = np.empty(image.shape, np.float32)
    for z in range(image.shape[0]):
        out[z] = fftconvolve(image[z].astype(np.float64), k, mode="same")
    return out


def random_rois(standard: np.ndarray, spacing: tuple[float, float, float], tumour_masks: list[np.ndarray],
                *, case_name: str, seed: int = 0, radius_mm: float = 7.0, max_per_range: int = 20,
                ranges: tuple[tuple[int, int], ...] = HU_RANGES, max_tries: int = 200) -> list[Roi]:
    """Up to ``max_per_range`` non-overlapping disc ROIs per HU range (see module docstring)."""
    std = np.asarray(standard, np.float32)
    zn, yn, xn = std.shape
    fp = disc(radius_mm, spacing[1:])
    ry, rx = fp.shape[0] // 2, fp.shape[1] // 2
    lm = local_disc_mean(std, fp)
    free = np.zeros(std.shape, bool)
    free[:, ry + MARGIN:yn - ry - MARGIN, rx + MARGIN:xn - rx - MARGIN] = True
    if tumour_masks:
        tum = np.any(np.stack([np.asarray(m, bool) for m in tumour_masks]), axis=0)
        near = ndimage.binary_dilation(tum, structure=fp[None]) if tum.any() else tum
        free &= ~near
    out: list[Roi] = []
    for ri, (lo, hi) in enumerate(ranges):
        rng = np.random.default_rng([seed, zlib.crc32(case_name.encode()), ri])
        valid = free & (lm >= lo) & (lm <= hi)
        counts = valid.sum(axis=(1, 2)).astype(np.float64)
        if counts.sum() == 0:
            continue
        taken: list[tuple[int, int, int]] = []
        tries = 0
        while len(taken) < max_per_range and tries < max_tries * max(1, max_per_range):
            tries += 1
            z = int(rng.choice(zn, p=counts / counts.sum()))
            flat = np.flatnonzero(valid[z])
            cy, cx = divmod(int(flat[rng.integers(flat.size)]), xn)
            if any(tz == z and ((ty - cy) * spacing[1]) ** 2 + ((tx - cx) * spacing[2]) ** 2 < (2 * radius_mm) ** 2
                   for tz, ty, tx in taken):
                continue
            taken.append((z, cy, cx))
        for k, (z, cy, cx) in enumerate(taken):
            box = (slice(z, z + 1), slice(cy - ry - MARGIN, cy + ry + MARGIN + 1),
                   slice(cx - rx - MARGIN, cx + rx + MARGIN + 1))
            mask = np.pad(fp, MARGIN)[None]
            out.append(Roi(range_group(lo, hi), f"{range_group(lo, hi)}#{k}@z{z},y{cy},x{cx}", box, mask, False))
    return out

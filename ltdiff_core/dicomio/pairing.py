"""Match the slices of two reconstructions of the same acquisition.

Two series reconstructed from the same raw data (e.g. Br40 and Bl64) share a
FrameOfReferenceUID and, slice for slice, a position along the normal. Slices are paired by
that position: each slice of ``a`` takes the nearest unused slice of ``b`` within ``tol_mm``.
The default tolerance is a quarter of the smaller slice spacing, small enough that a
neighbouring slice can never be taken for the matching one, large enough for rounding in
ImagePositionPatient. Series that differ in orientation or in-plane geometry are refused
instead of resampled: pairing must never move pixels.
"""
from __future__ import annotations

import numpy as np

from ltdiff_core.dicomio.reader import ORIENTATION_TOL, SPACING_TOL_MM, Series


class PairingError(ValueError):
    """Two series cannot be matched slice by slice; the message lists every reason."""


def default_tolerance(a: Series, b: Series) -> float:
    """A quarter of the smaller slice spacing, in mm."""
    return 0.25 * min(float(a.spacing[0]), float(b.spacing[0]))


def _in_plane_origin(series: Series) -> np.ndarray:
    """Median in-plane offset of the first pixel (row and column coordinates, mm)."""
    iop = np.asarray(series.orientation, dtype=np.float64)
    return np.median(series.positions @ np.stack([iop[:3], iop[3:]]).T, axis=0)


def geometry_problems(a: Series, b: Series) -> list[str]:
    """Every reason why ``a`` and ``b`` do not share a slice geometry (empty when they do)."""
    problems = []
    if a.frame_of_reference_uid != b.frame_of_reference_uid or not a.frame_of_reference_uid:
        problems.append(
            f"FrameOfReferenceUID differs: {a.frame_of_reference_uid or '<none>'} vs "
            f"{b.frame_of_reference_uid or '<none>'}"
        )
    if not np.allclose(a.orientation, b.orientation, atol=ORIENTATION_TOL):
        problems.append(
            f"ImageOrientationPatient differs: {np.round(a.orientation, 4).tolist()} vs "
            f"{np.round(b.orientation, 4).tolist()}"
        )
    if not np.allclose(a.spacing[1:], b.spacing[1:], atol=SPACING_TOL_MM):
        problems.append(f"PixelSpacing differs: {list(a.spacing[1:])} vs {list(b.spacing[1:])}")
    if a.hu.shape[1:] != b.hu.shape[1:]:
        problems.append(f"Rows/Columns differ: {a.hu.shape[1:]} vs {b.hu.shape[1:]}")
    if not problems:
        shift = np.abs(_in_plane_origin(a) - _in_plane_origin(b))
        if np.any(shift > 0.5 * np.asarray(a.spacing[1:][::-1])):
            problems.append(f"in-plane origin differs by {np.round(shift, 3).tolist()} mm (row, column)")
    return problems


def pair_series(
    a: Series, b: Series, tol_mm: float | None = None, min_matches: int = 1
) -> list[tuple[int, int]]:
    """Pairs ``(i_a, i_b)`` of slices at the same position along the normal, ascending.

    ``tol_mm`` defaults to :func:`default_tolerance`. Raises :class:`PairingError` when the
    geometries differ or fewer than ``min_matches`` slices match.
    """
    problems = geometry_problems(a, b)
    if problems:
        raise PairingError(f"cannot pair {a.series_uid} with {b.series_uid}: " + "; ".join(problems))
    tol = default_tolerance(a, b) if tol_mm is None else float(tol_mm)
    za = a.positions @ a.normal
    zb = b.positions @ a.normal
    # Closest pairs first, so a slice never steals the partner of a better-matching one.
    dist = np.abs(za[:, None] - zb[None, :])
    candidates = sorted(zip(*np.nonzero(dist <= tol)), key=lambda ij: dist[ij])
    used_a: set[int] = set()
    used_b: set[int] = set()
    pairs = []
    for i, j in candidates:
        if i not in used_a and j not in used_b:
            used_a.add(int(i))
            used_b.add(int(j))
            pairs.append((int(i), int(j)))
    pairs.sort()
    if len(pairs) < max(1, min_matches):
        raise PairingError(
            f"only {len(pairs)} of {len(za)}/{len(zb)} slices match within {tol:.3f} mm "
            f"(need {max(1, min_matches)}); slice positions {za.min():.2f}..{za.max():.2f} mm vs "
            f"{zb.min():.2f}..{zb.max():.2f} mm"
        )
    return pairs

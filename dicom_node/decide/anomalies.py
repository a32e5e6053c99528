"""Series-level checks made when a series is complete, before it is routed to the model.

Reading only the headers of the spooled instances, decide what may be standardized:

* ``ImageType`` containing ``LOCALIZER`` (topogram/scout): kept in the spool, not standardized
  (the instance is marked ``excluded``); a series of localizers only is ``ignored``.
* per-slice consistency of ``ConvolutionKernel``, ``ImageOrientationPatient``, ``PixelSpacing``
  and ``Rows``/``Columns``: a mix is *refused* whole, with the counts in the reason. (A
  mixed-kernel series is not split: which part the sender meant is not ours to guess.)
* matrix above ``processing.max_matrix``: refused.
* gaps in slice positions (a step above 1.5x the median) and slices sharing a position:
  recorded; shared positions are refused (the volume would be ambiguous), gaps are processed.

Every finding is returned as ``(kind, sop_instance_uid, detail)`` for the series' provenance.
Pixel-spacing limits depend on the model and are checked at processing time
(:func:`spacing_refusal`).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from ltdiff_core.resample import SUPPORTED_RATIO

GAP_FACTOR = 1.5  # a step this many times the median step is a gap
POSITION_TOL_MM = 1e-3
SPACING_TOL_MM = 1e-3
ORIENTATION_TOL = 1e-4
# The model's pixel-spacing range relative to its training spacing.
SPACING_RATIO_RANGE = SUPPORTED_RATIO


@dataclass
class SeriesCheck:
    """Outcome of :func:`check_series`."""

    refusal: str | None = None
    excluded: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> reason
    findings: list[tuple[str, str | None, str]] = field(default_factory=list)
    included: int = 0  # instances that would be standardized

    @property
    def all_excluded(self) -> bool:
        return self.refusal is None and self.included == 0 and bool(self.excluded)


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value if value is not None else "")


def _mix(label: str, values: Sequence[str]) -> str:
    counts = Counter(values)
    return f"mixed {label}: " + ", ".join(f"{v or '(none)'} x{n}" for v, n in counts.most_common())


def check_series(instances: Sequence[tuple[str, Path]], max_matrix: int) -> SeriesCheck:
    """Check the spooled ``(SOPInstanceUID, path)`` of one complete series."""
    out = SeriesCheck()
    headers = []
    for uid, path in instances:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        except Exception as exc:
            out.refusal = f"instance {uid} cannot be read: {type(exc).__name__}: {exc}"[:500]
            out.findings.append(("unreadable", uid, out.refusal))
            return out
        if "LOCALIZER" in image_type:
            out.excluded[uid] = "localizer (ImageType LOCALIZER): kept, not standardized"
            continue
        headers.append((uid, ds))
    if out.excluded:
        out.findings.append(("localizer", None, f"{len(out.excluded)} localizer instance(s) kept, not standardized"))
    out.included = len(headers)
    if not headers:
        return out

    try:
        kernels = [_text(ds.get("ConvolutionKernel")) for _, ds in headers]
    except Exception as exc:
        out.refusal = f"ConvolutionKernel cannot be read: {type(exc).__name__}: {exc}"[:500]
        out.findings.append(("unreadable", None, out.refusal))
        return out
    if len(set(kernels)) > 1:
        out.refusal = _mix("ConvolutionKernel", kernels) + " (series refused whole, not split)"
        out.findings.append(("mixed_kernel", None, out.refusal))
        return out
    try:
        iops = [np.asarray(ds.ImageOrientationPatient, dtype=float) for _, ds in headers]
        spacings = [np.asarray(ds.PixelSpacing, dtype=float) for _, ds in headers]
        sizes = [(int(ds.Rows), int(ds.Columns)) for _, ds in headers]
        ipps = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for _, ds in headers])
    except Exception as exc:
        out.refusal = f"geometry cannot be read: {type(exc).__name__}: {exc}"
        out.findings.append(("geometry", None, out.refusal))
        return out
    for label, values, close in (
        ("ImageOrientationPatient", iops, lambda a, b: np.allclose(a, b, atol=ORIENTATION_TOL)),
        ("PixelSpacing", spacings, lambda a, b: np.allclose(a, b, atol=SPACING_TOL_MM)),
        ("Rows/Columns", sizes, lambda a, b: a == b),
    ):
        if not all(close(v, values[0]) for v in values):
            out.refusal = _mix(label, [str(np.round(v, 4).tolist()) if label != "Rows/Columns" else f"{v[0]}x{v[1]}"
                                       for v in values])
            out.findings.append(("mixed_" + label.split("/")[0].lower(), None, out.refusal))
            return out
    rows, cols = sizes[0]
    if max(rows, cols) > max_matrix:
        out.refusal = f"matrix {rows}x{cols} exceeds processing.max_matrix {max_matrix}"
        out.findings.append(("geometry", None, out.refusal))
        return out

    row, col = iops[0][:3], iops[0][3:]
    normal = np.cross(row, col)
    along = ipps @ (normal / max(np.linalg.norm(normal), 1e-9))
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    same = np.flatnonzero(steps < POSITION_TOL_MM)
    if same.size:
        uids = [headers[order[i]][0] for i in (int(same[0]), int(same[0]) + 1)]
        out.refusal = (f"{same.size} pair(s) of slices share a position along the normal "
                       f"(e.g. {uids[0]} and {uids[1]} at {along[order][int(same[0])]:.3f} mm)")
        out.findings.append(("duplicate_position", uids[1], out.refusal))
        return out
    if steps.size >= 2:
        median = float(np.median(steps))
        for i in np.flatnonzero(steps > GAP_FACTOR * median):
            uid = headers[order[int(i) + 1]][0]
            out.findings.append(("gap", uid, f"gap of {steps[i]:.2f} mm before this slice (median step "
                                              f"{median:.2f} mm); processed slice by slice"))
    return out


def spacing_refusal(pixel_mm: float, trained_pixel_mm: float | None) -> str | None:
    """Pixel spacing outside what the model handles (resampled to its grid within the range)."""
    if not trained_pixel_mm:
        return None
    lo, hi = SPACING_RATIO_RANGE
    ratio = pixel_mm / float(trained_pixel_mm)
    if lo <= ratio <= hi:
        return None
    return (f"pixel spacing {pixel_mm:.3f} mm is outside the model's range {lo * trained_pixel_mm:.2f}-"
            f"{hi * trained_pixel_mm:.2f} mm (trained at {trained_pixel_mm:.2f} mm); refused")

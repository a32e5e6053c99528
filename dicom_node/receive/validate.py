"""Validation at receive: what must hold before an instance may be acknowledged with 0x0000.

An instance that the node could not process correctly later (a UID that is not a UID, a missing
identifier, an image without geometry) is refused *now*, with a failure status and a reason, so
the sender keeps its copy and its operator sees why. Checks are on the header only (the data set
is decoded lazily by pynetdicom); nothing here touches the database or the disk.

Statuses (PS3.4 B.2.3): ``0xA900`` "data set does not match SOP class" for a missing or
inconsistent required attribute, ``0xC000`` "cannot understand" for a value that is not valid
(UID syntax, length, undecodable header).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

# PS3.5 9.1: components of digits without leading zeros, separated by dots, at most 64 characters.
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UID_MAX = 64
# Attributes a CT image needs to be placed in a volume (type 1 in the Image Plane/Pixel modules).
IMAGE_ATTRIBUTES = ("Rows", "Columns", "PixelData", "ImagePositionPatient", "ImageOrientationPatient",
                    "PixelSpacing", "BitsAllocated")


@dataclass(frozen=True)
class Refusal:
    """Why an instance is not acknowledged: the C-STORE status and a one-line reason."""

    status: int
    reason: str

    @property
    def status_hex(self) -> str:
        return f"0x{self.status:04X}"


def clean_uid(value: Any) -> str:
    """A UID value as text without the NUL/space padding DICOM allows."""
    return str(value if value is not None else "").strip().rstrip("\x00").strip()


def uid_problem(value: Any) -> str | None:
    """``None`` for a valid UID, else what is wrong with it (never echoes more than 80 chars)."""
    uid = clean_uid(value)
    if not uid:
        return "missing"
    if len(uid) > UID_MAX:
        return f"{len(uid)} characters (UIDs have at most {UID_MAX})"
    if not UID_RE.match(uid):
        return f"not a valid UID {uid[:80]!r} (digits and dots, no leading zeros, no empty component)"
    return None


def printable(value: Any, limit: int = 64) -> str:
    """A received value safe to store, log and echo in an Error Comment (default character
    repertoire): printable ASCII only, cut to ``limit``."""
    text = "".join(c if " " <= c <= "~" else "?" for c in str(value if value is not None else ""))
    return text[:limit]


def _numbers(ds: Dataset, keyword: str, count: int) -> list[float] | None:
    try:
        values = [float(v) for v in ds[keyword].value]
    except (KeyError, TypeError, ValueError):
        return None
    return values if len(values) == count else None


def check_instance(ds: Dataset, affected_sop_uid: str, affected_sop_class: str) -> Refusal | None:
    """Refusal for a C-STORE whose data set the node must not acknowledge, else ``None``."""
    problem = uid_problem(affected_sop_uid)
    if problem:
        return Refusal(STATUS_CANNOT_UNDERSTAND, f"Affected SOP Instance UID {problem}")
    problem = uid_problem(affected_sop_class)
    if problem:
        return Refusal(STATUS_CANNOT_UNDERSTAND, f"Affected SOP Class UID {problem}")
    try:
        values = {k: ds.get(k) for k in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID")}
    except Exception as exc:  # a header pydicom cannot decode comes in many exception types
        return Refusal(STATUS_CANNOT_UNDERSTAND, f"data set cannot be decoded: {type(exc).__name__}: {exc}"[:200])
    for keyword, value in values.items():
        problem = uid_problem(value)
        if problem == "missing":
            return Refusal(STATUS_DATASET_MISMATCH, f"{keyword} missing")
        if problem:
            return Refusal(STATUS_CANNOT_UNDERSTAND, f"{keyword} {problem}")
    if clean_uid(values["SOPInstanceUID"]) != clean_uid(affected_sop_uid):
        return Refusal(STATUS_DATASET_MISMATCH, "SOPInstanceUID differs from the Affected SOP Instance UID")
    if clean_uid(values["SOPClassUID"]) != clean_uid(affected_sop_class):
        return Refusal(STATUS_DATASET_MISMATCH, "SOPClassUID differs from the Affected SOP Class UID")
    return check_image(ds)


def check_image(ds: Dataset) -> Refusal | None:
    """A single-frame greyscale image with geometry (what the reader needs to build a volume)."""
    try:
        missing = [k for k in IMAGE_ATTRIBUTES if k not in ds or ds[k].value in (None, b"", "")]
        if missing:
            return Refusal(STATUS_DATASET_MISMATCH, f"image attribute(s) missing: {', '.join(missing)}")
        rows, cols = int(ds.Rows), int(ds.Columns)
        if rows < 1 or cols < 1:
            return Refusal(STATUS_DATASET_MISMATCH, f"empty image matrix {rows}x{cols}")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            return Refusal(STATUS_DATASET_MISMATCH, f"not a greyscale image (SamplesPerPixel {ds.SamplesPerPixel})")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            return Refusal(STATUS_DATASET_MISMATCH, "multi-frame image; only single-frame CT images are processed")
        if int(ds.BitsAllocated) not in (8, 16, 32):
            return Refusal(STATUS_DATASET_MISMATCH, f"BitsAllocated {ds.BitsAllocated} not supported")
        if int(ds.get("BitsStored", ds.BitsAllocated) or 0) > int(ds.BitsAllocated):
            return Refusal(STATUS_DATASET_MISMATCH, f"BitsStored {ds.BitsStored} > BitsAllocated {ds.BitsAllocated}")
        slope = float(ds.get("RescaleSlope", 1) or 0)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        iop = _numbers(ds, "ImageOrientationPatient", 6)
        ipp = _numbers(ds, "ImagePositionPatient", 3)
        spacing = _numbers(ds, "PixelSpacing", 2)
    except Exception as exc:
        return Refusal(STATUS_CANNOT_UNDERSTAND, f"image header cannot be decoded: {type(exc).__name__}: {exc}"[:200])
    if not (math.isfinite(slope) and slope != 0 and math.isfinite(intercept)):
        return Refusal(STATUS_CANNOT_UNDERSTAND, f"RescaleSlope/RescaleIntercept {slope}/{intercept} unusable")
    if iop is None or ipp is None or spacing is None:
        return Refusal(STATUS_CANNOT_UNDERSTAND, "ImageOrientationPatient/ImagePositionPatient/PixelSpacing "
                                                 "not numeric with 6/3/2 values")
    if not all(math.isfinite(v) and abs(v) < 1e6 for v in iop + ipp + spacing) or min(spacing) <= 0:
        return Refusal(STATUS_CANNOT_UNDERSTAND, f"implausible geometry (non-finite, huge or zero): ImagePositionPatient "
                                                 f"{ipp}, PixelSpacing {spacing}"[:200])
    row, col = iop[:3], iop[3:]
    cross = [row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0]]
    if sum(c * c for c in cross) < 1e-6:
        return Refusal(STATUS_CANNOT_UNDERSTAND, "ImageOrientationPatient row and column vectors are parallel or zero")
    return None


def native_pixel_length_problem(ds: Dataset, transfer_syntax: Any) -> str | None:
    """For uncompressed transfer syntaxes: PixelData shorter than Rows x Columns x BitsAllocated/8."""
    if getattr(transfer_syntax, "is_compressed", True):
        return None
    try:
        need = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
        have = len(ds.PixelData)
    except Exception:
        return None
    if have < need:
        return f"PixelData has {have} bytes, {ds.Rows}x{ds.Columns}x{ds.BitsAllocated} bits need {need}"
    return None


def pixel_digest(ds: Dataset) -> str | None:
    """SHA-256 of the PixelData value as received (compares re-sends in the same transfer syntax)."""
    try:
        data = ds.PixelData
    except Exception:
        return None
    return hashlib.sha256(bytes(data)).hexdigest() if data is not None else None

"""Validation at receive: what must hold before an instance may be acknowledged with 0x0000.

An instance that the node could not process correctly later (a UID that is not a UID, a missing
identifier, an image without geometry) is refused *now*, with a failure status and a reason, so
the sender keeps its copy and its operator sees why. Checks are on the header only (the data set
is decoded lazily by pynetdicom); nothing here touches the database or the disk.

Statuses (PS3.4 B.2.3): ``0xA900`` "data set does not match SOP class" for a missing or
inconsistent required attribute, ``0xC000`` "cannot understand" for a value that is not valid
(UID syntax, length, undecodable header, a value length that does not fit its VR, a PixelData
whose length field claims more bytes than the data set holds), ``0x0122`` for an SOP class the
configuration does not accept (Enhanced CT unless ``node.accept_enhanced_ct``).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.dataelem import RawDataElement

from dicom_node.negotiation import ENHANCED_CT_SOP_CLASSES, STATUS_SOP_CLASS_NOT_SUPPORTED

STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
# The Image Pixel module's US attributes of value multiplicity 1 (PS3.3 C.7.6.3): 2 bytes each.
PIXEL_MODULE_US = {0x00280002: "SamplesPerPixel", 0x00280010: "Rows", 0x00280011: "Columns",
                   0x00280100: "BitsAllocated", 0x00280101: "BitsStored", 0x00280102: "HighBit",
                   0x00280103: "PixelRepresentation"}

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


_ENHANCED = frozenset(str(item[0] if isinstance(item, tuple) else item) for item in ENHANCED_CT_SOP_CLASSES)


def sop_class_refusal(affected_sop_class: str, accept_enhanced_ct: bool) -> Refusal | None:
    """Enhanced CT is negotiable (so that the sender sees a clear status, not an opaque "no
    presentation context"), but refused with 0x0122 unless the configuration accepts it."""
    if affected_sop_class in _ENHANCED and not accept_enhanced_ct:
        return Refusal(STATUS_SOP_CLASS_NOT_SUPPORTED, "Enhanced CT not accepted (node.accept_enhanced_ct = false)")
    return None


def request_refusal(affected_sop_uid: str, affected_sop_class: str) -> Refusal | None:
    """The C-STORE request's own UIDs (Affected SOP Instance/Class UID)."""
    problem = uid_problem(affected_sop_uid)
    if problem:
        return Refusal(STATUS_CANNOT_UNDERSTAND, f"Affected SOP Instance UID {problem}")
    problem = uid_problem(affected_sop_class)
    if problem:
        return Refusal(STATUS_CANNOT_UNDERSTAND, f"Affected SOP Class UID {problem}")
    return None


def check_received(ds: Dataset, affected_sop_uid: str, affected_sop_class: str, transfer_syntax: Any) -> Refusal | None:
    """Everything that must hold before a received data set is acknowledged."""
    refusal = check_instance(ds, affected_sop_uid, affected_sop_class)
    if refusal is None:
        problem = native_pixel_length_problem(ds, transfer_syntax)
        if problem:
            refusal = Refusal(STATUS_CANNOT_UNDERSTAND, problem)
    return refusal


def check_instance(ds: Dataset, affected_sop_uid: str, affected_sop_class: str) -> Refusal | None:
    """Refusal for a C-STORE whose data set the node must not acknowledge, else ``None``."""
    refusal = request_refusal(affected_sop_uid, affected_sop_class)
    if refusal is not None:
        return refusal
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
    # Before anything reads these: a raw element keeps its length field until it is converted.
    problem = pixel_module_length_problem(ds) or truncated_pixel_data(ds)
    if problem:
        return Refusal(STATUS_CANNOT_UNDERSTAND, problem)
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
        representation = int(ds.get("PixelRepresentation", 0) or 0)  # pixels are decoded by it
        if representation not in (0, 1):
            return Refusal(STATUS_CANNOT_UNDERSTAND, f"PixelRepresentation {representation} is neither 0 nor 1")
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


def pixel_module_length_problem(ds: Dataset) -> str | None:
    """A pixel-describing US value whose length is not 2 bytes (decoding the pixels would fail,
    after the instance was acknowledged)."""
    for tag, keyword in PIXEL_MODULE_US.items():
        try:
            elem = ds.get_item(tag)
        except Exception:  # noqa: BLE001 - reported by the checks that read it
            continue
        if isinstance(elem, RawDataElement) and elem.length not in (0, 2):
            return f"{keyword} (0028,{tag & 0xFFFF:04X}) has a value length of {elem.length} bytes; US is 2"
    return None


def truncated_pixel_data(ds: Dataset) -> str | None:
    """PixelData whose length field claims more bytes than the data set holds (a data set cut
    short: the value read is what was there, the file written would not parse)."""
    try:
        elem = ds.get_item(PIXEL_DATA)
    except Exception:  # noqa: BLE001 - reported by the checks that read it
        return None
    if not isinstance(elem, RawDataElement) or elem.length == UNDEFINED_LENGTH or elem.value is None:
        return None
    if len(elem.value) != elem.length:
        return f"PixelData length field says {elem.length} bytes, the data set holds {len(elem.value)}"
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

"""Is a re-sent SOP instance the same image? (identical duplicate versus conflict)

Senders re-send after timeouts, sometimes in another transfer syntax; that is an identical
duplicate and must be acknowledged. The same SOPInstanceUID with *other* pixel data is a
conflict (a broken UID generator, a tampered file) and must never be dropped silently. Same
transfer syntax: compare SHA-256 of the PixelData value. Different syntaxes: decode both.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset


def _stored_digest(path: Path) -> str | None:
    try:
        data = pydicom.dcmread(path, specific_tags=["PixelData"]).get("PixelData")
    except Exception:
        return None
    return hashlib.sha256(bytes(data)).hexdigest() if data is not None else None


# Header values that decide where and how a slice is used: a re-send that changes one of them is
# not the same instance, even with identical pixels.
GEOMETRY_KEYWORDS = ("SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                     "Rows", "Columns", "ConvolutionKernel", "RescaleSlope", "RescaleIntercept")


def header_differences(new: Dataset, stored: Path) -> list[str]:
    """Keywords of :data:`GEOMETRY_KEYWORDS` whose values differ from the stored instance's
    (an unreadable stored header counts as every one differing)."""
    try:
        ref = pydicom.dcmread(stored, stop_before_pixels=True)
    except Exception:
        return list(GEOMETRY_KEYWORDS)
    out = []
    for kw in GEOMETRY_KEYWORDS:
        try:
            a, b = new.get(kw), ref.get(kw)
            a = [str(v) for v in a] if isinstance(a, (list, tuple, pydicom.multival.MultiValue)) else a
            b = [str(v) for v in b] if isinstance(b, (list, tuple, pydicom.multival.MultiValue)) else b
            if str(a).strip("\x00 ") != str(b).strip("\x00 "):
                out.append(kw)
        except Exception:
            out.append(kw)
    return out


def same_pixels(new: Dataset, new_ts: str, new_digest: str | None, stored: Path, stored_ts: str,
                stored_digest: str | None) -> bool:
    """True when ``new`` carries the same pixel data as the instance stored at ``stored``.

    Anything that cannot be compared (unreadable file, undecodable pixels) counts as different:
    a conflict is quarantined for a person to look at, never lost.
    """
    if new_ts == stored_ts:
        stored_digest = stored_digest or _stored_digest(stored)
        return new_digest is not None and new_digest == stored_digest
    try:
        ref = pydicom.dcmread(stored)
        if getattr(new, "file_meta", None) is None or "TransferSyntaxUID" not in new.file_meta:
            new.file_meta = pydicom.dataset.FileMetaDataset()
            new.file_meta.TransferSyntaxUID = new_ts
        return bool(np.array_equal(ref.pixel_array, new.pixel_array))
    except Exception:
        return False

"""Is a re-sent SOP instance the same image? (identical duplicate versus conflict)

Senders re-send after timeouts, sometimes in another transfer syntax; that is an identical
duplicate and must be acknowledged. The same SOPInstanceUID with *other* pixel data is a
conflict (a broken UID generator, a tampered file) and must never be dropped silently. Same
transfer syntax: compare SHA-256 of the PixelData value. Different syntaxes: decode both.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicom_node.receive.incoming import IncomingDataSet
from dicom_node.receive.quarantine import Quarantine
from dicom_node.store import db, track


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


@dataclass(frozen=True)
class Conflict:
    """A copy that is not the stored instance: why, and where it is kept (``None``: not kept)."""

    reason: str
    quarantine: str | None


class Duplicates:
    """What to answer for a SOP Instance UID already stored: an identical re-send is acknowledged
    and recorded (``duplicate``); anything else is a conflict: the first copy is kept, the second
    goes to quarantine (when it may, see :mod:`dicom_node.receive.quarantine`) and is refused
    (``0xC000``) with the reason, recorded as ``conflict``."""

    def __init__(self, database: db.Database, spool_dir: Path, quarantine: Quarantine,
                 write_lock: threading.Lock) -> None:
        self.db = database
        self.spool_dir = spool_dir
        self.quarantine = quarantine
        self._write_lock = write_lock  # the receiver's: SQLite has one writer anyway

    def judge(self, ds: Dataset, incoming: IncomingDataSet, *, sop_uid: str, series_uid: str, ts_uid: str,
              digest: str | None, calling: str, peer: str) -> Conflict | None:
        """``None`` for an identical re-send (answer success); raises :class:`LookupError` when
        the first copy was purged meanwhile."""
        with self.db.session() as s:
            first = track.instance_by_uid(s, sop_uid)
            if first is None:
                raise LookupError(sop_uid)
            stored = self.spool_dir / first.path
            same = same_pixels(ds, ts_uid, digest, stored, first.transfer_syntax_uid, first.pixel_sha256)
            changed = header_differences(ds, stored) if same else []
            first_series_id, first_series_uid = first.series_id, first.series.series_uid
        if same and not changed:
            with self._write_lock, self.db.session() as s:
                track.record_anomaly(s, first_series_id, "duplicate", sop_uid,
                                     f"identical re-send from {calling}@{peer} acknowledged, not stored again")
            return None
        reason = "SOPInstanceUID already received with different pixel data (first copy kept)"
        if first_series_uid != series_uid:
            reason = "SOPInstanceUID already received in another series (first copy kept)"
        elif changed:
            reason = f"SOPInstanceUID already received with different {', '.join(changed)} (first copy kept)"
        kept = self.quarantine.keep(incoming, series_uid, sop_uid, digest)
        where = f"in {kept}" if kept else "not kept (disk watermark or disk.quarantine_max_mb)"
        with self._write_lock, self.db.session() as s:
            track.record_anomaly(s, first_series_id, "conflict", sop_uid,
                                 f"{reason}; second copy from {calling}@{peer} {where}")
        return Conflict(reason, kept)

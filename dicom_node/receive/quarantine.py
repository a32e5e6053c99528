"""Quarantine: conflicting copies kept for a person to inspect, within the disk's means.

A second copy of a SOP Instance UID with other pixels (or another series) is refused with
``0xC000`` and kept here, byte for byte as received, so that a broken UID generator or a
tampered file can be looked at. Copies are only evidence; the instances already acknowledged
are promises. So a copy is kept only

* while the disk watermark's headroom stays positive with it (quarantine counts against the
  watermark like received data, so the outputs of accepted series keep their room), and
* within ``disk.quarantine_max_mb``: to make room, the oldest copies are removed first, each with
  a log line (``quarantine_dropped``) and an audit record.

A copy that cannot be kept is still refused; its refusal row and the reason say "not kept".
"""
from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from dicom_node.audit import AuditLog
from dicom_node.logs import log_event
from dicom_node.receive.incoming import IncomingDataSet
from dicom_node.store.spool import fsync_dir, fsync_file, make_dirs, safe_name, unlink_quietly
from dicom_node.store.watermark import Watermark

log = logging.getLogger("dicom_node.receive.quarantine")

MiB = 1 << 20
# DICOM audit event ID for instances removed (PS3.16 CID 400), action D(elete)
STUDY_DELETED = {"csd-code": "110105", "codeSystemName": "DCM", "originalText": "DICOM Study Deleted"}


class Quarantine:
    """The quarantine folder of one node (``data_dir/quarantine/<series>/<sop>.<digest>.dcm``)."""

    def __init__(self, root: Path, watermark: Watermark, audit: AuditLog, max_mb: float) -> None:
        self.root = root
        self.watermark = watermark
        self.audit = audit
        self.max_bytes = int(max_mb * MiB)
        self._lock = threading.Lock()

    def keep(self, incoming: IncomingDataSet, series_uid: str, sop_uid: str, digest: str | None) -> str | None:
        """Move the received copy into quarantine; its path relative to the data directory, or
        ``None`` when it is not kept (the caller's file is then dropped)."""
        rel = f"{safe_name(series_uid)}/{safe_name(sop_uid)}.{(digest or 'nodigest')[:12]}.dcm"
        size = incoming.nbytes
        incoming.release()  # no output is made from a quarantined copy
        with self._lock:
            if size > self.max_bytes:
                return self._not_kept(rel, f"larger than disk.quarantine_max_mb ({self.max_bytes / MiB:g} MiB)")
            self._make_room(self.max_bytes - size)
            why = self.watermark.refusal()  # the copy's bytes are on the disk already
            if why is not None:
                return self._not_kept(rel, why)
            dest = self.root / rel
            new_dirs = make_dirs(dest.parent)
            os.replace(incoming.path, dest)
            fsync_file(dest)
            for d in {dest.parent, *new_dirs}:
                fsync_dir(d)
        return f"quarantine/{rel}"

    def _not_kept(self, rel: str, why: str) -> None:
        log_event(log, "quarantine_not_kept", level=logging.WARNING, path=f"quarantine/{rel}", reason=why)
        return None

    def copies(self) -> list[tuple[float, int, Path]]:
        """(modification time, bytes, path) of every copy, oldest first."""
        out = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                p = Path(dirpath, name)
                try:
                    st = p.stat()
                except OSError:
                    continue
                out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def _make_room(self, allowed: int) -> None:
        """Remove the oldest copies until at most ``allowed`` bytes are left."""
        copies = self.copies()
        used = sum(size for _, size, _ in copies)
        for _, size, path in copies:
            if used <= allowed:
                break
            unlink_quietly(path)
            used -= size
            rel = path.relative_to(self.root).as_posix()
            log_event(log, "quarantine_dropped", level=logging.WARNING, path=f"quarantine/{rel}", bytes=size,
                      reason=f"disk.quarantine_max_mb ({self.max_bytes / MiB:g} MiB) reached, oldest copy removed")
            self._audit_dropped(rel, size)

    def _audit_dropped(self, rel: str, size: int) -> None:
        """An audit record (RFC 3881 shape, UIDs only) for a copy removed to make room."""
        series, _, name = rel.partition("/")
        a = self.audit
        a.write({
            "EventIdentification": {
                "EventID": STUDY_DELETED, "EventActionCode": "D",
                "EventDateTime": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "EventOutcomeIndicator": 0,
                "EventOutcomeDescription": "quarantined copy removed: disk.quarantine_max_mb reached",
            },
            "ActiveParticipant": [{"UserID": a.ae_title, "AlternativeUserID": str(os.getpid()), "UserIsRequestor": True,
                                   "NetworkAccessPointID": a.host, "NetworkAccessPointTypeCode": "1"}],
            "AuditSourceIdentification": {"AuditSourceID": f"{a.ae_title}@{a.host}", "AuditEnterpriseSiteID": a.ae_title,
                                          "AuditSourceTypeCode": "4"},
            "ParticipantObjectIdentification": [{
                "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3",
                "ParticipantObjectID": series,
                "ParticipantObjectDetail": [{"type": "SeriesInstanceUID", "value": series},
                                            {"type": "SOPInstanceUID", "value": name.split(".dcm")[0].rsplit(".", 1)[0]}],
            }],
            "dicom_node": {"kind": "quarantine", "event": "dropped", "path": f"quarantine/{rel}", "bytes": size},
        })

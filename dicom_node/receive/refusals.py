"""Refusals at receive: every instance answered with a failure status leaves the same trail.

A refused instance is recorded (``refusals`` table, shown by ``dicom-node status``), logged
(``c_store_refused``) and audited (series event ``refused``), and its failure status carries the
reason as Error Comment (64 characters), so the sender's operator sees it too. Received values
are cut and made printable first: a refused UID may be over-long or hostile.
"""
from __future__ import annotations

import logging
import threading

from pydicom.dataset import Dataset

from dicom_node.audit import AuditLog
from dicom_node.logs import log_event
from dicom_node.receive.validate import Refusal, printable
from dicom_node.store import db, track

log = logging.getLogger("dicom_node.receive.scp")  # the receiver's lines, wherever they are written


def response(status: int, comment: str) -> Dataset:
    """A C-STORE response with a failure status and its reason."""
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = printable(comment, 64)
    return rsp


class Refusals:
    """Records the refusals of one receiver."""

    def __init__(self, database: db.Database, audit: AuditLog, write_lock: threading.Lock) -> None:
        self.db = database
        self.audit = audit
        self._write_lock = write_lock  # the receiver's: SQLite has one writer anyway

    def refuse(self, refusal: Refusal, sop_uid: str, series_uid: str | None, calling: str, peer: str,
               quarantine: str | None = None) -> Dataset:
        """Record, log and audit a refused instance; returns the response carrying the reason."""
        series_uid_db = printable(series_uid) if series_uid else None
        with self._write_lock, self.db.session() as s:
            track.record_refusal(s, calling_ae=printable(calling, 16), peer=printable(peer), status=refusal.status,
                                 sop_uid=printable(sop_uid), series_uid=series_uid_db, reason=refusal.reason,
                                 quarantine=quarantine)
        log_event(log, "c_store_refused", level=logging.WARNING, sop_instance_uid=printable(sop_uid),
                  series_uid=series_uid_db, calling_ae=calling, peer=peer, reason=refusal.reason,
                  status=refusal.status_hex)
        self.audit.series("refused", series_uid_db, None, success=False, reason=refusal.reason,
                          calling_ae=calling, peer=peer, sop_instance_uid=printable(sop_uid))
        return response(refusal.status, refusal.reason)

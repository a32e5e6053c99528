"""Receive: the node's Storage and Verification SCP (thin pynetdicom event handlers).

Each C-STORE is written raw (file meta + dataset exactly as received, no re-encode) to the spool
atomically and recorded in the database *before* the response says success; any failure to
persist returns a failure status, so the sender keeps its copy and retries. Instances arriving
together on concurrent associations share one pass of syncs and one transaction
(``groupcommit``). A duplicate SOPInstanceUID is acknowledged without a second file or row
(senders resend after timeouts).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import Verification

from dicom_node.store import db, track
from dicom_node.audit import audit_for
from dicom_node.receive.busy import BusyMeter
from dicom_node.config import NodeConfig
from dicom_node.receive.duplicates import header_differences, same_pixels
from dicom_node.receive.groupcommit import GroupCommitter, Outcome, Pending
from dicom_node.logs import log_event
from dicom_node.negotiation import (
    ACCEPTED_TRANSFER_SYNTAXES, ENHANCED_CT_SOP_CLASSES, STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED, STATUS_SUCCESS, STORAGE_SOP_CLASSES, reject_reason,
)
from dicom_node.store.spool import make_dirs, safe_name, write_atomic, write_pending
from dicom_node.tls import server_context
from dicom_node.receive.transport import ConnectionGate, Limits, no_delay, start_server, tls_peer
from dicom_node.version import IMPLEMENTATION_VERSION_NAME
from dicom_node.receive.validate import Refusal, check_instance, clean_uid, native_pixel_length_problem, pixel_digest, printable
from dicom_node.store.watermark import Watermark

log = logging.getLogger("dicom_node.receive.scp")

def _uids(items: Any) -> list[str]:
    """UIDs from the conformance constants (a sequence of UIDs, or a mapping keyed by UID)."""
    out = []
    for item in items:
        uid = item[0] if isinstance(item, tuple) else item
        out.append(str(uid))
    return out


@dataclass
class _AssocStats:
    calling_ae: str
    address: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    nbytes: int = 0
    last_store: float = -1e9  # monotonic time of the last C-STORE request


# An association that sent a C-STORE within this many seconds is expected to send the next one soon:
# the group committer waits (up to group_commit_ms) for those only, not for idle associations.
SENDER_ACTIVE_S = 1.0


def _part10(event: evt.Event) -> tuple[bytes, memoryview]:
    """The instance as a DICOM file in two pieces: the preamble, "DICM" and the file meta
    information, then the data set exactly as received, as a view of pynetdicom's buffer
    (``encoded_dataset()`` copies a CT slice's half megabyte twice). Release the view after use."""
    meta = b"\0" * 128 + b"DICM" + encode_file_meta(event.file_meta)
    return meta, event.request.DataSet.getbuffer()


class StorageSCP:
    """The receiving side: owns the pynetdicom AE and the C-ECHO/C-STORE handlers."""

    def __init__(self, config: NodeConfig, database: db.Database) -> None:
        self.config = config
        self.db = database
        self._server: Any = None
        self._servers: list[Any] = []  # every listener (plain TCP and/or TLS); _server is the first
        self.ports: dict[str, int] = {}
        self.gate = ConnectionGate(Limits.from_config(config))
        self._lock = threading.Lock()  # serialise DB writes: SQLite has one writer anyway
        self._stats: dict[int, _AssocStats] = {}
        self._hosts: dict[str, set[str]] = {}  # calling AE -> the addresses it may call from
        for a in config.allowed_calling_aes:
            if a.host:
                self._hosts.setdefault(a.ae_title, set()).update(a.addresses or (a.host,))
        self._enhanced = frozenset(_uids(ENHANCED_CT_SOP_CLASSES))
        self.watermark = Watermark(config, database)
        self.busy = BusyMeter()  # streaming waits while the handlers are saturated (busy.py)
        self.committer = GroupCommitter(database, audit_for(config), window_ms=config.node.group_commit_ms,
                                        max_group=config.node.group_commit_max,
                                        open_associations=self._active_senders,
                                        timeout_s=max(config.dimse_timeout_s, 30.0))
        self.ae = self._build_ae()

    # ------------------------------------------------------------------ set-up
    def _build_ae(self) -> AE:
        c = self.config
        ae = AE(ae_title=c.ae_title)
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_pdu_size = c.max_pdu
        ae.maximum_associations = c.max_associations  # enforced by self.gate (see transport.start_server)
        ae.require_called_aet = c.check_called_ae
        ae.require_calling_aet = [a.ae_title for a in c.allowed_calling_aes]
        ae.acse_timeout = c.acse_timeout_s
        ae.dimse_timeout = c.dimse_timeout_s
        ae.network_timeout = c.network_timeout_s
        syntaxes = _uids(ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        for uid in _uids(STORAGE_SOP_CLASSES):
            ae.add_supported_context(uid, syntaxes)
        enhanced = set(_uids(ENHANCED_CT_SOP_CLASSES))
        # Enhanced CT is always negotiable so that a refusal is a clear C-STORE status and a log
        # line rather than an opaque "no accepted presentation context" on the sender's side.
        for uid in sorted(enhanced):
            if uid not in {cx.abstract_syntax for cx in ae.supported_contexts}:
                ae.add_supported_context(uid, syntaxes)
        return ae

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]

    def start(self) -> int:
        """Start listening (non-blocking); returns the first bound port (useful with port 0).

        Plain TCP on ``node.port`` unless ``tls.plain_tcp = false``, and DICOM TLS on ``tls.port``
        when ``tls.enabled``; ``self.ports`` maps "dicom"/"dicom-tls" to the bound ports."""
        c = self.config
        self.committer.start()
        listeners = [("dicom", c.port, None)] if c.tls.plain_tcp else []
        if c.tls.enabled:
            listeners.append(("dicom-tls", c.tls.port, server_context(c.tls)))
        for name, port, ctx in listeners:
            server = start_server(self.ae, (c.bind_address, port), self.handlers(), self.gate, ctx, listener=name,
                                  reuse_port=c.node.reuse_port)
            self._servers.append(server)
            self.ports[name] = server.server_address[1]
            log_event(log, "scp_listening", ae_title=c.ae_title, address=c.bind_address, port=self.ports[name],
                      listener=name, max_pdu=c.max_pdu, max_associations=c.max_associations,
                      max_connections_per_address=c.max_connections_per_address, acse_timeout_s=c.acse_timeout_s,
                      client_certificate="required" if ctx is not None and c.tls.require_client_certificate
                      else None)
        self._server = self._servers[0]
        return int(self._server.server_address[1])

    def stop(self, drain_s: float = 30.0) -> None:
        """Stop accepting associations, let open ones finish (up to ``drain_s``), abort the rest."""
        if self._server is None:
            return
        for server in self._servers:
            server.shutdown()
        self._servers = []
        deadline = time.monotonic() + drain_s
        # Only established associations are worth waiting for: a bare TCP probe sits in the ACSE
        # timeout without ever sending an A-ASSOCIATE-RQ.
        while [a for a in self.ae.active_associations if a.is_acceptor and a.is_established] \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        for a in self.ae.active_associations:
            a.abort()
        self.committer.stop()
        self._server = None
        log_event(log, "scp_stopped", ae_title=self.config.ae_title)

    # ------------------------------------------------------------------ association events
    def _on_requested(self, event: evt.Event) -> None:
        """Host check for calling AEs pinned to an address (pynetdicom checks the title)."""
        rq = event.assoc.requestor
        calling = str(rq.primitive.calling_ae_title).strip()
        host = self._hosts.get(calling)
        if host is not None and rq.address not in host:
            log_event(log, "association_rejected", level=logging.WARNING, calling_ae=calling, peer=rq.address,
                      reason="calling AE not allowed from this host", expected_host=",".join(sorted(host)))
            audit_for(self.config).association("rejected", calling, rq.address, reason="calling AE not allowed from this host")
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, calling AE not recognised
            event.assoc.kill()  # waits until the DUL has sent the A-ASSOCIATE-RJ, as pynetdicom does

    def _on_rejected(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        prim = rq.primitive
        rj = event.assoc.acceptor.primitive
        reason = reject_reason(rj) if rj is not None else "unknown"
        log_event(log, "association_rejected", level=logging.WARNING, calling_ae=str(prim.calling_ae_title).strip(),
                  called_ae=str(prim.called_ae_title).strip(), peer=rq.address, reason=reason,
                  result="rejected-permanent" if rj is not None and rj.result == 0x01 else "rejected-transient")
        audit_for(self.config).association("rejected", str(prim.calling_ae_title).strip(), rq.address,
                                           called_ae=str(prim.called_ae_title).strip(), reason=reason)

    def _on_accepted(self, event: evt.Event) -> None:
        no_delay(event.assoc)
        rq = event.assoc.requestor
        self._stats[id(event.assoc)] = _AssocStats(calling_ae=str(rq.ae_title).strip(), address=rq.address)
        log_event(log, "association_accepted", calling_ae=str(rq.ae_title).strip(), peer=rq.address,
                  port=rq.port, max_pdu=rq.maximum_length, **tls_peer(event.assoc))
        audit_for(self.config).association("accepted", str(rq.ae_title).strip(), rq.address, called_ae=self.config.ae_title)

    def _on_closed(self, event: evt.Event) -> None:
        st = self._stats.pop(id(event.assoc), None)
        if st is None:
            return
        dt = max(time.monotonic() - st.started, 1e-6)
        how = "association_released" if event.event is evt.EVT_RELEASED else "association_aborted"
        log_event(log, how, level=logging.INFO if how.endswith("released") else logging.WARNING,
                  calling_ae=st.calling_ae, peer=st.address, stored=st.stored, duplicates=st.duplicates,
                  failed=st.failed, mbytes=round(st.nbytes / 1e6, 1), seconds=round(dt, 2),
                  images_per_s=round(st.stored / dt, 1))
        audit_for(self.config).association(how.split("_")[1], st.calling_ae, st.address, called_ae=self.config.ae_title,
                                           counts={"stored": st.stored, "duplicates": st.duplicates,
                                                   "failed": st.failed, "seconds": round(dt, 2)})

    def _on_echo(self, event: evt.Event) -> int:
        log_event(log, "c_echo", calling_ae=str(event.assoc.requestor.ae_title).strip(),
                  peer=event.assoc.requestor.address)
        return STATUS_SUCCESS

    # ------------------------------------------------------------------ C-STORE
    def _active_senders(self) -> int:
        """Associations that stored, or opened, recently (each has at most one C-STORE in flight)."""
        since = time.monotonic() - SENDER_ACTIVE_S
        return sum(1 for st in list(self._stats.values()) if max(st.started, st.last_store) >= since)

    def _on_store(self, event: evt.Event) -> int | Dataset:
        with self.busy.measuring():
            return self._handle_store(event)

    def _handle_store(self, event: evt.Event) -> int | Dataset:
        st = self._stats.get(id(event.assoc))
        if st is not None:
            st.last_store = time.monotonic()
        calling = str(event.assoc.requestor.ae_title).strip()
        peer = event.assoc.requestor.address
        sop_uid = clean_uid(event.request.AffectedSOPInstanceUID)
        sop_class = clean_uid(event.request.AffectedSOPClassUID)
        try:
            status = self._store(event, sop_uid, sop_class, calling, peer, st)
        except OSError as exc:
            log_event(log, "c_store_failed", level=logging.ERROR, sop_instance_uid=printable(sop_uid),
                      calling_ae=calling, reason=f"spool write failed: {exc.strerror or exc}", status="0xA700")
            status = STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # the sender must never see success for an unpersisted instance
            log_event(log, "c_store_failed", level=logging.ERROR, sop_instance_uid=printable(sop_uid),
                      calling_ae=calling, reason=f"{type(exc).__name__}: {exc}", status="0xA700")
            status = STATUS_OUT_OF_RESOURCES
        code = int(status.Status) if isinstance(status, Dataset) else int(status)
        if st is not None and code != STATUS_SUCCESS:
            st.failed += 1
        return status

    def _is_known(self, sop_uid: str) -> bool:
        with self.db.session() as s:
            return track.is_known(s, sop_uid)

    def _refuse(self, refusal: Refusal, sop_uid: str, series_uid: str | None, calling: str, peer: str,
                quarantine: str | None = None) -> Dataset:
        """Record, log and audit a refused instance; the failure status carries the reason
        (Error Comment, 64 characters) so the sender's operator sees it too."""
        series_uid_db = printable(series_uid) if series_uid else None
        with self._lock, self.db.session() as s:
            track.record_refusal(s, calling_ae=printable(calling, 16), peer=printable(peer), status=refusal.status,
                                 sop_uid=printable(sop_uid), series_uid=series_uid_db, reason=refusal.reason,
                                 quarantine=quarantine)
        log_event(log, "c_store_refused", level=logging.WARNING, sop_instance_uid=printable(sop_uid),
                  series_uid=series_uid_db, calling_ae=calling, peer=peer, reason=refusal.reason,
                  status=refusal.status_hex)
        audit_for(self.config).series("refused", series_uid_db, None, success=False, reason=refusal.reason,
                                      calling_ae=calling, peer=peer, sop_instance_uid=printable(sop_uid))
        rsp = Dataset()
        rsp.Status = refusal.status
        rsp.ErrorComment = printable(refusal.reason, 64)
        return rsp

    def _store(self, event: evt.Event, sop_uid: str, sop_class: str, calling: str, peer: str,
               st: _AssocStats | None) -> int | Dataset:
        if sop_class in self._enhanced and not self.config.accept_enhanced_ct:
            log_event(log, "c_store_refused", level=logging.WARNING, sop_instance_uid=printable(sop_uid),
                      sop_class_uid=sop_class, calling_ae=calling,
                      reason="Enhanced CT not accepted (node.accept_enhanced_ct = false)", status="0x0122")
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        try:
            ds = event.dataset  # decoded lazily: only the header elements read below are parsed
        except Exception as exc:
            return self._refuse(Refusal(STATUS_CANNOT_UNDERSTAND, f"data set cannot be decoded: {exc}"[:200]),
                                sop_uid, None, calling, peer)
        refusal = check_instance(ds, sop_uid, sop_class)
        series_uid = clean_uid(ds.get("SeriesInstanceUID", "")) if refusal is None else None
        if refusal is None:
            problem = native_pixel_length_problem(ds, event.context.transfer_syntax)
            if problem:
                refusal = Refusal(STATUS_CANNOT_UNDERSTAND, problem)
        if refusal is not None:
            try:
                series_uid = str(ds.get("SeriesInstanceUID", "") or "")
            except Exception:
                series_uid = None
            return self._refuse(refusal, sop_uid, series_uid, calling, peer)
        assert series_uid is not None
        ts_uid = str(event.context.transfer_syntax)
        digest = pixel_digest(ds)
        rel = f"{safe_name(series_uid)}/{safe_name(sop_uid)}.dcm"
        path = self.config.spool_dir / rel
        # A re-send of a stored instance finds its file: answered without writing anything. New
        # instances pay one stat here, no query (the group asks for all its members at once).
        if path.exists() and self._is_known(sop_uid):
            return self._duplicate(event, ds, sop_uid, series_uid, ts_uid, digest, calling, peer, st)
        meta, body = _part10(event)
        size = len(meta) + body.nbytes
        why = self.watermark.receive_refusal(size)
        if why is not None:
            if self._is_known(sop_uid):  # a re-send needs no space: answer it as a duplicate
                return self._duplicate(event, ds, sop_uid, series_uid, ts_uid, digest, calling, peer, st)
            log_event(log, "c_store_refused", level=logging.WARNING, sop_instance_uid=sop_uid, series_uid=series_uid,
                      calling_ae=calling, reason=why, status="0xA700")
            return STATUS_OUT_OF_RESOURCES
        new_dirs = make_dirs(path.parent)
        try:
            tmp = write_pending(path, meta, body)
        finally:
            body.release()
        # Durable and recorded with its group; whether the UID is known already is answered by
        # the group's one query (a known one keeps its first file untouched).
        outcome = self.committer.submit(Pending(tmp, path, dict(
            ds=ds, series_uid=series_uid, sop_uid=sop_uid, sop_class=sop_class, ts_uid=ts_uid, rel=rel,
            size=size, calling=calling, peer=peer, digest=digest), new_dirs))
        if outcome is Outcome.KNOWN:
            return self._duplicate(event, ds, sop_uid, series_uid, ts_uid, digest, calling, peer, st)
        self.watermark.note_accepted(size)
        if st is not None:
            st.stored += 1
            st.nbytes += size
        log_event(log, "c_store", level=logging.DEBUG, sop_instance_uid=sop_uid, series_uid=series_uid,
                  calling_ae=calling, bytes=size)
        return STATUS_SUCCESS

    def _duplicate(self, event: evt.Event, ds: Dataset, sop_uid: str, series_uid: str, ts_uid: str,
                   digest: str | None, calling: str, peer: str, st: _AssocStats | None) -> int | Dataset:
        """A SOPInstanceUID already received: an identical re-send is acknowledged and recorded;
        different pixel data is a conflict: the first copy is kept, the second is stored in
        quarantine for inspection and refused (0xC000) with the reason."""
        with self.db.session() as s:
            first = track.instance_by_uid(s, sop_uid)
            if first is None:  # purged meanwhile
                return STATUS_OUT_OF_RESOURCES
            stored = self.config.spool_dir / first.path
            same = same_pixels(ds, ts_uid, digest, stored, first.transfer_syntax_uid, first.pixel_sha256)
            changed = header_differences(ds, stored) if same else []
            first_series_id, first_series_uid = first.series_id, first.series.series_uid
        if same and not changed:
            with self._lock, self.db.session() as s:
                track.record_anomaly(s, first_series_id, "duplicate", sop_uid,
                                     f"identical re-send from {calling}@{peer} acknowledged, not stored again")
            if st is not None:
                st.duplicates += 1
            log_event(log, "c_store_duplicate", level=logging.INFO, sop_instance_uid=sop_uid, series_uid=series_uid,
                      calling_ae=calling)
            return STATUS_SUCCESS
        data = event.encoded_dataset()
        rel = f"{safe_name(series_uid)}/{safe_name(sop_uid)}.{(digest or 'nodigest')[:12]}.dcm"
        write_atomic(self.config.quarantine_dir / rel, data)
        reason = "SOPInstanceUID already received with different pixel data (first copy kept)"
        if first_series_uid != series_uid:
            reason = "SOPInstanceUID already received in another series (first copy kept)"
        elif changed:
            reason = f"SOPInstanceUID already received with different {', '.join(changed)} (first copy kept)"
        with self._lock, self.db.session() as s:
            track.record_anomaly(s, first_series_id, "conflict", sop_uid,
                                 f"{reason}; second copy from {calling}@{peer} in quarantine/{rel}")
        return self._refuse(Refusal(STATUS_CANNOT_UNDERSTAND, reason), sop_uid, series_uid, calling, peer,
                            quarantine=f"quarantine/{rel}")

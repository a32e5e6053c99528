"""Receive: the node's Storage and Verification SCP (thin pynetdicom event handlers).

Each C-STORE's data set arrives on disk (``incoming``: spooled as it is received, bounded by
``node.max_dataset_mb`` and the disk watermark), is checked (``validate``), and becomes the spool
file, recorded in the database, *before* the response says success; any failure to persist
returns a failure status, so the sender keeps its copy and retries. Instances arriving together
on concurrent associations share one pass of syncs and one transaction (``groupcommit``). A
re-sent SOPInstanceUID is acknowledged without a second file or row when it is the same image,
refused and quarantined when it is not (``duplicates``, ``quarantine``); every refusal leaves the
same trail (``refusals``). Admission and fair sharing of association slots are the listener's
(``transport``). What is left here is the protocol: which policy answers which request.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicom_node.audit import audit_for
from dicom_node.config import NodeConfig
from dicom_node.logs import log_event
from dicom_node.negotiation import (
    ACCEPTED_TRANSFER_SYNTAXES, ENHANCED_CT_SOP_CLASSES, STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS, STORAGE_SOP_CLASSES, reject_reason,
)
from dicom_node.receive.busy import BusyMeter
from dicom_node.receive.duplicates import Duplicates
from dicom_node.receive.groupcommit import GroupCommitter, Outcome, Pending
from dicom_node.receive.incoming import DataSetTooLarge, Incoming, IncomingDataSet
from dicom_node.receive.quarantine import Quarantine
from dicom_node.receive.refusals import Refusals, response
from dicom_node.receive.transport import ConnectionGate, Limits, TokenBucket, no_delay, start_server, tls_peer
from dicom_node.receive.validate import Refusal, check_received, clean_uid, pixel_digest, printable, sop_class_refusal
from dicom_node.store import db, track
from dicom_node.store.spool import make_dirs, safe_name
from dicom_node.store.watermark import Watermark
from dicom_node.tls import server_context
from dicom_node.version import IMPLEMENTATION_VERSION_NAME

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
    echo_rate: TokenBucket
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    echoes: int = 0
    nbytes: int = 0
    last_store: float = -1e9  # monotonic time of the last C-STORE request
    refused_contexts: int = 0  # presentation contexts the node refused at negotiation


#: A-ASSOCIATE-AC presentation context results (PS3.8 9.3.3.2), as storescp -v names them.
_CONTEXT_RESULT = {1: "user rejection", 2: "no reason", 3: "abstract syntax not supported",
                   4: "transfer syntaxes not supported"}


def refused_contexts(assoc: Any) -> list[str]:
    """``SOP class (transfer syntaxes): why`` for each presentation context refused, once each."""
    out: list[str] = []
    for cx in getattr(assoc, "rejected_contexts", ()):
        sop = UID(str(cx.abstract_syntax))
        name = sop.name if sop.name != str(sop) else str(sop)
        ts = ",".join(UID(str(t)).name for t in cx.transfer_syntax or ())
        text = f"{name} ({ts}): {_CONTEXT_RESULT.get(cx.result, f'result {cx.result}')}"
        if text not in out:
            out.append(text)
    return out


# An association that sent a C-STORE within this many seconds is expected to send the next one soon:
# the group committer waits (up to group_commit_ms) for those only, not for idle associations.
SENDER_ACTIVE_S = 1.0


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
        audit = audit_for(config)
        self.watermark = Watermark(config, database)
        self.incoming = Incoming(config.spool_dir, self.watermark, config.node.max_dataset_mb, self._is_known,
                                 stale_s=2 * max(config.network_timeout_s, config.dimse_timeout_s, 30.0))
        self.quarantine = Quarantine(config.quarantine_dir, self.watermark, audit, config.disk.quarantine_max_mb)
        self.duplicates = Duplicates(database, config.spool_dir, self.quarantine, self._lock)
        self.refusals = Refusals(database, audit, self._lock)
        self.busy = BusyMeter()  # streaming waits while the handlers are saturated (busy.py)
        self.committer = GroupCommitter(database, audit, window_ms=config.node.group_commit_ms,
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
        self.incoming.sweep()
        listeners = [("dicom", c.port, None)] if c.tls.plain_tcp else []
        if c.tls.enabled:
            listeners.append(("dicom-tls", c.tls.port, server_context(c.tls)))
        for name, port, ctx in listeners:
            server = start_server(self.ae, (c.bind_address, port), self.handlers(), self.gate, ctx, listener=name,
                                  reuse_port=c.node.reuse_port, prepare=self.incoming.install)
            self._servers.append(server)
            self.ports[name] = server.server_address[1]
            log_event(log, "scp_listening", ae_title=c.ae_title, address=c.bind_address, port=self.ports[name],
                      listener=name, max_pdu=c.max_pdu, max_associations=c.max_associations,
                      max_connections_per_address=c.max_connections_per_address,
                      max_associations_per_address=c.node.max_associations_per_address, acse_timeout_s=c.acse_timeout_s,
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
        self._stats[id(event.assoc)] = _AssocStats(calling_ae=str(rq.ae_title).strip(), address=rq.address,
                                                   echo_rate=TokenBucket(self.config.node.max_echo_per_s))
        log_event(log, "association_accepted", calling_ae=str(rq.ae_title).strip(), peer=rq.address,
                  port=rq.port, max_pdu=rq.maximum_length, **tls_peer(event.assoc))
        refused = refused_contexts(event.assoc)
        if refused:  # e.g. an MR series: the sender sees "no presentation context", the admin sees why
            self._stats[id(event.assoc)].refused_contexts = len(refused)
            log_event(log, "presentation_contexts_refused", level=logging.WARNING, calling_ae=str(rq.ae_title).strip(),
                      peer=rq.address, accepted=len(event.assoc.accepted_contexts), refused="; ".join(refused))
        audit_for(self.config).association("accepted", str(rq.ae_title).strip(), rq.address, called_ae=self.config.ae_title,
                                           counts={"refused_contexts": refused} if refused else None)

    def _on_closed(self, event: evt.Event) -> None:
        st = self._stats.pop(id(event.assoc), None)
        if st is None:
            return
        dt = max(time.monotonic() - st.started, 1e-6)
        how = "association_released" if event.event is evt.EVT_RELEASED else "association_aborted"
        log_event(log, how, level=logging.INFO if how.endswith("released") else logging.WARNING,
                  calling_ae=st.calling_ae, peer=st.address, stored=st.stored, duplicates=st.duplicates,
                  failed=st.failed, echoes=st.echoes, refused_contexts=st.refused_contexts or None,
                  mbytes=round(st.nbytes / 1e6, 1), seconds=round(dt, 2),
                  images_per_s=round(st.stored / dt, 1))
        audit_for(self.config).association(how.split("_")[1], st.calling_ae, st.address, called_ae=self.config.ae_title,
                                           counts={"stored": st.stored, "duplicates": st.duplicates,
                                                   "failed": st.failed, "seconds": round(dt, 2)})

    def _on_echo(self, event: evt.Event) -> int:
        """Answered at most ``node.max_echo_per_s`` a second per association (a C-ECHO loop is
        slowed, not served at full speed); one log line per association, the rest are counted
        in its ``association_released`` line."""
        st = self._stats.get(id(event.assoc))
        if st is not None:
            st.echoes += 1
            st.echo_rate.wait()
            if st.echoes > 1:
                return STATUS_SUCCESS
        log_event(log, "c_echo", calling_ae=str(event.assoc.requestor.ae_title).strip(),
                  peer=event.assoc.requestor.address)
        return STATUS_SUCCESS

    # ------------------------------------------------------------------ C-STORE
    def _active_senders(self) -> int:
        """Associations that stored, or opened, recently (each has at most one C-STORE in flight)."""
        since = time.monotonic() - SENDER_ACTIVE_S
        return sum(1 for st in list(self._stats.values()) if max(st.started, st.last_store) >= since)

    def _on_store(self, event: evt.Event) -> int | Dataset:
        with self.busy.measuring(), self.gate.working(event.assoc):
            return self._handle_store(event)

    def _handle_store(self, event: evt.Event) -> int | Dataset:
        st = self._stats.get(id(event.assoc))
        if st is not None:
            st.last_store = time.monotonic()
        calling = str(event.assoc.requestor.ae_title).strip()
        peer = event.assoc.requestor.address
        sop_uid = clean_uid(event.request.AffectedSOPInstanceUID)
        sop_class = clean_uid(event.request.AffectedSOPClassUID)
        incoming: IncomingDataSet | None = getattr(event.request, "incoming", None)
        try:
            if incoming is None:
                raise RuntimeError("C-STORE data set not spooled (association without the node's DIMSE layer)")
            status = self._store(event, incoming, sop_uid, sop_class, calling, peer, st)
        except OSError as exc:
            log_event(log, "c_store_failed", level=logging.ERROR, sop_instance_uid=printable(sop_uid),
                      calling_ae=calling, reason=f"spool write failed: {exc.strerror or exc}", status="0xA700")
            status = STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # the sender must never see success for an unpersisted instance
            log_event(log, "c_store_failed", level=logging.ERROR, sop_instance_uid=printable(sop_uid),
                      calling_ae=calling, reason=f"{type(exc).__name__}: {exc}", status="0xA700")
            status = STATUS_OUT_OF_RESOURCES
        finally:
            if incoming is not None:
                incoming.drop()  # a file still in incoming/ was not kept: refused, duplicate, failed
        code = int(status.Status) if isinstance(status, Dataset) else int(status)
        if st is not None and code != STATUS_SUCCESS:
            st.failed += 1
        return status

    def _is_known(self, sop_uid: str) -> bool:
        with self.db.session() as s:
            return track.is_known(s, sop_uid)

    def _store(self, event: evt.Event, incoming: IncomingDataSet, sop_uid: str, sop_class: str, calling: str,
               peer: str, st: _AssocStats | None) -> int | Dataset:
        refusal = sop_class_refusal(sop_class, self.config.accept_enhanced_ct)
        if refusal is not None:
            log_event(log, "c_store_refused", level=logging.WARNING, sop_instance_uid=printable(sop_uid),
                      sop_class_uid=sop_class, calling_ae=calling, reason=refusal.reason, status=refusal.status_hex)
            return refusal.status
        if incoming.refusal is not None:  # a limit reached while it arrived, or the spool not writable
            return self._out_of_resources(incoming.refusal, incoming.failed, incoming, sop_uid, calling, peer)
        ts = event.context.transfer_syntax
        try:
            ds = incoming.dataset(ts)  # decoded lazily: only the header elements read below are parsed
        except DataSetTooLarge as exc:
            return self._out_of_resources(str(exc), False, incoming, sop_uid, calling, peer)
        except Exception as exc:
            return self.refusals.refuse(Refusal(STATUS_CANNOT_UNDERSTAND, f"data set cannot be decoded: {exc}"[:200]),
                                        sop_uid, None, calling, peer)
        refusal = check_received(ds, sop_uid, sop_class, ts)
        if refusal is None and not incoming.has_meta:
            refusal = Refusal(STATUS_CANNOT_UNDERSTAND, "file meta information cannot be built from the C-STORE request")
        if refusal is not None:
            try:
                series_uid = str(ds.get("SeriesInstanceUID", "") or "")
            except Exception:
                series_uid = None
            return self.refusals.refuse(refusal, sop_uid, series_uid, calling, peer)
        series_uid = clean_uid(ds.get("SeriesInstanceUID", ""))
        ts_uid = str(ts)
        digest = pixel_digest(ds)
        rel = f"{safe_name(series_uid)}/{safe_name(sop_uid)}.dcm"
        path = self.config.spool_dir / rel
        args = dict(ds=ds, incoming=incoming, sop_uid=sop_uid, series_uid=series_uid, ts_uid=ts_uid, digest=digest,
                    calling=calling, peer=peer, st=st)
        # A re-send of a stored instance finds its file: answered without storing anything. New
        # instances pay one stat here, no query (the group asks for all its members at once).
        if path.exists() and self._is_known(sop_uid):
            return self._duplicate(**args)
        size = incoming.nbytes
        new_dirs = make_dirs(path.parent)
        # Durable and recorded with its group; whether the UID is known already is answered by
        # the group's one query (a known one keeps its first file untouched).
        outcome = self.committer.submit(Pending(incoming.path, path, dict(
            ds=ds, series_uid=series_uid, sop_uid=sop_uid, sop_class=sop_class, ts_uid=ts_uid, rel=rel,
            size=size, calling=calling, peer=peer, digest=digest), new_dirs))
        if outcome is Outcome.KNOWN:
            return self._duplicate(**args)
        incoming.accepted()
        if st is not None:
            st.stored += 1
            st.nbytes += size
        log_event(log, "c_store", level=logging.DEBUG, sop_instance_uid=sop_uid, series_uid=series_uid,
                  calling_ae=calling, bytes=size)
        return STATUS_SUCCESS

    def _out_of_resources(self, reason: str, failed: bool, incoming: IncomingDataSet, sop_uid: str, calling: str,
                          peer: str) -> Dataset:
        """0xA700 with the reason: a limit (``c_store_refused``) or a spool write that failed."""
        log_event(log, "c_store_failed" if failed else "c_store_refused",
                  level=logging.ERROR if failed else logging.WARNING, sop_instance_uid=printable(sop_uid),
                  calling_ae=calling, peer=peer, reason=reason, bytes=incoming.received, status="0xA700")
        return response(STATUS_OUT_OF_RESOURCES, reason)

    def _duplicate(self, *, ds: Dataset, incoming: IncomingDataSet, sop_uid: str, series_uid: str, ts_uid: str,
                   digest: str | None, calling: str, peer: str, st: _AssocStats | None) -> int | Dataset:
        """A SOPInstanceUID already received (``duplicates``): acknowledged when identical, else refused."""
        try:
            conflict = self.duplicates.judge(ds, incoming, sop_uid=sop_uid, series_uid=series_uid, ts_uid=ts_uid,
                                             digest=digest, calling=calling, peer=peer)
        except LookupError:  # purged meanwhile
            return STATUS_OUT_OF_RESOURCES
        if conflict is None:
            if st is not None:
                st.duplicates += 1
            log_event(log, "c_store_duplicate", level=logging.INFO, sop_instance_uid=sop_uid, series_uid=series_uid,
                      calling_ae=calling)
            return STATUS_SUCCESS
        return self.refusals.refuse(Refusal(STATUS_CANNOT_UNDERSTAND, conflict.reason), sop_uid, series_uid,
                                    calling, peer, quarantine=conflict.quarantine)

"""Send: C-STORE a derived series to one destination (one association, or a few in parallel).

The outcome (:mod:`dicom_node.dispatch.outcome`) is classified so the caller can retry only what
may succeed later: transient (connection refused, timeout, association rejected-transient, status
0xA7xx "out of resources", most aborts) versus permanent (association rejected-permanent such as
"calling AE not recognised", no accepted presentation context / SOP class not supported, status
0xA9xx/0xCxxx and other failures, an established association that the destination's application
aborts before answering anything: :func:`dicom_node.negotiation.classify_abort`). An abort the
destination sends is recorded with its Source and Reason/Diag. Retrying a permanent rejection
forever is the failure mode to avoid.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import build_context

from dicom_node.config import Destination
from dicom_node.dispatch.outcome import InstanceResult, SendOutcome
from dicom_node.negotiation import (PERMANENT, TRANSIENT, Abort, classify_abort, classify_status, context_result,
                                    rejection, rejection_text)
from dicom_node.logs import log_event
from dicom_node.tls import client_context
from dicom_node.receive.transport import no_delay
from dicom_node.version import IMPLEMENTATION_VERSION_NAME

log = logging.getLogger("dicom_node.dispatch.scu")

# A file whose own transfer syntax the destination accepted is sent from the file as stored, in
# PDU-sized chunks, without decoding it and encoding it again (pynetdicom reads this flag when
# send_c_store is given a path). Files that need another transfer syntax are decoded here and
# passed as a Dataset, which pynetdicom converts whatever the flag says.
_config.STORE_SEND_CHUNKED_DATASET = True


def _contexts(files: Sequence[Path]) -> tuple[list[tuple[Path, str, str, str]], list]:
    """(path, SOPInstanceUID, SOPClassUID, TransferSyntaxUID) per file and the presentation
    contexts to propose: each file's own transfer syntax (sent as stored, no re-encode) plus the
    uncompressed ones."""
    info = []
    wanted: dict[str, set[str]] = {}
    for p in files:
        meta = read_file_meta_info(p)  # the file meta group only: a quarter of the time of dcmread
        sop_class = str(meta.MediaStorageSOPClassUID)
        ts = str(meta.TransferSyntaxUID)
        info.append((p, str(meta.MediaStorageSOPInstanceUID), sop_class, ts))
        wanted.setdefault(sop_class, {ExplicitVRLittleEndian, ImplicitVRLittleEndian}).add(ts)
    contexts = [build_context(uid, sorted(ts)) for uid, ts in wanted.items()]
    return info, contexts


def keep_responses(assoc: Any) -> None:
    """Hand a C-STORE response that pynetdicom's association reactor took off the queue back to
    the sender waiting for it.

    ``send_c_store`` pauses the reactor before sending and waits for the response on the same
    queue, but the pause has a window: the reactor can pass its checkpoint just before the pause
    and take the response, log "Received unexpected C-STORE service message" and drop it (seen
    here once in a CI run; reported upstream as pynetdicom issue 875 for C-FIND). The sender then
    waits for the DIMSE timeout, the association is aborted and the instance is sent again, a
    duplicate at the PACS. The node's SCU associations carry only its own requests, so any
    message that is not a request is a response someone waits for."""
    serve = assoc._serve_request

    def serve_or_return(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and assoc.is_established:
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)
    assoc._serve_request = serve_or_return


def _context_refusal(assoc: Any) -> str | None:
    """The destination's reason when it answered A-ASSOCIATE-AC but accepted none of our
    presentation contexts (pynetdicom then aborts the association); ``None`` otherwise."""
    prim = assoc.acceptor.primitive
    if prim is None or int(prim.result) != 0:
        return None
    rejected = list(getattr(assoc, "rejected_contexts", []) or [])
    if not rejected:
        return None
    parts = sorted({f"{cx.abstract_syntax} ({context_result(cx)})"
                    for cx in rejected})
    return "no presentation context accepted by the destination: " + "; ".join(parts)


def send_files(dest: Destination, files: Sequence[Path], calling_ae: str, max_pdu: int = 131072,
               on_result: Callable[[int, InstanceResult], None] | None = None) -> SendOutcome:
    """Send ``files`` to ``dest``; never raises for network outcomes.

    Over one association, or over ``dest.associations`` opened together, each sending a
    contiguous share of ``files`` in order: the destination stores one instance while the node
    encodes the next. ``on_result(index, result)`` (index into ``files``) is called as each
    C-STORE response arrives (before that association sends its next instance), so the caller
    can commit per-instance state that survives a crash; with several associations it is called
    from several threads. The results are in the order of ``files``; the outcome is permanent if
    any share failed permanently, else transient if any failed."""
    n = max(1, min(dest.associations, len(files)))
    if n == 1:
        return _send_over_one(dest, files, calling_ae, max_pdu, on_result)
    t0 = time.monotonic()
    bounds = [len(files) * i // n for i in range(n + 1)]

    def share(i: int) -> SendOutcome:
        base = bounds[i]
        report = None if on_result is None else (lambda k, res: on_result(base + k, res))
        return _send_over_one(dest, files[base:bounds[i + 1]], calling_ae, max_pdu, report)

    with ThreadPoolExecutor(n, thread_name_prefix="c-store") as pool:
        parts = list(pool.map(share, range(n)))
    out = SendOutcome(results=[r for part in parts for r in part.results], seconds=time.monotonic() - t0,
                      reached=any(part.reached for part in parts))
    for kind in (PERMANENT, TRANSIENT):
        failed = [part for part in parts if part.failure == kind]
        if failed:
            out.failure, out.error = kind, failed[0].error
            break
    return out


class _AbortWatch:
    """The A-ABORT PDU the destination sent on one association, if any.

    pynetdicom turns a received A-ABORT into a primitive that keeps the Source only for a
    service-user abort and drops the Reason/Diag., and its reactor takes that primitive off the
    queue; the PDU itself is seen by ``evt.EVT_PDU_RECV``, which runs in the DUL thread as the PDU
    is decoded, before the waiting sender is woken."""

    def __init__(self) -> None:
        self.abort: Abort | None = None

    def __call__(self, event: Any) -> None:
        if self.abort is None and isinstance(event.pdu, A_ABORT_RQ):
            self.abort = Abort.from_pdu(event.pdu)


def _abort_error(watch: _AbortWatch, k: int, total: int, answered: int, calling_ae: str) -> tuple[str, str]:
    """(TRANSIENT | PERMANENT, reason) for an established association that ended at C-STORE
    ``k`` (0-based) after ``answered`` responses; the class is :func:`dicom_node.negotiation.classify_abort`'s."""
    abort = watch.abort
    kind = classify_abort(abort, established=True, answered=answered)
    if abort is None:
        return kind, "no C-STORE response (timeout or association aborted)"
    msg = f"association aborted by the destination at C-STORE {k + 1} of {total} ({abort})"
    if kind == PERMANENT:
        msg += (f"; it accepted the association and aborted at the first request (often: the calling AE title "
                f"{calling_ae} is not configured there)")
    return kind, msg


def _send_over_one(dest: Destination, files: Sequence[Path], calling_ae: str, max_pdu: int,
                   on_result: Callable[[int, InstanceResult], None] | None) -> SendOutcome:
    """``files`` in order over one association (see :func:`send_files`)."""
    t0 = time.monotonic()
    out = SendOutcome()
    if not files:
        return out
    info, contexts = _contexts(files)
    ae = AE(ae_title=calling_ae)
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.requested_contexts = contexts
    ae.acse_timeout = dest.timeout_s
    ae.dimse_timeout = dest.timeout_s
    ae.network_timeout = dest.timeout_s
    ae.connection_timeout = dest.timeout_s
    ae.maximum_pdu_size = max_pdu
    tls_args = (client_context(dest.tls), dest.tls.server_name) if dest.tls is not None else None
    watch = _AbortWatch()
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_PDU_RECV, watch)])

    def give_up(k: int, kind: str, msg: str) -> None:
        """Instances ``k`` and after are not sent on this association."""
        out.results += [InstanceResult(p, u, None, msg, reached=out.reached, failure=kind) for p, u, _, _ in info[k:]]
        out.failure = out.failure or kind
        out.error = out.error or msg

    try:
        if not assoc.is_established:
            if (prim := rejection(assoc)) is not None:
                out.failure = PERMANENT if int(prim.result) == 1 else TRANSIENT
                out.error = rejection_text(prim)
            elif (refusal := _context_refusal(assoc)) is not None:
                # Negotiated, then aborted by pynetdicom because nothing we propose is accepted:
                # a configuration mismatch that no retry can fix.
                out.failure, out.error = PERMANENT, refusal
            elif watch.abort is not None:
                out.failure = classify_abort(watch.abort, established=False, answered=0)
                out.error = (f"association with {dest.host}:{dest.port} not established: aborted by the "
                             f"destination during negotiation ({watch.abort})")
            else:
                out.failure = TRANSIENT
                out.error = f"association with {dest.host}:{dest.port} not established (refused, timed out or aborted)"
            give_up(0, out.failure, out.error)
            return out
        out.reached = True
        no_delay(assoc)
        keep_responses(assoc)
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        as_stored = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        answered = 0
        for k, (path, uid, sop_class, ts) in enumerate(info):
            if sop_class not in accepted:
                out.results.append(InstanceResult(path, uid, None, f"SOP class {sop_class} not accepted",
                                                  reached=True, failure=PERMANENT))
                out.failure, out.error = PERMANENT, f"no accepted presentation context for SOP class {sop_class}"
                continue
            try:
                rsp = assoc.send_c_store(path if (sop_class, ts) in as_stored else dcmread(path))
            except (ValueError, RuntimeError, OSError) as exc:
                if not assoc.is_established:  # the destination ended the association since the last response
                    give_up(k, *_abort_error(watch, k, len(info), answered, calling_ae))
                    break
                out.results.append(InstanceResult(path, uid, None, str(exc), reached=True, failure=PERMANENT))
                out.failure = out.failure or PERMANENT
                out.error = out.error or f"cannot send {path.name}: {exc}"
                continue
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            if status is None:
                # No response: DIMSE timeout or the association broke; the rest can't be sent now.
                give_up(k, *_abort_error(watch, k, len(info), answered, calling_ae))
                break
            answered += 1
            kind = classify_status(status)
            res = InstanceResult.answered(path, uid, status, failure=kind)
            if not res.ok:
                res.error = f"C-STORE status 0x{status:04X}"
                if out.failure != PERMANENT:
                    out.failure = kind
                    out.error = f"C-STORE status 0x{status:04X} ({kind})"
            out.results.append(res)
            if on_result is not None:
                on_result(k, res)
            if not assoc.is_established and k + 1 < len(info):
                kind, msg = _abort_error(watch, k + 1, len(info), answered, calling_ae)
                give_up(k + 1, kind, msg if watch.abort is not None else "association aborted by the destination")
                break
    finally:
        if assoc.is_established:
            assoc.release()
        out.seconds = time.monotonic() - t0
    log_event(log, "c_store_series", level=logging.INFO if out.failure is None else logging.WARNING,
              destination=dest.name, called_ae=dest.ae_title, host=dest.host, port=dest.port,
              sent=out.sent, total=len(info), failure=out.failure, error=out.error, seconds=round(out.seconds, 2))
    return out

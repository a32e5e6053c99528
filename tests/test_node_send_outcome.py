"""Send outcomes carry typed facts the retry policy decides from: whether an attempt reached the
destination, each answer's status category and the transient/permanent class; an abort by the
destination is recorded with its A-ABORT Source and Reason/Diag. and classified in one place
(issue 21 §3, issue 23 item 6). Real peers: DCMTK storescp, Orthanc, a pynetdicom SCP that
aborts, a loopback STOW-RS server."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
from fault_helpers import sending_pipeline
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select
from test_node_send_faults import MR_ONLY
from test_node_stow import Answer, StowServer, _stow_dest
from test_node_stow import _dest as _web_dest

from dicom_node.config import Destination
from dicom_node.dispatch.scu import send_files
from dicom_node.dispatch.stow import send_files_stow
from dicom_node.negotiation import PERMANENT, TRANSIENT, Abort, classify_abort
from dicom_node.store import db
from nodetools.peers import LOOPBACK, free_port, make_ct_series, orthanc_get, start_orthanc, start_storescp


def _dest(port: int, ae: str = "PACS") -> Destination:
    return Destination(name="PACS", ae_title=ae, host=LOOPBACK, port=port, timeout_s=5)


def _pipeline_dest(port: int, ae: str = "PACS") -> dict[str, Any]:
    return {"name": "PACS", "ae_title": ae, "host": LOOPBACK, "port": port, "max_retries": 3,
            "backoff_base_s": 0.1, "timeout_s": 5}


def _sends(worker: Any) -> tuple[db.Delivery, list[db.InstanceSend]]:
    with worker.db.session() as s:
        d = s.scalars(select(db.Delivery)).one()
        sends = sorted(d.sends, key=lambda x: x.path)
        s.expunge_all()
    return d, sends


# --------------------------------------------------------------------------- reached
def test_a_successful_send_reached_the_destination_with_success_answers(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "out", n=2, size=32)
    with start_storescp(tmp_path / "pacs", "PACS") as pacs:
        out = send_files(_dest(pacs.port), files, "LTDIFF")
    assert out.failure is None and out.reached and out.sent == 2
    assert [(r.reached, r.category, r.failure) for r in out.results] == [(True, "Success", None)] * 2


def test_a_refused_connection_did_not_reach_the_destination(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "out", n=2, size=32)
    out = send_files(_dest(free_port()), files, "LTDIFF")
    assert out.failure == TRANSIENT and not out.reached
    assert [(r.reached, r.category, r.failure) for r in out.results] == [(False, None, TRANSIENT)] * 2


def test_a_rejected_association_did_not_reach_it_and_counts_no_instance_attempt(tmp_path: Path) -> None:
    """A-ASSOCIATE-RJ: the destination answered, but no instance was offered. Before, the
    dispatcher searched the error text for "not established", which a rejection's text lacks, so
    every instance counted an attempt it never had."""
    files = make_ct_series(tmp_path / "out", n=2, size=32)
    with start_storescp(tmp_path / "pacs", "PACS", extra=["--refuse"]) as pacs:
        out = send_files(_dest(pacs.port), files, "LTDIFF")
        assert out.failure == PERMANENT and not out.reached
        assert all(not r.reached and r.failure == PERMANENT for r in out.results)
        worker, _ = sending_pipeline(tmp_path / "w", _pipeline_dest(pacs.port))
        assert worker.send() == 1
    d, sends = _sends(worker)
    assert d.state == db.FAILED and d.attempts == 1
    assert all(x.attempts == 0 and x.error.startswith("association rejected (permanent)") for x in sends)


def test_no_accepted_presentation_context_did_not_reach_the_destination(tmp_path: Path) -> None:
    cfg = tmp_path / "mr.cfg"
    cfg.write_text(MR_ONLY)
    files = make_ct_series(tmp_path / "out", n=2, size=32)
    with start_storescp(tmp_path / "pacs", "PACS", extra=["-xf", str(cfg), "MR"]) as pacs:
        out = send_files(_dest(pacs.port), files, "LTDIFF")
        assert out.failure == PERMANENT and not out.reached
        assert all(not r.reached for r in out.results)
        worker, _ = sending_pipeline(tmp_path / "w", _pipeline_dest(pacs.port))
        assert worker.send() == 1
    d, sends = _sends(worker)
    assert d.state == db.FAILED and all(x.attempts == 0 for x in sends)


def test_stow_reached_only_when_the_server_was_connected(tmp_path: Path) -> None:
    """Down: not reached, no instance attempt. Up and answering 503: reached, one attempt each,
    and the answers' categories are typed (Failure 0xA700 transient, Warning kept)."""
    files = make_ct_series(tmp_path / "out", n=2, size=32)
    down = send_files_stow(_stow_dest(f"http://{LOOPBACK}:{free_port()}/dicom-web", tmp_path), files)
    assert down.failure == TRANSIENT and not down.reached and not any(r.reached for r in down.results)
    with StowServer(answers=[Answer(503), Answer(409, failures={0: 0xA700}, warnings={1: 0xB000})]) as server:
        worker, _ = sending_pipeline(tmp_path / "w", _web_dest(server.url), n=2)
        assert worker.send() == 1
        d, sends = _sends(worker)
        assert d.state == db.PENDING and all(x.attempts == 1 for x in sends)
        out = send_files_stow(_stow_dest(server.url, tmp_path), files)
    assert out.reached and out.failure == TRANSIENT
    assert [(r.category, r.failure, r.ok) for r in out.results] == [("Failure", TRANSIENT, False),
                                                                   ("Warning", None, True)]


# --------------------------------------------------------------------------- aborts
def test_orthanc_aborting_an_unknown_calling_ae_is_recorded_and_permanent(tmp_path: Path) -> None:
    """Orthanc 1.10 accepts the association of a calling AE that is not in DicomModalities, then
    answers its first C-STORE with A-ABORT (Source 0, service-user). Before, the delivery was
    retried as transient with "no C-STORE response (timeout or association aborted)"."""
    files = make_ct_series(tmp_path / "out", n=2, size=32)
    with start_orthanc(tmp_path / "orthanc", "ORTHANC", {"known": ("KNOWN", free_port())}) as orthanc:
        out = send_files(_dest(orthanc.port, "ORTHANC"), files, "LTDIFF")
        assert out.failure == PERMANENT and out.reached and out.sent == 0
        assert out.error.startswith("association aborted by the destination at C-STORE 1 of 2 "
                                    "(A-ABORT source 0 DUL service-user, reason 0)"), out.error
        assert "calling AE title LTDIFF" in out.error
        worker, _ = sending_pipeline(tmp_path / "w", _pipeline_dest(orthanc.port, "ORTHANC"))  # calls as LTDIFF
        assert worker.send() == 1
        time.sleep(0.3)
        assert worker.send() == 0  # not retried
        d, sends = _sends(worker)
        assert d.state == db.FAILED and d.attempts == 1
        assert d.error.startswith("permanent: association aborted by the destination at C-STORE 1 of 3 "
                                  "(A-ABORT source 0 DUL service-user, reason 0)"), d.error
        assert all(x.attempts == 1 and x.status is None and "A-ABORT source 0" in x.error for x in sends)
        # the same Orthanc stores from a calling AE it knows: the abort was about the caller
        ok = send_files(_dest(orthanc.port, "ORTHANC"), files, "KNOWN")
        assert ok.failure is None and ok.sent == 2, ok.error
        assert len(orthanc_get(orthanc, "/instances")) == 2


def test_an_abort_after_answers_is_transient_and_keeps_what_was_acknowledged(tmp_path: Path) -> None:
    """A pynetdicom SCP that stores the first instance and aborts the association at the second:
    the first is acknowledged, the rest are retried; the abort's source and reason are recorded."""
    files = make_ct_series(tmp_path / "out", n=3, size=32)
    stored: list[str] = []

    def on_store(event: Any) -> int:
        if stored:
            event.assoc.abort(block=False)
            return 0x0000
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE("PACS")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server((LOOPBACK, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        out = send_files(_dest(server.server_address[1]), files, "LTDIFF")
    finally:
        server.shutdown()
    assert out.failure == TRANSIENT and out.reached and out.sent == 1
    assert stored == [str(pydicom.dcmread(files[0]).SOPInstanceUID)]
    assert out.error == ("association aborted by the destination at C-STORE 2 of 3 "
                         "(A-ABORT source 0 DUL service-user, reason 0)")
    assert [(r.ok, r.reached, r.failure) for r in out.results] == [(True, True, None), (False, True, TRANSIENT),
                                                                  (False, True, TRANSIENT)]


def _abort_pdu(source: int, reason: int) -> Abort:
    pdu = A_ABORT_RQ()
    pdu.decode(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, source, reason]))
    return Abort.from_pdu(pdu)


def test_abort_words_and_class_come_from_source_and_reason() -> None:
    user, provider = _abort_pdu(0, 0), _abort_pdu(2, 2)
    assert str(user) == "A-ABORT source 0 DUL service-user, reason 0"
    assert str(provider) == "A-ABORT source 2 DUL service-provider, reason 2 unexpected PDU"
    assert classify_abort(user, established=True, answered=0) == PERMANENT
    assert classify_abort(user, established=True, answered=1) == TRANSIENT
    assert classify_abort(user, established=False, answered=0) == TRANSIENT
    assert classify_abort(provider, established=True, answered=0) == TRANSIENT
    assert classify_abort(None, established=True, answered=0) == TRANSIENT  # connection closed, no A-ABORT

"""Send: C-STORE to DCMTK storescp, with retry on transient failures and none on permanent ones."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1
from pynetdicom.association import Association
from fault_helpers import sending_pipeline
from nodetools.peers import LOOPBACK, free_port, make_ct_series, start_storescp
from sqlalchemy import select

from dicom_node.store import db
from dicom_node.config import Destination
from dicom_node.negotiation import PERMANENT, TRANSIENT, classify_status
from dicom_node.dispatch.scu import send_files


def _dest(port: int, ae: str = "PACS", retries: int = 3, backoff: float = 0.5) -> dict:
    return {"name": "PACS", "ae_title": ae, "host": LOOPBACK, "port": port, "max_retries": retries,
            "backoff_base_s": backoff, "timeout_s": 5}


def test_status_classification() -> None:
    assert classify_status(0xA700) == TRANSIENT and classify_status(0xA702) == TRANSIENT
    assert classify_status(0xA900) == PERMANENT and classify_status(0xC000) == PERMANENT
    assert classify_status(0x0122) == PERMANENT


def test_send_series_to_storescp(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "out", n=3, size=32)
    with start_storescp(tmp_path / "pacs", "PACS") as pacs:
        dest = Destination(name="PACS", ae_title="PACS", host=LOOPBACK, port=pacs.port, timeout_s=5)
        out = send_files(dest, files, "LTDIFF")
        assert out.failure is None and out.sent == 3
        assert all(r.status == 0 for r in out.results)
    received = sorted((tmp_path / "pacs").glob("*.dcm"))
    assert len(received) == 3
    assert {pydicom.dcmread(f).SOPInstanceUID for f in received} == {pydicom.dcmread(f).SOPInstanceUID for f in files}


@pytest.mark.parametrize("accepts", ["explicit", "implicit-only"])
def test_files_go_as_stored_when_their_syntax_is_accepted_else_converted(tmp_path: Path, accepts: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    files = make_ct_series(tmp_path / "out", n=3, size=32)
    stored_ts = {str(pydicom.dcmread(f).file_meta.TransferSyntaxUID) for f in files}
    assert stored_ts == {ExplicitVRLittleEndian}
    sent_as: list[str] = []
    real = Association.send_c_store

    def spy(self: Association, dataset: Any, *args: Any, **kw: Any) -> Any:
        sent_as.append("file" if isinstance(dataset, (str, Path)) else "dataset")
        return real(self, dataset, *args, **kw)
    monkeypatch.setattr(Association, "send_c_store", spy)
    extra = ["+B"] + (["+xi"] if accepts == "implicit-only" else [])  # +B: written exactly as received
    with start_storescp(tmp_path / "pacs", "PACS", extra=extra) as pacs:
        dest = Destination(name="PACS", ae_title="PACS", host=LOOPBACK, port=pacs.port, timeout_s=5)
        out = send_files(dest, files, "LTDIFF")
        assert out.failure is None and out.sent == 3
    assert sent_as == (["file"] * 3 if accepts == "explicit" else ["dataset"] * 3)
    received = {str(d.SOPInstanceUID): d for d in map(pydicom.dcmread, (tmp_path / "pacs").glob("*.dcm"))}
    want_ts = ExplicitVRLittleEndian if accepts == "explicit" else ImplicitVRLittleEndian
    for f in files:
        src = pydicom.dcmread(f)
        got = received[str(src.SOPInstanceUID)]
        assert got.file_meta.TransferSyntaxUID == want_ts
        assert got.PixelData == src.PixelData and got.ConvolutionKernel == src.ConvolutionKernel


def test_parallel_associations_send_contiguous_shares_in_order(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "out", n=7, size=32)
    # labelled JPEG Lossless, which storescp does not accept and which cannot be converted:
    # a permanent failure of one instance, in the last share
    odd = tmp_path / "out" / "jpeg-labelled.dcm"
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.999.77"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([bytes(ds.PixelData)])
    ds.save_as(odd, enforce_file_format=True)
    seen: list[tuple[int, str]] = []
    with start_storescp(tmp_path / "pacs", "PACS", extra=["--fork"]) as pacs:
        dest = Destination(name="PACS", ae_title="PACS", host=LOOPBACK, port=pacs.port, timeout_s=5, associations=3)
        threads: set[str] = set()

        def report(k: int, r: Any) -> None:
            seen.append((k, r.sop_instance_uid))
            threads.add(threading.current_thread().name)
        out = send_files(dest, files, "LTDIFF", on_result=report)
        assert out.failure is None and out.sent == 7
        assert len(threads) == 3  # one association (thread) per share
        assert [r.path for r in out.results] == files
        assert sorted(seen) == [(k, str(pydicom.dcmread(f).SOPInstanceUID)) for k, f in enumerate(files)]
        shares = send_files(dest, files[1:4] + [odd], "LTDIFF")
    # the other shares were sent; the failed one says why; the outcome is that failure
    assert [r.ok for r in shares.results] == [True, True, True, False]
    assert shares.failure == PERMANENT and "jpeg-labelled.dcm" in (shares.error or ""), shares.error


@pytest.mark.parametrize("kept", [True, False])
def test_response_taken_by_the_reactor_goes_back_to_the_sender(tmp_path: Path, kept: bool) -> None:
    """pynetdicom's reactor can take a C-STORE response off the queue before the paused sender
    does (seen once in CI: DIMSE timeout, then a duplicate at the PACS). On a real association
    with storescp, a response handed to the reactor's handler is put back on the queue the sender
    reads; pynetdicom's own handler drops it."""
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.sop_class import CTImageStorage

    from dicom_node.dispatch.scu import keep_responses

    with start_storescp(tmp_path / "pacs", "PACS") as pacs:
        ae = AE(ae_title="LTDIFF")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(LOOPBACK, pacs.port, ae_title="PACS")
        try:
            assert assoc.is_established
            if kept:
                keep_responses(assoc)
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = 1
            rsp.AffectedSOPClassUID = CTImageStorage
            rsp.AffectedSOPInstanceUID = "1.2.3"
            rsp.Status = 0x0000
            cx_id = assoc.accepted_contexts[0].context_id
            assoc._serve_request(rsp, cx_id)  # what the reactor does with a message it took
            got = assoc.dimse.get_msg(block=False)
            assert got == ((cx_id, rsp) if kept else (None, None))
        finally:
            assoc.release()


def test_transient_failure_is_retried_until_the_destination_is_up(tmp_path: Path) -> None:
    port = free_port()
    worker, files = sending_pipeline(tmp_path, _dest(port, retries=4, backoff=0.5))
    assert worker.send() == 1  # connection refused: nothing listening yet
    with worker.db.session() as s:
        d = s.scalars(select(db.Delivery)).one()
        assert d.state == db.PENDING and d.attempts == 1 and "retry 1/4" in d.error
        assert d.next_attempt_at > db.utcnow()
    assert worker.send() == 0  # backoff: not due yet
    with start_storescp(tmp_path / "pacs", "PACS", port=port):
        time.sleep(0.6)
        assert worker.send() == 1
    with worker.db.session() as s:
        d = s.scalars(select(db.Delivery)).one()
        job = s.scalars(select(db.Job)).one()
        assert d.state == db.SENT and d.attempts == 2
        assert all(x.state == db.SENT and x.status == 0 for x in d.sends)
        assert job.state == db.DONE and job.series.state == db.DONE
    assert len(list((tmp_path / "pacs").glob("*.dcm"))) == 3


def test_permanent_rejection_fails_at_once(tmp_path: Path) -> None:
    with start_storescp(tmp_path / "pacs", "PACS", extra=["--refuse"]) as pacs:
        worker, _ = sending_pipeline(tmp_path, _dest(pacs.port, retries=5, backoff=0.1))
        assert worker.send() == 1
        time.sleep(0.3)
        assert worker.send() == 0  # nothing left to retry
    with worker.db.session() as s:
        d = s.scalars(select(db.Delivery)).one()
        job = s.scalars(select(db.Job)).one()
        assert d.state == db.FAILED and d.attempts == 1
        assert d.error.startswith("permanent: association rejected (permanent)")
        assert job.state == db.FAILED and job.series.state == db.FAILED
        assert "PACS: permanent" in job.series.error


def test_rejection_is_seen_even_when_the_peer_closes_at_once(tmp_path: Path) -> None:
    """``storescp --refuse`` rejects and closes at once; pynetdicom often reports that as an
    abort with the rejection left unread. Every try must still read as a
    permanent rejection, never as a transient failure that would be retried."""
    files = make_ct_series(tmp_path / "out", n=1, size=32)
    with start_storescp(tmp_path / "pacs", "PACS", extra=["--refuse"]) as pacs:
        dest = Destination(name="PACS", ae_title="PACS", host=LOOPBACK, port=pacs.port, timeout_s=5)
        outcomes = [send_files(dest, files, "LTDIFF") for _ in range(20)]
    assert {(o.failure, o.sent) for o in outcomes} == {(PERMANENT, 0)}
    assert all(o.error.startswith("association rejected (permanent)") for o in outcomes)


def test_echo_names_the_rejection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dicom-node echo --destination` tells the admin why the PACS said no, not just "failed"."""
    from dicom_node.app.cli import main as cli_main
    from nodetools.peers import write_node_config

    with start_storescp(tmp_path / "ok", "PACS") as ok, \
            start_storescp(tmp_path / "no", "PACS", extra=["--refuse"]) as no:
        conf = write_node_config(tmp_path / "node.toml", port=free_port(), data_dir=tmp_path / "data",
                                 destinations=[{**_dest(ok.port), "name": "OK"}, {**_dest(no.port), "name": "NO"}])
        assert cli_main(["--config", str(conf), "echo", "--destination", "OK"]) == 0
        assert capsys.readouterr().out.strip() == f"C-ECHO LTDIFF -> PACS@{LOOPBACK}:{ok.port}: status 0x0000"
        for _ in range(5):  # the peer closes at once: the rejection must be read every time
            assert cli_main(["--config", str(conf), "echo", "--destination", "NO"]) == 1
            assert capsys.readouterr().out.strip().startswith(
                f"C-ECHO LTDIFF -> PACS@{LOOPBACK}:{no.port}: association rejected (permanent): ")


def test_exhausted_retries_fail_with_reason(tmp_path: Path) -> None:
    worker, _ = sending_pipeline(tmp_path, _dest(free_port(), retries=1, backoff=0.1))
    worker.send()
    time.sleep(0.25)
    worker.send()
    with worker.db.session() as s:
        d = s.scalars(select(db.Delivery)).one()
        assert d.state == db.FAILED and d.attempts == 2 and d.error.startswith("gave up after 2 attempts")


def test_sending_socket_has_nagle_off(tmp_path: Path, monkeypatch) -> None:
    """The SCU's socket is switched to TCP_NODELAY before the first C-STORE: with Nagle on, the
    peer's delayed ACK held every instance ~40 ms (a local Orthanc took 20 instances/s)."""
    import socket

    from dicom_node.dispatch import scu

    seen: list[int] = []
    real = scu.no_delay

    def spy(assoc) -> None:
        real(assoc)
        sock = assoc.dul.socket.socket
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(scu, "no_delay", spy)
    files = make_ct_series(tmp_path / "out", n=2, size=32)
    with start_storescp(tmp_path / "pacs", "PACS") as pacs:
        dest = Destination(name="PACS", ae_title="PACS", host=LOOPBACK, port=pacs.port, timeout_s=5)
        assert send_files(dest, files, "LTDIFF").sent == 2
    assert seen and all(v != 0 for v in seen)

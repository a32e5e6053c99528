"""Receive: real DCMTK peers (echoscu, storescu) against the node's SCP on loopback."""
from __future__ import annotations

import contextlib

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from nodetools.peers import LOOPBACK, echoscu, free_port, make_ct_series, storescu
from sqlalchemy import func, select

from dicom_node.store import db
from dicom_node.config import parse_config
from dicom_node.receive.scp import StorageSCP


class RunningSCP:
    def __init__(self, tmp: Path, **node: Any) -> None:
        raw = {"node": {"bind_address": LOOPBACK, "port": free_port(), "data_dir": str(tmp / "data"), **node}}
        self.config = parse_config(raw, tmp)
        self.config.data_dir.mkdir(parents=True)
        self.db = db.Database(self.config.db_url)
        self.db.create_all()
        self.scp = StorageSCP(self.config, self.db)
        self.port = self.scp.start()

    def stop(self) -> None:
        self.scp.stop(drain_s=5)
        self.db.dispose()

    def count(self, model: Any) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(model)))


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[RunningSCP] = []

    def make(**node: Any) -> RunningSCP:
        node_ = RunningSCP(tmp_path, **node)
        started.append(node_)
        return node_

    yield make
    for n in started:
        n.stop()


def test_echo_and_calling_ae_allow_list(scp_factory: Any) -> None:
    node = scp_factory(allowed_calling_aes=["ECHOSCU", "STORESCU"])
    ok = echoscu(node.port, "LTDIFF", "ECHOSCU")
    assert ok.returncode == 0, ok.stderr
    bad = echoscu(node.port, "LTDIFF", "BAD")
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stderr or "Association Rejected" in bad.stderr
    wrong_called = echoscu(node.port, "NOTUS", "ECHOSCU")
    assert wrong_called.returncode != 0


def test_calling_ae_pinned_to_another_host_is_rejected(scp_factory: Any) -> None:
    node = scp_factory(allowed_calling_aes=[{"ae_title": "ECHOSCU", "host": "10.255.255.1"}])
    r = echoscu(node.port, "LTDIFF", "ECHOSCU")
    assert r.returncode != 0
    assert "Rejected" in r.stderr


def test_series_is_on_disk_and_in_db_before_success_and_duplicates_are_idempotent(
        scp_factory: Any, tmp_path: Path) -> None:
    node = scp_factory()
    files = make_ct_series(tmp_path / "in", n=4, size=64, expected_count=4)
    r = storescu(files, node.port, "LTDIFF")
    assert r.returncode == 0, r.stderr
    # storescu only exits 0 after every C-STORE response; by then everything must be persisted.
    with node.db.session() as s:
        series = s.scalars(select(db.Series)).one()
        inst = s.scalars(select(db.Instance)).all()
        assert series.instance_count == 4 and series.state == db.RECEIVED
        assert series.expected_count == 4 and series.convolution_kernel == "Br40"
        assert series.calling_ae == "STORESCU" and series.peer_address == LOOPBACK
        assert len(inst) == 4
        for i in inst:
            path = node.config.spool_dir / i.path
            raw = path.read_bytes()
            src = next(f for f in files if pydicom.dcmread(f).SOPInstanceUID == i.sop_instance_uid)
            # stored as received: the pixel bytes end the file unchanged, the meta names the negotiated syntax
            assert raw[-64 * 64 * 2:] == src.read_bytes()[-64 * 64 * 2:]
            assert str(pydicom.dcmread(path).file_meta.TransferSyntaxUID) == i.transfer_syntax_uid
            assert pydicom.dcmread(path).SOPInstanceUID == i.sop_instance_uid
    spool_files = sorted(p for p in node.config.spool_dir.rglob("*") if p.is_file())
    assert len(spool_files) == 4

    again = storescu(files, node.port, "LTDIFF")
    assert again.returncode == 0
    assert node.count(db.Instance) == 4
    assert sorted(p for p in node.config.spool_dir.rglob("*") if p.is_file()) == spool_files
    with node.db.session() as s:
        assert s.scalars(select(db.Series)).one().instance_count == 4


def test_persistence_failure_returns_failure_status(scp_factory: Any, tmp_path: Path) -> None:
    node = scp_factory()
    # A regular file where the spool directory should be: every write fails (even as root).
    node.config.spool_dir.write_text("not a directory")
    files = make_ct_series(tmp_path / "in", n=2, size=32)
    r = storescu(files, node.port, "LTDIFF", extra=["-v"])
    out = r.stdout + r.stderr
    assert "Refused: OutOfResources" in out, out
    assert node.count(db.Instance) == 0


def test_enhanced_ct_is_refused_with_a_clear_status(scp_factory: Any, tmp_path: Path) -> None:
    node = scp_factory()
    (f,) = make_ct_series(tmp_path / "in", n=1, size=32)
    ds = pydicom.dcmread(f)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    enh = tmp_path / "enhanced.dcm"
    ds.save_as(enh)
    r = storescu([enh], node.port, "LTDIFF", extra=["-v"])
    assert "Refused: SOPClassNotSupported" in r.stderr, r.stderr
    assert node.count(db.Instance) == 0


@contextlib.contextmanager
def _echo_association(node: RunningSCP) -> Iterator[Any]:
    """An established Verification association with the node (a real pynetdicom requestor), released after."""
    from pynetdicom import AE

    ae = AE(ae_title="PROBE")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(LOOPBACK, node.port, ae_title="LTDIFF")
    try:
        assert assoc.is_established
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def test_association_names_the_implementation(scp_factory: Any) -> None:
    """The A-ASSOCIATE-AC carries the node's Implementation Version Name (PS3.7 D.3.3.2), so a
    peer's logs say which release of the node it talked to."""
    from dicom_node.version import IMPLEMENTATION_VERSION_NAME

    node = scp_factory()
    with _echo_association(node) as assoc:
        assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME


def test_accepted_association_has_nagle_off(scp_factory: Any) -> None:
    """The node answers every C-STORE with a small response PDU; its accepted sockets run with
    TCP_NODELAY, as the DCMTK peers do with TCP_NODELAY=1."""
    import socket

    node = scp_factory()
    with _echo_association(node):
        (served,) = node.scp.ae.active_associations
        assert served.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_idle_association_waits_instead_of_polling(scp_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An open association with no traffic costs the node a few wake-ups a second (to check its
    timers), not pynetdicom's 1000 polls a second in each of its two threads, and still answers
    at once when a request comes."""
    import time

    from dicom_node.receive import reactor

    passes = {"dul": 0, "assoc": 0}
    real_wait = reactor.ReactiveDUL._wait_for_work

    def counting_wait(self: Any) -> None:
        passes["dul"] += 1
        real_wait(self)
    monkeypatch.setattr(reactor.ReactiveDUL, "_wait_for_work", counting_wait)
    node = scp_factory()
    with _echo_association(node) as assoc:
        (served,) = node.scp.ae.active_associations
        assert isinstance(served, reactor.ReactiveAssociation)
        real_event_wait = served._wake_event.wait

        def counting_event_wait(timeout: float | None = None) -> bool:
            passes["assoc"] += 1
            return real_event_wait(timeout)
        served._wake_event.wait = counting_event_wait  # type: ignore[method-assign]
        time.sleep(0.3)
        passes.update(dul=0, assoc=0)
        time.sleep(1.0)
        idle = dict(passes)
        t0 = time.monotonic()
        assert assoc.send_c_echo().Status == 0
        answered_s = time.monotonic() - t0
    assert idle["dul"] <= 3 / reactor.IDLE_WAIT_S and idle["assoc"] <= 3 / reactor.IDLE_WAIT_S, idle
    assert idle["dul"] >= 1 and idle["assoc"] >= 1, idle  # still checking its timers
    assert answered_s < reactor.IDLE_WAIT_S * 10, answered_s  # woken by the request, not by a timer


def test_network_timeout_still_ends_an_idle_association(scp_factory: Any) -> None:
    """The timers are checked between waits: a silent peer is dropped after network_timeout_s."""
    import time

    node = scp_factory(network_timeout_s=0.5)
    with _echo_association(node) as assoc:
        t0 = time.monotonic()
        while assoc.is_established and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert not assoc.is_established
        assert 0.4 < time.monotonic() - t0 < 5
    deadline = time.monotonic() + 5
    while node.scp.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not node.scp.ae.active_associations


def test_data_sets_left_by_a_dead_receiver_are_swept_at_start(tmp_path: Path) -> None:
    """A receiver killed while a data set arrived leaves its partial file in spool/.incoming;
    the next start removes those of gone processes on this host and any stale one, and keeps a
    fresh file of another host's receiver (a shared spool)."""
    import os
    import socket
    import subprocess
    import time

    gone = subprocess.Popen(["true"])
    gone.wait()
    incoming = tmp_path / "data" / "spool" / ".incoming"
    incoming.mkdir(parents=True)
    dead = incoming / f"{socket.gethostname()}@{gone.pid}-0.part"
    stale = incoming / "otherhost@1-0.part"
    fresh = incoming / "otherhost@2-0.part"
    for p in (dead, stale, fresh):
        p.write_bytes(b"\0" * 1024)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    raw = {"node": {"bind_address": LOOPBACK, "port": free_port(), "data_dir": str(tmp_path / "data")}}
    config = parse_config(raw, tmp_path)
    database = db.Database(config.db_url)
    database.create_all()
    scp = StorageSCP(config, database)
    scp.start()
    try:
        assert sorted(p.name for p in incoming.iterdir()) == [fresh.name]
    finally:
        scp.stop(drain_s=1)
        database.dispose()


def test_refused_presentation_contexts_are_logged_and_audited(scp_factory: Any, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """An MR series sent to the node: DCMTK storescu sees no accepted presentation context; the
    node says which SOP class and transfer syntaxes it refused and why (as storescp -v does), in
    the log, the association's closing line and the audit trail."""
    import json
    import logging

    node = scp_factory()
    mr = make_ct_series(tmp_path / "in", n=1, size=16)[0]
    ds = pydicom.dcmread(mr)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    ds.Modality = "MR"
    ds.save_as(mr)
    with caplog.at_level(logging.INFO, logger="dicom_node"):
        r = storescu([mr], node.port, "LTDIFF")
    assert r.returncode != 0
    refused = [rec for rec in caplog.records if rec.getMessage() == "presentation_contexts_refused"]
    assert refused, [rec.getMessage() for rec in caplog.records]
    text = refused[0].fields["refused"]
    assert "MR Image Storage" in text and "abstract syntax not supported" in text, text
    assert node.count(db.Instance) == 0
    audit = [json.loads(x) for x in node.config.audit_path.read_text().splitlines()]
    accepted = [a for a in audit if a["dicom_node"].get("outcome") == "accepted"]
    assert any("MR Image Storage" in " ".join(a["dicom_node"].get("refused_contexts", [])) for a in accepted)

"""Group commit at receive: instances on concurrent associations share one sync pass and one
transaction; a failure fails every member (0xA700, no row, no file); a UID repeated within one
group is stored once; and kill -9 during group commits loses no acknowledged instance."""
from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fault_helpers import rows
from pynetdicom import AE, _config
from sqlalchemy import select

from dicom_node.store import db, spool, track
from dicom_node.receive import groupcommit, scp as receive
from dicom_node.config import load_config, parse_config
from nodetools.peers import LOOPBACK, SCRATCH_DISK, free_port, make_ct_series, start_node, wait_for, write_node_config
from dicom_node.receive.scp import StorageSCP

CT = "1.2.840.10008.5.1.4.1.1.2"
OUT_OF_RESOURCES = 0xA700


def associate(port: int, calling: str) -> Any:
    _config.STORE_SEND_CHUNKED_DATASET = True  # files are sent as stored
    ae = AE(ae_title=calling)
    ae.add_requested_context(CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate(LOOPBACK, port, ae_title="LTDIFF")
    assert assoc.is_established
    return assoc


def send_together(port: int, files: Sequence[Path]) -> list[int | None]:
    """One association per file, all open before any C-STORE, then one C-STORE each at once:
    with a long group window they form one group."""
    assocs = [associate(port, f"GC{i}") for i in range(len(files))]
    statuses: list[int | None] = [None] * len(files)
    go = threading.Barrier(len(files))

    def one(i: int) -> None:
        go.wait()
        rsp = assocs[i].send_c_store(str(files[i]))
        statuses[i] = int(rsp.Status) if rsp is not None and "Status" in rsp else None

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(files))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for a in assocs:
        a.release()
    return statuses


class Node:
    """An in-process receiver with a long group window (groups close when every open
    association has its instance in)."""

    def __init__(self, tmp: Path) -> None:
        self.config = parse_config({"node": {"bind_address": LOOPBACK, "port": free_port(), "data_dir": str(tmp / "data"),
                                             "group_commit_ms": 5000.0, "group_commit_max": 16},
                                    "disk": SCRATCH_DISK}, tmp)
        self.db = db.Database(self.config.db_url)
        self.db.create_all()
        self.scp = StorageSCP(self.config, self.db)
        self.port = self.scp.start()

    def spool(self, pattern: str) -> list[Path]:
        return sorted(p for p in self.config.spool_dir.rglob(pattern) if p.is_file())

    def stop(self) -> None:
        self.scp.stop(drain_s=2)
        self.db.dispose()


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(receive, "SENDER_ACTIVE_S", 120.0)  # a slow machine must not split the group
    n = Node(tmp_path)
    yield n
    n.stop()


def fsync_disk_full(path: Path) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def second_insert_fails(real: Any) -> Any:
    calls = []

    def record(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("database write failed")
        return real(*args, **kw)
    return record


@pytest.mark.parametrize("fault", ["fsync", "database"])
def test_failure_in_a_group_fails_every_member(node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               fault: str) -> None:
    files = make_ct_series(tmp_path / "in", n=3, size=16)
    with monkeypatch.context() as m:
        if fault == "fsync":
            m.setattr(groupcommit, "fsync_file", fsync_disk_full)
        else:
            m.setattr(track, "record_instance", second_insert_fails(track.record_instance))
        assert send_together(node.port, files) == [OUT_OF_RESOURCES] * 3
    # no row without a file, and no file (or temporary file) left behind for the failed group
    assert rows(node.db, db.Instance) == []
    assert node.spool("*") == []
    assert node.scp.committer.groups == 0
    # the senders retry: the same three are stored as one group; the series directory, made by the
    # failed group, exists now, and its entry in the spool directory is synced with this group
    synced: list[Path] = []
    monkeypatch.setattr(groupcommit, "fsync_dir", lambda d: (synced.append(d), spool.fsync_dir(d)))
    assert send_together(node.port, files) == [0] * 3
    assert node.config.spool_dir in synced
    assert len(rows(node.db, db.Instance)) == 3 and len(node.spool("*.dcm")) == 3
    assert node.spool(".*") == []
    assert (node.scp.committer.groups, node.scp.committer.members) == (1, 3)


def test_same_uid_twice_in_one_group_is_stored_once(node: Node, tmp_path: Path) -> None:
    f = make_ct_series(tmp_path / "in", n=1, size=16)[0]
    assert send_together(node.port, [f, f]) == [0, 0]  # the second is an identical re-send
    assert len(rows(node.db, db.Instance)) == 1 and len(node.spool("*")) == 1
    assert [a.kind for a in rows(node.db, db.Anomaly)] == ["duplicate"]
    assert (node.scp.committer.groups, node.scp.committer.members) == (1, 1)
    stored, sent = pydicom.dcmread(node.spool("*")[0]), pydicom.dcmread(f)
    assert (stored.SOPInstanceUID, stored.PixelData) == (sent.SOPInstanceUID, sent.PixelData)


def test_conflict_within_one_group_keeps_the_first_copy(node: Node, tmp_path: Path) -> None:
    f = make_ct_series(tmp_path / "in", n=1, size=16)[0]
    ds = pydicom.dcmread(f)
    ds.PixelData = bytes(255 - b for b in ds.PixelData)  # same SOPInstanceUID, other pixels
    other = tmp_path / "other.dcm"
    ds.save_as(other)
    statuses = send_together(node.port, [f, other])
    assert sorted(s or 0 for s in statuses) == [0, 0xC000]  # whichever came first is kept
    stored = pydicom.dcmread(node.spool("*.dcm")[0])
    kept = [f, other][statuses.index(0)]
    assert len(node.spool("*")) == 1 and stored.PixelData == pydicom.dcmread(kept).PixelData
    assert [a.kind for a in rows(node.db, db.Anomaly)] == ["conflict"]
    assert len(list(node.config.quarantine_dir.rglob("*.dcm"))) == 1
    assert (node.scp.committer.groups, node.scp.committer.members) == (1, 1)


def test_kill9_during_group_commits_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    """A real `dicom-node serve`, four concurrent senders, SIGKILL mid-stream: every instance that
    got 0x0000 is on disk, complete, and has its row after the restart; every row has its file."""
    senders, per_sender = 4, 40
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data", stable_age_s=3600,
                            extra_node={"group_commit_ms": 5.0})
    node = start_node(cfg, port, tmp_path / "node.log")
    files = [make_ct_series(tmp_path / f"in{i}", n=per_sender, size=32, seed=i) for i in range(senders)]
    acked: list[list[Path]] = [[] for _ in range(senders)]
    done = [False] * senders

    def send(i: int) -> None:
        try:
            assoc = associate(port, f"KILL{i}")
            for f in files[i]:
                rsp = assoc.send_c_store(str(f))
                if rsp is None or "Status" not in rsp or int(rsp.Status) != 0:
                    return
                acked[i].append(f)
            done[i] = True
            assoc.release()
        except Exception:  # the node is killed under us: what was acknowledged is what counts
            pass

    threads = [threading.Thread(target=send, args=(i,)) for i in range(senders)]
    try:
        for t in threads:
            t.start()
        database = db.Database(load_config(cfg).db_url)
        wait_for(lambda: len(rows(database, db.Instance)) >= 30, 60, 0.01, "30 instances received")
        database.dispose()
        node.stop(sig=signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert not all(done), "the senders finished before the kill"
        node = start_node(cfg, port, tmp_path / "node-2.log")  # starts on what the kill left
    finally:
        node.stop()
    database = db.Database(load_config(cfg).db_url)
    with database.session() as s:
        recorded = {i.sop_instance_uid: i.path for i in s.scalars(select(db.Instance))}
    database.dispose()
    spool = load_config(cfg).spool_dir
    sent = [f for part in acked for f in part]
    assert len(sent) >= 30 - senders  # 30 rows at the kill; at most one C-STORE per sender in flight
    for f in sent:  # acknowledged => row => the file, complete
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert uid in recorded, f"instance {uid} acknowledged but not recorded"
        stored = pydicom.dcmread(spool / recorded[uid])
        assert stored.PixelData == pydicom.dcmread(f).PixelData
    for rel in recorded.values():  # no row without its file
        assert (spool / rel).is_file()

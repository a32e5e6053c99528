"""Stages as roles on one PostgreSQL queue, as real ``dicom-node serve`` processes: one receiver
(``--roles receive,decide``), two process workers (``--roles process``), one dispatcher
(``--roles dispatch``), DCMTK storescu as the scanner and DCMTK storescp as the PACS (unique file
names: every C-STORE it receives is one file, so a duplicate send is visible).

6 series are each processed exactly once (one job, one attempt) and arrive as 6 output series
with no instance twice. Then a process worker is killed with SIGKILL while it holds a job: the
job is claimed again by the other worker once its lease (3 s here) has expired, and its output
series arrives exactly once.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.store import db
from nodetools.peers import (
    LOOPBACK, SCRATCH_DISK, Peer, free_port, make_ct_series, node_cmd, peer_env, start_storescp, storescu,
    resume_and_stop, wait_for, wait_port, write_node_config,
)
from fault_helpers import LINEAR
from nodetools.postgres import PostgresServer

pytestmark = pytest.mark.slow
LEASE_S = 3.0


def serve(config: Path, roles: str, log: Path) -> Peer:
    """``dicom-node serve --roles ROLES`` as a subprocess (own session, stopped by PID)."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(node_cmd("--config", str(config), "serve", "--roles", roles), stdout=f,
                                stderr=subprocess.STDOUT, env=peer_env(), start_new_session=True)
    return Peer(proc, 0, log)


def pacs_instances(pacs_dir: Path) -> list[tuple[str, str]]:
    """(SeriesInstanceUID, SOPInstanceUID) of every C-STORE the PACS received."""
    out = []
    for f in sorted(pacs_dir.glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.append((str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
    return out


def jobs(database: db.Database) -> dict[str, dict[str, Any]]:
    with database.session() as s:
        return {j.series.series_uid: {"id": j.id, "state": j.state, "attempts": j.attempts, "by": j.claimed_by,
                                      "out": j.output_series_uid, "n": j.output_count, "error": j.error}
                for j in s.scalars(select(db.Job))}


def test_roles_share_one_postgres_queue(tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.create_database("roles")
    pacs_dir = tmp_path / "pacs"
    pacs = start_storescp(pacs_dir, "PACS", extra=["+uf"])
    port = free_port()
    cfg = write_node_config(
        tmp_path / "node.toml", port=port, data_dir=tmp_path / "shared", stable_age_s=1.0,
        extra_node={"uid_root": "1.2.826.0.1.3680043.10.999.", "database_url": url, "lease_s": LEASE_S},
        processing={"poll_interval_s": 0.3, "max_batch_slices": 4, "device": "cpu"},  # one series per claim
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs.port,
                       "backoff_base_s": 0.5, "timeout_s": 10}],
        rules=[{"name": "br40", "match": {"ConvolutionKernel": "Br40*"}, "model": str(LINEAR),
                "destinations": ["pacs"], "qa": "flag"}],
        disk=SCRATCH_DISK,
    )
    database = db.Database(url)
    peers: dict[str, Peer] = {}
    try:
        peers["receiver"] = serve(cfg, "receive,decide", tmp_path / "receiver.log")
        wait_port(port, 60, peers["receiver"].proc)  # the receiver upgrades the schema first
        for name, roles in (("worker-1", "process"), ("worker-2", "process"), ("dispatcher", "dispatch")):
            peers[name] = serve(cfg, roles, tmp_path / f"{name}.log")

        def heartbeats() -> dict[int, str] | None:
            with database.session() as s:
                rows = {h.pid: h.roles for h in s.scalars(select(db.Heartbeat).where(db.Heartbeat.stopped_at.is_(None)))}
            return rows if len(rows) == 4 else None
        beats = wait_for(heartbeats, 90, 0.5, "four heartbeats")
        assert sorted(beats.values()) == ["dispatch", "process", "process", "receive,decide"]
        worker_of = {f"{os.uname().nodename}:{peers[w].pid}:process": w for w in ("worker-1", "worker-2")}

        # ---- 6 series through receiver -> 2 workers -> dispatcher, each exactly once
        inputs = {}
        for i in range(6):
            files = make_ct_series(tmp_path / "in" / str(i), n=4, size=64, seed=i)
            inputs[str(pydicom.dcmread(files[0]).SeriesInstanceUID)] = files
        sent = storescu(tmp_path / "in", port, "LTDIFF")
        assert sent.returncode == 0, sent.stderr

        def all_done() -> dict[str, dict[str, Any]] | None:
            js = jobs(database)
            return js if len(js) == 6 and all(j["state"] in (db.DONE, db.FAILED) for j in js.values()) else None
        try:
            js = wait_for(all_done, 120, 0.5, "6 jobs done")
        except TimeoutError:
            print({k: p.log()[-3000:] for k, p in peers.items()})
            raise
        assert set(js) == set(inputs)
        assert all(j["state"] == db.DONE and j["attempts"] == 1 and j["n"] == 4 for j in js.values()), js
        assert {worker_of[j["by"]] for j in js.values()} == {"worker-1", "worker-2"}  # both took jobs
        received = pacs_instances(pacs_dir)
        assert len(received) == len(set(sop for _, sop in received)) == 24  # no instance twice
        assert Counter(series for series, _ in received) == {j["out"]: 4 for j in js.values()}

        # ---- kill -9 of a worker holding a job: the other worker takes it after the lease
        os.kill(peers["worker-2"].pid, signal.SIGSTOP)  # worker-1 must be the one that claims it
        files = make_ct_series(tmp_path / "big", n=24, size=256, seed=99)
        big_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        assert storescu(tmp_path / "big", port, "LTDIFF").returncode == 0

        def held_by_worker_1() -> bool:
            j = jobs(database).get(big_uid)
            return bool(j and j["state"] == db.PROCESSING and worker_of.get(j["by"]) == "worker-1")
        wait_for(held_by_worker_1, 60, 0.05, "worker-1 processing the big series")
        os.kill(peers["worker-1"].pid, signal.SIGSTOP)  # frozen mid-job ...
        assert held_by_worker_1(), "worker-1 finished before it could be stopped"
        peers["worker-1"].stop(sig=signal.SIGKILL)  # ... and killed: its lease is never renewed again
        os.kill(peers["worker-2"].pid, signal.SIGCONT)

        def big_done() -> dict[str, Any] | None:
            j = jobs(database).get(big_uid)
            return j if j and j["state"] in (db.DONE, db.FAILED) else None
        try:
            big = wait_for(big_done, 90, 0.5, "the big series done by worker-2")
        except TimeoutError:
            print({k: p.log()[-3000:] for k, p in peers.items()})
            raise
        assert big["state"] == db.DONE and big["attempts"] == 2 and worker_of[big["by"]] == "worker-2", big
        assert "job_lease_expired" in peers["worker-2"].log()
        received = pacs_instances(pacs_dir)
        assert len(received) == len(set(sop for _, sop in received)) == 24 + 24
        assert Counter(series for series, _ in received)[big["out"]] == 24
        assert len({series for series, _ in received}) == 7  # exactly one output series for it

        # dicom-node status from any host: every process's heartbeat, the killed one down
        st = subprocess.run(node_cmd("--config", str(cfg), "status", "--json"), capture_output=True, text=True,
                            env=peer_env(), timeout=60, check=True)
        import json

        workers = {w["pid"]: w for w in json.loads(st.stdout)["workers"]}
        assert workers[peers["worker-1"].pid]["up"] is False
        assert all(workers[peers[n].pid]["up"] for n in ("receiver", "worker-2", "dispatcher"))
    finally:
        resume_and_stop(peers.values())
        pacs.stop()
        database.dispose()


def test_two_receivers_share_one_port(tmp_path: Path, postgres: PostgresServer) -> None:
    """``node.reuse_port``: two ``serve --roles receive`` processes listen on one port; the kernel
    gives each new connection to one of them. 16 single-instance associations: every instance is
    recorded once, and both processes took associations. Without the key a second process on the
    port cannot start."""
    url = postgres.create_database("reuseport")
    port = free_port()

    def config(name: str, reuse: bool) -> Path:
        return write_node_config(tmp_path / f"{name}.toml", port=port, data_dir=tmp_path / "shared", stable_age_s=3600,
                                 extra_node={"database_url": url, "reuse_port": reuse,  # limits per process:
                                             "max_connections_per_address": 8, "max_associations_per_address": 8},
                                 disk=SCRATCH_DISK)
    cfg = config("node", True)
    database = db.Database(url)
    procs: list[Peer] = []
    try:
        procs.append(serve(cfg, "receive", tmp_path / "receiver-1.log"))
        wait_port(port, 60, procs[0].proc)  # the first one upgrades the schema
        procs.append(serve(cfg, "receive", tmp_path / "receiver-2.log"))
        wait_for(lambda: "scp_listening" in procs[1].log(), 60, 0.2, "second receiver listening")
        files = make_ct_series(tmp_path / "in", n=16, size=32)
        for f in files:  # one association each
            assert storescu([f], port, "LTDIFF").returncode == 0
        with database.session() as s:
            uids = list(s.scalars(select(db.Instance.sop_instance_uid)))
            series = list(s.scalars(select(db.Series)))
        assert sorted(uids) == sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
        assert len(series) == 1 and series[0].instance_count == 16
        accepted = [p.log().count("event=association_accepted") for p in procs]
        assert sum(accepted) == 16 and min(accepted) >= 1, accepted
        # the first instances of a new series at both receivers at once: one series row wins, the
        # other receiver records into it, and no count is lost (8 associations, 2 instances each)
        burst = make_ct_series(tmp_path / "burst", n=16, size=32, seed=5)
        codes: list[int] = []
        threads = [threading.Thread(target=lambda part: codes.append(storescu(part, port, "LTDIFF").returncode),
                                    args=(burst[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [0] * 8
        burst_uid = str(pydicom.dcmread(burst[0]).SeriesInstanceUID)
        with database.session() as s:
            rows = list(s.scalars(select(db.Series).where(db.Series.series_uid == burst_uid)))
            assert len(rows) == 1 and rows[0].instance_count == 16
            assert len(list(s.scalars(select(db.Instance.id).where(db.Instance.series_id == rows[0].id)))) == 16
        # the same port without reuse_port: refused at start
        lone = serve(config("lone", False), "receive", tmp_path / "lone.log")
        procs.append(lone)
        assert lone.proc.wait(60) != 0
        assert "Address already in use" in lone.log() or "in use" in lone.log()
    finally:
        resume_and_stop(procs)
        database.dispose()


def test_series_inserted_by_another_receiver_meanwhile_is_used(tmp_path: Path, postgres: PostgresServer) -> None:
    """Two transactions record the first instance of one series at once: the second one's insert
    waits on the unique SeriesInstanceUID until the first commits, then records into that row."""
    from pydicom.dataset import Dataset

    from dicom_node.store import track
    from dicom_node.audit import AuditLog

    database = db.Database(postgres.create_database("race"))
    database.create_all()

    def record(n: int) -> dict[str, Any]:
        ds = Dataset()
        ds.InstanceNumber = n
        return dict(ds=ds, series_uid="1.2.3", sop_uid=f"1.2.3.{n}", sop_class="1.2.840.10008.5.1.4.1.1.2",
                    ts_uid="1.2.840.10008.1.2.1", rel=f"x/{n}.dcm", size=1, calling="A", peer="127.0.0.1", digest=None)
    first = database.Session()
    track.record_received(first, AuditLog(None, "N"), [record(1)])  # inserted, not committed
    done = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with database.session() as s:
                track.record_received(s, AuditLog(None, "N"), [record(2)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        done.set()
    t = threading.Thread(target=second)
    t.start()
    assert not done.wait(1.0)  # blocked on the first transaction's row
    first.commit()
    first.close()
    t.join(30)
    assert done.is_set() and errors == []
    with database.session() as s:
        rows = list(s.scalars(select(db.Series)))
        assert len(rows) == 1 and rows[0].instance_count == 2
        assert sorted(s.scalars(select(db.Instance.sop_instance_uid))) == ["1.2.3.1", "1.2.3.2"]
    database.dispose()

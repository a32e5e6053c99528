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
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from dicom_node import db
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

"""Throughput of 1 vs 2 process workers on one PostgreSQL queue, same series, same machine.

    python -m bench.bench_roles [--series 6] [--slices 32] [--size 256] [--model linear|default|PATH]

A throw-away PostgreSQL server (nodetools/postgres.py), DCMTK storescp as PACS, one
``serve --roles receive,decide,dispatch`` and N ``serve --roles process`` processes. Per N: a
warm-up series per worker (model loaded), then the workers are paused (SIGSTOP), the series are
sent and queued, the workers resume (t0) and the run ends when the last job has committed its
output (t1; the node's own ``processing_finished_at``). Throughput = series / (t1 - t0). Each
worker runs torch with one thread (``LTDIFF_TORCH_THREADS=1``), so N workers use N cores.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from sqlalchemy import func, select

from dicom_node.store import db
from nodetools.peers import (
    LOOPBACK, SCRATCH_DISK, Peer, free_port, make_ct_series, node_cmd, peer_env, start_storescp, storescu,
    resume_and_stop, wait_for, wait_port, write_node_config,
)
from nodetools.postgres import start_postgres

ROOT = Path(__file__).resolve().parents[1]

LINEAR = ROOT / "ltdiff_core" / "weights" / "linear.safetensors"


def serve(config: Path, roles: str, log: Path) -> Peer:
    env = {**peer_env(), "LTDIFF_TORCH_THREADS": "1"}
    with open(log, "ab") as f:
        proc = subprocess.Popen(node_cmd("--config", str(config), "serve", "--roles", roles), stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Peer(proc, 0, log)


def run(workers: int, url: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    pacs = start_storescp(work / "pacs", "PACS", extra=["+uf"])
    port = free_port()
    model = str(LINEAR) if args.model == "linear" else args.model
    cfg = write_node_config(
        work / "node.toml", port=port, data_dir=work / "shared", stable_age_s=1.0,
        extra_node={"uid_root": "1.2.826.0.1.3680043.10.999.", "database_url": url, "lease_s": 60.0},
        processing={"poll_interval_s": 0.3, "max_batch_slices": args.slices, "device": "cpu"},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs.port, "timeout_s": 30}],
        rules=[{"name": "br40", "match": {"ConvolutionKernel": "Br40*"}, "model": model, "destinations": ["pacs"],
                "qa": "flag"}],
        disk=SCRATCH_DISK,
    )
    database = db.Database(url)
    procs = [serve(cfg, "receive,decide,dispatch", work / "receiver.log")]
    try:
        wait_port(port, 120, procs[0].proc)
        procs += [serve(cfg, "process", work / f"worker-{i}.log") for i in range(workers)]

        def count(state: str | None = None) -> int:
            with database.session() as s:
                q = select(func.count(db.Job.id))
                return int(s.scalar(q.where(db.Job.state == state) if state else q) or 0)

        def sent(n: int) -> None:
            wait_for(lambda: count(db.DONE) >= n, 1800, 0.5, f"{n} jobs done")

        for i in range(workers):  # warm-up: one series per worker, one after the other
            make_ct_series(work / "warm" / str(i), n=args.slices, size=args.size, seed=1000 + i)
        wait_for(lambda: count_up(database) == workers + 1, 120, 0.5, "heartbeats")
        assert storescu(work / "warm", port, "LTDIFF").returncode == 0
        sent(workers)
        for p in procs[1:]:
            os.kill(p.pid, signal.SIGSTOP)
        for i in range(args.series):
            make_ct_series(work / "in" / str(i), n=args.slices, size=args.size, seed=i)
        assert storescu(work / "in", port, "LTDIFF").returncode == 0
        wait_for(lambda: count(db.QUEUED) == args.series, 300, 0.2, "all series queued")
        t0 = db.utcnow()
        for p in procs[1:]:
            os.kill(p.pid, signal.SIGCONT)
        sent(workers + args.series)
        with database.session() as s:
            measured = s.execute(select(db.Job.processing_finished_at, db.Job.claimed_by, db.Job.attempts)
                                 .where(db.Job.processing_finished_at >= t0)).all()
        assert len(measured) == args.series, measured
        t1 = max(r[0] for r in measured)
        seconds = (t1 - t0).total_seconds()
        by = Counter(r[1].rsplit(":", 2)[1] for r in measured)
        return {"workers": workers, "seconds": seconds, "series_per_min": 60 * args.series / seconds,
                "per_worker": dict(by), "attempts": max(r[2] for r in measured)}
    finally:
        resume_and_stop(procs)
        pacs.stop()
        database.dispose()


def count_up(database: db.Database) -> int:
    with database.session() as s:
        return int(s.scalar(select(func.count(db.Heartbeat.id)).where(db.Heartbeat.stopped_at.is_(None))) or 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", type=int, default=6)
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--model", default="linear", help="linear (shipped), default, or a checkpoint path")
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    args = p.parse_args()
    server = start_postgres()
    results = []
    try:
        for n in [int(x) for x in args.workers.split(",")]:
            with tempfile.TemporaryDirectory(prefix=f"bench-roles-{n}-") as tmp:
                r = run(n, server.create_database(f"bench_{n}"), Path(tmp), args)
            results.append(r)
            print(f"{n} process worker(s): {args.series} series x {args.slices} slices {args.size}^2 in "
                  f"{r['seconds']:.1f} s = {r['series_per_min']:.1f} series/min (jobs per worker "
                  f"{sorted(r['per_worker'].values(), reverse=True)}, max attempts {r['attempts']})", flush=True)
    finally:
        server.stop()
    if len(results) >= 2:
        print(f"throughput ratio {results[-1]['workers']} vs {results[0]['workers']} workers: "
              f"{results[-1]['series_per_min'] / results[0]['series_per_min']:.2f}x  "
              f"(model {args.model}, {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

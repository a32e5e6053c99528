"""Cost of one /metrics scrape, one /healthz and one status page on a full database.

The observation endpoint reads the database on every request (see dicom_node/observe). This fills
a fresh SQLite database with ``--series`` done series of ``--instances`` instances, one job and one
delivery each (what ``retention.days`` of traffic leaves behind), then times each answer in-process
(median of ``--repeat``). Prints one JSON line.

    python -m bench.bench_observe [--series 3000] [--instances 300] [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert

from dicom_node.store import db
from dicom_node.config import parse_config
from dicom_node.observe.server import ObserveServer


def fill(database: db.Database, n_series: int, n_instances: int) -> None:
    now = db.utcnow()
    with database.engine.begin() as conn:
        conn.execute(insert(db.Series), [
            {"id": i + 1, "series_uid": f"1.2.3.{i}", "state": db.DONE, "instance_count": n_instances,
             "first_received_at": now, "last_received_at": now, "state_changed_at": now, "completed_at": now}
            for i in range(n_series)])
        for start in range(0, n_series, 200):
            conn.execute(insert(db.Instance), [
                {"series_id": i + 1, "sop_instance_uid": f"1.2.3.{i}.{k}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                 "transfer_syntax_uid": "1.2.840.10008.1.2.1", "instance_number": k + 1, "path": f"x/{i}/{k}.dcm",
                 "size": 530000, "received_at": now}
                for i in range(start, min(start + 200, n_series)) for k in range(n_instances)])
        conn.execute(insert(db.Job), [
            {"id": i + 1, "series_id": i + 1, "state": db.DONE, "rule_name": "r", "model": "default",
             "destinations": ["pacs"], "created_at": now, "processing_finished_at": now, "finished_at": now,
             "read_s": 1.0 + i % 7, "model_s": 30.0 + i % 50, "derive_s": 2.0 + i % 3}
            for i in range(n_series)])
        conn.execute(insert(db.Delivery), [
            {"job_id": i + 1, "destination": "pacs", "state": db.SENT, "attempts": 1 + (i % 10 == 0),
             "next_attempt_at": now, "started_at": now - timedelta(seconds=5 + i % 20), "finished_at": now}
            for i in range(n_series)])
        conn.execute(insert(db.Heartbeat), [
            {"ae_title": "LTDIFF", "pid": 1, "hostname": "h", "roles": "receive,decide,process,dispatch",
             "port": 11112, "started_at": now, "heartbeat_at": now, "model": "ltdiff 1.0", "device": "cpu"}])


def timed(fn: Callable[[], object], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return round(statistics.median(runs) * 1000, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=3000)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config({"node": {"data_dir": tmp}, "http": {"enabled": True, "port": 0}}, Path(tmp))
        cfg.spool_dir.mkdir(parents=True)
        database = db.Database(cfg.db_url)
        database.create_all()
        t0 = time.perf_counter()
        fill(database, args.series, args.instances)
        fill_s = time.perf_counter() - t0
        server = ObserveServer(cfg, database)
        result = {"series": args.series, "instances": args.series * args.instances, "fill_s": round(fill_s, 1)}
        for path in ("/metrics", "/healthz", "/"):
            status, _, body = server.handle(path)
            assert status in (200, 503), (path, status)
            result[f"{path}_ms"] = timed(lambda p=path: server.handle(p), args.repeat)
            result[f"{path}_bytes"] = len(body)
        database.dispose()
    print(json.dumps(result))


if __name__ == "__main__":
    main()

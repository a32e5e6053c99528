"""Recording a received instance in the database: the ORM path (``track.record_instance``: series
lookup, its jobs, two objects flushed) against the fast path of a series still being received
(``track.record_received``: one guarded UPDATE and one INSERT, statements built once), one
instance per transaction as one association gives them, interleaved. Not a test.

    python -m bench.bench_record [--instances 300] [--repeats 3] [--dir out/bench-record]

Prints the median milliseconds per instance of each path: the statements alone, and with the
commit (SQLite in WAL with synchronous=FULL, as the node; ``--dir`` should be on the node's disk).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.store import db, track
from dicom_node.audit import AuditLog

from bench.bench_node import machine

ROOT = Path(__file__).resolve().parents[1]


def record(path: str, n: int) -> dict[str, Any]:
    ds = Dataset()
    ds.InstanceNumber = n
    ds.Modality, ds.ConvolutionKernel = "CT", "Br40"
    uid = f"1.2.826.0.1.3680043.10.999.{path == 'fast'}.{n}"
    return dict(ds=ds, series_uid=f"1.2.826.0.1.3680043.10.999.{path}", sop_uid=uid,
                sop_class="1.2.840.10008.5.1.4.1.1.2", ts_uid="1.2.840.10008.1.2.1", rel=f"s/{n}.dcm",
                size=524288, calling="SCANNER", peer="127.0.0.1", digest=f"{n:064x}")


def run(database: db.Database, path: str, start: int, count: int) -> tuple[float, float]:
    """(statements, statements + commit) seconds per instance."""
    audit = AuditLog(None, "NODE")
    work = total = 0.0
    for n in range(start, start + count):
        t0 = time.perf_counter()
        s = database.Session()
        if path == "orm":
            track.record_instance(s, audit, **record(path, n))
        else:
            track.record_received(s, audit, [record(path, n)])
        t1 = time.perf_counter()
        s.commit()
        s.close()
        t2 = time.perf_counter()
        work += t1 - t0
        total += t2 - t0
    return work / count, total / count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=str(ROOT / "out" / "bench-record"))
    p.add_argument("--instances", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    d = Path(args.dir).resolve()
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    database = db.Database(f"sqlite:///{d / 'node.sqlite'}")
    database.create_all()
    for path in ("orm", "fast"):  # each series exists and is being received
        with database.session() as s:
            track.record_instance(s, AuditLog(None, "NODE"), **record(path, 0))
    print(f"machine: {machine()}")
    times: dict[str, list[tuple[float, float]]] = {"orm": [], "fast": []}
    for r in range(args.repeats):
        for path in (("orm", "fast") if r % 2 == 0 else ("fast", "orm")):
            times[path].append(run(database, path, 1 + r * args.instances, args.instances))
    with database.session() as s:
        counts = {path: db.series_by_uid(s, record(path, 0)["series_uid"]).instance_count for path in times}
    database.dispose()
    shutil.rmtree(d, ignore_errors=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(t for _, t in v)) for k, v in times.items()}
    print(f"RECORD orm: {med['orm'][0] * 1000:.2f} ms statements, {med['orm'][1] * 1000:.2f} ms with commit; "
          f"fast: {med['fast'][0] * 1000:.2f} ms, {med['fast'][1] * 1000:.2f} ms; ratio fast/orm "
          f"{med['fast'][0] / med['orm'][0]:.2f} (statements), {med['fast'][1] / med['orm'][1]:.2f} (with commit); "
          f"instances counted {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Receive rate of ``dicom-node serve`` against DCMTK ``storescp``, interleaved in one run.

    python -m bench.bench_receive [--slices 100] [--size 512] [--repeats 3] [--rss 2000]
                                  [--targets storescp,node,node-nostream,node-off,raw[,baseline]]
                                  [--baseline-tree DIR] [--node KEY=VALUE ...]

The same phantom Br40 series is sent by DCMTK ``storescu`` (TCP_NODELAY=1, 128 KB PDUs) to
``storescp`` and to the node, interleaved (the order reverses every repeat), on one association
and on 4 concurrent associations (4 ``storescu`` processes each sending a quarter;
``storescp --fork`` then serves them in parallel). Every target starts fresh (empty storage, so
no instance is a duplicate). images/s = slices / wall time until the last ``storescu`` exits; the
node has each instance on disk (file and directory entry fsynced) and committed in its database
before it answers success; ``storescp`` writes to the page cache only. The machine is shared:
read the ratio to ``storescp`` measured in the same run, not the absolute rates.

``baseline`` is the node of another source tree, given with ``--baseline-tree`` (e.g. a
``git worktree`` of the commit before a change), so before and after are measured in one run.
``node-off`` is the same node with ``group_commit_ms = 0`` (one sync pass and one transaction per
instance). ``raw`` is a bare pynetdicom SCP (same PDU size) that writes each data set as
received and answers success, without validation, fsync or database: the ceiling of any
pynetdicom-based receiver on the machine at that moment.

For the targets that are one process (the node, ``baseline``, ``raw``) it also prints the
receiver's CPU time per instance (user + system, from ``/proc/PID/stat``, all its threads) over
the send: what the receiver itself costs, less dependent on the load than the wall time.

First it prints the sync floor of the data volume: median milliseconds of one file fsync, one
directory fsync and one SQLite commit (WAL, synchronous=FULL, as the node's database) for 512 KB
files written one at a time: what one instance costs at least when nothing is shared.

``pg-1`` and ``pg-2`` are receive-only processes (``serve --roles receive``) on a PostgreSQL
database (a server started for the run): one, or two sharing the port (``node.reuse_port``), so
that receiving runs on two cores.

``node-nostream`` is the node with ``processing.streaming = false``: by default the node
standardizes a routed series' settled slices while the rest arrives, and that work shares the
cores with receiving.

``--rss N``: one more node receives an N-instance series (the 100 slices re-identified N/100
times) on one association, with streaming on and then off; its resident memory (VmRSS, and the
peak VmHWM) is printed after 100, N/2 and N instances (with streaming on, the model is loaded once
the first slices have settled). ``--node key=value`` adds ``[node]`` keys (e.g.
``group_commit_ms=0`` for one fsync pass and one transaction per instance).
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nodetools import peers

from bench.bench_node import machine, phantom_series

ROOT = Path(__file__).resolve().parents[1]


def send(files: list[Path], port: int, called: str, associations: int) -> float:
    """Send ``files`` over ``associations`` concurrent storescu processes; wall seconds."""
    parts = [files[i::associations] for i in range(associations)]
    results: list[Any] = [None] * associations

    def one(i: int) -> None:
        results[i] = peers.storescu(parts[i], port, called, calling=f"BENCH{i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(associations)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.monotonic() - t0
    for r in results:
        if r is None or r.returncode != 0:
            raise RuntimeError(f"storescu failed: {getattr(r, 'stderr', r)}")
    return dt


def node_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def start_node(out: Path, name: str, extra: dict[str, Any], processing: dict[str, Any] | None = None) -> peers.Peer:
    shutil.rmtree(out / f"{name}-data", ignore_errors=True)
    port = peers.free_port()
    cfg = peers.write_node_config(out / f"{name}.toml", port=port, data_dir=out / f"{name}-data",
                                  stable_age_s=3600, extra_node={"max_connections_per_address": 8, **extra},
                                  processing=processing)
    return peers.start_node(cfg, port, out / f"{name}.log")


def serve_raw(port: int, out_dir: Path) -> None:
    """The ``raw`` target: pynetdicom writing the encoded data set, nothing else (runs until killed)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, Verification

    out_dir.mkdir(parents=True, exist_ok=True)

    def store(event: Any) -> int:
        with open(out_dir / str(event.request.AffectedSOPInstanceUID), "wb") as f:
            f.write(event.encoded_dataset())
        return 0x0000

    ae = AE("LTDIFF")
    ae.maximum_pdu_size = 131072
    ae.maximum_associations = 16
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.add_supported_context(Verification)
    ae.start_server((peers.LOOPBACK, port), evt_handlers=[(evt.EVT_C_STORE, store)])


def start_raw(out: Path) -> peers.Peer:
    shutil.rmtree(out / "raw-received", ignore_errors=True)
    port = peers.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.bench_receive", "--serve-raw", str(port),
                             str(out / "raw-received")], cwd=ROOT,  # -m: the root on sys.path, as for this run
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    peer = peers.Peer(proc, port)
    try:
        peers.wait_port(port, 30, proc)
    except BaseException:
        peer.stop()
        raise
    return peer


class Receivers:
    """``n`` ``dicom-node serve --roles receive`` processes on one PostgreSQL database, sharing
    one port when ``n`` > 1 (``node.reuse_port``); stopped together."""

    def __init__(self, out: Path, pg: Any, n: int, extra: dict[str, Any], run: int) -> None:
        shutil.rmtree(out / "pg-data", ignore_errors=True)
        self.port = peers.free_port()
        url = pg.create_database(f"recv{run}")
        cfg = peers.write_node_config(out / "pg.toml", port=self.port, data_dir=out / "pg-data", stable_age_s=3600,
                                      extra_node={"max_connections_per_address": 8, "database_url": url,
                                                  "reuse_port": n > 1, **extra})
        self.procs: list[peers.Peer] = []
        try:
            for i in range(n):
                proc = peers._spawn(peers.node_cmd("--config", str(cfg), "serve", "--roles", "receive"),
                                    out / f"pg-{i}.log", env=peers.peer_env())
                self.procs.append(peers.Peer(proc, self.port, out / f"pg-{i}.log"))
                if i == 0:
                    peers.wait_port(self.port, 60, proc)  # the first one creates the schema
                else:
                    peers.wait_for(lambda p=self.procs[-1]: "scp_listening" in p.log(), 60, 0.1, "receiver listening")
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


def sync_floor(out: Path, n: int = 40) -> dict[str, float]:
    """Median ms of the three syncs an unshared instance pays (see the module docstring)."""
    import sqlite3

    from dicom_node.store.spool import fsync_dir, fsync_file

    d = out / "sync-floor"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    con = sqlite3.connect(d / "floor.sqlite", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, uid TEXT UNIQUE)")
    data = os.urandom(512 * 1024)
    times: dict[str, list[float]] = {"file fsync": [], "directory fsync": [], "SQLite commit": []}
    for i in range(n):
        (d / f".{i}.tmp").write_bytes(data)
        (d / f".{i}.tmp").replace(d / f"{i}.dcm")
        t0 = time.perf_counter()
        fsync_file(d / f"{i}.dcm")
        t1 = time.perf_counter()
        fsync_dir(d)
        t2 = time.perf_counter()
        con.execute("INSERT INTO t (uid) VALUES (?)", (str(i),))  # autocommit: one transaction
        t3 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key].append(dt * 1000)
    con.close()
    shutil.rmtree(d, ignore_errors=True)
    return {k: statistics.median(v) for k, v in times.items()}


def start_baseline(out: Path, tree: Path, extra: dict[str, Any]) -> peers.Peer:
    """The node of another source tree (e.g. ``git worktree add /tmp/before <commit>``)."""
    shutil.rmtree(out / "base-data", ignore_errors=True)
    port = peers.free_port()
    cfg = peers.write_node_config(out / "base.toml", port=port, data_dir=out / "base-data", stable_age_s=3600,
                                  extra_node={"max_connections_per_address": 8, **extra})
    env = peers.peer_env()
    env["PYTHONPATH"] = str(tree)
    proc = peers._spawn(peers.node_cmd("--config", str(cfg), "serve"), out / "base.log", env=env, cwd=tree)
    peer = peers.Peer(proc, port, out / "base.log")
    try:
        peers.wait_port(port, 60, proc)
    except BaseException:
        peer.stop()
        raise
    return peer


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far (its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def rates_targets(rates: dict[tuple[str, int], list[float]], assocs: int) -> set[str]:
    return {t for t, a in rates if a == assocs}


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) // 1024
    return out


def long_series(src: Path, dst: Path, n: int) -> list[Path]:
    """An ``n``-instance series made of the phantom's slices, re-identified and stacked."""
    import pydicom
    from pydicom.uid import generate_uid

    files = sorted(src.glob("*.dcm"))
    made = sorted(dst.glob("*.dcm"))
    if len(made) == n:
        return made
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    series_uid = generate_uid(prefix="1.2.826.0.1.3680043.10.999.")
    for k in range(n):
        ds = pydicom.dcmread(files[k % len(files)])
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.10.999.")
        ds.InstanceNumber = k + 1
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, -float(k) * float(ds.get("SliceThickness", 1) or 1)]
        ds.save_as(dst / f"{k:05d}.dcm")
    return sorted(dst.glob("*.dcm"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "out" / "bench"))
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--associations", default="1,4", help="comma-separated association counts")
    p.add_argument("--rss", type=int, default=2000, help="instances of the memory run (0: skip)")
    p.add_argument("--node", action="append", default=[], metavar="KEY=VALUE", help="extra [node] key")
    p.add_argument("--targets", default="storescp,node,node-off,raw",
                   help="comma-separated: storescp, node, node-nostream, node-off, pg-1, pg-2, raw, baseline")
    p.add_argument("--baseline-tree", type=Path, help="source tree of the 'baseline' target")
    p.add_argument("--serve-raw", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_raw:
        serve_raw(int(args.serve_raw[0]), Path(args.serve_raw[1]))
        return 0
    out = Path(args.out).resolve()
    extra = {k: node_value(v) for k, v in (kv.split("=", 1) for kv in args.node)}
    src = phantom_series(out, args.slices, args.size)
    files = sorted(src.glob("*.dcm"))
    mbytes = sum(f.stat().st_size for f in files) / 1e6
    print(f"machine: {machine()}")
    print(f"series: {len(files)} x {args.size}^2 CT, {mbytes:.0f} MB; node extra keys: {extra or 'none'}")
    floor = sync_floor(out)
    print("sync floor (median ms): " + ", ".join(f"{k} {v:.2f}" for k, v in floor.items())
          + f"; together {sum(floor.values()):.1f} ms per unshared instance")
    counts = [int(c) for c in args.associations.split(",")]
    rates: dict[tuple[str, int], list[float]] = {}
    cpus: dict[tuple[str, int], list[float]] = {}  # receiver CPU ms per instance (one-process targets)
    pg: Any = None  # a PostgreSQL server, started for the pg-1/pg-2 targets
    runs = 0
    for r in range(args.repeats):
        for assocs in counts:
            names = args.targets.split(",")
            for target in names if r % 2 == 0 else names[::-1]:
                if target == "raw":
                    peer = start_raw(out)
                elif target == "baseline":
                    peer = start_baseline(out, args.baseline_tree.resolve(), {})
                elif target == "storescp":
                    shutil.rmtree(out / "scp-received", ignore_errors=True)
                    # --fork: one process per association, so 4 associations run concurrently
                    peer = peers.start_storescp(out / "scp-received", "LTDIFF",
                                                extra=["--fork"] if assocs > 1 else [])
                elif target == "node-off":  # the same node with group commit off
                    peer = start_node(out, "recv", {**extra, "group_commit_ms": 0})
                elif target == "node-nostream":  # the same node, not standardizing while it receives
                    peer = start_node(out, "recv", extra, {"streaming": False})
                elif target in ("pg-1", "pg-2"):  # receive-only processes on PostgreSQL, 1 or 2 on one port
                    if pg is None:
                        from nodetools.postgres import start_postgres

                        pg = start_postgres()
                        atexit.register(pg.stop)
                    runs += 1
                    peer = Receivers(out, pg, int(target[-1]), extra, runs)
                else:
                    peer = start_node(out, "recv", extra)
                one_process = target not in ("storescp", "pg-1", "pg-2")  # storescp --fork, pg: several
                try:
                    load = os.getloadavg()[0]
                    cpu0 = cpu_seconds(peer.pid) if one_process else None
                    dt = send(files, peer.port, "LTDIFF", assocs)
                    cpu1 = cpu_seconds(peer.pid) if one_process else None
                finally:
                    peer.stop()
                rate = len(files) / dt
                rates.setdefault((target, assocs), []).append(rate)
                cpu = ""
                if cpu0 is not None and cpu1 is not None:
                    user, system = ((b - a) * 1000 / len(files) for a, b in zip(cpu0, cpu1))
                    cpus.setdefault((target, assocs), []).append(user + system)
                    cpu = f", receiver CPU {user + system:.1f} ms/instance (user {user:.1f}, system {system:.1f})"
                print(f"run {r + 1} {target:8s} {assocs} assoc: {dt:6.2f} s {rate:6.1f} images/s{cpu} "
                      f"(load {load:.1f})", flush=True)
    for assocs in counts:
        scp = statistics.median(rates[("storescp", assocs)])
        for target in [t for t in args.targets.split(",") if t != "storescp"]:
            got = statistics.median(rates[(target, assocs)])
            per_run = [n / s for n, s in zip(rates[(target, assocs)], rates[("storescp", assocs)])]
            cpu = (f"; receiver CPU {statistics.median(cpus[(target, assocs)]):.1f} ms/instance"
                   if (target, assocs) in cpus else "")
            print(f"RECEIVE {assocs} assoc: storescp {scp:.1f} images/s, {target} {got:.1f} images/s, "
                  f"ratio {got / scp:.2f} (per repeat {', '.join(f'{x:.2f}' for x in per_run)}){cpu}")
        if "baseline" in rates_targets(rates, assocs) and "node" in rates_targets(rates, assocs):
            for key, what in ((rates, "images/s"), (cpus, "receiver CPU")):
                pairs = [a / b for a, b in zip(key[("node", assocs)], key[("baseline", assocs)])]
                print(f"PAIRED {assocs} assoc: node / baseline {what}, same repeat: median {statistics.median(pairs):.2f}, "
                      f"range {min(pairs):.2f}-{max(pairs):.2f} (per repeat {', '.join(f'{x:.2f}' for x in pairs)})")
    if args.rss:
        many = long_series(src, out / f"series-{args.rss}x{args.size}", args.rss)
        marks = [100, args.rss // 2, args.rss]
        for streaming in (True, False):
            node = start_node(out, "rss", extra, {"streaming": streaming})
            seen: list[str] = []
            try:
                t0 = time.monotonic()
                for a, b in zip([0] + marks[:-1], marks):
                    send(many[a:b], node.port, "LTDIFF", 1)
                    m = memory(node.pid)
                    seen.append(f"{b}: {m['VmRSS']} MiB (peak {m['VmHWM']})")
                dt = time.monotonic() - t0
            finally:
                node.stop()
            print(f"RSS (streaming {'on' if streaming else 'off'}) after {'; '.join(seen)}; "
                  f"{args.rss / dt:.1f} images/s")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

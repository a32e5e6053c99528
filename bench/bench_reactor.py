"""CPU a receiver spends on associations that are open and idle, node against a baseline tree.

    python -m bench.bench_reactor [--associations 0,1,4,8] [--seconds 5] [--repeats 2]
                                  [--targets node,baseline,raw] [--baseline-tree DIR]

Each target is started fresh; this process opens N associations to it (pynetdicom, Verification
only), sends one C-ECHO on each, then holds them open without traffic and reads the receiver's
CPU time (user + system, all its threads, ``/proc/PID/stat``) over ``--seconds``. Printed as a
percentage of one core, median of the repeats (order reversed every repeat). Targets: ``node``
(``dicom-node serve`` of this tree), ``baseline`` (the node of ``--baseline-tree``, e.g. a
``git worktree`` of the commit before a change) and ``raw`` (a bare pynetdicom SCP, as in
``bench_receive.py``). The machine is shared: an idle receiver should read close to 0 %.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench.bench_node import machine
from bench.bench_receive import cpu_seconds, start_baseline, start_node, start_raw

ROOT = Path(__file__).resolve().parents[1]


def idle_cpu(port: int, pid: int, n: int, seconds: float) -> float:
    """Percent of one core the receiver ``pid`` used while ``n`` associations sat idle."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE("BENCH")
    ae.add_requested_context(Verification)
    assocs = [ae.associate("127.0.0.1", port, ae_title="LTDIFF") for _ in range(n)]
    try:
        if not all(a.is_established for a in assocs):
            raise RuntimeError("an association was not established")
        for a in assocs:
            a.send_c_echo()
        time.sleep(0.5)
        c0 = sum(cpu_seconds(pid))
        time.sleep(seconds)
        return (sum(cpu_seconds(pid)) - c0) / seconds * 100
    finally:
        for a in assocs:
            a.release()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "out" / "bench"))
    p.add_argument("--associations", default="0,1,4,8")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--targets", default="node,raw")
    p.add_argument("--baseline-tree", type=Path)
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    extra = {"max_connections_per_address": 16, "max_associations": 16}
    counts = [int(c) for c in args.associations.split(",")]
    names = args.targets.split(",")
    got: dict[tuple[str, int], list[float]] = {}
    for r in range(args.repeats):
        for target in names if r % 2 == 0 else names[::-1]:
            if target == "raw":
                peer = start_raw(out)
            elif target == "baseline":
                peer = start_baseline(out, args.baseline_tree.resolve(), extra)
            else:
                peer = start_node(out, "reactor", extra)
            try:
                for n in counts:
                    pct = idle_cpu(peer.port, peer.pid, n, args.seconds)
                    got.setdefault((target, n), []).append(pct)
                    print(f"run {r + 1} {target:8s} {n:2d} idle associations: {pct:5.1f} % of a core", flush=True)
            finally:
                peer.stop()
    for n in counts:
        print(f"IDLE {n} associations: " + ", ".join(
            f"{t} {statistics.median(got[(t, n)]):.1f} %" for t in names) + " of a core")
    return 0


if __name__ == "__main__":
    sys.exit(main())

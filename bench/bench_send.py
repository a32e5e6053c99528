"""Sending a derived series to a PACS: the previous path (every file decoded and encoded again)
against the current one (a file whose transfer syntax the PACS accepted is sent as stored, in
PDU-sized chunks), and 1, 2 and 4 associations at once. Not a test.

    python -m bench.bench_send [--slices 300] [--size 512] [--repeats 3] [--associations 1,2,4]

The PACS is Orthanc (a fresh one per run: no instance is a duplicate) on the same machine, and
the sender is ``dicom_node.dispatch.scu.send_files`` as the dispatch step calls it, without the database
commit per instance. DCMTK ``storescu`` (TCP_NODELAY=1, one association) sends the same files to
a fresh Orthanc too, as the native reference. The runs of one repeat are interleaved and their
order alternates per repeat; printed: median seconds per series and images/s per path.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pynetdicom import _config

from dicom_node.config import Destination
from dicom_node.dispatch.scu import send_files
from nodetools import peers

from bench.bench_node import machine

ROOT = Path(__file__).resolve().parents[1]


def one_run(name: str, files: list[Path], work: Path) -> float:
    orthanc = peers.start_orthanc(work / f"orthanc-{name}", "ORTHANC", {"node": ("LTDIFF", 104)})
    try:
        if name == "storescu":
            t0 = time.monotonic()
            subprocess.run([peers.dcmtk("storescu"), "-aet", "LTDIFF", "-aec", "ORTHANC", peers.LOOPBACK,
                            str(orthanc.port), *map(str, files)], check=True, env=peers.peer_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return time.monotonic() - t0
        path, _, n = name.partition("/")
        dest = Destination(name="pacs", ae_title="ORTHANC", host=peers.LOOPBACK, port=orthanc.port,
                           timeout_s=60, associations=int(n))
        _config.STORE_SEND_CHUNKED_DATASET = path == "as-stored"  # False: pynetdicom decodes every file
        try:
            t0 = time.monotonic()
            out = send_files(dest, files, "LTDIFF")
            dt = time.monotonic() - t0
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = True
        if out.failure is not None or out.sent != len(files):
            raise RuntimeError(f"{name}: {out.error}")
        return dt
    finally:
        orthanc.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "out" / "bench-send"))
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--associations", default="1,2,4")
    args = p.parse_args()
    out = Path(args.out).resolve()
    src = out / f"disc-{args.slices}x{args.size}"
    if len(list(src.glob("*.dcm"))) != args.slices:
        peers.make_ct_series(src, n=args.slices, size=args.size, seed=11)
    files = sorted(src.glob("*.dcm"))
    names = ["storescu", "decoded/1"] + [f"as-stored/{n}" for n in args.associations.split(",")]
    print(f"machine: {machine()}")
    print(f"series: {len(files)} x {args.size}^2 CT (explicit VR little endian) to Orthanc on this machine")
    times: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            dt = one_run(name, files, out)
            times.setdefault(name, []).append(dt)
            print(f"run {r + 1} {name:12s} {dt:6.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    base = statistics.median(times["decoded/1"])
    for name in names:
        t = statistics.median(times[name])
        print(f"SEND {name:12s} {t:6.2f} s per series, {len(files) / t:6.1f} images/s, "
              f"ratio to decoded/1 {t / base:.2f} (runs {', '.join(f'{x:.2f}' for x in times[name])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure the node on this machine: receive rate and series latency.

    python -m bench.bench_node [--slices 100] [--size 512] [--model default|PATH] [--repeats 3]

* receive rate: DCMTK storescu (TCP_NODELAY=1, 128 KB PDU, one association) sends a phantom Br40
  series to ``dicom-node serve``; images/s = slices / storescu wall time (every image is on disk,
  fsynced, and in the database before its C-STORE response).
* series latency: from the moment the series is complete (completeness decision) to the moment
  the last standardized instance is stored at the PACS (DCMTK storescp) — read, model, derive and
  send — taken from the node's own provenance records.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nodetools import peers

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, {gpu}, Python {platform.python_version()}"


def phantom_series(out: Path, slices: int, size: int) -> Path:
    """The Br40 phantom series used by the node benchmarks (made once, then reused)."""
    case = out / f"phantom-{slices}x{size}" / "case-000"
    if len(list((case / "br40").glob("*.dcm"))) != slices:
        subprocess.run([sys.executable, "-m", "ltdiff_train.make_phantom", "--out", str(case.parent), "--cases", "1",
                        "--slices", str(slices), "--seed", "11", "--size", str(size)], check=True, cwd=ROOT)
    return case / "br40"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "out" / "bench"))
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--model", default="default")
    p.add_argument("--repeats", type=int, default=3, help="receive-rate runs (median reported)")
    p.add_argument("--skip-latency", action="store_true")
    args = p.parse_args()
    out = Path(args.out).resolve()
    src = phantom_series(out, args.slices, args.size)
    mbytes = sum(f.stat().st_size for f in src.glob("*.dcm")) / 1e6
    print(f"machine: {machine()}")
    print(f"series: {args.slices} x {args.size}^2 CT, {mbytes:.0f} MB")

    # --- receive rate
    rates = []
    for r in range(args.repeats):
        port = peers.free_port()
        shutil.rmtree(out / f"recv-{r}-data", ignore_errors=True)  # fresh: duplicates would be skipped
        cfg = peers.write_node_config(out / f"recv-{r}.toml", port=port, data_dir=out / f"recv-{r}-data",
                                      stable_age_s=3600)
        node = peers.start_node(cfg, port, out / f"recv-{r}.log")
        try:
            t0 = time.monotonic()
            res = peers.storescu(src, port, "LTDIFF")
            dt = time.monotonic() - t0
            if res.returncode != 0:
                raise RuntimeError(res.stderr)
        finally:
            node.stop()
        rates.append(args.slices / dt)
        print(f"receive run {r + 1}: {dt:.2f} s, {args.slices / dt:.1f} images/s, {mbytes / dt:.1f} MB/s")
    print(f"RECEIVE RATE: {statistics.median(rates):.1f} images/s (median of {len(rates)})")
    if args.skip_latency:
        return 0

    # --- latency
    shutil.rmtree(out / "lat-data", ignore_errors=True)
    shutil.rmtree(out / "lat-pacs", ignore_errors=True)
    pacs = peers.start_storescp(out / "lat-pacs" / "received", "PACS")
    port = peers.free_port()
    cfg = peers.write_node_config(
        out / "lat.toml", port=port, data_dir=out / "lat-data", stable_age_s=2.0,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        rules=[{"name": "br40", "match": {"ConvolutionKernel": "Br40*"}, "model": args.model,
                "destinations": ["pacs"]}],
        processing={"max_batch_slices": max(args.slices, 256)},
    )
    node = peers.start_node(cfg, port, out / "lat.log")
    try:
        res = peers.storescu(src, port, "LTDIFF")
        if res.returncode != 0:
            raise RuntimeError(res.stderr)
        st = peers.wait_for(lambda: (lambda s: s if s["series"] and s["series"][0]["state"] in ("done", "failed")
                                     else None)(peers.node_status(cfg)), 7200, 1.0, "series done")
    finally:
        node.stop()
        pacs.stop()
    s = st["series"][0]
    job = s["jobs"][-1]
    d = job["durations_s"]
    if s["state"] != "done":
        print(f"latency run FAILED: {s['error']}")
        return 1
    print(f"model: {job['model']['name']} {job['model']['version']} ({job['model']['method']}) on {job['device']}")
    print(f"stages: queued {d['queued']} s, read {d['read']} s, model {d['model']} s, derive {d['derive']} s, "
          f"send {d['sending']} s")
    print(f"SERIES LATENCY (complete -> stored at PACS): {s['durations_s']['complete_to_done']} s "
          f"for {args.slices} slices (+ {peers_stable(cfg)} s stable-age wait before 'complete')")
    return 0


def peers_stable(cfg: Path) -> float:
    from dicom_node.config import load_config

    return load_config(cfg).completeness.stable_age_s


if __name__ == "__main__":
    sys.exit(main())

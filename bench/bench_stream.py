"""Streaming: latency from the last instance received to the last standardized instance stored
at the PACS, with ``processing.streaming`` on and off.

    python -m bench.bench_stream [--slices 300] [--size 512] [--rate 20] [--model linear|default|PATH]
                                 [--modes on,off[,on:4,...]] [--min-slices 16] [--settle 2.0]

A Br40 series (synthetic disc, or the chest phantom with ``--phantom``) is sent by pynetdicom over one association, paced at ``--rate`` images/s
(a scanner reconstructing), to ``dicom-node serve``, which sends the standardized series to
Orthanc (over one association, or ``N`` at once with a mode such as ``on:4``). Images in Acquisition (0020,1002) is set on every instance, so the series is complete
with its last instance in both modes (no stable-age wait). Before the timed series a 4-slice
warm-up series (new UIDs) goes through the same node, so the model is loaded in both modes.

Printed per mode: latency = (Orthanc holds every output instance, polled every 50 ms) - (C-STORE
response of the last input instance); the slices already standardized at that moment (rows in the
stream cache); the model time per slice of the process step at completion (job provenance); the
model time for the slices unprocessed at the end = that per-slice time x the slices not yet
standardized when the last instance arrived; the ratio latency / that model time (goal <= 1.2);
and the other stages.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE

from nodetools import peers

from bench.bench_node import machine

ROOT = Path(__file__).resolve().parents[1]

CT = "1.2.840.10008.5.1.4.1.1.2"


def series_files(out: Path, slices: int, size: int, use_phantom: bool) -> list[Path]:
    """The input series: a synthetic disc series (fast to make at any size; timing does not depend
    on content), or with ``--phantom`` the chest phantom (slow to generate at 300 x 512^2)."""
    if not use_phantom:
        d = out / f"disc-{slices}x{size}"
        if len(list(d.glob("*.dcm"))) != slices:
            shutil.rmtree(d, ignore_errors=True)
            peers.make_ct_series(d, n=slices, size=size, seed=11)
        return sorted(d.glob("*.dcm"))
    case = out / f"phantom-{slices}x{size}" / "case-000"
    if len(list((case / "br40").glob("*.dcm"))) != slices:
        subprocess.run([sys.executable, "-m", "ltdiff_train.make_phantom", "--out", str(case.parent), "--cases", "1",
                        "--slices", str(slices), "--seed", "11", "--size", str(size), "--no-rescan"],
                       check=True, cwd=ROOT)
    return sorted((case / "br40").glob("*.dcm"))


def send_paced(datasets: list[pydicom.Dataset], port: int, rate: float) -> float:
    """C-STORE every dataset over one association, the i-th not before t0 + i / rate; returns the
    monotonic time of the last response."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate(peers.LOOPBACK, port, ae_title="LTDIFF")
    assert assoc.is_established, "association with the node failed"
    t0 = time.monotonic()
    try:
        for i, ds in enumerate(datasets):
            wait = t0 + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            rsp = assoc.send_c_store(ds)
            if rsp is None or int(rsp.Status) != 0:
                raise RuntimeError(f"C-STORE {i} failed: {rsp}")
        return time.monotonic()
    finally:
        assoc.release()


def renamed(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Copies as another series (new Series/SOP Instance UIDs)."""
    series = generate_uid()
    out = []
    for ds in datasets:
        c = ds.copy()
        c.SeriesInstanceUID = series
        c.SOPInstanceUID = c.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        c.ImagesInAcquisition = len(datasets)
        out.append(c)
    return out


def cached_rows(database) -> int:  # noqa: ANN001
    """Slice outputs in the node's stream cache right now. The warm-up's job has been processed
    and swept, so every row belongs to the timed series. The engine is opened before the series is
    sent, so this reads within milliseconds of the last C-STORE response."""
    from sqlalchemy import func, select

    from dicom_node.store import db

    with database.session() as s:
        return int(s.scalar(select(func.count(db.StreamSlice.id))) or 0)


def orthanc_count(orthanc: peers.Peer) -> int:
    return int(peers.orthanc_get(orthanc, "/statistics")["CountInstances"])


def run(mode: str, datasets: list[pydicom.Dataset], args: argparse.Namespace, out: Path) -> dict:
    streaming, _, assocs = mode.partition(":")  # "on", "off", or with send associations: "on:4"
    work = out / f"run-{streaming}-{assocs or 1}"
    shutil.rmtree(work, ignore_errors=True)
    port = peers.free_port()
    orthanc = peers.start_orthanc(work / "orthanc", "ORTHANC", {"ltdiff": ("LTDIFF", port)})
    cfg = peers.write_node_config(
        work / "node.toml", port=port, data_dir=work / "data", stable_age_s=30.0,
        destinations=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.port,
                       "timeout_s": 60, "associations": int(assocs or 1)}],
        rules=[{"name": "br40", "match": {"ConvolutionKernel": "Br40*"}, "model": args.model_path,
                "destinations": ["orthanc"], "qa": "flag"}],
        processing={"streaming": streaming == "on", "stream_min_slices": args.min_slices,
                    "stream_settle_s": args.settle, "max_batch_slices": max(len(datasets), 256)},
    )
    node = peers.start_node(cfg, port, work / "node.log")
    try:
        warm = renamed(datasets[:4])
        send_paced(warm, port, args.rate)
        peers.wait_for(lambda: orthanc_count(orthanc) >= 4, 3600, 0.2, "warm-up series stored")
        timed = renamed(datasets)
        from dicom_node.store import db
        from dicom_node.config import load_config

        database = db.Database(load_config(cfg).db_url)
        cached_rows(database)  # connect now
        load0 = os.getloadavg()
        t_last = send_paced(timed, port, args.rate)
        at_last = cached_rows(database)
        database.dispose()
        total = 4 + len(timed)
        peers.wait_for(lambda: orthanc_count(orthanc) >= total, 7200, 0.05, "series stored at Orthanc")
        t_done = time.monotonic()
        load1 = os.getloadavg()
        st = peers.node_status(cfg)
    finally:
        node.stop()
        orthanc.stop()
    series = next(s for s in st["series"] if s["series_uid"] == str(timed[0].SeriesInstanceUID))
    job = series["jobs"][-1]
    with_cache = int(job.get("streamed_slices") or 0)
    d = job["durations_s"]
    return {"mode": mode, "latency": t_done - t_last, "streamed": with_cache, "slices": len(timed), "at_last": at_last,
            "model": d["model"], "read": d["read"], "derive": d["derive"], "sending": d["sending"],
            "queued": d["queued"], "processing": d["processing"], "qa": (job.get("qa") or {}).get("seconds"),
            "load": (load0[0], load1[0])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "out" / "bench-stream"))
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rate", type=float, default=20.0, help="images/s sent")
    p.add_argument("--model", default="linear", help="default, a shipped name (linear, ltdiff, direct) or a checkpoint path")
    p.add_argument("--modes", default="on,off",
                   help="comma-separated runs: streaming on|off, optionally :N C-STORE associations to Orthanc (on:4)")
    p.add_argument("--min-slices", type=int, default=16)
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--phantom", action="store_true", help="send the chest phantom instead of the disc series")
    args = p.parse_args()
    args.model_path = args.model  # rules take shipped names and paths alike
    out = Path(args.out).resolve()
    files = series_files(out, args.slices, args.size, args.phantom)
    datasets = [pydicom.dcmread(f) for f in files]
    print(f"machine: {machine()}")
    print(f"series: {args.slices} x {args.size}^2, sent at {args.rate:g} images/s over one association; "
          f"model {args.model}; stream_min_slices {args.min_slices}, settle {args.settle:g} s")
    for mode in args.modes.split(","):
        r = run(mode, datasets, args, out)
        rest = r["slices"] - r["streamed"]
        per_slice = r["model"] / rest if rest and r["model"] else float("nan")
        left = r["slices"] - r["at_last"]
        need = per_slice * left
        print(f"streaming {mode:>5}: LATENCY last received -> last stored at Orthanc {r['latency']:.2f} s; "
              f"{r['at_last']}/{r['slices']} slices standardized when the last arrived ({r['streamed']} from the "
              f"cache in the end); model {per_slice:.3f} s/slice at completion ({r['model']} s for {rest}); "
              f"MODEL TIME FOR THE {left} SLICES UNPROCESSED AT THE END {need:.2f} s; "
              f"RATIO {r['latency'] / need if need else float('nan'):.2f}; read {r['read']} s, QA {r['qa']} s, "
              f"derive {r['derive']} s, processing {r['processing']} s, queued {r['queued']} s, "
              f"send {r['sending']} s; load average {r['load'][0]:.1f} -> {r['load'][1]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job: the whole node path on the embedded phantom, on this machine, in a few minutes.

    python -m nodetools.demo [--out DIR] [--slices N] [--size N] [--model default|PATH]

1. generates a phantom case (Br40 series + Bl64 reference),
2. starts a local PACS (Orthanc on loopback; DCMTK storescp when Orthanc is not installed),
3. starts the node (``dicom-node serve`` with a generated configuration under the out dir),
4. sends the Br40 series with DCMTK ``storescu``, waits until the standardized series is stored
   at the PACS, prints ``dicom-node status`` and where to look,
5. writes ``before_after.png`` (input Br40 vs standardized output vs Bl64 reference, same window),
6. stops everything it started (by PID, also on Ctrl-C or failure).

The peers are started and stopped by ``nodetools.peers``, the same code the tests use.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nodetools import peers

ROOT = Path(__file__).resolve().parents[1]


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _hu(ds: Any) -> Any:
    import numpy as np

    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def write_png(path: Path, src_dir: Path, ref_dir: Path, out_files: list[Path]) -> Path:
    """Middle slice: Br40 input, standardized output, Bl64 reference; lung and soft-tissue windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pydicom

    def by_z(files: list[Path]) -> list[Any]:
        return sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))

    src, ref, out = by_z(sorted(src_dir.glob("*.dcm"))), by_z(sorted(ref_dir.glob("*.dcm"))), by_z(out_files)
    k = len(src) // 2
    def kernel(ds: Any) -> str:
        value = ds.get("ConvolutionKernel", "")
        return "/".join(str(v) for v in value) if not isinstance(value, str) else value

    images = [(_hu(src[k]), f"input {kernel(src[k])}"),
              (_hu(out[k]), f"standardized ({kernel(out[k])[:30]})"),
              (_hu(ref[k]), f"reference {kernel(ref[k])}")]
    n = images[0][0].shape[0]
    c0, c1 = n // 2 - n // 6, n // 2 + n // 6
    fig, axes = plt.subplots(2, 3, figsize=(13, 9))
    for j, (img, title) in enumerate(images):
        axes[0, j].imshow(img, cmap="gray", vmin=-1350, vmax=150)
        axes[0, j].set_title(f"{title}\nlung window W1500 L-600", fontsize=9)
        axes[1, j].imshow(img[c0:c1, c0:c1], cmap="gray", vmin=-160, vmax=240)
        axes[1, j].set_title("centre crop, soft-tissue window W400 L40", fontsize=9)
        for ax in axes[:, j]:
            ax.axis("off")
    fig.suptitle(f"slice {k + 1}/{len(src)}  (z = {float(src[k].ImagePositionPatient[2]):.1f} mm)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started: list[Any] = []

    def _term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        if args.model == "default":
            from ltdiff_core.weights import default_checkpoint

            if not default_checkpoint().is_file():
                raise FileNotFoundError(f"no shipped default weights at {default_checkpoint()}; pass --model")
        # 1. phantom
        case = out / "phantom" / "case-000"
        if not (case / "br40").is_dir() or len(list((case / "br40").glob("*.dcm"))) != args.slices:
            _say(f"generating a {args.slices}-slice {args.size}x{args.size} phantom case in {case.parent}")
            subprocess.run([sys.executable, "-m", "ltdiff_train.make_phantom", "--out", str(case.parent), "--cases", "1",
                            "--slices", str(args.slices), "--seed", str(args.seed), "--size", str(args.size)],
                           check=True, cwd=ROOT)
        src_dir, ref_dir = case / "br40", case / "bl64"
        # every run starts with an empty node and PACS: a re-run would otherwise show the earlier
        # run's output (the same series again is a duplicate) and the earlier run's model
        for stale in ("node-data", "pacs-orthanc", "pacs-storescp"):
            if (out / stale).exists():
                shutil.rmtree(out / stale)

        # 2. local PACS
        node_port = peers.free_port()
        if peers.ORTHANC and not args.storescp:
            pacs_dir = out / "pacs-orthanc"
            pacs = peers.start_orthanc(pacs_dir, "PACS", {"dicomnode": ("LTDIFF", node_port)})
            started.append(pacs)
            http = pacs.extra["http_port"]
            _say(f"Orthanc PACS (AE PACS) on 127.0.0.1:{pacs.port}, REST/Explorer http://127.0.0.1:{http}/ (PID {pacs.pid})")
        else:
            pacs_dir = out / "pacs-storescp"
            pacs = peers.start_storescp(pacs_dir / "received", "PACS")
            started.append(pacs)
            _say(f"DCMTK storescp PACS (AE PACS) on 127.0.0.1:{pacs.port} (PID {pacs.pid})")

        # 3. the node
        cfg = peers.write_node_config(
            out / "dicom-node.toml", port=node_port, data_dir=out / "node-data", stable_age_s=args.stable_age,
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port,
                           "max_retries": 3, "backoff_base_s": 2.0, "timeout_s": 60}],
            rules=[{"name": "br40-to-bl64", "match": {"Modality": "CT", "ConvolutionKernel": "Br40*"},
                    "model": args.model, "destinations": ["pacs"]}],
            processing={"device": args.device},
        )
        node = peers.start_node(cfg, node_port, out / "dicom-node.log")
        started.append(node)
        _say(f"dicom-node serve (AE LTDIFF) on 127.0.0.1:{node_port} (PID {node.pid}), config {cfg}, log {node.log_path}")

        # 4. send, wait
        t0 = time.monotonic()
        r = peers.storescu(src_dir, node_port, "LTDIFF")
        if r.returncode != 0:
            raise RuntimeError(f"storescu failed: {r.stderr.strip()}")
        t_sent = time.monotonic()
        _say(f"sent {args.slices} Br40 images with storescu in {t_sent - t0:.1f} s "
             f"({args.slices / max(t_sent - t0, 1e-6):.0f} images/s); series completes after {args.stable_age:g} s quiet")
        deadline, last_state, st = t_sent + args.timeout, None, None
        while time.monotonic() < deadline:
            st = peers.node_status(cfg)
            s = st["series"][0] if st["series"] else None
            state = s["state"] if s else "waiting"
            if state != last_state:
                _say(f"series state: {state}  ({time.monotonic() - t_sent:.0f} s after sending)")
                last_state = state
            if state in ("done", "failed"):
                break
            if node.proc.poll() is not None:
                raise RuntimeError(f"the node exited with {node.proc.returncode}; see {node.log_path}")
            time.sleep(1.0)
        else:
            raise TimeoutError(f"no result after {args.timeout} s; see {node.log_path}")
        print()
        subprocess.run([sys.executable, "-m", "dicom_node.app.cli", "--config", str(cfg), "status", "--last", "3"],
                       cwd=ROOT)
        print()
        series = st["series"][0]
        if series["state"] != "done":
            _say(f"FAILED: {series['error']}")
            return 1
        job = series["jobs"][-1]

        # 5. what arrived at the PACS
        got_dir = out / "received"
        got_dir.mkdir(exist_ok=True)
        if peers.ORTHANC and not args.storescp:
            ids = peers.orthanc_get(pacs, "/instances")
            files = []
            for i in ids:
                f = got_dir / f"{i}.dcm"
                f.write_bytes(peers.orthanc_get_bytes(pacs, f"/instances/{i}/file"))
                files.append(f)
            where = (f"Orthanc Explorer http://127.0.0.1:{pacs.extra['http_port']}/app/explorer.html "
                     f"(while running); stored in {pacs_dir / 'storage'}; "
                     f"reopen with: Orthanc {pacs.extra['config']}")
        else:
            files = sorted((pacs_dir / "received").glob("*.dcm"))
            where = f"{pacs_dir / 'received'}"
        import pydicom

        files = [f for f in files if str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)
                 == job["output_series_uid"]]
        png = write_png(out / "before_after.png", src_dir, ref_dir, files)
        d = job["durations_s"]
        _say(f"standardized series {job['output_series_uid']}: {len(files)} instances at the PACS")
        _say(f"model {job['model']['name']} {job['model']['version']} on {job['device']}: "
             f"read {d['read']} s, model {d['model']} s, derive {d['derive']} s, send {d['sending']} s; "
             f"complete -> stored at PACS {series['durations_s']['complete_to_done']} s")
        _say(f"result at the PACS: {where}")
        _say(f"before/after image: {png}")
        _say(f"node data (spool, outputs, database): {out / 'node-data'}; status: "
             f"python -m dicom_node --config {cfg} status")
        if args.keep_running:
            _say("PACS and node keep running; press Ctrl-C to stop them")
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        for p in reversed(started):
            p.stop()
        if started:
            _say("stopped: " + ", ".join(f"PID {p.pid}" for p in started))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nodetools.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "out" / "demo"), help="output folder (default out/demo)")
    p.add_argument("--slices", type=int, default=24, help="phantom slices (default 24)")
    p.add_argument("--size", type=int, default=512, help="image matrix (default 512)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    p.add_argument("--model", default="default",
                   help="'default' (the shipped default), a shipped name (ltdiff, linear, direct) or a .safetensors checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--stable-age", type=float, default=3.0, help="seconds without a new image = series complete")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    p.add_argument("--storescp", action="store_true", help="use DCMTK storescp as the PACS even if Orthanc exists")
    p.add_argument("--keep-running", action="store_true", help="keep the PACS and node running until Ctrl-C")
    args = p.parse_args(argv)
    os.environ.setdefault("TCP_NODELAY", "1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

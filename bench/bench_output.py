"""Writing a derived series durably: the previous per-file atomic writes against the current
staged write (plain writes into the private staging directory, the files' fsyncs from a few
threads, one directory fsync), interleaved on the same data volume. Not a test.

    python -m bench.bench_output [--slices 300] [--size 512] [--repeats 3] [--dir out/bench-output]

Prints one JSON object: seconds per series for each path (median), the ratio current/previous,
and the machine. ``--dir`` must be on the disk the node's data_dir uses for the figure to mean
anything (fsync cost is the disk's).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def previous(datasets, staging: Path) -> None:
    """Before: every file through open_atomic (temporary file, fsync, rename, directory fsync)."""
    from ltdiff_core.atomic import open_atomic

    for i, ds in enumerate(datasets):
        with open_atomic(staging / f"{i:05d}.dcm") as fh:
            ds.save_as(fh, enforce_file_format=True)


def current(datasets, staging: Path) -> None:
    """Now (dicom_node.process.processor): plain writes, fsync_files, one fsync_dir."""
    from ltdiff_core.atomic import fsync_dir, fsync_files

    files = []
    for i, ds in enumerate(datasets):
        with open(staging / f"{i:05d}.dcm", "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
        files.append(staging / f"{i:05d}.dcm")
    fsync_files(files)
    fsync_dir(staging)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=str(ROOT / "out" / "bench-output"))
    args = p.parse_args()

    from pydicom.uid import generate_uid

    from ltdiff_core.dicomio.writer import StudyInfo, ct_datasets

    rng = np.random.default_rng(0)
    vol = rng.normal(40, 20, (args.slices, args.size, args.size)).astype(np.float32)
    datasets = ct_datasets(vol, (1.0, 0.7, 0.7), study=StudyInfo(generate_uid(), generate_uid()),
                           kernel="Bl64", series_number=2)
    root = Path(args.dir)
    times: dict[str, list[float]] = {"previous": [], "current": []}
    for r in range(args.repeats):
        order = [("previous", previous), ("current", current)]
        for name, fn in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
            staging = root / f"{name}-{r}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            t0 = time.perf_counter()
            fn(datasets, staging)
            times[name].append(time.perf_counter() - t0)
            shutil.rmtree(staging)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(json.dumps({
        "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                    "load": os.getloadavg()},
        "slices": args.slices, "size": args.size, "repeats": args.repeats,
        "s_per_series": {k: round(v, 3) for k, v in med.items()},
        "runs": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ratio_current_over_previous": round(med["current"] / med["previous"], 3),
    }))


if __name__ == "__main__":
    main()

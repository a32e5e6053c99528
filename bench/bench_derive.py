"""Deriving the output series: the previous header copy (every element deep-copied) against the
current one (elements with values that cannot change in place copied shallowly), on the same
slices, interleaved; the encoded files must be byte-identical. Not a test.

    python -m bench.bench_derive [--slices 300] [--size 512] [--repeats 3] [--series DIR]

The slices are a synthetic disc series (a short header), or the DICOM files under ``--series``
(e.g. the chest phantom's Br40 series, whose header is a scanner-like one).

Times ``dicom_node.derive.series.derive_series`` per slice (UIDs and times fixed so both paths write the
same bytes), and separately encoding the derived datasets (``save_as`` to memory), which both
paths share.
"""
from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

import pydicom
from pydicom.dataset import Dataset

from dicom_node.derive import series as derive
from nodetools import peers

from bench.bench_node import machine

ROOT = Path(__file__).resolve().parents[1]


def previous_copy_header(source: Dataset) -> Dataset:
    """The header copy before this change."""
    out = Dataset()
    drop = set(derive._DROPPED)
    for elem in source:
        if elem.tag.is_private or elem.keyword in drop or elem.tag.group == 0x0002:
            continue
        out.add(copy.deepcopy(elem))
    return out


def run(copy_header, sources: list[Dataset], hu: np.ndarray) -> tuple[float, list[Dataset]]:
    counter = iter(range(1, 10**9))
    info = derive.DerivationInfo(model_name="linear")
    with mock.patch.object(derive, "generate_uid", lambda prefix=None: f"1.2.826.0.1.3680043.10.999.{next(counter)}"), \
            mock.patch.object(derive, "_copy_header", copy_header):
        t0 = time.perf_counter()
        out = derive.derive_series(sources, hu, info)
        return time.perf_counter() - t0, out


def encoded(datasets: list[Dataset]) -> tuple[float, list[bytes]]:
    t0 = time.perf_counter()
    blobs = []
    for ds in datasets:
        for keyword in ("InstanceCreationTime", "SeriesTime", "ContentTime"):
            setattr(ds, keyword, "000000")
        ds.ContributingEquipmentSequence[-1].ContributionDateTime = "20260101000000"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        blobs.append(buf.getvalue())
    return time.perf_counter() - t0, blobs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "out" / "bench-derive"))
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--series", type=Path, help="derive these DICOM files (searched recursively) instead")
    args = p.parse_args()
    if args.series:
        files = sorted(args.series.rglob("*.dcm"))
    else:
        src = Path(args.out).resolve() / f"disc-{args.slices}x{args.size}"
        if len(list(src.glob("*.dcm"))) != args.slices:
            peers.make_ct_series(src, n=args.slices, size=args.size, seed=11)
        files = sorted(src.glob("*.dcm"))
    sources = [pydicom.dcmread(f) for f in files]
    hu = np.stack([s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in sources]).astype(np.float32)
    print(f"machine: {machine()}")
    print(f"series: {len(sources)} slices from {files[0].parent}, {len(sources[0])} header elements each")
    paths = {"previous": previous_copy_header, "current": derive._copy_header}
    times: dict[str, list[float]] = {k: [] for k in paths}
    save: list[float] = []
    blobs: dict[str, list[bytes]] = {}
    for r in range(args.repeats):
        for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
            dt, out = run(paths[name], sources, hu)
            times[name].append(dt / len(sources))
            st, blobs[name] = encoded(out)
            save.append(st / len(sources))
    same = blobs["previous"] == blobs["current"]
    prev, cur = statistics.median(times["previous"]), statistics.median(times["current"])
    print(f"DERIVE previous {prev * 1000:.2f} ms/slice, current {cur * 1000:.2f} ms/slice, ratio {cur / prev:.2f}; "
          f"encoding {statistics.median(save) * 1000:.2f} ms/slice (both); files byte-identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

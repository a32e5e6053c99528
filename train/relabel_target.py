"""Copy a case layout with the target series duplicated under another kernel label.

Used to measure the autoencoder ceiling D(E(B)) against B with the normal evaluation command
(the case loader refuses one series as both source and target):

    python -m ltdiff_train.relabel_target --cases data/heldout --out out/ceiling-cases --label REF
    python -m ltdiff_train.evaluate --cases out/ceiling-cases --source-kernel REF --target-kernel Bl64 \\
        --methods identity,autoencoder --out out/ceiling
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from ltdiff_core.dicomio import list_cases


def relabel_case(case_dir: Path, out_dir: Path, target_kernel: str, label: str) -> None:
    """Copy the case and add its target series again with new UIDs and ConvolutionKernel ``label``."""
    shutil.copytree(case_dir, out_dir)
    copy_dir = out_dir / f"relabelled-{label.lower()}"
    copy_dir.mkdir()
    series_uid = generate_uid()
    n = 0
    for path in sorted(out_dir.rglob("*")):
        if not path.is_file() or copy_dir in path.parents:
            continue
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:  # not DICOM (case.json, notes)
            continue
        if ds.get("Modality") != "CT" or not str(ds.get("ConvolutionKernel", "")).lower().startswith(target_kernel.lower()):
            continue
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ConvolutionKernel = label
        ds.save_as(copy_dir / f"{n:05d}.dcm", enforce_file_format=True)
        n += 1
    if n == 0:
        raise SystemExit(f"{case_dir}: no CT series with kernel {target_kernel!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--target-kernel", default="Bl64")
    p.add_argument("--label", default="REF")
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"relabel_target: {args.out} exists; choose a new folder", file=sys.stderr)
        return 2
    for case_dir in list_cases(args.cases):
        relabel_case(case_dir, args.out / case_dir.name, args.target_kernel, args.label)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

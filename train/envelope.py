"""The QA training envelope of a checkpoint: what its training data looked like, measured.

    python -m ltdiff_train.envelope --cases DIR [--cases DIR ...] --checkpoint PATH [--checkpoint PATH ...] [--out PATH]

Measures every training pair with :mod:`ltdiff_core.qa` (source series; target series on the
source's patches), reduces them to robust ranges and writes them into the checkpoint's metadata
as ``training.qa_envelope``. The tensors are not touched (``weights_sha256`` stays the same); the
file and its sidecar ``.json`` are rewritten, so the file checksum changes. ``--out`` writes a
stamped copy instead of stamping in place (one checkpoint only). The fit scripts compute the same
envelope from the volumes they trained on (:func:`envelope_from_volumes`, called by
``train.common.training_record``).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ltdiff_core import qa
from ltdiff_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _case_pair(path: Path, source_kernel: str, target_kernel: str) -> qa.PairMeasures:
    """Measures of one case folder (DICOM layout) or ``*.npz`` case file."""
    if path.suffix == ".npz":
        with np.load(path) as d:
            src, tgt, sp = d["source"], d["target"], tuple(float(s) for s in d["spacing"])
        return qa.measure_pair(src, tgt, sp)
    from ltdiff_core.dicomio.cases import load_case

    case = load_case(path, source_kernel=source_kernel, target_kernel=target_kernel)
    thickness = qa.series_thickness(case.source_series.datasets)
    return qa.measure_pair(case.source, case.target, case.spacing, thickness)


def envelope_from_cases(roots: Sequence[str | Path], source_kernel: str = "Br40",
                        target_kernel: str = "Bl64") -> dict[str, Any]:
    """Envelope of every case under ``roots`` (the layout ``train.data.find_cases`` reads)."""
    from .data import find_cases

    paths = find_cases(roots)
    pairs = [_case_pair(p, source_kernel, target_kernel) for p in paths]
    return qa.build_envelope(pairs, source_kernel, target_kernel,
                             {"cases": [f"{p.parent.name}/{p.name}" for p in paths]})


def envelope_from_volumes(vols: Sequence[Any], source_kernel: str, target_kernel: str) -> dict[str, Any]:
    """Envelope of loaded training volumes (``train.data.PairedVolume``, normalised).

    The volumes carry no SliceThickness, so the slice spacing stands in for it (equal for
    contiguous reconstructions such as the phantom's).
    """
    from ltdiff_core.normalize import unit_to_hu

    pairs = [qa.measure_pair(unit_to_hu(v.source), unit_to_hu(v.target), v.spacing) for v in vols]
    return qa.build_envelope(pairs, source_kernel, target_kernel, {"cases": [v.name for v in vols]})


def stamp(checkpoint: str | Path, envelope: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write ``envelope`` into the checkpoint's ``training.qa_envelope`` (tensors unchanged)."""
    ck = load_checkpoint(checkpoint)
    meta = dict(ck.metadata)
    meta["training"] = {**(meta.get("training") or {}), "qa_envelope": envelope}
    target = Path(out) if out else ck.path
    save_checkpoint(target, ck.tensors, meta)
    return target


def _kernels(path: Path, source: str | None, target: str | None) -> tuple[str, str]:
    """Kernels from the command line, else from the checkpoint's training config, else Br40/Bl64."""
    data = ((load_checkpoint(path).metadata.get("training") or {}).get("config") or {}).get("data") or {}
    return source or data.get("source_kernel") or "Br40", target or data.get("target_kernel") or "Bl64"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ltdiff_train.envelope", description=__doc__.splitlines()[0])
    p.add_argument("--cases", action="append", required=True, metavar="DIR", help="case root (repeatable)")
    p.add_argument("--checkpoint", action="append", required=True, metavar="PATH",
                   help="checkpoint to stamp (repeatable)")
    p.add_argument("--out", metavar="PATH", help="write a stamped copy here (one checkpoint only)")
    p.add_argument("--source-kernel", help="default: the checkpoint's data.source_kernel, else Br40")
    p.add_argument("--target-kernel", help="default: the checkpoint's data.target_kernel, else Bl64")
    args = p.parse_args(argv)
    if args.out and len(args.checkpoint) > 1:
        p.error("--out needs exactly one --checkpoint")
    envelopes: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        for ck in args.checkpoint:
            kernels = _kernels(Path(ck), args.source_kernel, args.target_kernel)
            if kernels not in envelopes:
                envelopes[kernels] = envelope_from_cases(args.cases, *kernels)
            env = envelopes[kernels]
            written = stamp(ck, env, args.out)
            src = env["source"]["measures"]
            summary = ", ".join(f"{k} [{v['lo']:.3g}, {v['hi']:.3g}]" for k, v in src.items())
            print(f"{written}: envelope of {env['series']} {kernels[0]}->{kernels[1]} pairs: {summary}")
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"train.envelope: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

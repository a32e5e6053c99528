"""``dicom-node standardize``: one series from a folder in, one standardized series out.

For admins and researchers without a network round trip. It reads, runs the model and derives
with the same code the service uses (``ltdiff_core`` reader and Standardizer, the slice keys,
sampler record and derivation of :mod:`dicom_node.process.model`,
:func:`dicom_node.derive.series.derive_series`), so an offline result and a PACS result of the same
input, model, steps and seed differ only in their new UIDs and creation times.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicom_node.derive.series import derive_series, write_series
from dicom_node.process.model import derivation_info, sampler_parameters, series_slice_keys
from dicom_node.process.qa_gate import annotate

Progress = Callable[[int, int], None]


def standardize_series_dir(
    in_dir: str | Path,
    out_dir: str | Path,
    model: str | Path | None = None,
    steps: int | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: Progress | None = None,
    uid_root: str | None = None,
    qa_mode: str = "refuse",
    force: bool = False,
    qa_report: dict[str, Any] | None = None,
) -> list[Path]:
    """Standardize the single series in ``in_dir`` and write the derived series to ``out_dir``.

    ``model`` None uses the shipped default checkpoint; ``steps`` None the model's default.
    Raises ``SeriesError`` (unreadable or mixed series), ``CheckpointError`` (bad model) and
    :class:`~dicom_node.process.qa_gate.QARefused` (``qa_mode`` "refuse", input outside the checkpoint's
    training envelope, no ``force``) before anything is written. ``qa_report``, when given, receives
    the gate's record.
    """
    from ltdiff_core import Standardizer
    from ltdiff_core.dicomio.reader import read_series

    from dicom_node.process.qa_gate import QARefused, check_input, check_output

    series = read_series(Path(in_dir))
    std = Standardizer.from_checkpoint(model, device=device)
    gate = check_input(std, series, qa_mode, forced=force)
    if qa_report is not None:
        qa_report.update(gate.record())
    if gate.refused:
        raise QARefused(gate)
    hu = std.standardize(series.hu, series.spacing, steps=steps, seed=seed, progress=progress,
                         slice_keys=series_slice_keys(series, seed))
    check_output(gate, hu, series.spacing)
    if qa_report is not None:
        qa_report.clear()
        qa_report.update(gate.record())
    info = std.info
    derivation = derivation_info(info, sampler=sampler_parameters(info, steps, seed), uid_root=uid_root)
    derived = derive_series(series.datasets, hu, derivation)
    annotate(derived, gate.note())
    return write_series(derived, out_dir)


def add_standardize_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dicom-node standardize``."""
    parser.add_argument("in_dir", metavar="IN_SERIES_DIR", help="folder holding one CT series")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for the standardized series")
    parser.add_argument("--model", metavar="PATH", help="checkpoint (.safetensors) or shipped name (ltdiff, linear, direct); "
                        "default: the shipped default (ltdiff_core.weights.DEFAULT)")
    parser.add_argument("--steps", type=int, metavar="N", help="sampler steps; default: the model's default")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="sampler seed (default 0)")
    parser.add_argument("--uid-root", metavar="ROOT",
                        help="root for new Series/SOP Instance UIDs (default: UUID-derived 2.25.)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--qa", choices=("refuse", "flag", "off"), default="refuse",
                        help="physics QA gate against the checkpoint's training envelope (default refuse: exit 3)")
    parser.add_argument("--force", action="store_true",
                        help="write even when the QA gate refuses; the warning goes into DerivationDescription")


def _progress_printer() -> Progress:
    """Slices done so far, on one stderr line (stdout stays for the result)."""

    def report(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\rstandardizing: {done}/{total} slices", end=end, file=sys.stderr, flush=True)

    return report


def run_standardize(args: argparse.Namespace) -> int:
    """CLI entry: 0 on success, 2 on an unreadable series, a bad model or a write failure,
    3 when the QA gate refuses the series (one line: the failed check, its value, the envelope)."""
    from ltdiff_core import CheckpointError
    from ltdiff_core.dicomio.reader import SeriesError

    from dicom_node.process.qa_gate import QARefused

    if args.steps is not None and args.steps < 1:
        print("dicom-node standardize: --steps must be >= 1", file=sys.stderr)
        return 2
    report: dict[str, Any] = {}
    try:
        paths = standardize_series_dir(
            args.in_dir, args.out_dir, model=args.model, steps=args.steps, device=args.device,
            seed=args.seed, progress=None if getattr(args, "quiet", False) else _progress_printer(),
            uid_root=getattr(args, "uid_root", None), qa_mode=getattr(args, "qa", "refuse"),
            force=getattr(args, "force", False), qa_report=report,
        )
    except QARefused as exc:
        print(f"dicom-node standardize: {exc} (--force writes anyway)", file=sys.stderr)
        return 3
    except (SeriesError, CheckpointError, ValueError, OSError) as exc:
        print(f"dicom-node standardize: {exc}", file=sys.stderr)
        return 2
    for warning in report.get("warnings", []):
        print(f"dicom-node standardize: QA {report.get('verdict')}: {warning}", file=sys.stderr)
    print(f"wrote {len(paths)} instances to {args.out_dir} (QA {report.get('verdict', 'off')})")
    return 0

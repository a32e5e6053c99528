"""The ceiling set-up: the target series copied under another kernel label loads as an identical pair."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from ltdiff_core.dicomio import load_case
from ltdiff_train.relabel_target import main


def test_relabelled_target_pairs_with_itself(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "ltdiff_train.make_phantom", "--out", str(tmp_path / "cases"), "--cases", "1",
                    "--slices", "2", "--seed", "77", "--size", "64"], check=True, capture_output=True, timeout=300)
    assert main(["--cases", str(tmp_path / "cases"), "--out", str(tmp_path / "ceil"), "--label", "REF"]) == 0
    case = load_case(tmp_path / "ceil" / "case-000", source_kernel="REF", target_kernel="Bl64")
    original = load_case(tmp_path / "cases" / "case-000")
    assert np.array_equal(case.source, case.target)
    assert np.array_equal(case.target, original.target)
    assert case.source_series.series_uid != case.target_series.series_uid
    assert len(case.rois) == len(original.rois)
    assert main(["--cases", str(tmp_path / "cases"), "--out", str(tmp_path / "ceil")]) == 2  # never overwrites

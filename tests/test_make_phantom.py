"""The phantom command: layout, determinism of pixel data and UIDs, argument checks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ltdiff_core.dicomio import find_series, list_cases, load_case
from ltdiff_train.make_phantom import case_seed, main

ARGS = ["--cases", "2", "--slices", "3", "--size", "96", "--thickness", "3"]


def _pixels_and_uids(case_dir: Path) -> list[tuple[str, bytes, str]]:
    out = []
    for path in sorted(case_dir.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        out.append((str(path.relative_to(case_dir)), ds.PixelData, ds.SOPInstanceUID))
    return out


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "ltdiff_train.make_phantom", "--out", str(tmp_path / "a"), "--seed", "5", *ARGS]
    subprocess.run(cmd, check=True, cwd=repo, capture_output=True, timeout=600)
    assert main(["--out", str(tmp_path / "b"), "--seed", "5", *ARGS]) == 0
    assert main(["--out", str(tmp_path / "c"), "--seed", "6", "--cases", "1", *ARGS[2:]]) == 0

    cases = list_cases(tmp_path / "a")
    assert [c.name for c in cases] == ["case-000", "case-001"]
    for case_dir in cases:
        assert {p.name for p in case_dir.iterdir()} >= {"br40", "bl64", "rescan", "case.json"}
        assert _pixels_and_uids(case_dir) == _pixels_and_uids(tmp_path / "b" / case_dir.name)
    first, other = _pixels_and_uids(cases[0]), _pixels_and_uids(tmp_path / "c" / "case-000")
    assert [p for _, p, _ in first] != [p for _, p, _ in other]
    assert not {u for *_, u in first} & {u for *_, u in other}
    assert _pixels_and_uids(cases[0]) != _pixels_and_uids(cases[1])


def test_written_case_loads_as_a_pair(tmp_path, dciodvfy):
    assert main(["--out", str(tmp_path), "--seed", "2", "--cases", "1", "--slices", "3", "--size", "96"]) == 0
    loaded = load_case(tmp_path / "case-000")
    assert loaded.source.shape == loaded.target.shape == (3, 96, 96)
    assert loaded.spacing == pytest.approx((1.5, 0.7, 0.7))
    assert loaded.meta["meta"]["seed"] == case_seed(2, 0)
    assert len(loaded.rois) == len(loaded.meta["tumour_info"]) == len(loaded.roi_names)
    # Same acquisition, two kernels: strongly related but not identical images.
    assert not np.array_equal(loaded.source, loaded.target)
    assert np.corrcoef(loaded.source.ravel(), loaded.target.ravel())[0, 1] > 0.8
    groups = find_series(tmp_path / "case-000")
    assert len(groups) == 3 + (1 if loaded.rois else 0)  # Br40, Bl64, RESCAN (+ SEG)
    for files in groups.values():  # one file of every object kind written
        assert dciodvfy(files[0]) == [], files[0]
    rescan = load_case(tmp_path / "case-000", target_kernel="RESCAN")
    assert rescan.target.shape == loaded.target.shape and not np.array_equal(rescan.target, loaded.target)
    ds = pydicom.dcmread(sorted((tmp_path / "case-000" / "rescan").iterdir())[0])
    assert ds.ConvolutionKernel == "RESCAN" and ds.SeriesDescription.endswith("independent Bl64 realisation")


def test_no_rescan_pixel_spacing_and_split_mode(tmp_path):
    assert main(["--out", str(tmp_path / "a"), "--seed", "2", "--cases", "1", "--slices", "2", "--size", "64",
                 "--no-rescan", "--pixel-mm", "0.9", "--thickness", "5"]) == 0
    case_dir = tmp_path / "a" / "case-000"
    assert not (case_dir / "rescan").exists()
    loaded = load_case(case_dir)
    assert loaded.spacing == pytest.approx((5.0, 0.9, 0.9))
    assert main(["--out", str(tmp_path / "b"), "--seed", "2", "--cases", "1", "--slices", "2", "--size", "64",
                 "--rescan-mode", "split"]) == 0
    assert load_case(tmp_path / "b" / "case-000", target_kernel="RESCAN").meta["meta"]["rescan"]["mode"] == "split"


@pytest.mark.parametrize("bad", [["--cases", "0"], ["--slices", "0"], ["--seed", "-1"], ["--thickness", "0"],
                                 ["--pixel-mm", "0.1"], ["--generator", "other"],
                                 ["--generator", "fbp", "--rescan-mode", "split"]])
def test_refuses_bad_arguments(tmp_path, bad):
    argv = ["--out", str(tmp_path), "--cases", "1", "--slices", "1", "--seed", "0", *bad]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert not any(tmp_path.iterdir())

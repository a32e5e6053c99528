"""End-to-end ``train.evaluate`` on a tiny phantom set, and refusal of unusable inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ltdiff_core.radiomics.classes import ALL_CLASSES
from ltdiff_core.radiomics.evaluation import EvaluationError, load_checked, validate_pair
from ltdiff_train import evaluate, make_phantom


@pytest.fixture(scope="module")
def phantom_cases(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval") / "cases"
    assert make_phantom.main(["--out", str(root), "--cases", "2", "--slices", "2", "--seed", "7", "--size", "96"]) == 0
    return root


@pytest.fixture(scope="module")
def linear_checkpoint(tmp_path_factory) -> Path:
    """A linear filter fitted on a phantom case that is not in the evaluation set."""
    from ltdiff_core.checkpoint import save_checkpoint
    from ltdiff_core.linear_filter import LinearFilterFitter
    from ltdiff_core.normalize import NORMALIZATION
    from ltdiff_core.phantom import generate_case

    case = generate_case(99, 2, size=96)
    fitter = LinearFilterFitter()
    for a, b in zip(case.br40, case.bl64):
        fitter.add(a, b, case.spacing[1:])
    path = tmp_path_factory.mktemp("ckpt") / "linear.safetensors"
    save_checkpoint(path, fitter.fit().to_tensors("linear"),
                    {"name": "linear-test", "version": "0", "method": "linear", "networks": {},
                     "normalization": NORMALIZATION})
    return path


@pytest.fixture(scope="module")
def report(phantom_cases, linear_checkpoint, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report")
    rc = evaluate.main(["--cases", str(phantom_cases), "--out", str(out), "--methods", "identity,histmatch,linear",
                        "--linear", str(linear_checkpoint), "--max-rois-per-range", "4", "--no-progress"])
    assert rc == 0
    return json.loads((out / "report.json").read_text()), out


def test_report_files_and_structure(report):
    rep, out = report
    for name in ("report.md", "ccc_by_class.png", "re_curve.png", "panel.png"):
        assert (out / name).stat().st_size > 1000
    assert rep["methods"] == ["identity", "histmatch", "linear"]
    assert "--linear" in rep["command"]
    head = rep["headline_set"]
    assert rep["roi_counts"]["per_set"][head] >= 3
    assert rep["roi_counts"]["per_set"]["random2d"] > 0
    for m in rep["methods"]:
        a = rep["results"][m]["agreement"][head]
        assert set(a["classes"]) == set(ALL_CLASSES)
        for cell in a["classes"].values():
            assert cell["n"] + cell["n_constant"] + cell["n_undefined"] > 0
            assert cell["mean"] is None or -1.0 <= cell["mean"] <= 1.0
        curve = a["re_curve"]["count"]
        assert curve == sorted(curve) and curve[-1] <= a["n_features"]
        assert 0.0 <= a["re_reproducible"]["share"] <= 1.0
        assert rep["results"][m]["timing"]["slices"] == 4


def test_report_values_are_plausible(report):
    rep, out = report
    res = rep["results"]
    ident, lin = res["identity"]["image_metrics"], res["linear"]["image_metrics"]
    assert ident["rmse_hu"] > 10.0
    assert lin["rmse_hu"] < ident["rmse_hu"]  # a fitted filter must move Br40 towards Bl64
    assert lin["ssim"] > ident["ssim"]
    n_tumours = sum(c["n_tumours"] for c in rep["cases"])
    assert n_tumours >= 1
    assert ident["n_tumours"] == n_tumours
    # every tumour edge is either measured or skipped with a reason
    assert ident["mtf50_n_edges"] + len(ident.get("mtf50_skipped", [])) >= n_tumours
    md = (out / "report.md").read_text()
    assert "on their own data — not comparable" in md
    assert "| linear |" in md and "LTDiff++ (patient) (published)" in md


def test_evaluation_is_deterministic(report, phantom_cases, tmp_path):
    rep, _ = report
    assert evaluate.main(["--cases", str(phantom_cases), "--out", str(tmp_path), "--methods", "identity",
                          "--max-rois-per-range", "4", "--no-progress", "--jobs", "2"]) == 0
    again = json.loads((tmp_path / "report.json").read_text())
    assert again["roi_counts"] == rep["roi_counts"]
    head = rep["headline_set"]
    assert again["results"]["identity"]["agreement"][head] == rep["results"]["identity"]["agreement"][head]


def test_missing_checkpoint_is_an_error_naming_the_file(phantom_cases, tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    rc = evaluate.main(["--cases", str(phantom_cases), "--out", str(tmp_path / "o"), "--methods", "identity,linear",
                        "--linear", str(missing), "--no-progress"])
    assert rc == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.json").exists()


def test_mismatched_pair_is_refused(ct_series, tmp_path, capsys):
    ct_series(shape=(3, 32, 32), spacing=(1.5, 0.7, 0.7), kernel="Br40", folder="cases/bad/br40")
    ct_series(shape=(3, 32, 32), spacing=(1.5, 0.9, 0.9), kernel="Bl64", folder="cases/bad/bl64")
    with pytest.raises(EvaluationError, match="cannot be paired"):
        load_checked(tmp_path / "cases" / "bad", "Br40", "Bl64")
    rc = evaluate.main(["--cases", str(tmp_path / "cases"), "--out", str(tmp_path / "o"), "--methods", "identity",
                        "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad" in err and "mismatched" in err


def test_validate_pair_refuses_other_shapes():
    a = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(EvaluationError, match="mismatched"):
        validate_pair(a, np.zeros((2, 8, 9), np.float32), (1.0, 1.0, 1.0), [], "x")
    with pytest.raises(EvaluationError, match="tumour mask"):
        validate_pair(a, a, (1.0, 1.0, 1.0), [np.zeros((2, 8, 7), bool)], "x")

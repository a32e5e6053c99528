"""Ceiling rows (rescan series, autoencoder on the standard), sampler seeds and bootstrap tables end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ltdiff_core.dicomio.cases import CaseError, has_series, load_case, load_matched_series
from ltdiff_core.dicomio.uids import make_uid
from ltdiff_core.dicomio.writer import StudyInfo, ct_datasets, save_datasets, slice_positions, to_int16
from ltdiff_core.radiomics.methods import method_names
from ltdiff_train import evaluate

SHAPE = (3, 64, 64)
SPACING = (1.5, 0.7, 0.7)


def _truth(seed: int) -> np.ndarray:
    """Two tissues (lung-like left, soft-tissue right) with a little structure, no noise."""
    rng = np.random.default_rng(seed)
    vol = np.where(np.arange(SHAPE[2])[None, None, :] < SHAPE[2] // 2, -500.0, 100.0) * np.ones(SHAPE)
    return vol + rng.normal(0, 15, (SHAPE[0], 1, SHAPE[2]))


def write_case(root: Path, name: str, seed: int, rescan: str | None = "shifted") -> dict[str, np.ndarray]:
    """A Br40 / Bl64 case and, unless ``rescan`` is None, a RESCAN series (target-kernel noise redrawn).

    ``shifted``: the RESCAN series has one extra slice below the others, so its file index k + 1
    holds the slice at the target's index k (pairing must go by position). ``short``: it lacks the
    last slice.
    """
    rng = np.random.default_rng(seed + 100)
    truth = _truth(seed)
    study = StudyInfo(study_uid=make_uid(), frame_of_reference_uid=make_uid())
    source = truth + rng.normal(0, 10, SHAPE)
    target = truth + rng.normal(0, 40, SHAPE)
    save_datasets(ct_datasets(source, SPACING, study=study, kernel="Br40", series_number=1), root / name / "br40")
    save_datasets(ct_datasets(target, SPACING, study=study, kernel="Bl64", series_number=2), root / name / "bl64")
    out = {"source": to_int16(source).astype(np.float32), "target": to_int16(target).astype(np.float32)}
    if rescan is not None:
        pos = slice_positions(SHAPE, SPACING)
        again = truth + rng.normal(0, 40, SHAPE)
        if rescan == "shifted":
            below = pos[:1] - np.array([0, 0, SPACING[0]])
            vol = np.concatenate([rng.normal(0, 40, (1, *SHAPE[1:])), again])
            pos = np.concatenate([below, pos])
        else:
            vol, pos = again[:-1], pos[:-1]
        save_datasets(ct_datasets(vol, SPACING, study=study, kernel="RESCAN", series_number=3, positions=pos),
                      root / name / "rescan")
        out["rescan"] = to_int16(again).astype(np.float32)
    return out


def test_rescan_series_is_paired_by_position_with_the_standard(tmp_path):
    truth = write_case(tmp_path, "c0", 1)
    case = load_case(tmp_path / "c0")
    assert has_series(tmp_path / "c0", "RESCAN") and not has_series(tmp_path / "c0", "B30f")
    vol = load_matched_series(tmp_path / "c0", "RESCAN", case)
    assert np.array_equal(vol, truth["rescan"])
    write_case(tmp_path, "c1", 2, rescan="short")
    with pytest.raises(CaseError, match="c1.*no slice at 1 of the 3"):
        load_matched_series(tmp_path / "c1", "RESCAN", load_case(tmp_path / "c1"))


@pytest.fixture(scope="module")
def rescan_cases(tmp_path_factory) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    root = tmp_path_factory.mktemp("rescan") / "cases"
    return root, {f"c{i}": write_case(root, f"c{i}", i) for i in range(3)}


def _run(cases: Path, out: Path, *extra: str) -> dict:
    rc = evaluate.main(["--cases", str(cases), "--out", str(out), "--roi-radius-mm", "3", "--max-rois-per-range", "3",
                        "--no-progress", *extra])
    assert rc == 0
    return json.loads((out / "report.json").read_text())


def test_rescan_method_scores_the_rescan_series(rescan_cases, tmp_path):
    root, truth = rescan_cases
    rep = _run(root, tmp_path / "o", "--methods", "identity,rescan", "--reference", "identity",
               "--bootstrap", "200")
    per_case = {m["case"]: m for m in rep["results"]["rescan"]["image_metrics_per_case"]}
    for name, t in truth.items():
        expected = float(np.sqrt(np.mean((t["rescan"] - t["target"]) ** 2)))
        assert per_case[name]["rmse_hu"] == pytest.approx(expected, rel=1e-6)
    boot = rep["bootstrap"]
    assert boot["n_cases"] == 3 and boot["n_boot"] == 200 and boot["seconds"] >= 0
    assert set(boot["paired"]) == {"rescan"}
    for cell in boot["paired"]["rescan"]["ccc"].values():
        assert cell["verdict"] in ("better", "worse", "tied", "undefined")
    md = (tmp_path / "o" / "report.md").read_text()
    assert "| rescan (ceiling) |" in md
    assert "Paired difference: method − `identity`" in md


def test_a_case_without_rescan_series_is_an_error_naming_it(rescan_cases, tmp_path, capsys):
    root, _ = rescan_cases
    cases = tmp_path / "cases"
    import shutil

    shutil.copytree(root, cases)
    write_case(cases, "zz-norescan", 9, rescan=None)
    rc = evaluate.main(["--cases", str(cases), "--out", str(tmp_path / "o"), "--methods", "identity,rescan",
                        "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "zz-norescan" in err and "RESCAN" in err
    # the default method list includes rescan when the cases hold RESCAN series, so the same error
    # comes before any model is run
    rc = evaluate.main(["--cases", str(cases), "--out", str(tmp_path / "o2"), "--no-progress"])
    assert rc == 2 and "zz-norescan" in capsys.readouterr().err
    # not requested: no error
    assert evaluate.main(["--cases", str(cases), "--out", str(tmp_path / "o3"), "--methods", "identity",
                          "--roi-radius-mm", "3", "--max-rois-per-range", "2", "--bootstrap", "0",
                          "--no-progress"]) == 0


def test_default_methods_include_ceilings():
    assert "rescan" in method_names(None, [], rescan_available=True)
    assert "rescan" not in method_names(None, [])
    assert "autoencoder-ceiling" in method_names(None, [])


def test_explicit_reference_must_be_evaluated(rescan_cases, tmp_path, capsys):
    root, _ = rescan_cases
    rc = evaluate.main(["--cases", str(root), "--out", str(tmp_path / "o"), "--methods", "identity",
                        "--reference", "ours", "--no-progress"])
    assert rc == 2 and "reference" in capsys.readouterr().err


def test_seeds_and_paired_bootstrap_end_to_end(rescan_cases, tmp_path):
    """linear+noise draws new noise per seed, linear does not; the reference against itself is exactly tied."""
    root, _ = rescan_cases
    from ltdiff_core.weights import default_checkpoint

    lin = str(default_checkpoint("linear"))
    args = ["--methods", "identity,linear,linear+noise", "--linear", lin, "--seeds", "0,1",
            "--reference", "linear", "--bootstrap", "300", "--bootstrap-seed", "4"]
    rep = _run(root, tmp_path / "a", *args)
    res = rep["results"]
    assert rep["seeds"] == [0, 1]
    assert res["linear+noise"]["seed_dependent"] and not res["linear"]["seed_dependent"]
    assert res["linear+noise"]["timing"]["runs"] == 6 and res["identity"]["timing"]["runs"] == 3
    spread = res["linear+noise"]["seeds"]
    assert len(spread["per_seed"]) == 2
    v = [p["ccc"]["GLCM"] for p in spread["per_seed"]]
    assert spread["min"]["ccc"]["GLCM"] == pytest.approx(min(v))
    assert spread["max"]["ccc"]["GLCM"] == pytest.approx(max(v))
    assert v[0] != v[1]
    boot = rep["bootstrap"]
    est = boot["methods"]["linear+noise"]["ccc"]["GLCM"]["estimate"]
    assert est == pytest.approx(np.mean(v), abs=1e-9)
    assert "linear" not in boot["paired"] and set(boot["paired"]) == {"identity", "linear+noise"}
    md = (tmp_path / "a" / "report.md").read_text()
    assert "## Sampler seeds (0, 1)" in md and "Seed-independent: identity, linear." in md
    assert boot["seed"] == 4 and boot["n_boot"] == 300
    for m in ("identity", "linear+noise"):
        for cell in boot["paired"][m]["ccc"].values():
            assert cell["low"] is None or cell["low"] <= cell["high"]


def test_autoencoder_ceiling_equals_the_relabelled_target_route(rescan_cases, tmp_path):
    """D(E(standard)) in one run gives the numbers the train.relabel_target route gives."""
    from ltdiff_train import relabel_target

    root, _ = rescan_cases
    one = tmp_path / "one"
    import shutil

    shutil.copytree(root / "c0", one / "c0")
    rep = _run(one, tmp_path / "direct", "--methods", "autoencoder-ceiling", "--bootstrap", "50")
    assert relabel_target.main(["--cases", str(one), "--out", str(tmp_path / "ref"), "--label", "REF"]) == 0
    ref = _run(tmp_path / "ref", tmp_path / "relabel", "--methods", "autoencoder", "--source-kernel", "REF",
               "--bootstrap", "50")
    a, b = rep["results"]["autoencoder-ceiling"], ref["results"]["autoencoder"]
    assert a["image_metrics"]["rmse_hu"] == pytest.approx(b["image_metrics"]["rmse_hu"], rel=1e-6)
    head = rep["headline_set"]
    assert a["agreement"][head]["classes"] == b["agreement"][head]["classes"]
    assert a["image_metrics"]["rmse_hu"] > 0  # the autoencoder does not return its input
    assert "| autoencoder-ceiling |" in (tmp_path / "direct" / "report.md").read_text()

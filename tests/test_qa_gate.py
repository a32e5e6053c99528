"""Physics QA gate, offline (`dicom-node standardize`) and in a running node, on real data:
phantom series (small crops), pydicom's bundled CT files, the shipped checkpoint's envelope."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest

from dicom_node.config import ConfigError, parse_config
from nodetools.peers import (
    ROOT, free_port, node_cmd, node_status, start_node, start_storescp, storescu, wait_for, write_node_config,
)
from ltdiff_core import qa
from ltdiff_core.checkpoint import load_checkpoint
from ltdiff_core.weights import default_checkpoint

LINEAR = default_checkpoint("linear")


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.app.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _make_phantom(out: Path, seed: int, thickness: float = 1.5, slices: int = 2) -> Path:
    subprocess.run([sys.executable, "-m", "ltdiff_train.make_phantom", "--out", str(out), "--cases", "1", "--slices",
                    str(slices), "--seed", str(seed), "--size", "256", "--thickness", str(thickness)],
                   check=True, capture_output=True, timeout=300, cwd=ROOT)
    return out / "case-000"


def _relabel(src: Path, dst: Path, kernel: str = "Br40", description: str | None = None) -> Path:
    """Copy a series with a new ConvolutionKernel tag (and new UIDs: a different series)."""
    from pydicom.uid import generate_uid

    dst.mkdir(parents=True)
    series_uid = generate_uid()
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.ConvolutionKernel = kernel
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if description is not None:
            ds.SeriesDescription = description
        ds.save_as(dst / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_phantom(tmp_path_factory.mktemp("qa-phantom"), 4242)


@pytest.fixture(scope="module")
def sharp_as_br40(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom's Bl64 series with its kernel tag rewritten to Br40 (a lying tag)."""
    return _relabel(phantom / "bl64", tmp_path_factory.mktemp("relabel") / "series")


def _envelope() -> dict[str, Any]:
    env = qa.envelope_of(load_checkpoint(LINEAR).metadata)
    assert env is not None, "the shipped checkpoints must carry a QA envelope (python -m ltdiff_train.envelope)"
    return env


def _single_file_series(name: str, dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(pydicom.data.get_testdata_file(name, download=False), dst / name)
    return dst


# ------------------------------------------------------------------ offline command
def test_br40_series_passes_and_output_says_so(phantom: Path, tmp_path: Path) -> None:
    proc = _cli("standardize", str(phantom / "br40"), str(tmp_path / "out"), "--model", str(LINEAR), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "QA pass" in proc.stdout
    ds = pydicom.dcmread(sorted((tmp_path / "out").glob("*.dcm"))[0])
    assert "QA pass" in ds.DerivationDescription


def test_sharp_series_tagged_br40_is_refused_with_sharpness(sharp_as_br40: Path, tmp_path: Path) -> None:
    proc = _cli("standardize", str(sharp_as_br40), str(tmp_path / "out"), "--model", str(LINEAR), "--quiet")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert "QA refused: sharpness" in line and "outside the training envelope [" in line and "of Br40" in line
    rng = _envelope()["source"]["measures"]["sharpness"]
    value = float(line.split("3 lp/cm) ")[1].split()[0])
    assert value > rng["hi"], (value, rng)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.dcm"))


@pytest.mark.parametrize("how", [("--force",), ("--qa", "flag")])
def test_force_and_flag_write_a_valid_derived_series_naming_the_warning(
        sharp_as_br40: Path, tmp_path: Path, dciodvfy: Any, how: tuple[str, ...]) -> None:
    out = tmp_path / "out"
    proc = _cli("standardize", str(sharp_as_br40), str(out), "--model", str(LINEAR), "--quiet", *how)
    assert proc.returncode == 0, proc.stderr
    assert "QA flagged" in proc.stdout and "sharpness" in proc.stderr
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 2
    ds = pydicom.dcmread(files[0])
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    tag = "forced" if how == ("--force",) else "flag"
    assert f"QA WARNING ({tag})" in ds.DerivationDescription and "sharpness" in ds.DerivationDescription
    assert len(ds.DerivationDescription) <= 1024
    assert dciodvfy(files[0]) == []


def test_pydicom_ct_small_is_standardized_and_flagged(tmp_path: Path) -> None:
    """128x128, GE STANDARD, 5 mm: a smooth kernel in a geometry the model handles, but a 128^2
    image of 0.66 mm pixels (8 cm) holds no patch flat enough for the strict criterion. The kernel
    is measured on the least structured blocks of a looser one (the record says so); nothing in
    it is a different kind of input, so it is standardized and flagged, never refused."""
    series = _single_file_series("CT_small.dcm", tmp_path / "in")
    proc = _cli("standardize", str(series), str(tmp_path / "out"), "--model", str(LINEAR), "--quiet")
    assert proc.returncode == 0 and "QA flagged" in proc.stdout + proc.stderr, (proc.stdout, proc.stderr)
    from ltdiff_core.dicomio.reader import read_series

    s = read_series(series)
    v = qa.assess_input(s.hu, s.spacing, _envelope(), qa.series_thickness(s.datasets))
    assert v.inputs.values["sharpness"] is not None and "structure up to" in v.inputs.region, v.inputs.region
    assert not {f.check for f in v.findings} - {"pixel_spacing_mm", "slice_thickness_mm"}  # geometry only


def test_pydicom_512_head_ct_is_refused_with_a_reason(tmp_path: Path) -> None:
    # 512x512 head (BodyPartExamined HEAD), 0.43 mm pixels, JPEG 2000; the only bundled 512^2 head CT
    series = _single_file_series("J2K_pixelrep_mismatch.dcm", tmp_path / "in")
    proc = _cli("standardize", str(series), str(tmp_path / "out"), "--model", str(LINEAR), "--quiet")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "QA refused: pixel spacing 0.43 mm outside the model's range [0.49 mm, 0.98 mm]" in proc.stderr
    from ltdiff_core.dicomio.reader import read_series

    s = read_series(series)
    v = qa.assess_input(s.hu, s.spacing, _envelope(), qa.series_thickness(s.datasets))
    failed = {f.check for f in v.findings}
    flagged = {f.check for f in v.flags}
    # refused for its geometry; not a chest/body CT (small body) and a head kernel smoother than
    # Br40 are flags: neither is another kind of input for a kernel conversion
    assert {"pixel_spacing_mm", "slice_thickness_mm"} <= failed, failed
    assert {"body_diameter_mm", "sharpness"} <= flagged, flagged
    # with the geometry the Standardizer handles (resampling), the pixel spacing still fails: 0.43 mm
    # is beyond 0.7 x the training spacing; the physics findings stay
    from ltdiff_core.resample import supported_geometry

    g = qa.assess_input(s.hu, s.spacing, _envelope(), qa.series_thickness(s.datasets),
                        supported_geometry(load_checkpoint(LINEAR).metadata))
    assert "pixel_spacing_mm" in {f.check for f in g.findings}
    assert {"body_diameter_mm", "sharpness"} <= {f.check for f in g.flags}


def test_geometry_is_checked_against_what_the_model_handles(tmp_path: Path) -> None:
    """A 5 mm Br40 series is outside the training data's thickness (1-1.5 mm) but inside what the
    2-D model handles: its verdict comes from the physics (noise, sharpness), never from the
    thickness; a 0.9 mm-pixel series is resampled, not refused for its spacing."""
    case = _make_phantom(tmp_path / "ph5", 4243, thickness=5.0)
    proc = _cli("standardize", str(case / "br40"), str(tmp_path / "out"), "--model", str(LINEAR), "--quiet")
    assert "slice thickness" not in proc.stderr, proc.stderr
    from ltdiff_core.dicomio.reader import read_series
    from ltdiff_core.resample import supported_geometry

    s = read_series(case / "br40")
    geometry = supported_geometry(load_checkpoint(LINEAR).metadata)
    v = qa.assess_input(s.hu, s.spacing, _envelope(), qa.series_thickness(s.datasets), geometry)
    assert (proc.returncode == 0) == (v.status == "pass"), (proc.stderr, v.reason)
    assert "slice_thickness_mm" not in {f.check for f in v.findings}
    wide = qa.assess_input(s.hu, (5.0, 0.9, 0.9), _envelope(), 5.0, geometry)
    assert "pixel_spacing_mm" not in {f.check for f in wide.findings}
    narrow = qa.assess_input(s.hu, (5.0, 0.9, 0.9), _envelope(), 5.0)  # the training data's own geometry
    assert {"pixel_spacing_mm", "slice_thickness_mm"} <= {f.check for f in narrow.findings}


def test_thresholds_come_from_the_checkpoint_envelope(phantom: Path, sharp_as_br40: Path, tmp_path: Path) -> None:
    """Stamp an envelope measured on the phantom's Bl64 series as 'source': the same gate now passes
    the sharp series and refuses the smooth one; the tensors are untouched."""
    cases = tmp_path / "cases"
    shutil.copytree(phantom, cases / "case-000")
    ck = tmp_path / "sharp-source.safetensors"
    before = load_checkpoint(LINEAR)
    r = subprocess.run([sys.executable, "-m", "ltdiff_train.envelope", "--cases", str(cases), "--checkpoint", str(LINEAR),
                        "--out", str(ck), "--source-kernel", "Bl64", "--target-kernel", "Br40"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    after = load_checkpoint(ck)
    assert after.metadata["weights_sha256"] == before.metadata["weights_sha256"]
    assert qa.envelope_of(after.metadata)["source"]["kernel"] == "Bl64"
    assert _cli("standardize", str(sharp_as_br40), str(tmp_path / "a"), "--model", str(ck), "--quiet").returncode == 0
    smooth = _cli("standardize", str(phantom / "br40"), str(tmp_path / "b"), "--model", str(ck), "--quiet")
    assert smooth.returncode == 3 and "of Bl64" in smooth.stderr


def test_rule_qa_key_is_validated() -> None:
    cfg = parse_config({"rules": [{"name": "r", "match": {"Modality": "CT"}, "qa": "flag"}]})
    assert cfg.rules[0].qa == "flag"
    assert parse_config({"rules": [{"name": "r", "match": {"Modality": "CT"}}]}).rules[0].qa == "refuse"
    with pytest.raises(ConfigError, match=r"rules\[0\]\.qa: must be 'refuse', 'flag' or 'off' \(got 'warn'\)"):
        parse_config({"rules": [{"name": "r", "qa": "warn"}]})
    with pytest.raises(ConfigError, match=r"rules\[0\]\.qa: must be str"):
        parse_config({"rules": [{"name": "r", "qa": True}]})


def test_older_database_gets_the_new_columns(tmp_path: Path) -> None:
    """A database written before the QA columns existed (and before schema versions) is upgraded
    at start-up (create_all)."""
    import sqlite3

    from dicom_node.store import db, migrate

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    d = db.Database(url)
    migrate.upgrade(d.engine, "0001")  # the schema of the last release before versions were recorded
    d.dispose()
    con = sqlite3.connect(tmp_path / "old.sqlite")
    con.execute("DROP TABLE alembic_version")
    con.execute("ALTER TABLE jobs DROP COLUMN qa")
    con.execute("ALTER TABLE jobs DROP COLUMN qa_mode")
    con.execute("ALTER TABLE series DROP COLUMN qa_force")
    con.commit()
    con.close()
    d = db.Database(url)
    d.create_all()
    with d.session() as s:
        s.add(db.Series(series_uid="1.2.3", state=db.FAILED, qa_force=True))
    with d.session() as s:
        assert s.scalars(db.select(db.Series)).one().qa_force is True
    d.dispose()
    cols = {r[1] for r in sqlite3.connect(tmp_path / "old.sqlite").execute("PRAGMA table_info(jobs)")}
    assert {"qa", "qa_mode"} <= cols


# ------------------------------------------------------------------ the node
def test_node_refuses_flags_and_force_retries(phantom: Path, sharp_as_br40: Path, tmp_path: Path) -> None:
    """A running node: Br40 passes and is sent; the lying tag is refused (state refused, nothing sent);
    a rule with qa = "flag" standardizes it with the warning; `retry --force` does the same for
    the refused series. Status, status --json and jobs SERIES show verdicts and measures."""
    flag_me = _relabel(phantom / "bl64", tmp_path / "flagme", description="FLAGME")
    port = free_port()
    with start_storescp(tmp_path / "pacs", "PACS") as pacs:
        cfg = write_node_config(
            tmp_path / "node.toml", port=port, data_dir=tmp_path / "node-data", stable_age_s=1.0,
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port,
                           "max_retries": 1, "backoff_base_s": 1.0}],
            rules=[{"name": "flagged", "match": {"SeriesDescription": "FLAGME"}, "model": str(LINEAR),
                    "destinations": ["pacs"], "qa": "flag"},
                   {"name": "br40", "match": {"ConvolutionKernel": "Br40*"}, "model": str(LINEAR),
                    "destinations": ["pacs"]}],
        )
        node = start_node(cfg, port, tmp_path / "node.log")
        try:
            uids = {}
            for name, folder in (("br40", phantom / "br40"), ("sharp", sharp_as_br40), ("flag", flag_me)):
                uids[name] = str(pydicom.dcmread(sorted(folder.glob("*.dcm"))[0]).SeriesInstanceUID)
                assert storescu(folder, port, "LTDIFF").returncode == 0

            def settled() -> dict[str, Any] | None:
                st = node_status(cfg)
                by = {s["series_uid"]: s for s in st["series"]}
                ok = all(u in by and by[u]["state"] in ("done", "failed", "refused") for u in uids.values())
                return by if ok else None

            by = wait_for(settled, 120, 0.5, "three series settled")
            good, sharp, flagged = by[uids["br40"]], by[uids["sharp"]], by[uids["flag"]]
            assert good["state"] == "done" and good["qa"]["verdict"] == "pass", good
            out = good["jobs"][0]["qa"]["output"]
            assert out["noise_ratio"] > 1.0 and out["sharpness"] > good["jobs"][0]["qa"]["input"]["sharpness"]

            assert sharp["state"] == "refused" and sharp["error"].startswith("QA refused: sharpness"), sharp
            assert sharp["qa"]["verdict"] == "refused" and sharp["jobs"][0]["deliveries"] == []
            assert sharp["jobs"][0]["qa"]["input"]["sharpness"] > _envelope()["source"]["measures"]["sharpness"]["hi"]

            assert flagged["state"] == "done" and flagged["qa"]["verdict"] == "flagged", flagged
            assert "sharpness" in flagged["qa"]["warnings"][0]

            text = subprocess.run(node_cmd("--config", str(cfg), "status", "--last", "10"), capture_output=True,
                                  text=True, timeout=60).stdout
            assert "qa refused: " in text and "qa pass" in text and "qa flagged: " in text

            jobs = subprocess.run(node_cmd("--config", str(cfg), "jobs", uids["sharp"]), capture_output=True,
                                  text=True, timeout=60)
            assert jobs.returncode == 0 and "sharpness" in jobs.stdout and "OUTSIDE" in jobs.stdout, jobs.stdout

            # received by the PACS: the good series and the flagged one, never the refused one
            sent = [pydicom.dcmread(f) for f in (tmp_path / "pacs").glob("*.dcm")]
            by_source = {str(d.ReferencedSeriesSequence[0].SeriesInstanceUID) for d in sent}
            assert by_source == {uids["br40"], uids["flag"]}
            flagged_desc = {str(d.DerivationDescription) for d in sent
                            if str(d.ReferencedSeriesSequence[0].SeriesInstanceUID) == uids["flag"]}
            assert all("QA WARNING (flag)" in t and "sharpness" in t for t in flagged_desc)

            r = subprocess.run(node_cmd("--config", str(cfg), "retry", "--force", uids["sharp"]),
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr

            def forced_done() -> dict[str, Any] | None:
                s = {x["series_uid"]: x for x in node_status(cfg)["series"]}[uids["sharp"]]
                return s if s["state"] in ("done", "failed") and len(s["jobs"]) == 2 else None

            s = wait_for(forced_done, 120, 0.5, "forced retry done")
            assert s["state"] == "done" and s["qa"]["verdict"] == "flagged" and s["qa"]["forced"] is True, s
            forced = [pydicom.dcmread(f) for f in (tmp_path / "pacs").glob("*.dcm")]
            texts = {str(d.DerivationDescription) for d in forced
                     if str(d.ReferencedSeriesSequence[0].SeriesInstanceUID) == uids["sharp"]}
            assert texts and all("QA WARNING (forced)" in t for t in texts)
            js = json.loads(subprocess.run(node_cmd("--config", str(cfg), "jobs", "--json", uids["sharp"]),
                                           capture_output=True, text=True, timeout=60).stdout)
            assert [j["qa"]["verdict"] for j in sorted(js, key=lambda j: j["job"])] == ["refused", "flagged"]
        finally:
            node.stop()

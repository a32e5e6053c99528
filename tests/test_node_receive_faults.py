"""Receive and series checks under bad input (issue 12, items 3, 4, 5), against one real
`dicom-node serve` process: UID abuse, missing identifiers, mixed kernels, localizers, geometry
the model cannot handle, duplicates and conflicts, gaps, late instances."""
from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fault_helpers import NodeRig, c_store, make_rig, rows
from ltdiff_core.dicomio.uids import make_uid
from ltdiff_core.dicomio.writer import StudyInfo, ct_datasets

from dicom_node.store import db
from nodetools.peers import echoscu, node_cmd, storescu, wait_for


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeRig]:
    r = make_rig(tmp_path_factory.mktemp("recv"))
    yield r
    r.stop()


def series_files(out: Path, n: int = 4, size: int = 32, spacing: tuple = (1.5, 0.7, 0.7), kernel: str = "Br40",
                 edit: Callable[[list], None] | None = None) -> list[Path]:
    """A small CT series written with pydicom (``edit`` may break the datasets first)."""
    vol = np.random.default_rng(len(str(out))).normal(0, 20, (n, size, size)).astype(np.float32)
    dss = ct_datasets(vol, spacing, study=StudyInfo(study_uid=make_uid(), frame_of_reference_uid=make_uid()),
                      kernel=kernel, series_number=3)
    if edit is not None:
        edit(dss)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(dss):
        ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", ds.file_meta.MediaStorageSOPInstanceUID)
        p = out / f"{k:03d}.dcm"
        ds.preamble = b"\x00" * 128
        ds.save_as(p, enforce_file_format=False)
        paths.append(p)
    return paths


def _uid(p: Path, kw: str = "SeriesInstanceUID") -> str:
    return str(pydicom.dcmread(p, stop_before_pixels=True).get(kw, ""))


def _refusals(rig: NodeRig) -> list[db.Refusal]:
    return rows(rig.database(), db.Refusal)


# --------------------------------------------------------------------------- item 3
@pytest.mark.parametrize(("field", "value", "status", "reason"), [
    ("SOPInstanceUID", "1.2." + "3" * 92, "CannotUnderstand", "96 characters"),
    ("SOPInstanceUID", "1.2.3/../../../etc/x", "CannotUnderstand", "not a valid UID"),
    ("SOPInstanceUID", "1.2.03.4", "CannotUnderstand", "not a valid UID"),
    ("SeriesInstanceUID", "1.2." + "4" * 64, "CannotUnderstand", "SeriesInstanceUID 68 characters"),
    ("StudyInstanceUID", None, "DataSetDoesNotMatchSOPClass", "StudyInstanceUID missing"),
])
def test_uid_abuse_is_refused_by_dcmtk_storescu(rig: NodeRig, tmp_path: Path, field: str, value: str | None,
                                                status: str, reason: str) -> None:
    """Before: accepted with 0x0000, standardized, copied into the output's references."""
    def edit(dss: list) -> None:
        if value is None:
            delattr(dss[0], field)
        else:
            setattr(dss[0], field, value)
    files = series_files(tmp_path / "in", n=1, edit=edit)
    before = len(_refusals(rig))
    r = storescu(files, rig.port, "LTDIFF", extra=["-v"])
    assert f"Error: {status}" in r.stderr or f"Failed: {status}" in r.stderr, r.stderr[-1500:]
    refused = _refusals(rig)[before:]
    assert len(refused) == 1 and reason in refused[0].reason
    assert all(len(x.sop_instance_uid or "") <= 64 and len(x.series_uid or "") <= 64 for x in refused)
    with rig.database().session() as s:
        assert all(len(x.series_uid) <= 64 for x in s.query(db.Series))
        assert all(len(i.sop_instance_uid) <= 64 and ".." not in i.path for i in s.query(db.Instance))
    assert "event=c_store_refused" in rig.log() and reason.split()[0] in rig.log()


def test_missing_sop_instance_uid_is_refused_with_a_clear_reason(rig: NodeRig, tmp_path: Path) -> None:
    """Item 5: before, an internal AttributeError was the recorded reason. The file meta names
    an instance UID (so the sender can address it); the data set has none."""
    def edit(dss: list) -> None:
        dss[0].file_meta.MediaStorageSOPInstanceUID = make_uid()
        del dss[0].SOPInstanceUID
    (f,) = series_files(tmp_path / "in", n=1, edit=edit)
    [(status, comment)] = c_store(rig.port, [f])
    assert status == 0xA900 and comment == "SOPInstanceUID missing"
    assert _refusals(rig)[-1].reason == "SOPInstanceUID missing"


# --------------------------------------------------------------------------- item 4
def test_mixed_kernel_series_is_refused_whole_with_the_counts(rig: NodeRig, tmp_path: Path) -> None:
    """Before: 8 Br40 + 4 Bl64 slices were standardized whole (kernel of the first slice)."""
    def edit(dss: list) -> None:
        for ds in dss[8:]:
            ds.ConvolutionKernel = "Bl64"
    files = series_files(tmp_path / "in", n=12, edit=edit)
    assert storescu(files, rig.port, "LTDIFF").returncode == 0
    series = rig.wait_state(_uid(files[0]), ("refused", "done", "failed"))
    assert series["state"] == "refused", series
    assert "mixed ConvolutionKernel: Br40 x8, Bl64 x4" in series["error"]
    assert series["anomalies"]["counts"].get("mixed_kernel") == 1


def test_localizer_is_kept_not_standardized(rig: NodeRig, tmp_path: Path) -> None:
    """Before: a topogram was standardized. A localizer inside an axial series is excluded
    (recorded); a localizer-only series is ignored."""
    def scout(dss: list) -> None:
        for ds in dss:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    loc = series_files(tmp_path / "loc", n=1, edit=scout)
    assert storescu(loc, rig.port, "LTDIFF").returncode == 0
    s1 = rig.wait_state(_uid(loc[0]), ("ignored", "done", "failed", "refused"))
    assert s1["state"] == "ignored" and "localizer" in s1["error"]
    assert s1["jobs"] == [] and s1["anomalies"]["excluded"] == 1

    def mixed(dss: list) -> None:
        dss[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    files = series_files(tmp_path / "mixed", n=5, edit=mixed)
    before = len(rig.pacs_files())
    assert storescu(files, rig.port, "LTDIFF").returncode == 0
    s2 = rig.wait_state(_uid(files[0]), ("done", "failed", "refused"))
    assert s2["state"] == "done", s2
    assert s2["anomalies"]["counts"]["localizer"] == 1 and s2["anomalies"]["excluded"] == 1
    assert s2["jobs"][0]["output_count"] == 4
    wait_for(lambda: len(rig.pacs_files()) == before + 4, 20, 0.2, "4 outputs at the PACS")


def test_geometry_the_model_cannot_handle_is_refused_not_done(rig: NodeRig, tmp_path: Path) -> None:
    """Before: 1024x1024 at 0.35 mm was processed with a log warning only and shown `done`."""
    files = series_files(tmp_path / "in", n=2, size=1024, spacing=(1.0, 0.35, 0.35))
    assert storescu(files, rig.port, "LTDIFF").returncode == 0
    series = rig.wait_state(_uid(files[0]), ("refused", "done", "failed"), 120)
    assert series["state"] == "refused", series
    assert "pixel spacing 0.350 mm is outside the model's range" in series["error"]
    assert series["jobs"][0]["state"] == "refused" and series["jobs"][0]["output_count"] is None

    big = series_files(tmp_path / "big", n=1, size=1100)
    assert storescu(big, rig.port, "LTDIFF").returncode == 0
    s2 = rig.wait_state(_uid(big[0]), ("refused", "done", "failed"), 60)
    assert s2["state"] == "refused" and "exceeds processing.max_matrix 1024" in s2["error"]


# --------------------------------------------------------------------------- item 5
def test_duplicates_conflicts_and_gaps_are_recorded(rig: NodeRig, tmp_path: Path) -> None:
    def gap(dss: list) -> None:
        for ds in dss[3:]:  # a 6 mm jump between slice 3 and 4 (median step 1.5 mm)
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                       float(ds.ImagePositionPatient[2]) + 4.5]
    files = series_files(tmp_path / "in", n=6, edit=gap)
    uid = _uid(files[0])
    assert storescu(files, rig.port, "LTDIFF").returncode == 0
    # identical re-send (another association, as after a sender timeout): acknowledged, recorded
    assert c_store(rig.port, files[:2]) == [(0, ""), (0, "")]
    # same SOPInstanceUID, other pixels: first copy kept, second quarantined and refused
    ds = pydicom.dcmread(files[0])
    arr = ds.pixel_array.copy()
    arr[0, 0] += 100
    ds.PixelData = arr.tobytes()
    other = tmp_path / "conflict.dcm"
    ds.save_as(other, enforce_file_format=True)
    [(status, comment)] = c_store(rig.port, [other])
    assert status == 0xC000 and "different pixel data" in comment
    series = rig.wait_state(uid, ("done", "failed", "refused"))
    assert series["state"] == "done", series
    counts = series["anomalies"]["counts"]
    assert counts["duplicate"] == 2 and counts["conflict"] == 1 and counts["gap"] == 1, counts
    assert series["instances"] == 6
    quarantined = list((rig.data_dir / "quarantine").rglob("*.dcm"))
    assert any(pydicom.dcmread(q).SOPInstanceUID == ds.SOPInstanceUID for q in quarantined)
    assert np.array_equal(pydicom.dcmread(rig.data_dir / "spool" / uid / files[0].name.replace(
        files[0].name, f"{ds.SOPInstanceUID}.dcm")).pixel_array, pydicom.dcmread(files[0]).pixel_array)
    text = subprocess.run(node_cmd("--config", str(rig.config), "status", "--last", "50"), capture_output=True,
                          text=True, check=True).stdout
    assert "anomalies: conflict 1, duplicate 2, gap 1" in text
    jobs = subprocess.run(node_cmd("--config", str(rig.config), "jobs"), capture_output=True, text=True,
                          check=True).stdout
    assert "conflict 1, duplicate 2, gap 1" in jobs


def test_every_late_instance_is_counted(rig: NodeRig, tmp_path: Path) -> None:
    """Before: 7 late instances were shown as 1."""
    files = series_files(tmp_path / "in", n=11)
    uid = _uid(files[0])
    assert storescu(files[:4], rig.port, "LTDIFF").returncode == 0
    rig.wait_state(uid, ("done",))
    assert storescu(files[4:], rig.port, "LTDIFF").returncode == 0
    series = rig.wait_state(uid, ("done",))
    series = wait_for(lambda: (lambda x: x if len(x["jobs"]) == 2 and x["state"] == "done" else None)(
        rig.series(uid)), 60, 0.3, "second job")
    assert series["late_instances"] == 7 and series["anomalies"]["counts"]["late"] == 7
    assert series["instances"] == 11 and series["jobs"][1]["output_count"] == 11


# --------------------------------------------------------------------------- audit trail
def test_audit_trail_has_one_record_per_association_and_series_event(rig: NodeRig, tmp_path: Path) -> None:
    """ATNA/RFC 3881-shaped JSON lines, UIDs only (no patient name or ID)."""
    files = series_files(tmp_path / "in", n=3)
    uid = _uid(files[0])
    assert storescu(files, rig.port, "LTDIFF", calling="CT_AUDIT").returncode == 0
    rig.wait_state(uid, ("done",))
    assert echoscu(rig.port, "NOT_US", "INTRUDER").returncode != 0
    wait_for(lambda: any(r["dicom_node"].get("outcome") == "rejected" for r in rig.audit()), 10, 0.2, "rejection")
    records = rig.audit()
    for r in records:
        ev = r["EventIdentification"]
        assert ev["EventID"]["csd-code"].startswith("110") and ev["EventActionCode"] in "CRUDE"
        assert ev["EventOutcomeIndicator"] in (0, 4, 8, 12) and ev["EventDateTime"].endswith("Z")
        assert r["ActiveParticipant"] and r["AuditSourceIdentification"]["AuditSourceID"].startswith("LTDIFF@")
    assoc = [r for r in records if r["dicom_node"]["kind"] == "association"
             and r["ActiveParticipant"][0]["UserID"] == "CT_AUDIT"]
    assert [r["dicom_node"]["outcome"] for r in assoc] == ["accepted", "released"]
    assert assoc[1]["dicom_node"]["stored"] == 3 and assoc[1]["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1"
    rejected = [r for r in records if r["dicom_node"].get("outcome") == "rejected"]
    assert rejected[-1]["ActiveParticipant"][0]["UserID"] == "INTRUDER"
    assert rejected[-1]["EventIdentification"]["EventOutcomeIndicator"] == 4
    events = [r["dicom_node"]["event"] for r in records if r["dicom_node"]["kind"] == "series"
              and any(d["value"] == uid for o in r["ParticipantObjectIdentification"]
                      for d in o["ParticipantObjectDetail"])]
    assert events == ["received", "completed", "processed", "sent"], events
    refused = [r for r in records if r["dicom_node"].get("event") == "refused"]
    assert refused and all(r["EventIdentification"]["EventOutcomeIndicator"] == 4 for r in refused)
    text = (rig.data_dir / "audit.jsonl").read_text()
    src = pydicom.dcmread(files[0])
    for value in (str(src.PatientName), str(src.PatientID)):
        assert value and value not in text


# --------------------------------------------------------------------------- issue 23, item 5
def _patched(src: Path, out: Path, old: bytes, new: bytes) -> Path:
    """``src`` with one encoded element replaced byte for byte (pydicom would not write it)."""
    raw = src.read_bytes()
    assert raw.count(old) == 1, "the element to patch is not found once"
    out.write_bytes(raw.replace(old, new))
    return out


def test_value_length_that_does_not_fit_its_vr_is_refused_at_receive(rig: NodeRig, tmp_path: Path) -> None:
    """Before: a PixelRepresentation of 3 bytes (US is 2) was acknowledged 0x0000 and the job
    then failed "cannot decode pixel data". Now it is refused at receive, 0xC000, with the reason."""
    (f,) = series_files(tmp_path / "in", n=1)
    pr = b"\x28\x00\x03\x01US\x02\x00" + (1).to_bytes(2, "little")  # (0028,0103) US 2 bytes, value 1
    if pr not in f.read_bytes():
        pr = pr[:-2] + (0).to_bytes(2, "little")
    bad = _patched(f, tmp_path / "pr3.dcm", pr, b"\x28\x00\x03\x01US\x03\x00" + pr[-2:] + b"\x00")
    before = len(_refusals(rig))
    [(status, comment)] = c_store(rig.port, [bad])
    assert status == 0xC000 and comment.startswith("PixelRepresentation (0028,0103)"), (status, comment)
    refused = _refusals(rig)[before:]
    assert len(refused) == 1 and refused[0].reason == (
        "PixelRepresentation (0028,0103) has a value length of 3 bytes; US is 2")
    with rig.database().session() as s:
        assert s.query(db.Instance).filter_by(sop_instance_uid=_uid(f, "SOPInstanceUID")).count() == 0


def test_pixel_data_length_field_beyond_the_data_set_is_refused(rig: NodeRig, tmp_path: Path) -> None:
    """Before: PixelData claiming 2 GiB with 512 KiB present was accepted (Rows x Columns fit)
    and standardized, and the spooled file could not be read by DCMTK. Now the declared length is
    checked: 0xC000."""
    (f,) = series_files(tmp_path / "in", n=1, size=512)
    length = (512 * 512 * 2).to_bytes(4, "little")
    bad = _patched(f, tmp_path / "px.dcm", b"\xe0\x7f\x10\x00OW\x00\x00" + length,
                   b"\xe0\x7f\x10\x00OW\x00\x00" + (2**31).to_bytes(4, "little"))
    [(status, comment)] = c_store(rig.port, [bad])
    assert status == 0xC000, (status, comment)
    assert _refusals(rig)[-1].reason == "PixelData length field says 2147483648 bytes, the data set holds 524288"
    with rig.database().session() as s:
        assert s.query(db.Instance).filter_by(sop_instance_uid=_uid(f, "SOPInstanceUID")).count() == 0

"""Fault-injection corpus: odd inputs generated here (transfer syntaxes, geometry defects,
non-targets, malformed files, UID abuse, huge slices) sent to one real `dicom-node serve`.

Each case says what the node must answer (the C-STORE status of its instances) and what must be
recorded (the refusal reason, or the series' end state and its reason/anomaly). The table of
outcomes is printed (``pytest -s``) and every case must be handled as expected.
"""
from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fault_helpers import NodeRig, c_store, make_rig, rows
from ltdiff_core.dicomio.uids import make_uid
from ltdiff_core.dicomio.writer import StudyInfo, ct_datasets
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.store import db
from nodetools.peers import dcmtk, peer_env, wait_for

OK, MISMATCH, CANNOT, RESOURCES, SOP_CLASS = 0x0000, 0xA900, 0xC000, 0xA700, 0x0122
NO_CONTEXT = -1  # the association did not accept a presentation context for the file
TERMINAL = ("done", "failed", "refused", "ignored", "unrouted")
CT = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Case:
    name: str
    group: str
    build: Callable[[Path], list[Path]]
    status: int | tuple[int, ...]  # expected C-STORE status of every instance, or of each
    state: str | None = None  # expected series end state (accepted cases)
    reason: str = ""  # substring of the refusal reason, series error or anomaly kinds


def write(out: Path, n: int = 3, size: int = 32, spacing: tuple = (1.5, 0.7, 0.7), kernel: str = "Br40",
          edit: Callable[[list], None] | None = None, ts: str | None = None, enforce: bool = False) -> list[Path]:
    """``n`` tiny CT slices of a new series; ``edit(datasets)`` breaks them before saving."""
    vol = np.random.default_rng(n * size).normal(0, 30, (n, size, size)).astype(np.float32)
    dss = ct_datasets(vol, spacing, study=StudyInfo(study_uid=make_uid(), frame_of_reference_uid=make_uid()),
                      kernel=kernel, series_number=7)
    if edit is not None:
        edit(dss)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(dss):
        if "SOPInstanceUID" in ds and not ds.file_meta.get("MediaStorageSOPInstanceUID_fixed"):
            ds.file_meta.MediaStorageSOPInstanceUID = _meta_uid(str(ds.SOPInstanceUID))
        if ts is not None:
            ds.file_meta.TransferSyntaxUID = ts
        ds.preamble = b"\x00" * 128
        p = out / f"{k:03d}.dcm"
        ds.save_as(p, enforce_file_format=enforce)
        paths.append(p)
    return paths


def _meta_uid(uid: str) -> str:
    """The file meta must carry a sendable UID (pynetdicom checks it); abuse lives in the data set."""
    clean = uid.strip("\x00 ")
    ok = len(clean) <= 64 and all(c.isdigit() or c == "." for c in clean) and clean and ".." not in clean
    return clean if ok else make_uid()


def each(attr: str, value: object) -> Callable[[list], None]:
    def edit(dss: list) -> None:
        for ds in dss:
            if value is None:
                if attr in ds:
                    delattr(ds, attr)
            else:
                setattr(ds, attr, value)
    return edit


def dcmtk_convert(tool: str, *args: str) -> Callable[[Path], list[Path]]:
    def build(out: Path) -> list[Path]:
        files = write(out / "src")
        dst = []
        for f in files:
            d = out / f.name
            subprocess.run([dcmtk(tool), *args, str(f), str(d)], check=True, capture_output=True, env=peer_env())
            dst.append(d)
        return dst
    return build


def corrupt(mutate: Callable[[bytes], bytes], n: int = 1) -> Callable[[Path], list[Path]]:
    def build(out: Path) -> list[Path]:
        files = write(out, n=n, enforce=True)  # with (0002,0000) group length, so the data set is found
        for f in files:
            f.write_bytes(mutate(f.read_bytes()))
        return files
    return build


def _meta_end(raw: bytes) -> int:
    """Offset of the data set after the file meta group (group length is its first element)."""
    return 132 + 12 + int.from_bytes(raw[140:144], "little")


def garbage_dataset(raw: bytes) -> bytes:
    return raw[:_meta_end(raw)] + bytes(range(256)) * 8


def bad_length(raw: bytes) -> bytes:
    end = _meta_end(raw)  # first data set element of Explicit VR LE: tag(4) VR(2) len(2)
    return raw[:end + 6] + b"\xff\xff" + raw[end + 8:]


def truncate_pixels(raw: bytes) -> bytes:
    return raw[:-700]


def gap(dss: list) -> None:
    for ds in dss[2:]:
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 6.0]


def first(attr: str, value: object) -> Callable[[list], None]:
    def edit(dss: list) -> None:
        setattr(dss[0], attr, value)
    return edit


def same_position(dss: list) -> None:
    dss[1].ImagePositionPatient = list(dss[0].ImagePositionPatient)


def localizer_first(dss: list) -> None:
    dss[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]


def oblique(dss: list) -> None:
    c, s = float(np.cos(0.3)), float(np.sin(0.3))
    for k, ds in enumerate(dss):
        ds.ImageOrientationPatient = [1, 0, 0, 0, c, s]
        ds.ImagePositionPatient = [0.0, -s * 1.5 * k, c * 1.5 * k]


def rgb(dss: list) -> None:
    for ds in dss:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0


def sop_class(uid: str) -> Callable[[list], None]:
    def edit(dss: list) -> None:
        for ds in dss:
            ds.SOPClassUID = uid
            ds.file_meta.MediaStorageSOPClassUID = uid
    return edit


def meta_sop_differs(dss: list) -> None:
    dss[0].file_meta.MediaStorageSOPInstanceUID = make_uid()
    dss[0].file_meta.MediaStorageSOPInstanceUID_fixed = True  # keep it


def missing_sop(dss: list) -> None:
    dss[0].file_meta.MediaStorageSOPInstanceUID = make_uid()
    del dss[0].SOPInstanceUID


def both(*edits: Callable[[list], None]) -> Callable[[list], None]:
    def edit(dss: list) -> None:
        for e in edits:
            e(dss)
    return edit


def padded_uid(dss: list) -> None:
    for ds in dss:
        ds.SeriesInstanceUID = str(dss[0].SeriesInstanceUID) + "\x00"


def long_text(dss: list) -> None:
    for ds in dss:
        ds.SeriesDescription = "x" * 200
        ds.StationName = "S" * 100
        ds.Manufacturer = "SIEMENS" + "é" * 60


def kernels(dss: list) -> None:
    dss[-1].ConvolutionKernel = "Bl64"


def mixed_spacing(dss: list) -> None:
    dss[-1].PixelSpacing = [0.8, 0.8]


def mixed_iop(dss: list) -> None:
    dss[-1].ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.43589]


def resend(change: Callable[[pydicom.Dataset], None]) -> Callable[[Path], list[Path]]:
    """One instance, then the same SOPInstanceUID again after ``change`` (sent second)."""
    def build(out: Path) -> list[Path]:
        (a,) = write(out, n=1)
        ds = pydicom.dcmread(a)
        change(ds)
        b = out / "again.dcm"
        ds.save_as(b, enforce_file_format=True)
        return [a, b]
    return build


def other_pixels(ds: pydicom.Dataset) -> None:
    arr = ds.pixel_array.copy()
    arr[5, 5] += 1
    ds.PixelData = arr.tobytes()


def moved(ds: pydicom.Dataset) -> None:
    ds.ImagePositionPatient = [0.0, 0.0, 500.0]


def other_series(ds: pydicom.Dataset) -> None:
    ds.SeriesInstanceUID = make_uid()


def W(**kw: object) -> Callable[[Path], list[Path]]:
    return lambda out: write(out, **kw)


CASES = [
    # --- transfer syntaxes: all decodable, all standardized
    Case("explicit VR little endian", "transfer syntax", W(), OK, "done"),
    Case("implicit VR little endian", "transfer syntax", W(ts=ImplicitVRLittleEndian, enforce=True), OK, "done"),
    Case("deflated explicit VR LE", "transfer syntax", W(ts=DeflatedExplicitVRLittleEndian, enforce=True), OK, "done"),
    Case("RLE lossless (dcmcrle)", "transfer syntax", dcmtk_convert("dcmcrle"), OK, "done"),
    Case("JPEG lossless SV1 (dcmcjpeg)", "transfer syntax", dcmtk_convert("dcmcjpeg"), OK, "done"),
    Case("JPEG-LS lossless (dcmcjpls)", "transfer syntax", dcmtk_convert("dcmcjpls"), OK, "done"),
    Case("JPEG baseline (lossy, not accepted)", "transfer syntax", dcmtk_convert("dcmcjpeg", "+eb"), NO_CONTEXT),
    Case("explicit VR big endian (retired)", "transfer syntax", dcmtk_convert("dcmconv", "+tb"), NO_CONTEXT),
    # --- geometry
    Case("single slice", "geometry", W(n=1), OK, "done"),
    Case("oblique, consistent", "geometry", W(edit=oblique), OK, "done"),
    Case("gap in positions", "geometry", W(n=5, edit=gap), OK, "done", "gap"),
    Case("two slices at one position", "geometry", W(edit=same_position), OK, "refused", "share a position"),
    Case("mixed orientation", "geometry", W(edit=mixed_iop), OK, "refused", "mixed ImageOrientationPatient"),
    Case("mixed pixel spacing", "geometry", W(edit=mixed_spacing), OK, "refused", "mixed PixelSpacing"),
    Case("0.35 mm pixels (model trained at 0.7)", "geometry", W(n=1, spacing=(1.0, 0.35, 0.35)), OK, "refused",
         "outside the model's range"),
    Case("2.0 mm pixels", "geometry", W(n=1, spacing=(1.0, 2.0, 2.0)), OK, "refused", "outside the model's range"),
    Case("huge slice 2048x2048", "geometry", W(n=1, size=2048), OK, "refused", "exceeds processing.max_matrix"),
    Case("parallel orientation vectors", "geometry", W(n=1, edit=each("ImageOrientationPatient", [1, 0, 0, 1, 0, 0])),
         CANNOT, reason="parallel or zero"),
    Case("zero pixel spacing", "geometry", W(n=1, edit=each("PixelSpacing", [0, 0])), CANNOT, reason="implausible"),
    Case("no ImagePositionPatient", "geometry", W(n=1, edit=each("ImagePositionPatient", None)), MISMATCH,
         reason="ImagePositionPatient"),
    Case("no PixelSpacing", "geometry", W(n=1, edit=each("PixelSpacing", None)), MISMATCH, reason="PixelSpacing"),
    Case("NaN in ImagePositionPatient", "geometry", W(n=1, edit=each("ImagePositionPatient", ["0", "NaN", "0"])),
         CANNOT, reason="implausible"),
    Case("orientation with 5 values", "geometry", W(n=1, edit=each("ImageOrientationPatient", [1, 0, 0, 0, 1])),
         CANNOT, reason="not numeric with 6/3/2"),
    # --- non-targets
    Case("kernel Bl64 (no rule)", "non-target", W(kernel="Bl64"), OK, "unrouted"),
    Case("kernel B30f (no rule)", "non-target", W(kernel="B30f"), OK, "unrouted"),
    Case("localizer series", "non-target", W(n=1, edit=each("ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"])), OK,
         "ignored", "localizer"),
    Case("localizer inside axial series", "non-target", W(n=4, edit=localizer_first), OK, "done", "localizer"),
    Case("mixed kernels", "non-target", W(n=4, edit=kernels), OK, "refused", "mixed ConvolutionKernel"),
    Case("Enhanced CT", "non-target", W(n=1, edit=sop_class("1.2.840.10008.5.1.4.1.1.2.1")), SOP_CLASS),
    Case("Secondary Capture (not negotiated)", "non-target", W(n=1, edit=sop_class("1.2.840.10008.5.1.4.1.1.7")),
         NO_CONTEXT),
    Case("RGB pixels", "non-target", W(n=1, edit=rgb), MISMATCH, reason="greyscale"),
    Case("multi-frame", "non-target", W(n=1, edit=each("NumberOfFrames", 2)), MISMATCH, reason="multi-frame"),
    # --- malformed files
    Case("no PixelData", "malformed", W(n=1, edit=each("PixelData", None)), MISMATCH, reason="PixelData"),
    Case("Rows = 0", "malformed", W(n=1, edit=each("Rows", 0)), MISMATCH, reason="empty image matrix"),
    Case("BitsStored 20 > BitsAllocated 16", "malformed", W(n=1, edit=each("BitsStored", 20)), MISMATCH,
         reason="BitsStored 20"),
    Case("RescaleSlope 0", "malformed", W(n=1, edit=each("RescaleSlope", 0)), CANNOT, reason="RescaleSlope"),
    Case("BitsAllocated 12", "malformed", W(n=1, edit=each("BitsAllocated", 12)), MISMATCH, reason="BitsAllocated"),
    Case("truncated PixelData", "malformed", corrupt(truncate_pixels), CANNOT, reason="PixelData length field says"),
    # pydicom parses 2 KB of byte garbage into a few odd elements: refused for what is missing
    Case("garbage data set", "malformed", corrupt(garbage_dataset), MISMATCH, reason="missing"),
    Case("element length 0xFFFF", "malformed", corrupt(bad_length), CANNOT, reason=""),
    Case("SOPClassUID differs from the request", "malformed",
         W(n=1, edit=first("SOPClassUID", "1.2.840.10008.5.1.4.1.1.4")), MISMATCH, reason="SOPClassUID differs"),
    Case("200-char description, 100-char station", "malformed", W(edit=long_text), OK, "done"),
    # --- UID abuse
    Case("96-char SOPInstanceUID", "UID abuse", W(n=1, edit=first("SOPInstanceUID", "1.2." + "3" * 92)), CANNOT,
         reason="96 characters"),
    Case("path traversal SOPInstanceUID", "UID abuse", W(n=1, edit=first("SOPInstanceUID", "1.2/../../../tmp/x")),
         CANNOT, reason="not a valid UID"),
    Case("leading zero UID component", "UID abuse", W(n=1, edit=first("SOPInstanceUID", "1.2.03.4")), CANNOT,
         reason="not a valid UID"),
    Case("letters in SOPInstanceUID", "UID abuse", W(n=1, edit=first("SOPInstanceUID", "1.2.abc")), CANNOT,
         reason="not a valid UID"),
    Case("68-char SeriesInstanceUID", "UID abuse", W(n=1, edit=each("SeriesInstanceUID", "1.2." + "4" * 64)), CANNOT,
         reason="SeriesInstanceUID 68 characters"),
    Case("SeriesInstanceUID with ../", "UID abuse", W(n=1, edit=each("SeriesInstanceUID", "1.2.3/../../4")), CANNOT,
         reason="SeriesInstanceUID not a valid UID"),
    Case("empty SeriesInstanceUID", "UID abuse", W(n=1, edit=each("SeriesInstanceUID", "")), MISMATCH,
         reason="SeriesInstanceUID missing"),
    Case("no StudyInstanceUID", "UID abuse", W(n=1, edit=each("StudyInstanceUID", None)), MISMATCH,
         reason="StudyInstanceUID missing"),
    Case("no SOPInstanceUID", "UID abuse", W(n=1, edit=missing_sop), MISMATCH, reason="SOPInstanceUID missing"),
    Case("meta and data set SOP UIDs differ", "UID abuse", W(n=1, edit=meta_sop_differs), MISMATCH,
         reason="differs from the Affected SOP Instance UID"),
    Case("NUL-padded SeriesInstanceUID", "UID abuse", W(edit=padded_uid), OK, "done"),
    # --- duplicates (the same SOPInstanceUID twice)
    Case("identical re-send", "duplicate", resend(lambda ds: None), (OK, OK), "done", "duplicate"),
    Case("same SOP UID, other pixels", "duplicate", resend(other_pixels), (OK, CANNOT), "done",
         "different pixel data"),
    Case("same SOP UID, other position", "duplicate", resend(moved), (OK, CANNOT), "done",
         "different ImagePositionPatient"),
    Case("same SOP UID in another series", "duplicate", resend(other_series), (OK, CANNOT), "done", "another series"),
]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeRig]:
    r = make_rig(tmp_path_factory.mktemp("corpus"), stable_age_s=1.0)
    yield r
    r.stop()


def _send(rig: NodeRig, files: list[Path]) -> list[int | None]:
    try:
        return [s for s, _ in c_store(rig.port, files)]
    except (ValueError, RuntimeError) as exc:  # pynetdicom: no accepted context for the file
        if "presentation context" in str(exc):
            return [NO_CONTEXT] * len(files)
        raise


def test_fault_corpus(rig: NodeRig, tmp_path: Path) -> None:
    assert len(CASES) >= 40
    sent: list[tuple[Case, list[Path], list[int | None], int]] = []
    for k, case in enumerate(CASES):
        files = case.build(tmp_path / f"case{k:02d}")
        before = len(rows(rig.database(), db.Refusal))
        sent.append((case, files, _send(rig, files), before))
    database = rig.database()
    wait_for(lambda: all(x.state in TERMINAL for x in rows(database, db.Series)), 180, 0.5, "every series finished")
    refusals = rows(database, db.Refusal)
    with database.session() as s:
        series = {x.series_uid: (x.state, x.error or "", ",".join(a.kind for a in x.anomalies),
                                 x.series_description, x.station_name) for x in s.query(db.Series)}
    table, wrong = [], []
    for k, (case, files, statuses, before) in enumerate(sent):
        got_state, why = None, ""
        expected = case.status if isinstance(case.status, tuple) else (case.status,) * len(files)
        ok = list(statuses) == list(expected)
        n_refused = sum(e in (MISMATCH, CANNOT) for e in expected)
        if n_refused:
            mine = refusals[before:before + n_refused]
            why = mine[0].reason if mine else "(no refusal recorded)"
            ok = ok and len(mine) == n_refused and case.reason in why
        if case.state is not None:
            uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID).strip("\x00 ")
            got_state, error, kinds, desc, station = series.get(uid, (None, "", "", None, None))
            why = why or error or kinds
            ok = ok and got_state == case.state and (n_refused > 0 or case.reason in f"{error} {kinds}")
            ok = ok and len(desc or "") <= 128 and len(station or "") <= 64
        table.append((case.group, case.name, "/".join(f"0x{s:04X}" if s is not None and s >= 0 else "no context"
                                                      for s in statuses), got_state or "-", why[:70], ok))
        if not ok:
            wrong.append((case.name, statuses, got_state, why))
    print(f"\n{'group':<16}{'case':<42}{'status':<34}{'state':<10}ok  reason")
    for group, name, st, state, why, ok in table:
        print(f"{group:<16}{name:<42}{st[:33]:<34}{state:<10}{'yes' if ok else 'NO ':<4}{why}")
    print(f"inputs {len(table)}, handled correctly {sum(r[-1] for r in table)}, wrong {len(wrong)}")
    assert not wrong, wrong

"""derive_series: the DERIVED CT series the node writes next to the original.

The sources are small CT series written here with pydicom (64 x 64, 3 slices) in several stored
representations and transfer syntaxes, plus pydicom's bundled CT_small.dcm (uncompressed, GE)
and 693_J2KI.dcm (lossy JPEG 2000). ``dciodvfy`` judges the outputs against the inputs.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr.codedict import codes
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from dicom_node.derive.series import DerivationInfo, derive_series, write_series

SHA = hashlib.sha256(b"test checkpoint").hexdigest()
UID_ROOT = "1.2.826.0.1.3680043.10.999."


def _info(**kw: object) -> DerivationInfo:
    values: dict[str, object] = {"sampler": {"steps": 8, "seed": 3}, "uid_root": UID_ROOT}
    values.update(kw)
    return DerivationInfo.from_model_info(
        {"name": "ltdiff-test", "version": "1.2.3", "sha256": SHA, "method": "latent-diffusion"}, **values
    )


def dciodvfy_errors(path: Path) -> set[str]:
    """The ``Error`` lines dciodvfy prints (to stderr) for one file."""
    exe = shutil.which("dciodvfy")
    assert exe is not None, "dciodvfy (dicom3tools) is required"
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return {line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.startswith("Error")}


def _ct_slice(k: int, uids: tuple[str, str, str], *, signed: bool, slope: float, size: int = 64) -> Dataset:
    """One complete CT Image Storage instance with a reproducible noisy image."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.PatientName = "Phantom^Derive"
    ds.PatientID = "DRV-001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "SOMATOM Test"
    ds.SeriesNumber = 3
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.SeriesDescription = "Thorax 1.5 Br40"
    ds.ConvolutionKernel = ["Br40d", "3"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientPosition = "HFS"
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [-22.4, -22.4, -1.5 * k]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = 1.5
    ds.SliceLocation = -1.5 * k
    ds.PixelSpacing = [0.7, 0.7]
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = int(ds.BitsStored) - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = 0 if signed else -1024
    ds.RescaleSlope = slope
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    ds.BodyPartExamined = "CHEST"
    rng = np.random.default_rng(k)
    hu = rng.normal(-300, 200, (size, size)).clip(-1000, 1500)
    stored = np.rint((hu - float(ds.RescaleIntercept)) / slope).astype(np.int16 if signed else np.uint16)
    ds.PixelData = stored.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write_source_series(
    folder: Path, *, n: int = 3, signed: bool = False, slope: float = 1.0, syntax: str = ExplicitVRLittleEndian
) -> list[Path]:
    """A small CT series on disk in the given transfer syntax; returns its files in slice order."""
    folder.mkdir(parents=True)
    uids = (generate_uid(), generate_uid(), generate_uid())
    paths = []
    for k in range(n):
        ds = _ct_slice(k, uids, signed=signed, slope=slope)
        if syntax in (RLELossless, JPEG2000Lossless):
            ds.compress(syntax)
        elif syntax == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        path = folder / f"src{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_hu(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def digest(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _code(item: Dataset) -> tuple[str, str, str]:
    return (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning)


def _expected(code: object) -> tuple[str, str, str]:
    return (code.value, code.scheme_designator, code.meaning)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- attributes
def test_output_marks_and_references(tmp_path: Path) -> None:
    paths = write_source_series(tmp_path / "src")
    sources = [pydicom.dcmread(p) for p in paths]
    hu = np.stack([read_hu(s) for s in sources]) * 0.8 + 40.0
    info = _info()
    out = derive_series(sources, hu, info)

    assert len(out) == len(sources)
    series_uids = {str(d.SeriesInstanceUID) for d in out}
    assert len(series_uids) == 1 and series_uids.isdisjoint({str(s.SeriesInstanceUID) for s in sources})
    sop_uids = [str(d.SOPInstanceUID) for d in out]
    assert len(set(sop_uids)) == len(out)
    assert all(u.startswith(UID_ROOT) for u in sop_uids + list(series_uids))
    for src, d in zip(sources, out):
        assert d.SOPClassUID == CTImageStorage
        assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        assert list(d.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert d.SeriesNumber == src.SeriesNumber + info.series_number_offset == 1003
        assert d.SeriesDescription.startswith("Thorax 1.5 Br40") and "RESEARCH USE" in d.SeriesDescription
        assert len(d.SeriesDescription) <= 64
        assert list(d.ConvolutionKernel) == ["Bl64-LIKE", "STANDARDIZED"]
        assert "Br40d -> Bl64-like" in d.DerivationDescription  # the source kernel, uncut
        assert len(d.InstanceCreationDate) == 8 and d.InstanceCreationTime
        # Patient, study, geometry and acquisition are those of the source.
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyDate",
                   "AccessionNumber", "FrameOfReferenceUID", "ImagePositionPatient", "PixelSpacing",
                   "InstanceNumber", "AcquisitionDate", "Manufacturer", "KVP"):
            assert d[kw].value == src[kw].value, kw
        # References to exactly its own source instance and series.
        (ref,) = d.SourceImageSequence
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
        assert _code(ref.PurposeOfReferenceCodeSequence[0]) == _expected(
            codes.DCM.SourceImageForImageProcessingOperation
        ) == ("121322", "DCM", "Source image for image processing operation")
        (rs,) = d.ReferencedSeriesSequence
        assert rs.SeriesInstanceUID == src.SeriesInstanceUID
        assert rs.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        # Derivation: a CID 7203 code and a description naming model and checksum.
        (dc,) = d.DerivationCodeSequence
        assert _code(dc) == _expected(codes.DCM.EdgeEnhancement)
        assert "EdgeEnhancement" in cid_concepts[7203]["DCM"]  # CID 7203 Image Derivation
        assert "ltdiff-test" in d.DerivationDescription and SHA[:12] in d.DerivationDescription
        assert "steps=8" in d.DerivationDescription
        # Contributing equipment: our software, model name, versions and full checksum.
        eq = d.ContributingEquipmentSequence[-1]
        assert _code(eq.PurposeOfReferenceCodeSequence[0]) == _expected(codes.DCM.ProcessingEquipment)
        assert "ProcessingEquipment" in cid_concepts[7005]["DCM"]  # CID 7005 Contributing Equipment
        assert eq.ManufacturerModelName == "ltdiff-test"
        assert list(eq.SoftwareVersions) == [f"{info.software_name} {info.software_version}", "1.2.3"]
        assert SHA in eq.ContributionDescription
        assert len(eq.ContributionDateTime) >= 14
        # Stored representation kept, HU round trip within half a stored step.
        for kw in ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "RescaleSlope",
                   "RescaleIntercept", "WindowCenter", "WindowWidth"):
            assert d[kw].value == src[kw].value, kw
    for k, d in enumerate(out):
        assert np.abs(read_hu(d) - hu[k]).max() <= 0.5


def test_non_unit_slope_round_trip_and_order(tmp_path: Path) -> None:
    """hu[k] belongs to sources[k] whatever the order; slope 0.5 rounds to 0.25 HU."""
    paths = write_source_series(tmp_path / "src", slope=0.5)
    sources = [pydicom.dcmread(p) for p in reversed(paths)]
    rng = np.random.default_rng(7)
    hu = rng.uniform(-1000, 900, (3, 64, 64))
    out = derive_series(sources, hu, _info())
    for k, (src, d) in enumerate(zip(sources, out)):
        assert d.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert d.ImagePositionPatient == src.ImagePositionPatient
        assert np.abs(read_hu(d) - hu[k]).max() <= 0.25 + 1e-9


def test_clipping_to_source_representation(tmp_path: Path) -> None:
    """12-bit unsigned with intercept -1024 holds -1024..3071 HU; outside values are clipped."""
    paths = write_source_series(tmp_path / "src")
    sources = [pydicom.dcmread(p) for p in paths]
    hu = np.zeros((3, 64, 64))
    hu[:, 0, :8] = -5000.0
    hu[:, 1, :8] = 9000.0
    out = derive_series(sources, hu, _info())
    arr = out[0].pixel_array
    assert arr.dtype == np.uint16
    assert int(arr.max()) == 4095 and int(arr.min()) == 0
    back = read_hu(out[0])
    assert back[0, :8].tolist() == [-1024.0] * 8 and back[1, :8].tolist() == [3071.0] * 8
    assert np.all(back[2:] == 0.0)


def test_signed_source_and_new_uids_per_call(tmp_path: Path) -> None:
    paths = write_source_series(tmp_path / "src", signed=True)
    sources = [pydicom.dcmread(p) for p in paths]
    hu = np.stack([read_hu(s) for s in sources]) - 500.0
    a = derive_series(sources, hu, _info(uid_root=None))
    b = derive_series(sources, hu, _info(uid_root=None))
    assert a[0].SeriesInstanceUID != b[0].SeriesInstanceUID
    assert {str(d.SOPInstanceUID) for d in a}.isdisjoint(str(d.SOPInstanceUID) for d in b)
    assert str(a[0].SeriesInstanceUID).startswith("2.25.")
    assert a[0].pixel_array.dtype == np.int16
    assert np.abs(read_hu(a[1]) - hu[1]).max() <= 0.5


def test_private_tags_dropped_equipment_appended_source_object_unchanged(tmp_path: Path) -> None:
    paths = write_source_series(tmp_path / "src")
    sources = [pydicom.dcmread(p) for p in paths]
    for s in sources:
        block = s.private_block(0x0029, "TEST RECON", create=True)
        block.add_new(0x10, "LO", "Br40 private recon detail")
        acq = Dataset()
        acq.Manufacturer = "SIEMENS"
        acq.PurposeOfReferenceCodeSequence = [Dataset()]
        acq.PurposeOfReferenceCodeSequence[0].CodeValue = "109101"
        acq.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator = "DCM"
        acq.PurposeOfReferenceCodeSequence[0].CodeMeaning = "Acquisition Equipment"
        s.ContributingEquipmentSequence = [acq]
    before = [(str(s.SOPInstanceUID), str(s.SeriesInstanceUID), bytes(s.PixelData)) for s in sources]
    out = derive_series(sources, np.stack([read_hu(s) for s in sources]), _info())
    assert not any(e.tag.is_private for d in out for e in d)
    seq = out[0].ContributingEquipmentSequence
    assert [i.PurposeOfReferenceCodeSequence[0].CodeValue for i in seq] == ["109101", "109102"]
    assert [(str(s.SOPInstanceUID), str(s.SeriesInstanceUID), bytes(s.PixelData)) for s in sources] == before
    assert len(sources[0].ContributingEquipmentSequence) == 1


def test_output_headers_share_nothing_mutable_with_the_sources(tmp_path: Path) -> None:
    """Headers are copied element by element, shallowly only for values that cannot change in
    place: editing a derived header (multi-valued, sequence, text) leaves the source as it was."""
    sources = [pydicom.dcmread(p) for p in write_source_series(tmp_path / "src")]
    for s in sources:
        s.ReferencedImageSequence = [Dataset()]
        s.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
        s.PatientName = "Doe^Jane"
    before = [s.to_json_dict() for s in sources]
    out = derive_series(sources, np.stack([read_hu(s) for s in sources]), _info())
    for d in out:
        assert d.ImageOrientationPatient == sources[0].ImageOrientationPatient
        d.ImageOrientationPatient[0] = 0.5
        d.PixelSpacing.append(9)
        d.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "9.9"
        d.ReferencedImageSequence.append(Dataset())
        d.PatientName = "Changed^Name"
        d.WindowCenter = 1
    assert [s.to_json_dict() for s in sources] == before


def test_rejects_inconsistent_input(tmp_path: Path) -> None:
    paths = write_source_series(tmp_path / "src")
    sources = [pydicom.dcmread(p) for p in paths]
    with pytest.raises(ValueError, match="shape"):
        derive_series(sources, np.zeros((2, 64, 64)), _info())
    with pytest.raises(ValueError, match="64x64"):
        derive_series(sources, np.zeros((3, 32, 32)), _info())
    bad = np.zeros((3, 64, 64))
    bad[1, 5, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        derive_series(sources, bad, _info())
    sources[0].SOPClassUID = MRImageStorage
    with pytest.raises(ValueError, match="not CT Image Storage"):
        derive_series(sources, np.zeros((3, 64, 64)), _info())


# --------------------------------------------------------------------------- files and validity
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_written_series_valid_uncompressed_and_originals_untouched(tmp_path: Path, syntax: str) -> None:
    paths = write_source_series(tmp_path / "src", syntax=syntax)
    hashes = digest(paths)
    sources = [pydicom.dcmread(p) for p in paths]
    assert sources[0].file_meta.TransferSyntaxUID == syntax
    hu = np.stack([read_hu(s) for s in sources]) * 0.9 + 20.0
    files = write_series(derive_series(sources, hu, _info()), tmp_path / "out")

    assert digest(paths) == hashes
    assert sorted(files) == sorted((tmp_path / "out").iterdir())  # no temporary files left
    for k, (src_path, f) in enumerate(zip(paths, files)):
        assert f.read_bytes()[128:132] == b"DICM"
        d = pydicom.dcmread(f)
        assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert f.name == f"{d.SOPInstanceUID}.dcm"
        assert np.abs(read_hu(d) - hu[k]).max() <= 0.5
        new_errors = dciodvfy_errors(f) - dciodvfy_errors(src_path)
        assert not new_errors, new_errors


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm"])
def test_bundled_ct_files(tmp_path: Path, name: str) -> None:
    """A real GE header (private tags, padding value) and a lossy JPEG 2000 head CT."""
    src_path = Path(get_testdata_file(name, download=False))
    digest_before = digest([src_path])
    src = pydicom.dcmread(src_path)
    original_hu = read_hu(src)
    hu = original_hu[None] + 10.0
    (f,) = write_series(derive_series([src], hu, _info()), tmp_path / "out")
    d = pydicom.dcmread(f)

    assert digest([src_path]) == digest_before
    assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert d.SeriesNumber == int(src.SeriesNumber) + 1000
    assert d.BitsStored == src.BitsStored and d.PixelRepresentation == src.PixelRepresentation
    new_errors = dciodvfy_errors(f) - dciodvfy_errors(src_path)
    assert not new_errors, new_errors
    # Padding pixels stay padding; every other pixel carries the new value.
    pad = src.pixel_array == int(src.PixelPaddingValue)
    assert d.PixelPaddingValue == src.PixelPaddingValue
    assert np.array_equal(d.pixel_array[pad], src.pixel_array[pad])
    lo = -(2 ** (int(src.BitsStored) - 1)) if src.PixelRepresentation else 0
    hi = 2 ** (int(src.BitsStored) - (1 if src.PixelRepresentation else 0)) - 1
    inside = ~pad & (hu[0] - float(src.RescaleIntercept) <= hi) & (hu[0] - float(src.RescaleIntercept) >= lo)
    assert inside.sum() > 0.5 * inside.size
    assert np.abs(read_hu(d)[inside] - hu[0][inside]).max() <= 0.5
    if "LossyImageCompression" in src:
        assert d.LossyImageCompression == "01"  # once lossy, always lossy


def test_pixel_value_extremes_recomputed(tmp_path: Path) -> None:
    paths = write_source_series(tmp_path / "src", n=1)
    src = pydicom.dcmread(paths[0])
    src.add_new(0x00280106, "US", 0)
    src.add_new(0x00280107, "US", 4095)
    hu = np.full((1, 64, 64), 100.0)
    hu[0, 0, 0] = 200.0
    (d,) = derive_series([src], hu, _info())
    assert (d.SmallestImagePixelValue, d.LargestImagePixelValue) == (1124, 1224)
    (f,) = write_series([d], tmp_path / "out")
    assert not dciodvfy_errors(f)

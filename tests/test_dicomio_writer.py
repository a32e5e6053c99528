"""Writer and case loading: DICOM validity, headers, and the write -> load_case round trip."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from ltdiff_core.dicomio import CaseError, list_cases, load_case, read_series, write_phantom_case
from ltdiff_core.dicomio.uids import make_uid
from ltdiff_core.dicomio.writer import StudyInfo, ct_datasets, save_datasets, write_seg
from ltdiff_core.phantom.case import PhantomCase

SHAPE = (5, 64, 48)
SPACING = (1.5, 0.7, 0.7)


def _ball(shape, centre, radius):
    z, y, x = np.indices(shape)
    return ((z - centre[0]) * 3) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2


@pytest.fixture
def case() -> PhantomCase:
    rng = np.random.default_rng(3)
    truth = rng.integers(-1000, 1500, size=SHAPE).astype(np.float32)
    br40 = np.rint(truth + rng.normal(0, 20, SHAPE)).astype(np.float32)
    bl64 = np.rint(truth + rng.normal(0, 60, SHAPE)).astype(np.float32)
    bl64[0, 0, 0], bl64[0, 0, 1] = -3024, 4000  # extremes of a sharp kernel must survive
    masks = [_ball(SHAPE, (1, 20, 15), 6), _ball(SHAPE, (3, 40, 30), 9)]
    return PhantomCase(
        br40=br40, bl64=bl64, truth=truth, labels=np.zeros(SHAPE, np.uint8), label_names={0: "air"},
        tumour_masks=masks, tumour_info=[{"radius_mm": np.float64(4.2)}, {"radius_mm": 6.3}],
        spacing=SPACING, meta={"seed": 11, "ir_strength": (1.5, 3.0), "noise_br40_hu": np.float32(24.0)},
    )


def test_every_written_object_passes_dciodvfy(case, tmp_path, dciodvfy):
    written = write_phantom_case(case, tmp_path / "case-000")
    files = [*written.series["Br40"], *written.series["Bl64"], written.seg]
    assert len(files) == 2 * SHAPE[0] + 1
    for path in files:
        assert dciodvfy(path) == [], path
        assert dciodvfy(path, "Warning") == [], path
    compressed = save_datasets(
        ct_datasets(case.br40[:2], SPACING, study=_study(written), kernel="Br40", series_number=9),
        tmp_path / "rle", transfer_syntax=RLELossless,
    )
    assert dciodvfy(compressed[0]) == []


def _study(written):
    """The study and frame of reference of a written case, for adding series to it."""
    ds = pydicom.dcmread(written.series["Br40"][0])
    return StudyInfo(study_uid=ds.StudyInstanceUID, frame_of_reference_uid=ds.FrameOfReferenceUID)


def test_headers_describe_two_synthetic_kernels_of_one_acquisition(case, tmp_path):
    written = write_phantom_case(case, tmp_path / "case-000")
    br = [pydicom.dcmread(p) for p in written.series["Br40"]]
    bl = [pydicom.dcmread(p) for p in written.series["Bl64"]]
    assert {ds.StudyInstanceUID for ds in br + bl} == {br[0].StudyInstanceUID}
    assert {ds.FrameOfReferenceUID for ds in br + bl} == {br[0].FrameOfReferenceUID}
    assert br[0].SeriesInstanceUID != bl[0].SeriesInstanceUID
    assert (br[0].ConvolutionKernel, bl[0].ConvolutionKernel) == ("Br40", "Bl64")
    for ds in (br[0], bl[-1]):
        assert "SYNTHETIC PHANTOM" in ds.Manufacturer and "SYNTHETIC PHANTOM" in ds.SeriesDescription
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.PixelRepresentation == 1 and float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == 0
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == SPACING[0]
        assert [float(v) for v in ds.PixelSpacing] == [SPACING[1], SPACING[2]]
        assert "seed=11" in ds.ImageComments and "ir_strength=[1.5, 3.0]" in ds.ImageComments
    steps = np.diff([float(ds.ImagePositionPatient[2]) for ds in br])
    assert np.allclose(steps, SPACING[0])
    seg = pydicom.dcmread(written.seg)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert len(seg.SegmentSequence) == 2
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == bl[0].SeriesInstanceUID
    meta = json.loads(written.case_json.read_text())
    assert meta["meta"]["seed"] == 11 and meta["tumour_info"][1]["radius_mm"] == 6.3


def test_round_trip_gives_back_arrays_and_masks_exactly(case, tmp_path):
    write_phantom_case(case, tmp_path / "cases" / "case-000")
    loaded = load_case(tmp_path / "cases" / "case-000")
    np.testing.assert_array_equal(loaded.source, case.br40)
    np.testing.assert_array_equal(loaded.target, case.bl64)
    assert loaded.source.dtype == np.float32 and loaded.spacing == pytest.approx(SPACING)
    assert loaded.roi_names == ["tumour-1", "tumour-2"]
    for got, want in zip(loaded.rois, case.tumour_masks, strict=True):
        assert got.dtype == bool
        np.testing.assert_array_equal(got, want)
    assert loaded.meta["meta"]["noise_br40_hu"] == 24.0
    assert loaded.source_series.kernel == "Br40" and loaded.target_series.kernel == "Bl64"
    assert list_cases(tmp_path / "cases") == [tmp_path / "cases" / "case-000"]


def test_same_uid_key_gives_identical_files(case, tmp_path):
    a = write_phantom_case(case, tmp_path / "a" / "case-000")
    b = write_phantom_case(case, tmp_path / "b" / "case-000")
    for pa, pb in zip([*a.series["Br40"], *a.series["Bl64"], a.seg, a.case_json],
                      [*b.series["Br40"], *b.series["Bl64"], b.seg, b.case_json], strict=True):
        assert pa.read_bytes() == pb.read_bytes(), pa
    case.meta["seed"] = 12
    c = write_phantom_case(case, tmp_path / "c" / "case-000")
    assert pydicom.dcmread(c.seg).SOPInstanceUID != pydicom.dcmread(a.seg).SOPInstanceUID


def test_load_case_any_layout_reversed_kernels_and_partial_overlap(case, tmp_path):
    written = write_phantom_case(case, tmp_path / "w")
    # Re-file everything under meaningless names and drop the first Br40 slice.
    flat = tmp_path / "flat" / "patient-x"
    flat.mkdir(parents=True)
    for k, path in enumerate([*written.series["Br40"][1:], *written.series["Bl64"], written.seg]):
        shutil.copy(path, flat / f"{(k * 7) % 13:02d}")
    loaded = load_case(flat, source_kernel="bl64", target_kernel="BR40")
    assert [j for _, j in loaded.pairs] == list(range(SHAPE[0] - 1))
    np.testing.assert_array_equal(loaded.source, case.bl64[1:])
    np.testing.assert_array_equal(loaded.target, case.br40[1:])
    np.testing.assert_array_equal(loaded.rois[1], case.tumour_masks[1][1:])
    assert loaded.meta == {}


def test_seg_on_another_series_is_mapped_by_plane_position(case, tmp_path):
    written = write_phantom_case(case, tmp_path / "c")
    header = pydicom.dcmread(written.series["Bl64"][0])
    study = _study(written)
    assert header.StudyInstanceUID == study.study_uid
    # A third reconstruction (same frame of reference) carries the SEG: SOP UIDs do not help.
    other = ct_datasets(case.truth, SPACING, study=study, kernel="Qr40", series_number=5)
    shutil.rmtree(tmp_path / "c" / "seg")
    write_seg(case.tumour_masks[:1], ["lesion"], other, tmp_path / "c" / "roi" / "x.dcm")
    loaded = load_case(tmp_path / "c")
    assert loaded.roi_names == ["lesion"]
    np.testing.assert_array_equal(loaded.rois[0], case.tumour_masks[0])


def test_seg_from_another_frame_of_reference_is_refused(case, tmp_path):
    write_phantom_case(case, tmp_path / "c")
    foreign = StudyInfo(study_uid=make_uid(), frame_of_reference_uid=make_uid())
    other = ct_datasets(case.truth, SPACING, study=foreign, kernel="Qr40", series_number=5)
    write_seg(case.tumour_masks[:1], ["lesion"], other, tmp_path / "c" / "roi" / "x.dcm")
    with pytest.raises(CaseError, match="another FrameOfReferenceUID"):
        load_case(tmp_path / "c")


def test_load_case_names_the_kernels_it_found(case, tmp_path):
    write_phantom_case(case, tmp_path / "c")
    with pytest.raises(CaseError, match=r"no CT series with source kernel 'B30f\*'") as info:
        load_case(tmp_path / "c", source_kernel="B30f")
    assert "Br40 (CT, 5 files)" in str(info.value) and "Bl64 (CT, 5 files)" in str(info.value)
    with pytest.raises(CaseError, match="2 CT series with source kernel 'B\\*'"):
        load_case(tmp_path / "c", source_kernel="B", target_kernel="Bl64")


def test_series_reader_and_list_cases_ignore_non_dicom(case, tmp_path):
    root = tmp_path / "root"
    write_phantom_case(case, root / "case-001")
    (root / "not-a-case").mkdir()
    (root / "not-a-case" / "notes.txt").write_text("hello")
    assert list_cases(root) == [root / "case-001"]
    series = read_series(root / "case-001" / "br40")
    np.testing.assert_array_equal(series.hu, case.br40)


def test_tumours_outside_the_slab_keep_their_empty_segment(case, tmp_path, dciodvfy):
    # A crop or slab may miss a tumour: its segment stays, so ROIs line up with tumour_info.
    case.tumour_masks = [np.zeros(SHAPE, bool), case.tumour_masks[1]]
    written = write_phantom_case(case, tmp_path / "c")
    assert dciodvfy(written.seg) == []
    loaded = load_case(tmp_path / "c")
    assert [int(r.sum()) for r in loaded.rois] == [0, int(case.tumour_masks[1].sum())]
    case.tumour_masks = [np.zeros(SHAPE, bool)]
    written = write_phantom_case(case, tmp_path / "d")
    assert dciodvfy(written.seg) == [] and not load_case(tmp_path / "d").rois[0].any()

"""Reader: ordering along the slice normal, HU scaling, refusals, compressed transfer syntaxes."""
from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from ltdiff_core.dicomio import SeriesError, find_series, read_series
from ltdiff_core.dicomio.uids import make_uid
from ltdiff_core.dicomio.writer import slice_positions


def _volume(shape=(5, 64, 64), seed=0):
    return np.random.default_rng(seed).integers(-1024, 3000, size=shape).astype(np.float32)


def test_sorts_by_position_not_by_name_or_instance_number(ct_series, tmp_path):
    volume = _volume()
    shuffled = ["b.dcm", "e", "a.dcm", "zz.img", "c.dcm"]  # file name order != slice order

    def reverse_numbers(datasets):
        for ds in datasets:
            ds.InstanceNumber = len(datasets) - ds.InstanceNumber + 1

    ct_series(volume, names=shuffled, edit=reverse_numbers)
    series = read_series(tmp_path / "series")
    np.testing.assert_array_equal(series.hu, volume)
    assert np.all(np.diff(series.slice_locations) > 0)
    assert [p.name for p in series.paths] == shuffled
    assert [int(ds.InstanceNumber) for ds in series.datasets] == [5, 4, 3, 2, 1]
    assert series.spacing == pytest.approx((1.5, 0.7, 0.7))
    assert series.kernel == "Br40" and series.modality == "CT"
    assert series.hu.dtype == np.float32 and "PixelData" not in series.datasets[0]


def test_sorts_along_oblique_normal_with_descending_z(ct_series, tmp_path):
    volume = _volume(shape=(4, 32, 48))
    # Row/column cosines tilted about x: the normal is not the z axis, and z falls with index.
    c, s = np.cos(0.3), np.sin(0.3)
    orientation = (1.0, 0.0, 0.0, 0.0, c, -s)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([[-10.0, 5.0, 0.0] + k * 2.0 * normal for k in range(4)])
    ct_series(volume, shape=volume.shape, positions=positions, orientation=orientation,
              names=["4.dcm", "3.dcm", "2.dcm", "1.dcm"])
    series = read_series(sorted((tmp_path / "series").iterdir()))
    np.testing.assert_array_equal(series.hu, volume)
    assert series.spacing[0] == pytest.approx(2.0, abs=1e-4)
    assert np.allclose(series.normal, normal)


def test_rescale_slope_and_intercept_are_applied(ct_series, tmp_path):
    volume = _volume(shape=(2, 32, 32))

    def rescale(datasets):
        for ds in datasets:
            ds.RescaleSlope = "2"
            ds.RescaleIntercept = "-1024"

    ct_series(volume, shape=volume.shape, edit=rescale)
    series = read_series(tmp_path / "series")
    np.testing.assert_array_equal(series.hu, volume * 2 - 1024)


def test_refuses_mixed_series(ct_series, tmp_path):
    ct_series(folder="mixed/a")
    ct_series(folder="mixed/b", kernel="Bl64")
    with pytest.raises(SeriesError, match="mixes 2 series"):
        read_series(tmp_path / "mixed")
    with pytest.raises(SeriesError, match="mixed SeriesInstanceUID"):
        read_series(sorted((tmp_path / "mixed").rglob("*.dcm")))


def test_series_uid_selects_one_series_and_ignores_other_files(ct_series, tmp_path):
    a = ct_series(folder="mixed/a")
    ct_series(folder="mixed/b", kernel="Bl64")
    (tmp_path / "mixed" / "notes.txt").write_text("not DICOM")
    uid = pydicom.dcmread(a[0]).SeriesInstanceUID
    groups = find_series(tmp_path / "mixed")
    assert len(groups) == 2 and sorted(groups[uid]) == sorted(a)
    assert read_series(tmp_path / "mixed", series_uid=uid).series_uid == uid


def _edit_slice(attribute, value, index=1):
    def edit(datasets):
        setattr(datasets[index], attribute, value)

    return edit


@pytest.mark.parametrize(
    ("attribute", "value", "message"),
    [
        ("ImageOrientationPatient", ["0", "1", "0", "0", "0", "-1"], "mixed ImageOrientationPatient"),
        ("PixelSpacing", ["0.8", "0.8"], "mixed PixelSpacing"),
    ],
)
def test_refuses_mixed_geometry(ct_series, tmp_path, attribute, value, message):
    ct_series(edit=_edit_slice(attribute, value))
    with pytest.raises(SeriesError, match=message):
        read_series(tmp_path / "series")


def test_refuses_mixed_rows_columns(ct_series, tmp_path):
    files = ct_series(shape=(3, 64, 64))
    small = ct_series(shape=(1, 32, 64), folder="other")
    ds = pydicom.dcmread(small[0])
    template = pydicom.dcmread(files[0])
    for keyword in ("SeriesInstanceUID", "ImagePositionPatient"):
        setattr(ds, keyword, getattr(template, keyword))
    ds.ImagePositionPatient[2] = "50"
    ds.save_as(tmp_path / "series" / "odd.dcm")
    with pytest.raises(SeriesError, match="mixed Rows/Columns"):
        read_series(tmp_path / "series")


def test_refuses_duplicate_positions(ct_series, tmp_path):
    positions = slice_positions((3, 64, 64), (1.5, 0.7, 0.7))
    positions[2] = positions[1]
    ct_series(shape=(3, 64, 64), positions=positions)
    with pytest.raises(SeriesError, match="duplicate slice positions"):
        read_series(tmp_path / "series")


def test_refuses_empty_and_non_image_input(tmp_path, ct_series):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(SeriesError, match="no DICOM files"):
        read_series(tmp_path / "empty")
    with pytest.raises(SeriesError, match="no images given"):
        read_series([])
    with pytest.raises(SeriesError, match="not a readable DICOM file"):
        read_series([tmp_path / "empty" / "readme.txt"])
    files = ct_series(edit=lambda dss: delattr(dss[0], "ImagePositionPatient"))
    with pytest.raises(SeriesError, match="missing ImagePositionPatient"):
        read_series(files)
    with pytest.raises(SeriesError, match="not found"):
        read_series(tmp_path / "series", series_uid=make_uid())


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_reads_series_we_compressed(ct_series, tmp_path, syntax):
    volume = _volume(shape=(3, 32, 32))
    files = ct_series(volume, shape=volume.shape, transfer_syntax=syntax)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_series(tmp_path / "series").hu, volume)


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
             "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]
)
def test_bundled_compressed_files_decode_like_the_uncompressed_original(name):
    reference = read_series(get_testdata_file("MR_small.dcm", download=False))
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom no longer bundles {name}"
    series = read_series(path)
    np.testing.assert_array_equal(series.hu, reference.hu)
    assert series.spacing[1:] == reference.spacing[1:]


def test_bundled_ct_files_give_plausible_hu(tmp_path):
    small = read_series(get_testdata_file("CT_small.dcm", download=False))
    assert small.modality == "CT" and small.hu.shape == (1, 128, 128)
    # Lossy JPEG 2000 head CT, copied under a meaningless name into a folder.
    shutil.copy(get_testdata_file("693_J2KI.dcm", download=False), tmp_path / "x")
    head = read_series(tmp_path)
    assert head.hu.shape == (1, 512, 512)
    in_fov = head.hu[head.hu > -2000]  # outside the reconstruction circle is padding
    assert 0.2 < np.mean((in_fov > -1100) & (in_fov < -900)) < 0.8  # air around the head
    assert 0.002 < np.mean(in_fov > 1000) < 0.05  # skull

"""`dicom-node standardize` on a phantom series with the shipped models: a valid DERIVED
series whose noise moves from Br40-like towards Bl64-like, originals untouched."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ltdiff_core.dicomio import read_series
from ltdiff_core.radiomics.image_metrics import find_uniform_patches, noise_and_nps


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.app.cli", *args], capture_output=True, text=True,
                          timeout=600)


def _digest(files: list[Path]) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    subprocess.run([sys.executable, "-m", "ltdiff_train.make_phantom", "--out", str(out), "--cases", "1", "--slices", "2",
                    "--seed", "4242", "--size", "256"], check=True, capture_output=True, timeout=300)
    return out / "case-000"


@pytest.mark.parametrize("model", [None, "ltdiff"], ids=["default", "ltdiff"])
def test_standardize_shipped_model_writes_valid_derived_series(phantom: Path, tmp_path: Path, dciodvfy,
                                                               model: str | None) -> None:
    """The default (no --model: ltdiff_core.weights.DEFAULT) and the latent diffusion by name."""
    from ltdiff_core.checkpoint import load_checkpoint
    from ltdiff_core.weights import default_checkpoint

    src_files = sorted((phantom / "br40").glob("*.dcm"))
    before = _digest(src_files)
    out = tmp_path / "std"
    proc = _cli("standardize", str(phantom / "br40"), str(out), "--device", "cpu", "--quiet",
                *(["--model", model] if model else []))
    assert proc.returncode == 0, proc.stderr
    name = load_checkpoint(default_checkpoint(model)).metadata["name"]
    assert {ds.ContributingEquipmentSequence[-1].ManufacturerModelName for ds in read_series(out).datasets} == {name}

    outputs = sorted(out.rglob("*.dcm"))
    assert len(outputs) == len(src_files)
    assert _digest(src_files) == before, "the original files were modified"

    src = read_series(phantom / "br40")
    res = read_series(out)
    src_sops = {ds.SOPInstanceUID for ds in src.datasets}
    for ds in res.datasets:
        assert ds.SeriesInstanceUID != src.series_uid
        assert ds.SOPInstanceUID not in src_sops
        assert ds.StudyInstanceUID == src.study_uid
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in src_sops
        assert ds.ContributingEquipmentSequence[-1].ManufacturerModelName
    for f in outputs:
        assert dciodvfy(f) == [], f"dciodvfy errors in {f.name}"

    # Noise in uniform soft tissue (found on the Bl64 reference) moves from Br40's towards Bl64's.
    ref = read_series(phantom / "bl64")
    patches = find_uniform_patches(ref.hu, ref.spacing[1], size=24)
    assert patches.corners, "no uniform soft-tissue patch in the test phantom"
    n_in = noise_and_nps(src.hu, patches, ref.spacing[1])["noise_std_hu"]
    n_out = noise_and_nps(res.hu, patches, ref.spacing[1])["noise_std_hu"]
    n_ref = noise_and_nps(ref.hu, patches, ref.spacing[1])["noise_std_hu"]
    assert n_in < n_ref
    assert n_out > 1.5 * n_in
    assert abs(n_out - n_ref) < abs(n_in - n_ref)


def test_standardize_refuses_a_folder_without_a_series(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    proc = _cli("standardize", str(empty), str(tmp_path / "out"), "--device", "cpu", "--quiet")
    assert proc.returncode == 2
    assert "DICOM" in proc.stderr or "series" in proc.stderr.lower()
    assert not list(tmp_path.rglob("*.dcm"))


def test_standardize_reads_compressed_input(tmp_path: Path) -> None:
    """A JPEG 2000 CT from pydicom's test data is decoded, standardized and written uncompressed."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("693_J2KI.dcm", download=False)
    assert path is not None
    src = tmp_path / "in"
    src.mkdir()
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    ds.save_as(src / "ct.dcm", enforce_file_format=True)
    # a 0.48 mm, 5 mm head CT: outside the model's QA envelope (refused by default, exit 3); this test is
    # about decoding, so the gate is off
    proc = _cli("standardize", str(src), str(tmp_path / "out"), "--device", "cpu", "--quiet", "--qa", "off",
                "--model", str(Path(__file__).resolve().parents[1] / "ltdiff_core" / "weights" / "linear.safetensors"))
    assert proc.returncode == 0, proc.stderr
    (out,) = sorted((tmp_path / "out").rglob("*.dcm"))
    res = pydicom.dcmread(out)
    assert res.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert res.pixel_array.shape == ds.pixel_array.shape
    assert np.isfinite(res.pixel_array.astype(float)).all()

"""Write phantom cases as standard DICOM: two CT Image Storage series (Br40, Bl64) and a SEG.

A case with a rescan gets a third CT series, ConvolutionKernel ``RESCAN`` (folder ``rescan/``),
so kernel-prefix selection of ``Br40``/``Bl64`` never picks it up.

Every object is built explicitly with all modules of its IOD so that ``dciodvfy`` accepts it;
the same builders serve tests that need small, hand-made series.
Pixel data are stored as signed int16 (PixelRepresentation 1, RescaleSlope 1,
RescaleIntercept 0), so the stored values *are* HU and round-trip exactly.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, UID

from ltdiff_core.dicomio.uids import make_uid

SYNTHETIC = "SYNTHETIC PHANTOM"
MODEL_NAME = "ltdiff two-kernel chest phantom"
#: ConvolutionKernel of the rescan series: matches neither ``Br40`` nor ``Bl64`` as a prefix.
RESCAN_KERNEL = "RESCAN"
RESCAN_DESCRIPTION = f"{SYNTHETIC} RESCAN independent Bl64 realisation"
SOFTWARE_VERSION = "ltdiff_core 0.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# Display defaults per kernel family: soft-tissue window for body kernels, lung window otherwise.
_WINDOWS = {"B": (40.0, 400.0), "L": (-600.0, 1500.0)}
# CID 7162 has no "simulation ground truth" family; the masks are the phantom's shape model
# (drawn objects, supersampled and thresholded), closest to morphological processing. Standard
# codes keep dciodvfy free of "unrecognized coding scheme" warnings.
_ALGORITHM_FAMILY = codes.cid7162.MorphologicalOperations


@dataclass(frozen=True)
class StudyInfo:
    """Patient/study level attributes shared by every series of one case."""

    study_uid: str
    frame_of_reference_uid: str
    patient_name: str = "PHANTOM^SYNTHETIC"
    patient_id: str = "PHANTOM"
    study_id: str = "1"
    study_date: str = "20240101"
    study_time: str = "120000"
    study_description: str = f"{SYNTHETIC} CHEST"
    accession_number: str = ""


@dataclass
class WrittenCase:
    """Paths of everything :func:`write_phantom_case` produced for one case."""

    case_dir: Path
    series: dict[str, list[Path]] = field(default_factory=dict)  # kernel -> CT files
    seg: Path | None = None
    case_json: Path | None = None


def to_int16(volume: np.ndarray) -> np.ndarray:
    """Round and clip HU values to the int16 range used for storage."""
    info = np.iinfo(np.int16)
    return np.clip(np.rint(np.asarray(volume, dtype=np.float64)), info.min, info.max).astype(np.int16)


def _ds(value: float) -> str:
    """Decimal String that fits the 16-character limit without float noise."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def slice_positions(shape: tuple[int, int, int], spacing: Sequence[float]) -> np.ndarray:
    """ImagePositionPatient per slice: image centred on the isocentre, z ascending with slice index."""
    nz, ny, nx = shape
    dz, dy, dx = (float(s) for s in spacing)
    x0 = -0.5 * (nx - 1) * dx
    y0 = -0.5 * (ny - 1) * dy
    z0 = -0.5 * (nz - 1) * dz
    return np.array([[x0, y0, z0 + k * dz] for k in range(nz)], dtype=np.float64)


def ct_datasets(
    volume_hu: np.ndarray,
    spacing: Sequence[float],
    *,
    study: StudyInfo,
    kernel: str,
    series_number: int,
    series_uid: str | None = None,
    uid_key: str | None = None,
    series_description: str | None = None,
    image_comments: str | None = None,
    positions: np.ndarray | None = None,
    orientation: Sequence[float] = AXIAL,
) -> list[Dataset]:
    """Build one CT Image Storage dataset per slice of ``volume_hu`` ``(Z, Y, X)``.

    ``uid_key`` makes series and SOP Instance UIDs deterministic; without it they are random.
    ``positions``/``orientation`` override the default axial, isocentred geometry (tests use
    this to build oblique or broken series).
    """
    pixels = to_int16(volume_hu)
    if pixels.ndim != 3:
        raise ValueError(f"volume must be (Z, Y, X), got shape {pixels.shape}")
    nz, ny, nx = pixels.shape
    dz, dy, dx = (float(s) for s in spacing)
    key = (uid_key, kernel, series_number) if uid_key is not None else ()
    if series_uid is None:
        series_uid = make_uid(*key, "series") if key else make_uid()
    if positions is None:
        positions = slice_positions(pixels.shape, spacing)  # type: ignore[arg-type]
    orientation = [float(v) for v in orientation]
    normal = np.cross(orientation[:3], orientation[3:])
    center, width = _WINDOWS["L" if kernel[1:2].lower() == "l" else "B"]
    out = []
    for k in range(nz):
        sop_uid = make_uid(*key, "instance", k) if key else make_uid()
        ds = _ct_slice(pixels[k], study, sop_uid)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description or f"{SYNTHETIC} {kernel}"
        ds.ConvolutionKernel = kernel
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.SliceLocation = _ds(float(np.dot(positions[k], normal)))
        ds.PixelSpacing = [_ds(dy), _ds(dx)]
        ds.SliceThickness = _ds(dz)
        ds.SpacingBetweenSlices = _ds(dz)
        ds.ReconstructionDiameter = _ds(max(ny * dy, nx * dx))
        ds.WindowCenter = _ds(center)
        ds.WindowWidth = _ds(width)
        if image_comments:
            ds.ImageComments = image_comments
        out.append(ds)
    return out


def _ct_slice(pixels: np.ndarray, study: StudyInfo, sop_uid: str) -> Dataset:
    """Patient, study, equipment, image pixel and CT image attributes of one slice."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    # Patient, General Study, Patient Study
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.study_description
    # General Series, Frame of Reference, General Equipment
    ds.Modality = "CT"
    ds.SeriesDate = study.study_date
    ds.SeriesTime = study.study_time
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = SYNTHETIC
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.InstitutionName = SYNTHETIC
    # General Image, General Acquisition, CT Image
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.ContentDate = study.study_date
    ds.ContentTime = study.study_time
    ds.AcquisitionDate = study.study_date
    ds.AcquisitionTime = study.study_time
    ds.BurnedInAnnotation = "NO"
    ds.KVP = "120"
    ds.XRayTubeCurrent = 200
    ds.ExposureTime = 500
    ds.ScanOptions = "HELICAL"
    ds.RotationDirection = "CW"
    ds.GantryDetectorTilt = "0"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def save_datasets(
    datasets: Sequence[Dataset],
    out_dir: Path,
    *,
    names: Sequence[str] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[Path]:
    """Save datasets as DICOM Part 10 files (``IM00001.dcm``…, or ``names``), optionally compressed.

    ``transfer_syntax`` may be any syntax pydicom can encode here (e.g. RLE Lossless,
    JPEG 2000 Lossless with pylibjpeg-openjpeg).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(names) if names is not None else [f"IM{k + 1:05d}.dcm" for k in range(len(datasets))]
    paths = []
    for ds, name in zip(datasets, names, strict=True):
        if UID(transfer_syntax) != ExplicitVRLittleEndian:
            ds = _copy(ds)
            ds.compress(transfer_syntax)
        path = out_dir / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _copy(ds: Dataset) -> Dataset:
    out = Dataset(ds)
    out.file_meta = FileMetaDataset(ds.file_meta)
    return out


def write_seg(
    masks: Sequence[np.ndarray],
    names: Sequence[str],
    source_images: Sequence[Dataset],
    path: Path,
    *,
    uid_key: str | None = None,
    series_number: int = 100,
    descriptions: Sequence[str] | None = None,
) -> Path:
    """Write bool masks ``(Z, Y, X)`` as one BINARY DICOM SEG, one segment per mask.

    ``source_images`` are the CT datasets the masks were drawn on, in the masks' slice order;
    the SEG references them, so readers can map frames back by SOP Instance UID.
    """
    if not masks:
        raise ValueError("write_seg needs at least one mask")
    stack = np.stack([np.asarray(m, dtype=bool) for m in masks], axis=-1)
    if stack.shape[:3] != (len(source_images), source_images[0].Rows, source_images[0].Columns):
        raise ValueError(f"masks {stack.shape[:3]} do not match the source images")
    segments = []
    for number, name in enumerate(names, start=1):
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=str(name)[:64],
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.DCM.PhantomTumor,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name=MODEL_NAME, family=_ALGORITHM_FAMILY, version=SOFTWARE_VERSION
                ),
                tracking_id=str(name)[:64],
                tracking_uid=make_uid(uid_key, "segment", number) if uid_key else make_uid(),
            )
        )
    key = (uid_key, "seg") if uid_key else ()
    first = source_images[0]
    seg = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=make_uid(*key, "series") if key else make_uid(),
        series_number=series_number,
        sop_instance_uid=make_uid(*key, "instance") if key else make_uid(),
        instance_number=1,
        manufacturer=SYNTHETIC,
        manufacturer_model_name=MODEL_NAME,
        software_versions=SOFTWARE_VERSION,
        device_serial_number="0",
        content_description=(f"{SYNTHETIC} tumour masks")[:64],
        content_creator_name="PHANTOM^GENERATOR",
        content_label="TUMOURS",
        series_description=f"{SYNTHETIC} tumour masks",
        content_date=first.StudyDate,
        content_time=first.StudyTime,
        series_date=first.StudyDate,
        series_time=first.StudyTime,
        omit_empty_frames=bool(stack.any()),
    )
    if uid_key:
        _freeze_seg(seg, make_uid(*key, "dimension-organization"), first.StudyDate, first.StudyTime)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def _freeze_seg(seg: Dataset, dimension_uid: str, date: str, time: str) -> None:
    """Replace the clock- and random-derived values highdicom fills in, for reproducible files."""
    seg.InstanceCreationDate = date
    seg.InstanceCreationTime = time
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{date}{time}"
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dimension_uid
    for item in seg.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dimension_uid


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and tuples so case metadata can go to JSON."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"<array {value.shape} {value.dtype}>"
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _scalars(meta: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key=value`` items for the scalar and short numeric entries, nested mappings dotted."""
    items = []
    for key, value in meta.items():
        value = _jsonable(value)
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items.extend(_scalars(value, f"{name}."))
        elif isinstance(value, float):
            items.append(f"{name}={round(value, 4)}")
        elif isinstance(value, (str, int, bool)):
            items.append(f"{name}={value}")
        elif isinstance(value, list) and len(value) <= 4 and all(isinstance(v, (int, float)) for v in value):
            items.append(f"{name}={[round(v, 4) if isinstance(v, float) else v for v in value]}")
    return items


def meta_comment(meta: Mapping[str, Any], limit: int = 1024) -> str:
    """ImageComments text: the synthetic marker plus the scalar phantom parameters."""
    return f"{SYNTHETIC}; " + "; ".join(_scalars(meta))[: limit - len(SYNTHETIC) - 2]


def write_phantom_case(
    case: Any,
    out_dir: Path,
    *,
    uid_key: str | None = None,
    name: str | None = None,
    kernels: tuple[str, str] = ("Br40", "Bl64"),
) -> WrittenCase:
    """Write a :class:`~ltdiff_core.phantom.case.PhantomCase` as ``out_dir/{br40,bl64,seg}`` + ``case.json``.

    Both CT series share StudyInstanceUID and FrameOfReferenceUID; the SEG (only when the case
    has tumour masks) references the Bl64 series. A case with ``rescan`` also gets
    ``out_dir/rescan`` (series 3, ConvolutionKernel ``RESCAN``) in the same study and frame. ``uid_key`` (default: derived from
    ``case.meta["seed"]`` when present) makes every UID reproducible.
    """
    out_dir = Path(out_dir)
    meta = dict(getattr(case, "meta", {}) or {})
    if uid_key is None and "seed" in meta:
        uid_key = f"phantom-seed-{meta['seed']}"
    name = name or out_dir.name
    study = StudyInfo(
        study_uid=make_uid(uid_key, "study") if uid_key else make_uid(),
        frame_of_reference_uid=make_uid(uid_key, "frame-of-reference") if uid_key else make_uid(),
        patient_name=f"PHANTOM^{name}"[:64],
        patient_id=f"PHANTOM-{meta['seed']}" if "seed" in meta else f"PHANTOM-{name}"[:64],
    )
    comments = meta_comment(meta)
    written = WrittenCase(case_dir=out_dir)
    by_kernel = {}
    for number, (kernel, volume) in enumerate(zip(kernels, (case.br40, case.bl64)), start=1):
        datasets = ct_datasets(
            volume, case.spacing, study=study, kernel=kernel, series_number=number,
            uid_key=uid_key, image_comments=comments,
        )
        written.series[kernel] = save_datasets(datasets, out_dir / kernel.lower())
        by_kernel[kernel] = datasets
    rescan = getattr(case, "rescan", None)
    if rescan is not None:
        mode = str(meta.get("rescan", {}).get("mode", "independent"))
        description = RESCAN_DESCRIPTION if mode == "independent" else f"{SYNTHETIC} RESCAN {mode} Bl64 realisation"
        datasets = ct_datasets(
            rescan, case.spacing, study=study, kernel=RESCAN_KERNEL, series_number=3, uid_key=uid_key,
            series_description=description[:64], image_comments=comments,
        )
        written.series[RESCAN_KERNEL] = save_datasets(datasets, out_dir / RESCAN_KERNEL.lower())
        by_kernel[RESCAN_KERNEL] = datasets
    masks = [np.asarray(m, dtype=bool) for m in getattr(case, "tumour_masks", [])]
    roi_names = [f"tumour-{i + 1}" for i in range(len(masks))]
    if masks:
        written.seg = write_seg(
            masks, roi_names, by_kernel[kernels[1]], out_dir / "seg" / "SEG00001.dcm", uid_key=uid_key
        )
    summary = {
        "name": name,
        "synthetic": True,
        "kernels": list(kernels),
        "rescan_kernel": RESCAN_KERNEL if rescan is not None else None,
        "shape": list(case.br40.shape),
        "spacing": [float(s) for s in case.spacing],
        "study_instance_uid": study.study_uid,
        "frame_of_reference_uid": study.frame_of_reference_uid,
        "series_instance_uids": {k: str(ds[0].SeriesInstanceUID) for k, ds in by_kernel.items()},
        "roi_names": roi_names,
        "meta": _jsonable(meta),
        "tumour_info": _jsonable(list(getattr(case, "tumour_info", []))),
        "label_names": _jsonable(dict(getattr(case, "label_names", {}))),
    }
    written.case_json = out_dir / "case.json"
    written.case_json.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return written

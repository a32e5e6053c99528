"""Derive: turn standardized HU volumes into a new DERIVED CT series next to the original.

This is the only code that builds output objects; the service and ``dicom-node standardize``
both call :func:`derive_series`, so every standardized series in a PACS carries the same marks:

* CT Image Storage, new SeriesInstanceUID (one per call) and SOPInstanceUIDs (under the
  configured UID root, else UUID-derived ``2.25.`` UIDs), ImageType ``DERIVED\\SECONDARY\\AXIAL``.
* SeriesNumber = source SeriesNumber + ``series_number_offset`` (default 1000) and a
  SeriesDescription suffix saying research use, so the series sorts and reads apart from the scan.
* ConvolutionKernel ``["Bl64-LIKE", "STANDARDIZED"]``: two values because a PACS shows the whole
  multi-valued string (``Bl64-LIKE\\STANDARDIZED``) and viewers that show only the first value
  still read "Bl64-like"; neither value is a real scanner kernel name, so a query or a routing
  rule for ``Br40*`` or ``Bl64`` never mistakes the output for a scan (and the node never
  re-standardizes its own output). Both fit the 16 characters of SH whatever the source kernel
  (``STD-FROM-STANDARD`` would not); the source kernel is named in DerivationDescription.
* SourceImageSequence (DCM 121322) per instance, ReferencedSeriesSequence (Common Instance
  Reference), DerivationCodeSequence (CID 7203, default DCM 113086 "Edge enhancement": a smooth
  to sharp kernel conversion raises high-frequency content; CID 7203 has no generic "kernel
  conversion" concept), DerivationDescription naming model and checksum, and a
  ContributingEquipmentSequence item (DCM 109102 "Processing Equipment": equipment that created
  new instances; 109103 "Modifying Equipment" is for edits of existing instances).
* Patient, study, equipment, geometry and acquisition attributes are kept (the pixels still
  show the same acquisition, so IrradiationEventUID and FrameOfReferenceUID still hold).
  Private attributes are removed: they describe the original reconstruction (vendor kernel and
  recon parameters) or may hold data this software cannot vouch for. Icon images, digital
  signatures and old derivation/reference sequences are removed because they no longer hold.
* Pixels keep the source's stored representation (BitsAllocated, BitsStored,
  PixelRepresentation, RescaleSlope/Intercept): stored = round((HU - intercept) / slope), clipped
  to what the representation can hold. Output is always uncompressed Explicit VR Little Endian,
  even for compressed input: every PACS accepts it, and re-encoding lossy would add a second
  loss. LossyImageCompression is kept: an image once lossy-compressed stays "01". Pixels that
  are padding in the source (PixelPaddingValue) stay padding; without source pixels to tell
  them apart, PixelPaddingValue is removed. Smallest/LargestImagePixelValue are recomputed.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import PersonName
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ltdiff_core.atomic import open_atomic

from dicom_node.version import MANUFACTURER, SOFTWARE_NAME, SOFTWARE_VERSION

log = logging.getLogger("dicom_node.derive.series")

# Attributes that describe the source instance itself, its encoding or its old derivation.
_DROPPED = (
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "PixelDataProviderURL",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "EncapsulatedPixelDataValueTotalLength",
    "IconImageSequence", "DigitalSignaturesSequence", "MACParametersSequence",
    "DataSetTrailingPadding", "InstanceCreatorUID", "SourceImageSequence",
    "DerivationCodeSequence", "DerivationDescription", "ReferencedSeriesSequence",
    "StudiesContainingOtherReferencedInstancesSequence", "SourceImageEvidenceSequence",
    "SmallestPixelValueInSeries", "LargestPixelValueInSeries",
)


@dataclass(frozen=True)
class DerivationInfo:
    """What produced the new pixels and how the output series is labelled."""

    model_name: str
    model_version: str = "unknown"
    model_sha256: str = ""
    method: str = "latent-diffusion"
    sampler: Mapping[str, Any] = field(default_factory=dict)  # steps, seed, strength, ...
    device: str | None = None
    uid_root: str | None = None  # None, "" or "2.25." = UUID-derived UIDs
    series_number_offset: int = 1000
    source_kernel: str = "Br40"  # used only when a source has no ConvolutionKernel
    target_kernel: str = "Bl64"
    series_description_suffix: str = " [STANDARDIZED {target}-like, RESEARCH USE]"
    derivation_code: Code = codes.DCM.EdgeEnhancement
    software_name: str = SOFTWARE_NAME
    software_version: str = SOFTWARE_VERSION
    manufacturer: str = MANUFACTURER

    @classmethod
    def from_model_info(cls, info: Mapping[str, Any], **overrides: Any) -> DerivationInfo:
        """Build from ``Standardizer.info`` (keys name, version, sha256, method)."""
        values: dict[str, Any] = {
            "model_name": str(info.get("name") or "unknown"),
            "model_version": str(info.get("version") or "unknown"),
            "model_sha256": str(info.get("sha256") or ""),
            "method": str(info.get("method") or "unknown"),
        }
        values.update(overrides)
        return cls(**values)


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    if code.scheme_version:
        item.CodingSchemeVersion = code.scheme_version
    item.CodeMeaning = code.meaning
    return item


def uid_prefix(root: str | None) -> str | None:
    """A generate_uid prefix; 2.25 is reserved for UUID-derived UIDs, so it maps to None."""
    if not root or root.rstrip(".") == "2.25":
        return None
    return root if root.endswith(".") else root + "."


def _first(value: Any) -> str | None:
    """First value of a possibly multi-valued attribute (Siemens: ["Br40d", "3"])."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return str(value[0]) if len(value) else None
    return str(value)


def output_kernel(source: Dataset, info: DerivationInfo) -> list[str]:
    """ConvolutionKernel of the output: the target label and a marker, each within SH's 16
    characters; the source kernel goes to DerivationDescription (any length)."""
    return [f"{info.target_kernel}-LIKE"[:16], "STANDARDIZED"]


def _series_description(source: Dataset, info: DerivationInfo) -> str:
    suffix = info.series_description_suffix.format(target=info.target_kernel)
    base = str(source.get("SeriesDescription") or "CT")
    return (base[: max(0, 64 - len(suffix))] + suffix)[:64].strip()


def _derivation_description(info: DerivationInfo, src_kernel: str) -> str:
    params = ", ".join(f"{k}={v}" for k, v in info.sampler.items())
    text = (
        f"Kernel standardization {src_kernel} -> {info.target_kernel}-like by {info.method} model "
        f"{info.model_name} {info.model_version} (sha256 {info.model_sha256[:12]}); {params}. "
        "Research use, not for diagnosis."
    )
    return text[:1024]


def _stored_range(ds: Dataset) -> tuple[int, int, np.dtype]:
    """Representable stored values and the array type for the source's pixel representation."""
    allocated = int(ds.BitsAllocated)
    stored = int(ds.get("BitsStored", allocated))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if allocated not in (8, 16, 32):
        raise ValueError(f"BitsAllocated {allocated} is not supported for CT output")
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    if signed:
        return -(2 ** (stored - 1)), 2 ** (stored - 1) - 1, dtype
    return 0, 2**stored - 1, dtype


def _padding(source: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """(mask, stored values) of the source's padding pixels (outside the reconstruction circle).

    Padding is kept as it was: it marks "no data", and a model output there is meaningless.
    """
    if "PixelPaddingValue" not in source or "PixelData" not in source:
        return None
    raw = np.asarray(source.pixel_array)
    pad = int(source.PixelPaddingValue)
    limit = int(source.get("PixelPaddingRangeLimit", pad))
    lo, hi = min(pad, limit), max(pad, limit)
    return (raw >= lo) & (raw <= hi), raw


def _encode_pixels(hu: np.ndarray, source: Dataset, out: Dataset) -> tuple[np.ndarray, int]:
    """Stored values in the source's representation; returns (array, number of clipped pixels)."""
    slope = float(source.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(source.get("RescaleIntercept", 0.0) or 0.0)
    lo, hi, dtype = _stored_range(source)
    values = np.rint((hu.astype(np.float64) - intercept) / slope)
    clipped = int(np.count_nonzero((values < lo) | (values > hi)))
    stored = np.clip(values, lo, hi).astype(dtype)
    padding = _padding(source)
    if padding is not None:
        mask, raw = padding
        stored[mask] = raw[mask].astype(dtype)
    elif "PixelPaddingValue" in out:  # cannot tell padding pixels apart: the claim no longer holds
        del out.PixelPaddingValue
        if "PixelPaddingRangeLimit" in out:
            del out.PixelPaddingRangeLimit
    return stored, clipped


def _set_pixel_value(out: Dataset, keyword: str, value: int, signed: bool) -> None:
    tag = {"SmallestImagePixelValue": 0x00280106, "LargestImagePixelValue": 0x00280107}[keyword]
    if keyword in out:
        del out[tag]
    out.add_new(tag, "SS" if signed else "US", int(value))


# Values that cannot change in place: an element holding one is copied shallowly (deep-copying
# every element cost 20-27 % of deriving a slice, bench/bench_derive.py); lists, sequences and
# anything else are deep-copied.
_IMMUTABLE_VALUES = (str, int, float, bytes, type(None), PersonName)


def _copy_element(elem: DataElement) -> DataElement:
    if elem.VR == "SQ" or not isinstance(elem.value, _IMMUTABLE_VALUES):
        return copy.deepcopy(elem)
    new = DataElement.__new__(DataElement)
    new.__dict__.update(elem.__dict__)
    return new


def _copy_header(source: Dataset) -> Dataset:
    """Public attributes of the source without pixel data (the source object is not changed)."""
    out = Dataset()
    drop = set(_DROPPED)
    for elem in source:
        if elem.tag.is_private or elem.keyword in drop or elem.tag.group == 0x0002:
            continue
        out.add(_copy_element(elem))
    return out


def _file_meta(out: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = out.SOPClassUID
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _check_inputs(sources: Sequence[Dataset], hu: np.ndarray) -> None:
    if len(sources) == 0:
        raise ValueError("derive_series needs at least one source instance")
    if hu.ndim != 3 or hu.shape[0] != len(sources):
        raise ValueError(f"hu must be (Z, Y, X) with Z = {len(sources)} sources, got shape {hu.shape}")
    if not np.all(np.isfinite(hu)):
        raise ValueError("hu contains NaN or infinite values")
    for k, src in enumerate(sources):
        if str(src.get("SOPClassUID", "")) != CTImageStorage:
            raise ValueError(f"source {k} is not CT Image Storage (SOPClassUID {src.get('SOPClassUID')})")
        if int(src.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(f"source {k} is multi-frame")
        if (int(src.Rows), int(src.Columns)) != hu.shape[1:]:
            raise ValueError(f"source {k} is {src.Rows}x{src.Columns}, hu slice is {hu.shape[1]}x{hu.shape[2]}")


def derive_series(sources: Sequence[Dataset], hu: np.ndarray, info: DerivationInfo) -> list[Dataset]:
    """One derived CT instance per source; ``hu[k]`` (HU, float) becomes the pixels of ``sources[k]``."""
    hu = np.asarray(hu)
    _check_inputs(sources, hu)
    prefix = uid_prefix(info.uid_root)
    series_uid = generate_uid(prefix=prefix)
    now = datetime.now().astimezone()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    contribution_dt = now.strftime("%Y%m%d%H%M%S.%f%z")

    outputs: list[Dataset] = []
    clipped_total = 0
    for k, src in enumerate(sources):
        out = _copy_header(src)
        out.SOPClassUID = CTImageStorage
        out.SOPInstanceUID = generate_uid(prefix=prefix)
        out.SeriesInstanceUID = series_uid
        out.InstanceCreationDate, out.InstanceCreationTime = date, time
        out.SeriesDate, out.SeriesTime = date, time
        out.ContentDate, out.ContentTime = date, time
        out.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        out.SeriesNumber = int(src.get("SeriesNumber") or 0) + info.series_number_offset
        out.SeriesDescription = _series_description(src, info)
        out.ConvolutionKernel = output_kernel(src, info)
        src_kernel = _first(src.get("ConvolutionKernel")) or info.source_kernel
        out.DerivationDescription = _derivation_description(info, src_kernel)
        out.DerivationCodeSequence = DicomSequence([_code_item(info.derivation_code)])
        out.SourceImageSequence = DicomSequence([_source_item(src)])
        out.ReferencedSeriesSequence = DicomSequence([_referenced_series_item(src)])
        equipment = list(src.get("ContributingEquipmentSequence") or [])
        out.ContributingEquipmentSequence = DicomSequence(
            [copy.deepcopy(e) for e in equipment] + [_equipment_item(info, contribution_dt)]
        )

        stored, clipped = _encode_pixels(hu[k], src, out)
        clipped_total += clipped
        signed = stored.dtype.kind == "i"
        out.add_new(0x7FE00010, "OB" if stored.dtype.itemsize == 1 else "OW", stored.tobytes())
        for keyword, value in (("SmallestImagePixelValue", stored.min()), ("LargestImagePixelValue", stored.max())):
            if keyword in src:
                _set_pixel_value(out, keyword, int(value), signed)
        out.file_meta = _file_meta(out)
        outputs.append(out)
    if clipped_total:
        log.warning("derive: %d pixels clipped to the source's stored range", clipped_total)
    return outputs


def _source_item(src: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = src.SOPClassUID
    item.ReferencedSOPInstanceUID = src.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code_item(codes.DCM.SourceImageForImageProcessingOperation)]
    )
    item.SpatialLocationsPreserved = "YES"
    return item


def _referenced_series_item(src: Dataset) -> Dataset:
    inst = Dataset()
    inst.ReferencedSOPClassUID = src.SOPClassUID
    inst.ReferencedSOPInstanceUID = src.SOPInstanceUID
    item = Dataset()
    item.SeriesInstanceUID = src.SeriesInstanceUID
    item.ReferencedInstanceSequence = DicomSequence([inst])
    return item


def _equipment_item(info: DerivationInfo, contribution_dt: str) -> Dataset:
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code_item(codes.DCM.ProcessingEquipment)])
    item.Manufacturer = info.manufacturer[:64]
    item.ManufacturerModelName = info.model_name[:64]
    item.SoftwareVersions = [f"{info.software_name} {info.software_version}"[:64], str(info.model_version)[:64]]
    item.ContributionDateTime = contribution_dt
    item.ContributionDescription = (
        f"Kernel standardization to {info.target_kernel}-like ({info.method}); "
        f"model {info.model_name} {info.model_version} sha256 {info.model_sha256}"
        + (f"; device {info.device}" if info.device else "")
    )[:1024]
    return item


def write_series(datasets: Sequence[Dataset], out_dir: str | Path) -> list[Path]:
    """Write each dataset as ``<SOPInstanceUID>.dcm`` (DICOM File Format), atomically, in order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out / f"{ds.SOPInstanceUID}.dcm"
        with open_atomic(path, fsync=False) as fh:  # offline output: atomic, durability not needed
            ds.save_as(fh, enforce_file_format=True)
        paths.append(path)
    return paths

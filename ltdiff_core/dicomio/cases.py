"""Paired training/evaluation cases: one folder per case, two kernels, optional SEG ROIs.

The layout is documented in ``docs/data-layout.md``. A case folder may hold any number of
DICOM files in any sub-folders; the source and target series are chosen by ConvolutionKernel
(case-insensitive prefix match, so ``Br40`` also finds ``Br40d\\3``), paired by slice position,
and every SEG in the folder contributes its segments as boolean ROI volumes on the paired slices.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import SegmentationStorage

from ltdiff_core.dicomio.pairing import pair_series
from ltdiff_core.dicomio.reader import (
    ORIENTATION_TOL,
    SPACING_TOL_MM,
    Series,
    find_series,
    read_series,
)


class CaseError(ValueError):
    """A case folder does not hold the expected series or ROIs."""


@dataclass
class PairedCase:
    """Matched source/target volumes ``(Z, Y, X)`` float32 HU on the same slices.

    ``rois[k]`` is a bool ``(Z, Y, X)`` mask on those slices named ``roi_names[k]``;
    ``meta`` is the content of ``case.json`` when the folder has one.
    """

    name: str
    source: np.ndarray
    target: np.ndarray
    spacing: tuple[float, float, float]
    source_series: Series
    target_series: Series
    pairs: list[tuple[int, int]]
    rois: list[np.ndarray] = field(default_factory=list)
    roi_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def _has_dicom(folder: Path) -> bool:
    for path in folder.rglob("*"):
        if path.is_file():
            try:
                with open(path, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def list_cases(root: str | Path) -> list[Path]:
    """Immediate sub-folders of ``root`` that contain DICOM files, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise CaseError(f"{root} is not a folder")
    return sorted(p for p in root.iterdir() if p.is_dir() and _has_dicom(p))


@dataclass
class _SeriesInfo:
    uid: str
    files: list[Path]
    modality: str
    kernel: str
    sop_class: str


def _survey(case_dir: Path) -> list[_SeriesInfo]:
    out = []
    for uid, files in find_series(case_dir).items():
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        kernel = ds.get("ConvolutionKernel", "")
        if isinstance(kernel, pydicom.multival.MultiValue):
            kernel = "\\".join(str(k) for k in kernel)
        out.append(_SeriesInfo(uid, files, str(ds.get("Modality", "")), str(kernel), str(ds.get("SOPClassUID", ""))))
    return out


def _pick(series: list[_SeriesInfo], kernel: str, role: str, case_dir: Path) -> _SeriesInfo:
    hits = [s for s in series if s.modality == "CT" and s.kernel.lower().startswith(kernel.lower())]
    if len(hits) == 1:
        return hits[0]
    listing = sorted(f"{s.kernel or '<none>'} ({s.modality}, {len(s.files)} files)" for s in series)
    found = ", ".join(listing) or "none"
    what = "no" if not hits else f"{len(hits)}"
    raise CaseError(f"{case_dir.name}: {what} CT series with {role} kernel '{kernel}*'; series found: {found}")


def load_case(
    case_dir: str | Path,
    source_kernel: str = "Br40",
    target_kernel: str = "Bl64",
    tol_mm: float | None = None,
) -> PairedCase:
    """Load, pair and crop one case to the slices both kernels have (see module docstring).

    Raises :class:`CaseError` for a missing/ambiguous kernel or an unusable SEG, and lets
    ``SeriesError``/``PairingError`` from reading and pairing through unchanged.
    """
    case_dir = Path(case_dir)
    surveyed = _survey(case_dir)
    src_info = _pick(surveyed, source_kernel, "source", case_dir)
    tgt_info = _pick(surveyed, target_kernel, "target", case_dir)
    if src_info.uid == tgt_info.uid:
        raise CaseError(f"{case_dir.name}: source and target kernel select the same series {src_info.uid}")
    source = read_series(src_info.files)
    target = read_series(tgt_info.files)
    pairs = pair_series(source, target, tol_mm=tol_mm)
    ia = [i for i, _ in pairs]
    ib = [j for _, j in pairs]
    locations = source.slice_locations[ia]
    dz = float(np.median(np.diff(locations))) if len(ia) > 1 else float(source.spacing[0])
    rois: list[np.ndarray] = []
    names: list[str] = []
    for info in surveyed:
        if info.sop_class == SegmentationStorage or info.modality == "SEG":
            for path in info.files:
                masks, labels = _seg_rois(path, source, ia, target, ib, tol_mm)
                rois.extend(masks)
                names.extend(labels)
    meta_path = case_dir / "case.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return PairedCase(
        name=case_dir.name,
        source=source.hu[ia],
        target=target.hu[ib],
        spacing=(dz, float(source.spacing[1]), float(source.spacing[2])),
        source_series=source,
        target_series=target,
        pairs=pairs,
        rois=rois,
        roi_names=names,
        meta=meta,
    )


def has_series(case_dir: str | Path, kernel: str) -> bool:
    """Whether the case folder holds a CT series whose ConvolutionKernel starts with ``kernel``."""
    return any(s.modality == "CT" and s.kernel.lower().startswith(kernel.lower()) for s in _survey(Path(case_dir)))


def load_matched_series(case_dir: str | Path, kernel: str, case: PairedCase, tol_mm: float | None = None) -> np.ndarray:
    """A third CT series of the case on the case's paired slices, ``(Z, Y, X)`` float32 HU.

    Chosen by ConvolutionKernel like the pair (prefix match, exactly one series), paired with the
    *target* series by slice position; every paired target slice must have a partner, otherwise
    :class:`CaseError` names the case (a reference that covers only part of the case would be
    compared on other slices than the methods). Used for the rescan ceiling (kernel ``RESCAN``).
    """
    case_dir = Path(case_dir)
    info = _pick(_survey(case_dir), kernel, "extra", case_dir)
    if info.uid in (case.source_series.series_uid, case.target_series.series_uid):
        raise CaseError(f"{case_dir.name}: kernel '{kernel}' selects the source or target series {info.uid}")
    extra = read_series(info.files)
    partner = dict(pair_series(case.target_series, extra, tol_mm=tol_mm))
    ib = [j for _, j in case.pairs]
    missing = [j for j in ib if j not in partner]
    if missing:
        locations = case.target_series.slice_locations[missing]
        raise CaseError(f"{case_dir.name}: the '{kernel}' series has no slice at {len(missing)} of the "
                        f"{len(ib)} paired positions (e.g. {float(locations[0]):.2f} mm)")
    return extra.hu[[partner[j] for j in ib]]


def _seg_rois(
    path: Path, source: Series, ia: list[int], target: Series, ib: list[int], tol_mm: float | None
) -> tuple[list[np.ndarray], list[str]]:
    """Segments of one SEG as bool volumes on the paired slices.

    SEGs that reference the target or source series are mapped by SOP Instance UID; others
    (same frame of reference, same in-plane grid) by their frames' plane positions. FRACTIONAL
    segments are thresholded at one half.
    """
    seg = hd.seg.segread(path)
    numbers = list(seg.segment_numbers)
    labels = [str(seg.get_segment_description(n).segment_label) for n in numbers]
    referenced = {sop for _, _, sop in seg.get_source_image_uids()}
    for series, index in ((target, ib), (source, ia)):
        sops = [str(series.datasets[i].SOPInstanceUID) for i in index]
        if referenced.issuperset(sops):
            pixels = seg.get_pixels_by_source_instance(sops, segment_numbers=numbers)
            return [pixels[..., k] >= 0.5 for k in range(len(numbers))], labels
    return _rois_by_position(seg, numbers, source, ia, tol_mm, path), labels


def _rois_by_position(
    seg: Any, numbers: list[int], source: Series, index: list[int], tol_mm: float | None, path: Path
) -> list[np.ndarray]:
    if str(seg.get("FrameOfReferenceUID", "")) != source.frame_of_reference_uid:
        raise CaseError(f"{path.name}: SEG references none of the paired series and has another FrameOfReferenceUID")
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=np.float64)
    spacing = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=np.float64)
    if (
        not np.allclose(orientation, source.orientation, atol=ORIENTATION_TOL)
        or not np.allclose(spacing, source.spacing[1:], atol=SPACING_TOL_MM)
        or (int(seg.Rows), int(seg.Columns)) != source.hu.shape[1:]
    ):
        raise CaseError(f"{path.name}: SEG grid (orientation, PixelSpacing, Rows/Columns) differs from the images")
    tol = 0.25 * float(source.spacing[0]) if tol_mm is None else float(tol_mm)
    locations = source.slice_locations[index]
    frames = np.asarray(seg.pixel_array).reshape(-1, int(seg.Rows), int(seg.Columns))
    fractional = str(seg.get("SegmentationType", "")) == "FRACTIONAL"
    threshold = 0.5 * float(seg.get("MaximumFractionalValue", 1)) if fractional else 0.5
    in_plane = np.stack([source.orientation[:3], source.orientation[3:]]).T  # row, column cosines
    pixel = np.asarray(source.spacing[1:][::-1])  # spacing along a row (dx), along a column (dy)
    masks = [np.zeros((len(index), *source.hu.shape[1:]), dtype=bool) for _ in numbers]
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(_functional(item, shared, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        position = np.asarray(_functional(item, shared, "PlanePositionSequence").ImagePositionPatient, dtype=float)
        k = int(np.argmin(np.abs(locations - position @ source.normal)))
        if abs(locations[k] - position @ source.normal) > tol or number not in numbers:
            continue  # a slice that is not among the paired ones
        shift = np.abs((position - source.positions[index[k]]) @ in_plane)
        if np.any(shift > 0.5 * pixel):
            raise CaseError(f"{path.name}: SEG frame {f + 1} is shifted in-plane by {np.round(shift, 2).tolist()} mm")
        masks[numbers.index(number)][k] |= frames[f] >= threshold
    return masks


def _functional(per_frame: Any, shared: Any, keyword: str) -> Any:
    """A functional group macro of one frame: per-frame when present, else the shared one."""
    group = per_frame.get(keyword) or shared.get(keyword)
    if not group:
        raise CaseError(f"SEG frame lacks {keyword}")
    return group[0]


__all__ = ["CaseError", "PairedCase", "has_series", "list_cases", "load_case", "load_matched_series"]

"""Read a DICOM image series into a HU volume with its geometry.

Slices are ordered by their position along the slice normal (cross product of the
ImageOrientationPatient row and column vectors), never by file name or InstanceNumber, which
scanners and PACS exports do not keep consistent. Anything that would make the volume
ambiguous (mixed series, orientations, pixel spacings, matrix sizes, duplicate positions)
is refused with a :class:`SeriesError` instead of being silently repaired.

``Series.datasets`` hold headers only: pixel data are decoded once into ``Series.hu`` and then
dropped from the datasets to halve memory use.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

# Geometry tolerances: header values are decimal strings, so compare with some slack.
ORIENTATION_TOL = 1e-4  # direction cosines
SPACING_TOL_MM = 1e-3  # pixel spacing
DUPLICATE_TOL_MM = 1e-3  # two slices closer than this along the normal are duplicates


class SeriesError(ValueError):
    """A set of files does not form one well-defined image volume."""


@dataclass
class Series:
    """One image series as a volume ``hu`` ``(Z, Y, X)`` float32, sorted along the slice normal.

    ``spacing`` is ``(dz, dy, dx)`` in mm: ``dz`` is the median step between sorted slice
    positions (for a single slice: SpacingBetweenSlices, else SliceThickness, else 1), ``dy``/``dx``
    come from PixelSpacing (row spacing, column spacing). ``positions`` holds each slice's
    ImagePositionPatient ``(Z, 3)``; ``orientation`` the six ImageOrientationPatient cosines.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    positions: np.ndarray
    orientation: np.ndarray
    datasets: list[Dataset]
    paths: list[Path]
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    kernel: str
    modality: str

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row cosines × column cosines)."""
        return slice_normal(self.orientation)

    @property
    def slice_locations(self) -> np.ndarray:
        """Position of each slice along the normal in mm (ascending)."""
        return self.positions @ self.normal

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of an ImageOrientationPatient value."""
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise SeriesError(f"ImageOrientationPatient {list(iop)} has parallel row and column vectors")
    return normal / norm


def _read_header(path: Path) -> Dataset | None:
    """Header of a DICOM Part 10 file, or None when the file is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError):
        return None


def find_series(root: str | Path) -> dict[str, list[Path]]:
    """Map SeriesInstanceUID -> sorted file paths for every DICOM file below ``root``.

    The search is recursive and ignores file names; files that are not DICOM Part 10 (no
    ``DICM`` preamble) or have no SeriesInstanceUID (e.g. DICOMDIR) are skipped.
    """
    root = Path(root)
    if not root.exists():
        raise SeriesError(f"{root} does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    found: dict[str, list[Path]] = {}
    for path in files:
        header = _read_header(path)
        uid = header.get("SeriesInstanceUID") if header is not None else None
        if uid:
            found.setdefault(str(uid), []).append(path)
    return found


def _kernel(ds: Dataset) -> str:
    value = ds.get("ConvolutionKernel", "")
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _files(path_or_files: str | Path | Iterable[str | Path], series_uid: str | None) -> list[Path]:
    """Resolve the input to the file list of exactly one series."""
    if isinstance(path_or_files, (str, Path)) and Path(path_or_files).is_dir():
        groups = find_series(path_or_files)
        if not groups:
            raise SeriesError(f"no DICOM files in {path_or_files}")
        if series_uid is not None:
            if series_uid not in groups:
                raise SeriesError(f"series {series_uid} not found in {path_or_files}; found: {sorted(groups)}")
            return groups[series_uid]
        if len(groups) > 1:
            listing = ", ".join(f"{uid} ({len(files)} files)" for uid, files in sorted(groups.items()))
            raise SeriesError(
                f"{path_or_files} mixes {len(groups)} series: {listing}; pass series_uid or a file list"
            )
        return next(iter(groups.values()))
    if isinstance(path_or_files, (str, Path)):
        return [Path(path_or_files)]
    return [Path(p) for p in path_or_files]


def _check_same(values: list, label: str, paths: list[Path], close) -> None:
    """Refuse when the per-file ``values`` are not all equal (``close`` decides equality)."""
    first = values[0]
    odd = [(p, v) for p, v in zip(paths, values) if not close(v, first)]
    if odd:
        distinct = Counter(str(v) for v in values)
        detail = "; ".join(f"{v} x{n}" for v, n in distinct.most_common())
        raise SeriesError(f"mixed {label} in series: {detail} (e.g. {odd[0][0].name})")


def read_series(
    path_or_files: str | Path | Iterable[str | Path], series_uid: str | None = None
) -> Series:
    """Load one single-frame image series (folder, single file, or file list) as HU.

    A folder must hold exactly one series unless ``series_uid`` picks one, in which case all
    other files (other series, SEG, non-DICOM) are ignored. A file list is taken as given:
    every file must be a readable single-frame image of the same series.
    """
    paths = _files(path_or_files, series_uid)
    if not paths:
        raise SeriesError("no images given")
    datasets = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except (InvalidDicomError, OSError, EOFError) as exc:
            raise SeriesError(f"{path} is not a readable DICOM file: {exc}") from exc
    uids = [str(ds.get("SeriesInstanceUID", "")) for ds in datasets]
    _check_same(uids, "SeriesInstanceUID", paths, lambda a, b: a == b)
    for path, ds in zip(paths, datasets):
        missing = [
            k for k in ("PixelData", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows")
            if k not in ds
        ]
        if missing:
            raise SeriesError(f"{path.name} is not a positioned image: missing {', '.join(missing)}")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise SeriesError(f"{path.name} is a multi-frame image; only single-frame series are supported")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise SeriesError(f"{path.name} is not a greyscale image (SamplesPerPixel {ds.SamplesPerPixel})")

    orientations = [np.asarray(ds.ImageOrientationPatient, dtype=np.float64) for ds in datasets]
    _check_same(orientations, "ImageOrientationPatient", paths,
                lambda a, b: np.allclose(a, b, atol=ORIENTATION_TOL))
    spacings = [np.asarray(ds.PixelSpacing, dtype=np.float64) for ds in datasets]
    _check_same(spacings, "PixelSpacing", paths, lambda a, b: np.allclose(a, b, atol=SPACING_TOL_MM))
    sizes = [(int(ds.Rows), int(ds.Columns)) for ds in datasets]
    _check_same(sizes, "Rows/Columns", paths, lambda a, b: a == b)

    normal = slice_normal(orientations[0])
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    steps = np.diff(along)
    duplicates = np.flatnonzero(steps < DUPLICATE_TOL_MM)
    if duplicates.size:
        i = int(duplicates[0])
        a, b = paths[order[i]], paths[order[i + 1]]
        raise SeriesError(
            f"duplicate slice positions: {len(duplicates)} pair(s) share a position along the normal, "
            f"e.g. {a.name} and {b.name} at {along[i]:.3f} mm"
        )

    datasets = [datasets[i] for i in order]
    paths = [paths[i] for i in order]
    hu = np.empty((len(datasets), *sizes[0]), dtype=np.float32)
    for k, ds in enumerate(datasets):
        try:
            hu[k] = apply_modality_lut(ds.pixel_array, ds)
        except Exception as exc:  # decoder errors come in many types; report the file
            raise SeriesError(f"cannot decode pixel data of {paths[k].name}: {exc}") from exc
        del ds.PixelData  # headers only from here on (see module docstring)

    first = datasets[0]
    if len(datasets) > 1:
        dz = float(np.median(steps))
    else:
        dz = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    dy, dx = (float(v) for v in spacings[0])
    return Series(
        hu=hu,
        spacing=(dz, dy, dx),
        positions=positions[order],
        orientation=orientations[0],
        datasets=datasets,
        paths=paths,
        series_uid=uids[0],
        study_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        kernel=_kernel(first),
        modality=str(first.get("Modality", "")),
    )

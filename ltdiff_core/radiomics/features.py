"""Feature extraction on ROIs: PyRadiomics (2-D per slice, 3-D per tumour) + GOH + IH.

Every ROI is cut out of the image as a small box (``Roi.box``) with a margin, so PyRadiomics
and the gradients see real neighbours at the ROI border but never touch the rest of the
volume; that keeps one extraction at tens of milliseconds. Extractions are independent, so
they run in a process pool when ``jobs > 1``; results come back in task order (deterministic).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from .goh import goh_features
from .ih import ih_features
from .rois import Roi

DEFAULT_PARAMS = Path(__file__).resolve().parents[2] / "conf" / "radiomics.yaml"


@dataclass
class Task:
    """One extraction: an image box, its ROI mask and voxel spacing (dz, dy, dx)."""

    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    is3d: bool


@dataclass
class FeatureTable:
    """Feature values of a list of ROIs: ``values[i, j]`` is feature ``names[j]`` of ROI ``i``."""

    names: list[str]
    values: np.ndarray


_EXTRACTORS: dict[tuple[str, bool], tuple[object, object, float]] = {}


def _extractors(params: str, is3d: bool) -> tuple[object, object, float]:
    """(original extractor, gradient-firstorder extractor, bin width), cached per process."""
    key = (params, is3d)
    if key not in _EXTRACTORS:
        from radiomics import featureextractor

        logging.getLogger("radiomics").setLevel(logging.ERROR)
        orig = featureextractor.RadiomicsFeatureExtractor(params)
        grad = featureextractor.RadiomicsFeatureExtractor(params)
        grad.disableAllImageTypes()
        grad.enableImageTypeByName("Gradient")
        grad.disableAllFeatures()
        grad.enableFeatureClassByName("firstorder")
        for ex in (orig, grad):
            ex.settings["force2D"] = not is3d
            ex.settings["force2Ddimension"] = 0
            ex.settings["additionalInfo"] = False
        _EXTRACTORS[key] = (orig, grad, float(orig.settings["binWidth"]))
    return _EXTRACTORS[key]


def extract_one(task: Task, params: str | os.PathLike = DEFAULT_PARAMS) -> dict[str, float]:
    """All features of one ROI, as ``{name: value}`` in a fixed order."""
    if task.image.shape != task.mask.shape:
        raise ValueError(f"image box {task.image.shape} and mask {task.mask.shape} differ")
    orig, grad, bin_width = _extractors(str(params), task.is3d)
    dz, dy, dx = task.spacing
    img = sitk.GetImageFromArray(np.ascontiguousarray(task.image, dtype=np.float32))
    img.SetSpacing((float(dx), float(dy), float(dz)))
    msk = sitk.GetImageFromArray(task.mask.astype(np.uint8))
    msk.CopyInformation(img)
    out: dict[str, float] = {}
    for ex in (orig, grad):
        for k, v in ex.execute(img, msk).items():
            out[k] = float(v)
    for k, v in goh_features(task.image, task.mask, (dy, dx)).items():
        out[f"goh_{k}"] = v
    for k, v in ih_features(task.image[task.mask], bin_width).items():
        out[f"ih_{k}"] = v
    return out


def _run(args: tuple[Task, str]) -> dict[str, float]:
    return extract_one(*args)


def task_for(image: np.ndarray, roi: Roi, spacing: tuple[float, float, float]) -> Task:
    """Cut the ROI's box out of a ``(Z, Y, X)`` image."""
    return Task(np.asarray(image[roi.box], dtype=np.float32), roi.mask, tuple(spacing), roi.is3d)


def extract(tasks: Sequence[Task], params: str | os.PathLike = DEFAULT_PARAMS, jobs: int = 1,
            progress: bool = True, desc: str = "features") -> FeatureTable:
    """Extract all tasks (optionally in ``jobs`` processes) into one table, rows in task order."""
    params = str(params)
    work = [(t, params) for t in tasks]
    bar = tqdm(total=len(work), desc=desc, disable=not progress, leave=False)
    rows: list[dict[str, float]] = []
    if jobs > 1 and len(work) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for r in pool.map(_run, work, chunksize=max(1, len(work) // (4 * jobs))):
                rows.append(r)
                bar.update()
    else:
        for w in work:
            rows.append(_run(w))
            bar.update()
    bar.close()
    if not rows:
        return FeatureTable([], np.zeros((0, 0)))
    names = list(rows[0])
    for r in rows:
        if list(r) != names:
            raise RuntimeError("feature names differ between ROIs; extraction settings changed mid-run")
    return FeatureTable(names, np.array([[r[n] for n in names] for r in rows], dtype=np.float64))

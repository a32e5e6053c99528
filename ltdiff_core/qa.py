"""Physics QA of a CT series against a checkpoint's training envelope.

A routing rule trusts the ConvolutionKernel *tag*; this module looks at the *images*. It measures
what decides whether a kernel-conversion model applies to a series, compares every measure with
the range the model saw in training (the *envelope*, stored in the checkpoint), and returns a
verdict naming each check that failed with its measured value.

Input measures (:func:`measure_series`), from at most ``MAX_SLICES`` evenly spaced slices:

* ``pixel_spacing_mm``, ``slice_thickness_mm`` (header geometry). The Standardizer resamples
  in-plane to its training grid, so the gate checks these against what it *handles*
  (``ltdiff_core.resample.supported_geometry``), not the training data's narrower geometry;
  thickness changes the noise level, which ``noise_hu`` checks;
* ``hu_air``: median HU of the air around the body (calibration: about -1000); not measured
  when the body is cut by the field of view (no outside air to trust);
* ``hu_soft_tissue``: median mean HU of the homogeneous patches between -50 and 150 HU (about 40;
  fat patches, also used for noise, are left out);
* ``body_diameter_mm``: area-equivalent diameter of the body cross-section (a head is far
  smaller than a chest or abdomen); not measured when the body is cut by the field of view;
  ``body_fraction`` (share of the image inside the body) is recorded, never checked, because a
  crop of the same scan changes it;
* ``noise_hu``: plane-detrended HU standard deviation in homogeneous soft-tissue patches (when
  the sampled slices hold fewer than ``MIN_PATCHES``, every slice is searched; when still too few,
  e.g. a small field of view inside the chest, homogeneous lung-parenchyma patches are added and
  ``noise_region`` says so). A series without any homogeneous patch (a short upper-chest series
  of thin muscle and fat bands, a 9 cm crop of lung) cannot have its kernel verified;
* ``nps_peak_lpcm``, ``nps_mean_lpcm``: peak and power-weighted mean frequency of the radial
  noise power spectrum of the same patches;
* ``sharpness``: ratio of noise power above ``SHARPNESS_SPLIT_LPCM`` to the power below it; a
  sharper kernel passes more high-frequency noise, so this separates smooth from sharp kernels
  whatever the tag says.

Homogeneous patches are square blocks of ``PATCH_MM`` (candidates every half patch, chosen least
structured first without overlap, at most ``MAX_PATCHES_PER_SLICE`` per slice) whose mean lies in
soft tissue [-200, 300] HU and whose structure score (plane-detrended std after a 2 mm Gaussian
low-pass, computed on the 2x2-binned slice) is at most ``STRUCTURE_MAX_HU``, the criterion of
:mod:`ltdiff_core.radiomics.image_metrics`. Sampling 6 slices and binning keep the cost near 3 %
of the linear filter's time per series (``bench/bench_qa.py``).

Output measures (:func:`measure_output`) use the *input's* patches on the output volume, so
input and output are compared on the same pixels; ``noise_ratio`` is output/input noise.

Envelope (:func:`build_envelope`): for each measure the robust range [P2, P98] of the per-series
training values, widened on each side by ``margin = max(MARGIN_WIDTH x (P98 - P2),
MARGIN_RELATIVE x |median|, MARGIN_ABSOLUTE[unit])`` (25 % of the range, 10 % of the median,
0.05 mm / 20 HU / 0.2 lp/cm). Positive multiplicative measures (noise, sharpness, noise ratio) get
the same rule on their logarithm: [P2 / f, P98 x f] with ``f = max((P98 / P2) ** 0.25, 1.1)``.
The relative and absolute floors keep a measure that was constant in training (one pixel
spacing, one phantom calibration) from getting a zero-width range; no limit is set by hand for
any kernel.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from . import measure

ENVELOPE_VERSION = 1
MAX_SLICES = 6
PATCH_MM = 22.4                  # 32 px at 0.7 mm
MAX_PATCHES_PER_SLICE = 12
SOFT_TISSUE_HU = (-200.0, 300.0)  # patches for noise (fat to enhanced organ)
WATER_LIKE_HU = (-50.0, 150.0)    # patches whose mean counts as soft tissue for the HU check
LUNG_HU = (-950.0, -500.0)        # fallback region for noise when soft tissue is scarce
MIN_PATCHES = 4
STRUCTURE_SIGMA_MM = 2.0
STRUCTURE_MAX_HU = 10.0
RELAXED_STRUCTURE = (2.0, 4.0)    # fallback criteria (x STRUCTURE_MAX_HU) when too few patches pass
BODY_HU = -500.0
PADDING_BELOW_HU = -1100.0       # stored values below this are padding outside the reconstruction
TRUNCATED_BORDER_FRACTION = 0.02
MIN_AIR_PIXELS = 200            # 2x2-binned pixels
SHARPNESS_SPLIT_LPCM = 3.0
PERCENTILES = (2.0, 98.0)
MARGIN_WIDTH = 0.25
MARGIN_RELATIVE = 0.10
MARGIN_ABSOLUTE = {"mm": 0.05, "HU": 20.0, "lp/cm": 0.2, "ratio": 0.0}
LOG_SCALE = ("noise_hu", "sharpness", "noise_ratio")  # positive, multiplicative: margin on the log

# name -> (unit, label); the order is the order of the checks (the first failure is reported).
INPUT_MEASURES: dict[str, tuple[str, str]] = {
    "pixel_spacing_mm": ("mm", "pixel spacing"),
    "slice_thickness_mm": ("mm", "slice thickness"),
    "hu_air": ("HU", "air HU"),
    "hu_soft_tissue": ("HU", "soft-tissue HU"),
    "body_diameter_mm": ("mm", "body diameter (not a chest/body CT?)"),
    "sharpness": ("ratio", "sharpness (noise power above/below 3 lp/cm)"),
    "nps_peak_lpcm": ("lp/cm", "NPS peak"),
    "nps_mean_lpcm": ("lp/cm", "NPS mean frequency"),
    "noise_hu": ("HU", "noise"),
}
OUTPUT_MEASURES: dict[str, tuple[str, str]] = {
    "sharpness": INPUT_MEASURES["sharpness"],
    "nps_peak_lpcm": INPUT_MEASURES["nps_peak_lpcm"],
    "nps_mean_lpcm": INPUT_MEASURES["nps_mean_lpcm"],
    "noise_hu": INPUT_MEASURES["noise_hu"],
    "noise_ratio": ("ratio", "output/input noise ratio"),
}
# Without these the kernel cannot be verified, so a missing value fails the check.
REQUIRED = ("pixel_spacing_mm", "slice_thickness_mm", "sharpness", "noise_hu")
#: Checks whose failure means a different kind of input: geometry resampling does not handle, air
#: that is not calibrated as CT air, and a kernel on the other side of the smooth/sharp boundary.
#: Only these refuse; every other measure outside its training range (dose: noise; patient size:
#: body diameter; NPS shape; a kernel smoother than the training data) flags: the series is
#: standardized and the measured reason recorded.
REFUSE_CHECKS = ("pixel_spacing_mm", "slice_thickness_mm", "hu_air", "sharpness")
#: Header geometry: checked against what the Standardizer handles when the gate is given it.
GEOMETRY = ("pixel_spacing_mm", "slice_thickness_mm")


# --------------------------------------------------------------------------- measuring
@dataclass
class Patches:
    """Top-left corners ``(z, y, x)`` of homogeneous soft-tissue patches of ``size`` px."""

    size: int
    corners: list[tuple[int, int, int]] = field(default_factory=list)

    def cut(self, volume: np.ndarray) -> np.ndarray:
        s = self.size
        return np.stack([volume[z, y:y + s, x:x + s] for z, y, x in self.corners]).astype(np.float64)

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "corners": [list(c) for c in self.corners]}


@dataclass
class Measures:
    """Measured values (``None`` = not measured, with the reason in ``why_not``)."""

    values: dict[str, float | None]
    why_not: dict[str, str] = field(default_factory=dict)
    patches: Patches | None = None
    slices: list[int] = field(default_factory=list)
    region: str = "soft tissue"  # where the noise patches lie (soft tissue, or lung as fallback)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: (None if v is None else round(float(v), 4)) for k, v in self.values.items()}
        if self.why_not:
            out["not_measured"] = dict(self.why_not)
        out["slices_measured"] = len(self.slices)
        out["patches"] = len(self.patches.corners) if self.patches else 0
        out["noise_region"] = self.region
        return out


def sample_slices(n: int, max_slices: int = MAX_SLICES) -> list[int]:
    """Evenly spaced slice indices (all slices when there are few)."""
    if n <= max_slices:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, max_slices + 2)[1:-1]})


@functools.lru_cache(maxsize=16)
def _plane_basis(p: int) -> np.ndarray:
    """Orthonormal basis (p*p, 3) of constant + x + y: projecting it out detrends a patch."""
    y, x = np.mgrid[0:p, 0:p]
    a = np.stack([np.ones(p * p), x.ravel() / p - 0.5, y.ravel() / p - 0.5], axis=1)
    q, _ = np.linalg.qr(a)
    return q


def _detrended_std(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Plane-detrended std of each block of ``blocks`` (N, p*p)."""
    res = blocks - (blocks @ q) @ q.T
    return np.sqrt((res * res).sum(axis=1) / max(blocks.shape[1] - 3, 1))


def _bin2(img: np.ndarray) -> np.ndarray:
    """2x2 mean (odd last row/column dropped): a quarter of the pixels for masks and low-pass."""
    a = img[: img.shape[0] // 2 * 2, : img.shape[1] // 2 * 2]
    return (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) * 0.25


def _body(img: np.ndarray) -> np.ndarray:
    """Largest connected region above ``BODY_HU`` with its holes (lungs, bowel gas) filled.

    Holes are the regions of the complement that do not touch the image border (one labelling
    instead of ``binary_fill_holes``' iterated dilation, which costs ten times more).
    """
    mask = img > BODY_HU
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    body = lab == 1 + int(np.argmax(sizes))
    rest, m = ndimage.label(~body)
    touching = np.zeros(m + 1, bool)
    touching[np.concatenate([rest[0], rest[-1], rest[:, 0], rest[:, -1]])] = True
    touching[0] = False
    return ~touching[rest]


def _slice_patches(img: np.ndarray, binned: np.ndarray, pixel_mm: float, p: int,
                   hu_range: tuple[float, float] = SOFT_TISSUE_HU,
                   max_structure: float = STRUCTURE_MAX_HU) -> list[tuple[int, int, float]]:
    """(y, x, score) of this slice's homogeneous soft-tissue blocks, least structured first.

    Candidates overlap by half a patch (a small field of view still offers enough of them); the
    structure score is computed on the 2x2-binned slice (the 2 mm Gaussian is wider than a bin).
    """
    h = p // 2
    ty, tx = img.shape[0] // h, img.shape[1] // h
    if ty < 2 or tx < 2:
        return []
    tiles = img[: ty * h, : tx * h].reshape(ty, h, tx, h).sum(axis=(1, 3), dtype=np.float64)
    sums = tiles[:-1, :-1] + tiles[1:, :-1] + tiles[:-1, 1:] + tiles[1:, 1:]  # p-blocks every h pixels
    ny, nx = sums.shape
    means = (sums / (p * p)).ravel()
    cand = np.nonzero((means >= hu_range[0]) & (means <= hu_range[1]))[0]
    if len(cand) == 0:
        return []
    ys, xs = (cand // nx) * h, (cand % nx) * h
    smooth = ndimage.gaussian_filter(binned, STRUCTURE_SIGMA_MM / (2 * pixel_mm), truncate=3.0)
    swin = np.lib.stride_tricks.sliding_window_view(smooth, (h, h))
    scores = _detrended_std(swin[ys // 2, xs // 2].reshape(len(cand), h * h), _plane_basis(h))
    keep = [(int(c), float(s)) for c, s in zip(cand, scores) if s <= max_structure]
    keep.sort(key=lambda t: t[1])
    chosen: list[tuple[int, int, float]] = []
    for c, s in keep:  # least structured first, no two patches overlapping
        y, x = (c // nx) * h, (c % nx) * h
        if all(abs(y - cy) >= p or abs(x - cx) >= p for cy, cx, _ in chosen):
            chosen.append((y, x, s))
        if len(chosen) >= MAX_PATCHES_PER_SLICE:
            break
    return chosen


def noise_measures(volume: np.ndarray, patches: Patches, pixel_mm: float) -> dict[str, float | None]:
    """Noise, NPS peak/mean frequency and sharpness of ``volume`` in the given patches."""
    if not patches.corners:
        return {"noise_hu": None, "nps_peak_lpcm": None, "nps_mean_lpcm": None, "sharpness": None}
    stack = patches.cut(volume)
    n, p = len(stack), patches.size
    q = _plane_basis(p)
    flat = stack.reshape(n, -1)
    resid = flat - (flat @ q) @ q.T  # plane-detrended, all patches at once
    noise = float(np.mean(np.sqrt((resid * resid).sum(axis=1) / max(p * p - 3, 1))))
    f, nps = measure.nps_radial(resid.reshape(n, p, p), pixel_mm, detrend=0)
    power = nps * f  # radial NPS times annulus circumference: power per frequency bin
    total = float(power.sum())
    mean_f = float((f * power).sum() / total) if total > 0 else None
    low = float(power[f <= SHARPNESS_SPLIT_LPCM].sum())
    high = float(power[f > SHARPNESS_SPLIT_LPCM].sum())
    return {"noise_hu": noise, "nps_peak_lpcm": measure.nps_peak_frequency(f, nps), "nps_mean_lpcm": mean_f,
            "sharpness": high / low if low > 0 else None}


def measure_series(hu: np.ndarray, spacing: Sequence[float], slice_thickness_mm: float | None = None,
                   max_slices: int = MAX_SLICES) -> Measures:
    """Input measures of a ``(Z, Y, X)`` HU volume with ``spacing`` ``(dz, dy, dx)`` mm."""
    vol = np.asarray(hu)
    if vol.ndim == 2:
        vol = vol[None]
    dz, dy, dx = (float(s) for s in spacing)
    pixel_mm = math.sqrt(dy * dx)
    thickness = float(slice_thickness_mm) if slice_thickness_mm else dz
    p = 4 * int(np.clip(round(PATCH_MM / pixel_mm / 4), 2, 24))  # multiple of 4: half-patch steps, 2x2 bins
    idx = sample_slices(vol.shape[0], max_slices)
    patches = Patches(p)
    air: list[np.ndarray] = []
    diam: list[float] = []
    frac: list[float] = []
    truncated = 0
    binned_by_z: dict[int, np.ndarray] = {}
    for z in idx:
        img = vol[z].astype(np.float32)
        binned = _bin2(img)
        body = _body(binned)
        border = np.concatenate([body[0], body[-1], body[:, 0], body[:, -1]])
        n_body = int(np.count_nonzero(body))
        frac.append(n_body / body.size)
        if np.count_nonzero(border) > TRUNCATED_BORDER_FRACTION * border.size:
            truncated += 1
        else:
            outside = binned[~body]
            air.append(outside[(outside >= PADDING_BELOW_HU) & (outside < BODY_HU)])
            if n_body:
                diam.append(2.0 * math.sqrt(n_body * 4 * dy * dx / math.pi))
        patches.corners += [(z, y, x) for y, x, _ in _slice_patches(img, binned, pixel_mm, p)]
        binned_by_z[z] = binned
    region = "soft tissue"
    if len(patches.corners) < MIN_PATCHES and len(idx) < vol.shape[0]:
        # the sampled slices hold too little flat soft tissue (e.g. upper chest): search them all
        for z in sorted(set(range(vol.shape[0])) - set(idx)):
            img = vol[z].astype(np.float32)
            binned_by_z[z] = _bin2(img)
            patches.corners += [(z, y, x) for y, x, _ in _slice_patches(img, binned_by_z[z], pixel_mm, p)]
    if len(patches.corners) < MIN_PATCHES:
        # a small field of view inside the chest may hold no flat soft tissue: homogeneous lung
        # parenchyma carries the same reconstruction noise texture
        lung = [(z, y, x) for z in sorted(binned_by_z)
                for y, x, _ in _slice_patches(vol[z].astype(np.float32), binned_by_z[z], pixel_mm, p, LUNG_HU)]
        if lung:
            region = "soft tissue + lung" if patches.corners else "lung"
            patches.corners += lung
    for factor in RELAXED_STRUCTURE:
        if len(patches.corners) >= MIN_PATCHES:
            break
        # Still too few (a short upper-chest series of thin muscle and fat bands): the least
        # structured blocks of a looser criterion. Structure adds low-frequency power, so the
        # kernel still shows (sharpness is a ratio of high to low band) though noise reads high.
        limit = STRUCTURE_MAX_HU * factor
        found = [(z, y, x) for z in sorted(binned_by_z) for hu_range in (SOFT_TISSUE_HU, LUNG_HU)
                 for y, x, _ in _slice_patches(vol[z].astype(np.float32), binned_by_z[z], pixel_mm, p, hu_range,
                                               limit)]
        if found:
            patches.corners = found
            region = f"soft tissue + lung, structure up to {limit:g} HU"
    why: dict[str, str] = {}
    air_all = np.concatenate(air) if air else np.zeros(0)
    hu_air = float(np.median(air_all[:: max(1, air_all.size // 20000)])) if air_all.size >= MIN_AIR_PIXELS else None
    if hu_air is None:
        why["hu_air"] = ("the body is cut by the field of view" if truncated else "too little air around the body")
    body_d = float(np.median(diam)) if diam else None
    if body_d is None:
        why["body_diameter_mm"] = "the body is cut by the field of view" if truncated else "no body found"
    means = [float(vol[z, y:y + p, x:x + p].mean()) for z, y, x in patches.corners]
    means = [m for m in means if WATER_LIKE_HU[0] <= m <= WATER_LIKE_HU[1]]
    soft = float(np.median(means)) if means else None
    values: dict[str, float | None] = {
        "pixel_spacing_mm": pixel_mm, "slice_thickness_mm": thickness, "hu_air": hu_air,
        "hu_soft_tissue": soft, "body_diameter_mm": body_d,
        "body_fraction": float(np.median(frac)) if frac else None,
    }
    values.update(noise_measures(vol, patches, pixel_mm))
    if soft is None:
        why["hu_soft_tissue"] = "no homogeneous patch between -50 and 150 HU"
    if not patches.corners:
        for k in ("hu_soft_tissue", "noise_hu", "nps_peak_lpcm", "nps_mean_lpcm", "sharpness"):
            why[k] = "no homogeneous soft-tissue patch found"
    return Measures(values, why, patches, idx, region)


def measure_output(hu_out: np.ndarray, spacing: Sequence[float], inputs: Measures) -> Measures:
    """Output measures on the input's patches, and the output/input noise ratio."""
    vol = np.asarray(hu_out)
    if vol.ndim == 2:
        vol = vol[None]
    pixel_mm = math.sqrt(float(spacing[-2]) * float(spacing[-1]))
    patches = inputs.patches or Patches(8)
    values = noise_measures(vol, patches, pixel_mm)
    n_in, n_out = inputs.values.get("noise_hu"), values.get("noise_hu")
    values["noise_ratio"] = n_out / n_in if n_in and n_out is not None else None
    why = {k: "no homogeneous soft-tissue patch found in the input" for k, v in values.items() if v is None}
    return Measures(values, why, patches, inputs.slices, inputs.region)


def series_thickness(datasets: Iterable[Any]) -> float | None:
    """Median SliceThickness of the headers (None when no header has one)."""
    vals = []
    for ds in datasets:
        try:
            v = float(ds.get("SliceThickness") or 0)
        except (TypeError, ValueError):
            continue
        if v > 0:
            vals.append(v)
    return float(np.median(vals)) if vals else None


# --------------------------------------------------------------------------- envelope
def robust_range(values: Sequence[float], unit: str, log_scale: bool = False) -> dict[str, float] | None:
    """[P2, P98] of ``values`` widened by the documented margin (see the module docstring).

    ``log_scale`` measures (positive, multiplicative: noise, power ratios) get the same rule on
    their logarithm, so the range never reaches zero or below.
    """
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if log_scale:
        v = v[v > 0]
    if v.size == 0:
        return None
    if log_scale:
        lv = np.log(v)
        p_lo, p_hi = np.percentile(lv, PERCENTILES)
        margin = max(MARGIN_WIDTH * (p_hi - p_lo), math.log1p(MARGIN_RELATIVE))
        return {"lo": float(np.exp(p_lo - margin)), "hi": float(np.exp(p_hi + margin)),
                "p_lo": float(np.exp(p_lo)), "p_hi": float(np.exp(p_hi)), "median": float(np.median(v)),
                "margin_factor": float(np.exp(margin)), "n": int(v.size)}
    p_lo, p_hi = np.percentile(v, PERCENTILES)
    med = float(np.median(v))
    margin = max(MARGIN_WIDTH * (p_hi - p_lo), MARGIN_RELATIVE * abs(med), MARGIN_ABSOLUTE.get(unit, 0.0))
    return {"lo": float(p_lo - margin), "hi": float(p_hi + margin), "p_lo": float(p_lo), "p_hi": float(p_hi),
            "median": med, "margin": float(margin), "n": int(v.size)}


@dataclass
class PairMeasures:
    """Measures of one training pair: source series, target series on the source's patches."""

    source: Measures
    target: Measures


def measure_pair(source_hu: np.ndarray, target_hu: np.ndarray, spacing: Sequence[float],
                 slice_thickness_mm: float | None = None) -> PairMeasures:
    src = measure_series(source_hu, spacing, slice_thickness_mm)
    return PairMeasures(src, measure_output(target_hu, spacing, src))


def build_envelope(pairs: Sequence[PairMeasures], source_kernel: str, target_kernel: str,
                   data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``qa_envelope`` metadata block from the measures of every training pair."""
    src = {k: robust_range([p.source.values.get(k) for p in pairs], unit, k in LOG_SCALE)
           for k, (unit, _) in INPUT_MEASURES.items()}
    tgt = {k: robust_range([p.target.values.get(k) for p in pairs], unit, k in LOG_SCALE)
           for k, (unit, _) in OUTPUT_MEASURES.items()}
    return {
        "version": ENVELOPE_VERSION,
        "method": {"percentiles": list(PERCENTILES), "margin_width": MARGIN_WIDTH,
                   "margin_relative": MARGIN_RELATIVE, "margin_absolute": MARGIN_ABSOLUTE,
                   "max_slices": MAX_SLICES, "patch_mm": PATCH_MM,
                   "sharpness_split_lpcm": SHARPNESS_SPLIT_LPCM},
        "series": len(pairs),
        "data": dict(data or {}),
        "source": {"kernel": source_kernel, "measures": {k: v for k, v in src.items() if v is not None}},
        "target": {"kernel": target_kernel, "measures": {k: v for k, v in tgt.items() if v is not None}},
    }


def envelope_of(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """The envelope stored in checkpoint metadata (``training.qa_envelope``), if any."""
    env = (metadata.get("training") or {}).get("qa_envelope")
    return env if isinstance(env, dict) and env.get("version") == ENVELOPE_VERSION else None


# --------------------------------------------------------------------------- verdict
@dataclass
class Finding:
    """One check outside its envelope (or not measurable where it must be)."""

    check: str
    label: str
    value: float | None
    lo: float | None
    hi: float | None
    unit: str
    why: str | None = None

    def text(self, kernel: str) -> str:
        if self.value is None:
            return f"{self.label}: not measured ({self.why})"
        fmt = _fmt(self.value, self.unit)
        where = "the model's range" if self.check in GEOMETRY else "the training envelope"
        of = "" if self.check in GEOMETRY else f" of {kernel}"
        return f"{self.label} {fmt} outside {where} [{_fmt(self.lo, self.unit)}, {_fmt(self.hi, self.unit)}]{of}"

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "value": self.value, "lo": self.lo, "hi": self.hi, "unit": self.unit,
                **({"why": self.why} if self.why else {})}


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "?"
    digits = 3 if unit == "ratio" else (2 if unit in ("mm", "lp/cm") else 1)
    suffix = "" if unit == "ratio" else f" {unit}"
    return f"{v:.{digits}f}{suffix}"


def check(values: Mapping[str, float | None], why_not: Mapping[str, str], side: Mapping[str, Any],
          measures: Mapping[str, tuple[str, str]], required: Sequence[str] = ()) -> list[Finding]:
    """Every measure outside ``side['measures']`` (in check order); missing required ones fail."""
    env = side.get("measures", {})
    out: list[Finding] = []
    for name, (unit, label) in measures.items():
        rng = env.get(name)
        v = values.get(name)
        if v is None:
            if name in required:
                out.append(Finding(name, label, None, rng and rng["lo"], rng and rng["hi"], unit,
                                   why_not.get(name, "not measurable")))
            continue
        if rng is None:
            continue
        if not rng["lo"] <= v <= rng["hi"]:
            out.append(Finding(name, label, float(v), rng["lo"], rng["hi"], unit))
    return out


@dataclass
class Verdict:
    """The gate's view of one series: input findings, output findings, and the measures."""

    status: str                       # "pass" | "flag" | "fail" | "unchecked" (no envelope)
    inputs: Measures
    findings: list[Finding]           # refusing: a different kind of input (REFUSE_CHECKS)
    source_kernel: str = "?"
    target_kernel: str = "?"
    outputs: Measures | None = None
    output_findings: list[Finding] = field(default_factory=list)
    flags: list[Finding] = field(default_factory=list)  # outside the training range: standardized, flagged

    @property
    def reason(self) -> str:
        """One line: the first failed check with its value against the envelope."""
        if self.status == "unchecked":
            return "checkpoint carries no QA training envelope"
        first = self.findings or self.flags
        if not first:
            return "within the training envelope"
        more = len(self.findings) + len(self.flags) - 1
        return first[0].text(self.source_kernel) + (f" (+{more} more)" if more else "")

    @property
    def input_flags(self) -> list[str]:
        return [f.text(self.source_kernel) for f in self.flags]

    @property
    def output_warnings(self) -> list[str]:
        return [f.text(self.target_kernel) for f in self.output_findings]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "verdict": self.status, "reason": self.reason, "source_kernel": self.source_kernel,
            "input": self.inputs.to_json(), "input_findings": [f.to_json() for f in self.findings],
            "input_flags": [f.to_json() for f in self.flags],
        }
        if self.outputs is not None:
            out["output"] = self.outputs.to_json()
            out["output_verdict"] = "fail" if self.output_findings else "pass"
            out["output_findings"] = [f.to_json() for f in self.output_findings]
            out["target_kernel"] = self.target_kernel
        return out


def kernel_boundary(envelope: Mapping[str, Any]) -> tuple[float, str] | None:
    """The sharpness between the envelope's source and target kernels, and on which side of it the
    target lies (``"above"`` for a smooth source and a sharp target): the geometric mean of the
    nearer ends of their training ranges. None when the envelope lacks either side."""
    src = (envelope.get("source") or {}).get("measures", {}).get("sharpness")
    tgt = (envelope.get("target") or {}).get("measures", {}).get("sharpness")
    if not src or not tgt:
        return None
    if tgt["median"] >= src["median"]:
        return math.sqrt(src["p_hi"] * max(tgt["p_lo"], src["p_hi"])), "above"
    return math.sqrt(src["p_lo"] * min(tgt["p_hi"], src["p_lo"])), "below"


def _refusing_side(side: Mapping[str, Any], envelope: Mapping[str, Any]) -> dict[str, Any]:
    """The envelope's source side reduced to :data:`REFUSE_CHECKS`, the sharpness range opened
    up to the kernel boundary on the target's side and without limit on the other."""
    measures = {k: v for k, v in side.get("measures", {}).items() if k in REFUSE_CHECKS}
    boundary = kernel_boundary(envelope)
    if boundary is not None and "sharpness" in measures:
        value, where = boundary
        measures["sharpness"] = {**measures["sharpness"], "lo": 0.0 if where == "above" else value,
                                 "hi": value if where == "above" else math.inf}
    return {**side, "measures": measures}


def assess_input(hu: np.ndarray, spacing: Sequence[float], envelope: Mapping[str, Any] | None,
                 slice_thickness_mm: float | None = None,
                 geometry: Mapping[str, Mapping[str, float]] | None = None) -> Verdict:
    """Measure an input series and check it against the envelope's source side; ``geometry``
    replaces the envelope's geometry ranges with what the model handles (resampling).

    Findings (refusing) come from :data:`REFUSE_CHECKS`; every other measure outside its training
    range, and a sharpness outside the training range but on the source's side of the kernel
    boundary, is a flag."""
    m = measure_series(hu, spacing, slice_thickness_mm)
    if envelope is None:
        return Verdict("unchecked", m, [])
    src = envelope["source"]
    if geometry:
        src = {**src, "measures": {**src.get("measures", {}), **geometry}}
    refusing = {k: INPUT_MEASURES[k] for k in REFUSE_CHECKS}
    findings = check(m.values, m.why_not, _refusing_side(src, envelope), refusing,
                     [k for k in REQUIRED if k in REFUSE_CHECKS])
    refused = {f.check for f in findings}
    flags = [f for f in check(m.values, m.why_not, src, INPUT_MEASURES, REQUIRED) if f.check not in refused]
    status = "fail" if findings else ("flag" if flags else "pass")
    return Verdict(status, m, findings, str(src.get("kernel", "?")),
                   str(envelope["target"].get("kernel", "?")), flags=flags)


def assess_output(verdict: Verdict, hu_out: np.ndarray, spacing: Sequence[float],
                  envelope: Mapping[str, Any] | None) -> Verdict:
    """Add the output measures (on the input's patches) and their check against the target side."""
    verdict.outputs = measure_output(hu_out, spacing, verdict.inputs)
    if envelope is not None:
        verdict.output_findings = check(verdict.outputs.values, verdict.outputs.why_not, envelope["target"],
                                        OUTPUT_MEASURES)
    return verdict

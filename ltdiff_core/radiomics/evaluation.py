"""One evaluation run: every method on every case, features on the same ROIs, then aggregation.

Cases are read twice when histogram matching is requested (first pass: the standard images'
histograms, so each case's reference can exclude its own standard) instead of holding every
volume in memory; real series are too large for that.

Model methods run once per sampler seed (``seeds``); a method whose image is bit-identical for
every seed is recorded as seed-independent and its features are extracted once. Confidence
intervals and paired comparisons come from :mod:`.bootstrap` on the headline ROI set.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .aggregate import agreement, headline_set, roi_sets
from .bootstrap import bootstrap_comparison, per_seed_points
from .features import DEFAULT_PARAMS, extract, task_for
from .image_metrics import find_uniform_patches, image_metrics, noise_and_nps, tumour_edge_mtf50
from .methods import RESCAN, RESCAN_KERNEL, MethodRunner, leave_one_out_matcher, method_names, resolve
from .rois import random_rois, tumour_rois
from ltdiff_core.baselines.histmatch import hu_histogram


class EvaluationError(RuntimeError):
    """The inputs cannot be evaluated (no cases, unpaired or mismatched series)."""


@dataclass
class EvalConfig:
    """Everything that defines a run; recorded verbatim in report.json."""

    cases: Path
    out: Path
    methods: list[str] | None = None
    steps_list: list[int] = field(default_factory=list)
    model: Path | None = None
    linear: Path | None = None
    direct: Path | None = None
    ablation: Path | None = None
    source_kernel: str = "Br40"
    target_kernel: str = "Bl64"
    max_rois_per_range: int = 20
    roi_radius_mm: float = 7.0
    seed: int = 0
    jobs: int = 1
    params: Path = DEFAULT_PARAMS
    device: str = "auto"
    progress: bool = True
    seeds: list[int] | None = None        # sampler seeds of model methods (default: [seed])
    bootstrap: int = 1000                 # replicates; 0 turns confidence intervals off
    bootstrap_seed: int = 0
    reference: str | None = None          # paired comparisons against it (default: ours, when run)


DEFAULT_REFERENCE = "ours"


def load_rescan(case_dir: Path, case: Any) -> np.ndarray:
    """The case's RESCAN series on its paired slices; an error naming the case when it has none."""
    from ltdiff_core.dicomio.cases import CaseError, load_matched_series
    from ltdiff_core.dicomio.pairing import PairingError
    from ltdiff_core.dicomio.reader import SeriesError

    try:
        vol = load_matched_series(case_dir, RESCAN_KERNEL, case)
    except PairingError as e:
        raise EvaluationError(f"case {case_dir}: the {RESCAN_KERNEL} series cannot be paired with the standard "
                              f"slice by slice ({e})") from e
    except (CaseError, SeriesError) as e:
        raise EvaluationError(f"case {case_dir}: method 'rescan' needs a CT series with ConvolutionKernel "
                              f"'{RESCAN_KERNEL}': {e}") from e
    if vol.shape != case.target.shape:
        raise EvaluationError(f"case {case_dir}: {RESCAN_KERNEL} volume {vol.shape} differs from the standard "
                              f"{case.target.shape}")
    return vol


def load_checked(case_dir: Path, source_kernel: str, target_kernel: str) -> Any:
    """Load one paired case and refuse anything that is not one grid (clear error naming the case)."""
    from ltdiff_core.dicomio.cases import CaseError, load_case
    from ltdiff_core.dicomio.pairing import PairingError
    from ltdiff_core.dicomio.reader import SeriesError

    try:
        case = load_case(case_dir, source_kernel=source_kernel, target_kernel=target_kernel)
    except PairingError as e:
        raise EvaluationError(f"case {case_dir}: the {source_kernel} and {target_kernel} series cannot be "
                              f"paired slice by slice ({e}); refusing to compare mismatched images") from e
    except (CaseError, SeriesError) as e:
        raise EvaluationError(f"case {case_dir}: {e}") from e
    validate_pair(case.source, case.target, case.spacing, case.rois, str(case_dir))
    return case


def validate_pair(source: np.ndarray, target: np.ndarray, spacing: Any, rois: list[np.ndarray], name: str) -> None:
    """Shapes and spacing of a pair (and its tumour masks) must agree."""
    if np.ndim(source) != 3 or np.shape(source) != np.shape(target):
        raise EvaluationError(f"case {name}: source {np.shape(source)} and target {np.shape(target)} "
                              f"are not matched (Z, Y, X) volumes; refusing mismatched pair")
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise EvaluationError(f"case {name}: invalid spacing {spacing}")
    for i, m in enumerate(rois):
        if np.shape(m) != np.shape(source):
            raise EvaluationError(f"case {name}: tumour mask {i} has shape {np.shape(m)}, image {np.shape(source)}")


def _panel_view(case: Any, rois: list) -> dict[str, Any]:
    """Slice and zoom box for the image panel: the largest tumour slice, else the middle slice."""
    t2 = [r for r in rois if r.group == "tumour2d"]
    if t2:
        r = max(t2, key=lambda r: int(r.mask.sum()))
        z = r.box[0].start
        zoom = (max(0, r.box[1].start - 10), r.box[1].stop + 10, max(0, r.box[2].start - 10), r.box[2].stop + 10)
    else:
        z = case.source.shape[0] // 2
        _, yn, xn = case.source.shape
        zoom = (yn * 3 // 8, yn * 5 // 8, xn * 3 // 8, xn * 5 // 8)
    return {"case": case.name, "z": int(z), "zoom": zoom, "images": {}}


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """Run everything and return the report dictionary (written by ``report.write_report``)."""
    from ltdiff_core.dicomio.cases import has_series, list_cases

    case_dirs = list(list_cases(cfg.cases))
    if not case_dirs:
        raise EvaluationError(f"no cases found under {cfg.cases}")
    requested = list(cfg.methods) if cfg.methods else None
    with_rescan = [d for d in case_dirs if has_series(d, RESCAN_KERNEL)] \
        if requested is None or RESCAN in requested else []
    names = method_names(cfg.methods, cfg.steps_list, rescan_available=bool(with_rescan))
    if RESCAN in names and len(with_rescan) < len(case_dirs):
        lacking = ", ".join(d.name for d in case_dirs if d not in with_rescan)
        raise EvaluationError(f"method 'rescan' needs a CT series with ConvolutionKernel '{RESCAN_KERNEL}' in "
                              f"every case; missing in: {lacking} (leave 'rescan' out with --methods)")
    specs = resolve(names, model=cfg.model, linear=cfg.linear, direct=cfg.direct, ablation=cfg.ablation)
    seeds = list(dict.fromkeys(cfg.seeds)) if cfg.seeds else [cfg.seed]
    reference = cfg.reference
    if reference is not None and reference not in names:
        raise EvaluationError(f"reference method {reference!r} is not among the evaluated methods {names}")
    if reference is None and DEFAULT_REFERENCE in names:
        reference = DEFAULT_REFERENCE

    histograms: list[np.ndarray] = []
    if "histmatch" in names:
        for d in tqdm(case_dirs, desc="histograms", disable=not cfg.progress):
            histograms.append(hu_histogram(load_checked(d, cfg.source_kernel, cfg.target_kernel).target))

    runner = MethodRunner(cfg.device)
    rows: dict[Any, list[np.ndarray]] = {"standard": []}
    rows.update({(n, si): [] for n in names for si in range(len(seeds))})
    seed_dependent = {n: False for n in names}
    groups: list[str] = []
    case_of_row: list[int] = []
    roi_ids: list[str] = []
    feat_names: list[str] | None = None
    img_metrics: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    std_metrics: list[dict[str, Any]] = []
    timing = {n: {"seconds": 0.0, "slices": 0, "runs": 0} for n in names}
    roi_counts: dict[str, dict[str, int]] = {}
    panel: dict[str, Any] | None = None
    cases_info = []

    for ci, d in enumerate(tqdm(case_dirs, desc="cases", disable=not cfg.progress)):
        case = load_checked(d, cfg.source_kernel, cfg.target_kernel)
        spacing = tuple(float(s) for s in case.spacing)
        tnames = list(case.roi_names) if len(case.roi_names) == len(case.rois) else None
        rois = tumour_rois(list(case.rois), tnames)
        rois += random_rois(case.target, spacing, list(case.rois), case_name=case.name, seed=cfg.seed,
                            radius_mm=cfg.roi_radius_mm, max_per_range=cfg.max_rois_per_range)
        counts: dict[str, int] = {}
        for r in rois:
            counts[r.group] = counts.get(r.group, 0) + 1
        roi_counts[case.name] = counts
        cases_info.append({"name": case.name, "dir": str(d), "shape": list(case.source.shape), "spacing": list(spacing),
                           "n_tumours": len(case.rois)})
        if panel is None:
            panel = _panel_view(case, rois)
            panel["images"]["standard"] = case.target[panel["z"]].copy()
            panel["images"]["input"] = case.source[panel["z"]].copy()
            panel["tumour"] = (np.any([m[panel["z"]] for m in case.rois], axis=0)
                               if case.rois else np.zeros(case.source.shape[1:], bool))

        patches = find_uniform_patches(case.target, spacing[1])
        std_entry = {"case": case.name, "noise": noise_and_nps(case.target, patches, spacing[1]), "mtf50_lpcm": []}
        for t in case.rois:
            v, _ = tumour_edge_mtf50(case.target, t, spacing[1], case.target)
            if v is not None:
                std_entry["mtf50_lpcm"].append(v)
        std_metrics.append(std_entry)

        tasks = [task_for(case.target, r, spacing) for r in rois]
        blocks: list[Any] = ["standard"]  # block k of the feature table belongs to blocks[k]
        same_as_first: dict[Any, Any] = {}  # (name, seed index) -> (name, 0) when the image is identical
        matcher = leave_one_out_matcher(histograms, ci) if "histmatch" in names else None
        rescan = load_rescan(d, case) if RESCAN in names else None
        for spec in tqdm(specs, desc=f"methods {case.name}", disable=not cfg.progress, leave=False):
            first: np.ndarray | None = None
            for si, seed in enumerate(seeds if spec.kind == "model" else seeds[:1]):
                t0 = time.perf_counter()
                img = runner.run(spec, case.source, spacing, matcher=matcher, seed=seed, standard=case.target,
                                 rescan=rescan)
                timing[spec.name]["seconds"] += time.perf_counter() - t0
                timing[spec.name]["slices"] += int(case.source.shape[0])
                timing[spec.name]["runs"] += 1
                if si == 0:
                    first = img
                    m = image_metrics(case.target, img, spacing, list(case.rois), patches)
                    m["case"] = case.name
                    img_metrics[spec.name].append(m)
                    if panel is not None and panel["case"] == case.name:
                        panel["images"][spec.name] = img[panel["z"]].copy()
                elif np.array_equal(img, first):
                    same_as_first[(spec.name, si)] = (spec.name, 0)
                    continue
                else:
                    seed_dependent[spec.name] = True
                tasks += [task_for(img, r, spacing) for r in rois]
                blocks.append((spec.name, si))
            for si in range(len(seeds)):
                if (spec.name, si) not in blocks:
                    same_as_first[(spec.name, si)] = (spec.name, 0)
        table = extract(tasks, cfg.params, jobs=cfg.jobs, progress=cfg.progress, desc=f"features {case.name}")
        if rois:
            if feat_names is None:
                feat_names = table.names
            elif table.names != feat_names:
                raise EvaluationError("feature names changed between cases")
            block_values = {key: table.values[k * len(rois):(k + 1) * len(rois)] for k, key in enumerate(blocks)}
            for key in rows:
                rows[key].append(block_values[same_as_first.get(key, key)])
            groups += [r.group for r in rois]
            case_of_row += [ci] * len(rois)
            roi_ids += [f"{case.name}:{r.name}" for r in rois]

    if feat_names is None:
        raise EvaluationError("no ROI could be placed in any case (no tumour masks and no HU-range ROIs)")
    tables = {k: np.concatenate(v) for k, v in rows.items()}
    sets = roi_sets(groups)
    head = headline_set(sets)
    results: dict[str, Any] = {}
    for n in names:
        per_set = {}
        for sname, idx in sets.items():
            per_set[sname] = agreement(feat_names, tables["standard"][idx], tables[(n, 0)][idx],
                                       per_feature=(sname == head))
        secs, sl = timing[n]["seconds"], timing[n]["slices"]
        results[n] = {"agreement": per_set, "image_metrics": summarize_image_metrics(img_metrics[n]),
                      "image_metrics_per_case": img_metrics[n],
                      "timing": {"seconds": secs, "slices": sl, "runs": timing[n]["runs"],
                                 "s_per_slice": secs / sl if sl else None},
                      "seed_dependent": seed_dependent[n]}
        if seed_dependent[n]:
            idx = sets[head]
            per_seed = [tables[(n, si)][idx] for si in range(len(seeds))]
            results[n]["seeds"] = seed_spread(seeds, per_seed_points(feat_names, tables["standard"][idx], per_seed))
    boot = run_bootstrap(cfg, feat_names, tables, sets[head], np.asarray(case_of_row), names, seeds, seed_dependent,
                         reference)
    boot["roi_set"] = head
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
        "seeds": seeds,
        "reference": reference,
        "bootstrap": boot,
        "cases": cases_info,
        "methods": names,
        "method_info": runner.info,
        "headline_set": head,
        "roi_counts": {"per_case": roi_counts, "per_set": {k: int(len(v)) for k, v in sets.items()}},
        "feature_names": feat_names,
        "results": results,
        "standard_image": summarize_image_metrics(std_metrics),
        "_panel": panel,
    }


def run_bootstrap(cfg: EvalConfig, feat_names: list[str], tables: dict[Any, np.ndarray], idx: np.ndarray,
                  case_of_row: np.ndarray, names: list[str], seeds: list[int], seed_dependent: dict[str, bool],
                  reference: str | None) -> dict[str, Any]:
    """Hierarchical bootstrap CIs and paired differences on one ROI set (rows ``idx``), timed."""
    info: dict[str, Any] = {"n_boot": int(cfg.bootstrap), "seed": int(cfg.bootstrap_seed), "alpha": 0.05,
                            "interval": "percentile", "seeds": seeds, "reference": reference,
                            "n_rois": int(len(idx)), "n_cases": int(len(np.unique(case_of_row[idx])))}
    if reference is None:
        info["paired_skipped"] = (f"reference method {DEFAULT_REFERENCE!r} was not evaluated; "
                                  f"pass --reference NAME for paired comparisons")
    if cfg.bootstrap <= 0:
        info["skipped"] = "--bootstrap 0"
        return info
    if len(idx) == 0:
        info["skipped"] = "no ROIs in the headline set"
        return info
    t0 = time.perf_counter()
    cands = {}
    for n in names:
        if seed_dependent[n]:
            cands[n] = [tables[(n, si)][idx] for si in range(len(seeds))]
        else:
            one = tables[(n, 0)][idx]
            cands[n] = [one] * len(seeds)
    info.update(bootstrap_comparison(feat_names, tables["standard"][idx], cands, case_of_row[idx],
                                     n_boot=cfg.bootstrap, seed=cfg.bootstrap_seed, reference=reference))
    info["seconds"] = time.perf_counter() - t0
    return info


def seed_spread(seeds: list[int], points: list[dict[str, dict]]) -> dict[str, Any]:
    """Mean, sample std and min/max over seeds of each class's mean CCC and of the RE shares."""
    out: dict[str, Any] = {"seeds": seeds, "per_seed": points}
    for stat in ("mean", "std", "min", "max"):
        out[stat] = {}
    for kind in points[0]:
        for stat in ("mean", "std", "min", "max"):
            out[stat][kind] = {}
        for cls in points[0][kind]:
            v = np.array([p[kind][cls] for p in points], dtype=np.float64)
            ok = v[np.isfinite(v)]
            out["mean"][kind][cls] = float(ok.mean()) if ok.size else float("nan")
            out["std"][kind][cls] = float(ok.std(ddof=1)) if ok.size > 1 else float("nan")
            out["min"][kind][cls] = float(ok.min()) if ok.size else float("nan")
            out["max"][kind][cls] = float(ok.max()) if ok.size else float("nan")
    return out


def summarize_image_metrics(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases of the scalar image metrics (NaN-free), plus pooled tumour checks."""
    out: dict[str, Any] = {}
    for key in ("rmse_hu", "psnr_db", "ssim"):
        vals = [e[key] for e in entries if key in e]
        if vals:
            out[key] = float(np.mean(vals))
    for key in ("noise_std_hu", "nps_peak_lpcm"):
        vals = [e["noise"][key] for e in entries if key in e.get("noise", {})]
        out[key] = float(np.mean(vals)) if vals else None
    mtf = [v for e in entries for v in e.get("mtf50_lpcm", [])]
    out["mtf50_lpcm"] = float(np.median(mtf)) if mtf else None
    out["mtf50_n_edges"] = len(mtf)
    skipped = [s for e in entries for s in e.get("mtf50_skipped", [])]
    if skipped:
        out["mtf50_skipped"] = skipped
    st = [e["structure"] for e in entries if "structure" in e]
    if st:
        out["tumours_within_tol"] = int(sum(s["tumours_within_tol"] for s in st))
        out["n_tumours"] = int(sum(s["n_tumours"] for s in st))
        out["max_abs_tumour_mean_diff_hu"] = max((abs(x) for s in st for x in s["tumour_mean_diff_hu"]), default=None)
        out["outside_diff_mean_hu"] = float(np.mean([s["outside_diff_mean_hu"] for s in st]))
        out["outside_lowpass_abs_p99_hu"] = float(np.max([s["outside_lowpass_abs_p99_hu"] for s in st]))
    return out

"""Write an evaluation's report.json, report.md and PNG figures (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .classes import EXTRA_CLASSES, PAPER_CLASSES  # noqa: E402

# Published CCC (mean ± std) on the papers' own lung-tumour data (REFERENCE.md): quoted, not comparable.
PUBLISHED: dict[str, tuple[str, ...]] = {
    "Baseline (input)": ("0.90±0.05", "0.20±0.13", "0.59±0.13", "0.33±0.16", "0.35±0.12", "0.28±0.15"),
    "UNet++": ("1.00±0.00", "0.85±0.19", "0.81±0.15", "0.62±0.11", "0.79±0.25", "0.63±0.09"),
    "DiffusionCT": ("1.00±0.00", "0.83±0.25", "0.82±0.27", "0.89±0.18", "0.49±0.15", "0.87±0.02"),
    "LTDiff++ (patient)": ("1.00±0.00", "0.86±0.11", "0.84±0.04", "0.84±0.05", "0.72±0.04", "0.88±0.03"),
    "LTDiff++ (phantom)": ("1.00±0.00", "0.86±0.35", "0.72±0.06", "0.84±0.05", "0.57±0.08", "0.84±0.02"),
}
CEILINGS = ("rescan", "autoencoder-ceiling")  # reference rows, not standardizers
LUNG_WINDOW = (-600.0, 1500.0)  # level, width
SOFT_WINDOW = (40.0, 400.0)


def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars/arrays -> Python types."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _cell(c: dict[str, Any] | None) -> str:
    if not c or c.get("n", 0) == 0 or c.get("mean") is None or not math.isfinite(c["mean"]):
        return "–"
    return f"{c['mean']:.2f} ± {c['std']:.2f}"


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _label(m: str) -> str:
    return f"{m} (ceiling)" if m in CEILINGS and "ceiling" not in m else m


def _ci(c: dict[str, Any] | None, scale: float = 1.0, spec: str = ".2f", signed: bool = False) -> str:
    """``estimate [low, high]`` of one bootstrap cell (``–`` when undefined)."""
    if not c or c.get("estimate") is None or c.get("low") is None or c.get("high") is None:
        return "–"
    f = ("+" if signed else "") + spec
    return (f"{format(scale * c['estimate'], f)} [{format(scale * c['low'], f)}, "
            f"{format(scale * c['high'], f)}]")


def bootstrap_tables(report: dict[str, Any]) -> list[str]:
    """CI table per method, paired-difference table with verdicts, and the seed-spread table."""
    boot = report.get("bootstrap") or {}
    out: list[str] = []
    seeds = report.get("seeds", [])
    if "methods" in boot:
        out += [f"## Bootstrap 95 % confidence intervals — ROI set `{boot.get('roi_set')}`", "",
                f"{boot['n_boot']} hierarchical replicates (cases with replacement, then ROIs within each drawn "
                f"case; {boot['n_cases']} cases, {boot['n_rois']} ROIs; bootstrap seed {boot['seed']}); sampler "
                f"seeds {', '.join(map(str, seeds))} drawn with replacement in each replicate. Cells: point "
                f"estimate (mean over seeds) [2.5 %, 97.5 % percentile]. CCC columns: the class's mean CCC; "
                f"RE<0.15: share of features, in %. Computed in {boot.get('seconds', float('nan')):.2f} s.", "",
                "| Method | " + " | ".join(PAPER_CLASSES) + " | RE<0.15 % |",
                "|---|" + "---|" * (len(PAPER_CLASSES) + 1)]
        for m in report["methods"]:
            b = boot["methods"][m]
            out.append(f"| {_label(m)} | " + " | ".join(_ci(b["ccc"].get(c)) for c in PAPER_CLASSES) +
                       f" | {_ci(b['re_share'].get('all'), 100.0, '.0f')} |")
        out.append("")
    if "paired" in boot:
        ref = boot["reference"]
        out += [f"## Paired difference: method − `{ref}` (same resampled cases, ROIs and seeds)", "",
                "Cells: difference of the point estimates [95 % interval of the paired differences], then the "
                "verdict: **better** when the whole interval is above 0, **worse** when below, **tied** when it "
                "contains 0 (never from the point estimate alone). RE<0.15 in percentage points.", "",
                "| Method | " + " | ".join(PAPER_CLASSES) + " | RE<0.15 pp |",
                "|---|" + "---|" * (len(PAPER_CLASSES) + 1)]
        for m in report["methods"]:
            if m == ref:
                continue
            b = boot["paired"][m]
            cells = [f"{_ci(b['ccc'].get(c), signed=True)} {b['ccc'].get(c, {}).get('verdict', '')}"
                     for c in PAPER_CLASSES]
            r = b["re_share"].get("all")
            cells.append(f"{_ci(r, 100.0, '.0f', signed=True)} {(r or {}).get('verdict', '')}")
            out.append(f"| {_label(m)} | " + " | ".join(cells) + " |")
        out.append("")
    elif boot.get("paired_skipped"):
        out += ["## Paired difference", "", f"Not computed: {boot['paired_skipped']}.", ""]
    if boot.get("skipped"):
        out += ["## Bootstrap confidence intervals", "", f"Not computed: {boot['skipped']}.", ""]
    spread = [m for m in report["methods"] if "seeds" in report["results"][m]]
    if len(seeds) > 1:
        out += [f"## Sampler seeds ({', '.join(map(str, seeds))}) — ROI set `{report['headline_set']}`", "",
                "Cells: mean over seeds ± sample std (min–max) of the class's mean CCC; RE<0.15 in %. Methods whose "
                "image is identical for every seed are listed as seed-independent.", ""]
        if spread:
            out += ["| Method | " + " | ".join(PAPER_CLASSES) + " | RE<0.15 % |",
                    "|---|" + "---|" * (len(PAPER_CLASSES) + 1)]
            for m in spread:
                sd = report["results"][m]["seeds"]

                def cell(kind: str, cls: str, k: float = 1.0, spec: str = ".3f") -> str:
                    vals = [sd[x][kind].get(cls) for x in ("mean", "std", "min", "max")]
                    if any(v is None or not math.isfinite(v) for v in vals):
                        return "–"
                    mu, sdev, lo, hi = (k * v for v in vals)
                    return f"{mu:{spec}} ± {sdev:{spec}} ({lo:{spec}}–{hi:{spec}})"

                out.append(f"| {_label(m)} | " + " | ".join(cell("ccc", c) for c in PAPER_CLASSES) +
                           f" | {cell('re_share', 'all', 100.0, '.1f')} |")
            out.append("")
        indep = [m for m in report["methods"] if not report["results"][m].get("seed_dependent")]
        if indep:
            out += ["Seed-independent: " + ", ".join(indep) + ".", ""]
    return out


def ccc_table(report: dict[str, Any], roi_set: str) -> list[str]:
    """Paper-style markdown table (rows: methods) for one ROI set."""
    cls = PAPER_CLASSES + EXTRA_CLASSES
    lines = ["| Method | " + " | ".join(cls) + " | RE<0.15 | RMSE HU |",
             "|---|" + "---|" * (len(cls) + 2)]
    for m in report["methods"]:
        r = report["results"][m]
        a = r["agreement"].get(roi_set, {})
        if "classes" not in a:
            lines.append(f"| {_label(m)} | " + " | ".join("–" for _ in cls) + f" | – | {_fmt(r['image_metrics'].get('rmse_hu'), '.1f')} |")
            continue
        share = a["re_reproducible"]["share"]
        cells = [_cell(a["classes"].get(c)) for c in cls]
        lines.append(f"| {_label(m)} | " + " | ".join(cells) +
                     f" | {_fmt(100 * share if share is not None else None, '.0f')} % | "
                     f"{_fmt(r['image_metrics'].get('rmse_hu'), '.1f')} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    head = report["headline_set"]
    out = ["# Radiomic reproducibility report", "",
           f"Cases: {len(report['cases'])} ({', '.join(c['name'] for c in report['cases'])}); "
           f"ROIs per set: " + ", ".join(f"{k} {v}" for k, v in report["roi_counts"]["per_set"].items()) + ".",
           "",
           f"## CCC vs the standard by feature class — ROI set `{head}` (headline)", "",
           "Cells: mean ± std over the features of the class of Lin's CCC across ROIs. RE<0.15: share of "
           "features whose mean relative error over ROIs is below 0.15. GLSZM and GLDM are extra classes.", ""]
    out += ccc_table(report, head)
    if len(report.get("seeds", [])) > 1:
        out += ["", f"Stochastic methods in this table: first sampler seed ({report['seeds'][0]}); the interval "
                    "table below gives the mean over seeds."]
    out += [""] + bootstrap_tables(report)
    out += ["### Published figures, on their own data — not comparable", "",
            "Quoted from the reference papers (lung tumour ROIs, Siemens Br40 → Bl64, their patients/phantom); "
            "different data, ROIs and software: shown for orientation only.", "",
            "| Published method | " + " | ".join(PAPER_CLASSES) + " |", "|---|" + "---|" * len(PAPER_CLASSES)]
    out += [f"| {k} (published) | " + " | ".join(v) + " |" for k, v in PUBLISHED.items()]
    out += ["", "## Group-wise CCC (features z-scored by the standard, pooled per class)", "",
            "| Method | " + " | ".join(PAPER_CLASSES + EXTRA_CLASSES) + " |",
            "|---|" + "---|" * len(PAPER_CLASSES + EXTRA_CLASSES)]
    for m in report["methods"]:
        cl = report["results"][m]["agreement"].get(head, {}).get("classes", {})
        out.append(f"| {m} | " + " | ".join(_fmt(cl.get(c, {}).get("group_ccc"), ".2f")
                                            for c in PAPER_CLASSES + EXTRA_CLASSES) + " |")
    for s in report["roi_counts"]["per_set"]:
        if s == head:
            continue
        out += ["", f"## CCC by class — ROI set `{s}`", ""]
        out += ccc_table(report, s)
    out += ["", "## Image metrics vs the standard", "",
            "| Method | RMSE HU | PSNR dB | SSIM | noise std HU | NPS peak lp/cm | MTF50 lp/cm | tumours within 10 HU | "
            "outside p99 |low-pass diff| HU | s/slice |", "|---|" + "---|" * 9]
    std = report["standard_image"]
    out.append(f"| standard (reference) | – | – | – | {_fmt(std.get('noise_std_hu'), '.1f')} | "
               f"{_fmt(std.get('nps_peak_lpcm'), '.2f')} | {_fmt(std.get('mtf50_lpcm'), '.2f')} | – | – | – |")
    for m in report["methods"]:
        im, t = report["results"][m]["image_metrics"], report["results"][m]["timing"]
        tum = f"{im.get('tumours_within_tol', 0)}/{im.get('n_tumours', 0)}"
        out.append(f"| {m} | {_fmt(im.get('rmse_hu'), '.1f')} | {_fmt(im.get('psnr_db'), '.1f')} | "
                   f"{_fmt(im.get('ssim'), '.3f')} | {_fmt(im.get('noise_std_hu'), '.1f')} | "
                   f"{_fmt(im.get('nps_peak_lpcm'), '.2f')} | {_fmt(im.get('mtf50_lpcm'), '.2f')} | {tum} | "
                   f"{_fmt(im.get('outside_lowpass_abs_p99_hu'), '.1f')} | {_fmt(t.get('s_per_slice'), '.3f')} |")
    skipped = sorted({s for m in report["methods"] for s in report["results"][m]["image_metrics"].get("mtf50_skipped", [])})
    if skipped:
        out += ["", "MTF50 not measured for: " + "; ".join(skipped) + "."]
    out += ["", "## Figures", "", "![CCC by class](ccc_by_class.png)", "", "![RE curve](re_curve.png)", "",
            "![Image panel](panel.png)", "", "## Command", "", "```", report.get("command", ""), "```", ""]
    return "\n".join(out)


def fig_ccc(report: dict[str, Any], path: Path) -> None:
    head = report["headline_set"]
    cls = PAPER_CLASSES + EXTRA_CLASSES
    methods = report["methods"]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(cls)), 4.5))
    w = 0.8 / max(1, len(methods))
    x = np.arange(len(cls))
    for i, m in enumerate(methods):
        cl = report["results"][m]["agreement"].get(head, {}).get("classes", {})
        mean = [cl.get(c, {}).get("mean", np.nan) for c in cls]
        sd = [cl.get(c, {}).get("std", np.nan) for c in cls]
        ax.bar(x + (i - (len(methods) - 1) / 2) * w, np.nan_to_num(mean, nan=0.0), w, yerr=np.nan_to_num(sd),
               label=m, capsize=2)
    ax.set_xticks(x, cls)
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
    ax.set_ylabel("CCC vs standard (mean ± std over features)")
    ax.set_title(f"CCC by feature class, ROI set {head}")
    ax.legend(fontsize=8, ncol=min(4, len(methods)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_re(report: dict[str, Any], path: Path) -> None:
    head = report["headline_set"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in report["methods"]:
        a = report["results"][m]["agreement"].get(head, {})
        if "re_curve" in a:
            ax.plot(a["re_curve"]["x"], a["re_curve"]["count"], label=m)
    ax.axvline(0.15, color="grey", ls="--", lw=1)
    ax.set_xlabel("relative error x")
    ax.set_ylabel("number of features with RE ≤ x")
    ax.set_title(f"RE curve, ROI set {head}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _window(level_width: tuple[float, float]) -> dict[str, float]:
    lv, w = level_width
    return {"vmin": lv - w / 2, "vmax": lv + w / 2}


def fig_panel(panel: dict[str, Any], path: Path) -> None:
    """Rows: full slice (lung window), zoom (soft-tissue window), difference to the standard."""
    imgs = panel["images"]
    names = list(imgs)
    y0, y1, x0, x1 = panel["zoom"]
    fig, axes = plt.subplots(3, len(names), figsize=(2.6 * len(names), 8), squeeze=False)
    std = imgs["standard"].astype(np.float64)
    for j, n in enumerate(names):
        im = imgs[n].astype(np.float64)
        axes[0, j].imshow(im, cmap="gray", **_window(LUNG_WINDOW))
        axes[0, j].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=0.8))
        axes[0, j].set_title(n, fontsize=9)
        axes[1, j].imshow(im[y0:y1, x0:x1], cmap="gray", **_window(SOFT_WINDOW))
        if panel["tumour"].any():
            axes[1, j].contour(panel["tumour"][y0:y1, x0:x1], levels=[0.5], colors="r", linewidths=0.6)
        axes[2, j].imshow(im - std, cmap="coolwarm", vmin=-200, vmax=200)
        for i in range(3):
            axes[i, j].set_axis_off()
    fig.suptitle(f"case {panel['case']}, slice {panel['z']}: W1500/L-600; zoom W400/L40; difference ±200 HU",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write all outputs into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    panel = report.get("_panel")
    body = {k: v for k, v in report.items() if k != "_panel"}
    paths = {"json": out / "report.json", "md": out / "report.md", "ccc": out / "ccc_by_class.png",
             "re": out / "re_curve.png", "panel": out / "panel.png"}
    paths["json"].write_text(json.dumps(_clean(body), indent=1, allow_nan=False))
    paths["md"].write_text(markdown(body))
    fig_ccc(body, paths["ccc"])
    fig_re(body, paths["re"])
    if panel is not None:
        fig_panel(panel, paths["panel"])
    return paths

"""Radiomic reproducibility evaluation of every method on paired cases, in one run.

    python -m ltdiff_train.evaluate --cases DIR --out DIR [--methods identity,histmatch,...]
        [--model PATH] [--linear PATH] [--direct PATH] [--ablation PATH] [--steps-list 2,8]
        [--source-kernel Br40 --target-kernel Bl64] [--max-rois-per-range N] [--seed S] [--jobs N]
        [--seeds 0,1,2] [--bootstrap 1000] [--bootstrap-seed 0] [--reference ours]

Writes report.json, report.md and PNG figures into --out (see docs/evaluation.md): per method and
feature class the hierarchical-bootstrap 95 % CI of the mean CCC and of the RE<0.15 share, and the
paired CI of every method minus the reference with a better / worse / tied verdict.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ltdiff_core.radiomics.evaluation import EvalConfig, EvaluationError, run_evaluation
from ltdiff_core.radiomics.features import DEFAULT_PARAMS
from ltdiff_core.radiomics.methods import BASE_METHODS, RESCAN, MethodError
from ltdiff_core.radiomics.report import write_report


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ltdiff_train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=Path, required=True, help="folder of case folders (paired series + optional SEG)")
    p.add_argument("--out", type=Path, required=True, help="output folder for report.json/report.md/PNGs")
    p.add_argument("--methods", type=_csv, default=None,
                   help=f"comma-separated subset of {','.join(BASE_METHODS)},{RESCAN},ours@N "
                        f"(default: all, with {RESCAN} when the cases hold a RESCAN series)")
    p.add_argument("--steps-list", type=lambda s: [int(x) for x in _csv(s)], default=[],
                   help="extra sampling step counts for ours, e.g. 2,8 (adds ours@2, ours@8)")
    p.add_argument("--model", type=Path, default=None, help="latent diffusion checkpoint (ours, autoencoder)")
    p.add_argument("--linear", type=Path, default=None, help="linear filter checkpoint (linear, linear+noise)")
    p.add_argument("--direct", type=Path, default=None, help="direct UNet++ checkpoint (unetpp)")
    p.add_argument("--ablation", type=Path, default=None,
                   help="bottleneck-only latent diffusion checkpoint (ours-bottleneck)")
    p.add_argument("--source-kernel", default="Br40")
    p.add_argument("--target-kernel", default="Bl64")
    p.add_argument("--max-rois-per-range", type=int, default=20)
    p.add_argument("--roi-radius-mm", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0, help="ROI placement seed (and the sampler seed without --seeds)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default=None,
                   help="sampler seeds: every model method runs once per seed, e.g. 0,1,2 (default: --seed)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the CIs (0: none)")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--reference", default=None,
                   help="method the paired comparisons subtract (default: ours, when evaluated)")
    p.add_argument("--jobs", type=int, default=1, help=f"feature extraction processes (this machine: {os.cpu_count()})")
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="PyRadiomics parameter file")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = EvalConfig(cases=args.cases, out=args.out, methods=args.methods, steps_list=args.steps_list,
                     model=args.model, linear=args.linear, direct=args.direct, ablation=args.ablation, source_kernel=args.source_kernel,
                     target_kernel=args.target_kernel, max_rois_per_range=args.max_rois_per_range,
                     roi_radius_mm=args.roi_radius_mm, seed=args.seed, jobs=max(1, args.jobs), params=args.params,
                     device=args.device, progress=not args.no_progress, seeds=args.seeds,
                     bootstrap=max(0, args.bootstrap), bootstrap_seed=args.bootstrap_seed, reference=args.reference)
    try:
        report = run_evaluation(cfg)
    except (EvaluationError, MethodError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    argv_list = sys.argv[1:] if argv is None else list(argv)
    report["command"] = "python -m ltdiff_train.evaluate " + " ".join(shlex.quote(a) for a in argv_list)
    paths = write_report(report, args.out)
    boot = report.get("bootstrap", {})
    if "seconds" in boot:
        print(f"bootstrap: {boot['n_boot']} replicates x {len(report['methods'])} methods x "
              f"{len(report['seeds'])} seeds on {boot['n_rois']} ROIs / {boot['n_cases']} cases "
              f"in {boot['seconds']:.2f} s")
    print("\n".join(f"wrote {p}" for p in paths.values() if p.exists()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

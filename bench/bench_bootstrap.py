"""Seconds taken by the evaluation's hierarchical bootstrap (CIs + paired differences); not a test.

    python -m bench.bench_bootstrap [--cases 6] [--rois 97] [--methods 12] [--seeds 3] [--boot 1000]

Synthetic feature tables with the evaluation's feature-class sizes (140 features: GOH 24, GLCM 24,
GLRLM 16, ID 16, IH 25, NID 5, GLSZM 16, GLDM 14); timing depends on the sizes only. Prints one
JSON object. The held-out set's headline set has 6 cases and 97 ROIs (tumour2d); all2d has 577.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from ltdiff_core.radiomics.bootstrap import bootstrap_comparison

CLASS_SIZES = {"goh": 24, "original_glcm": 24, "original_glrlm": 16, "original_firstorder": 16, "ih": 25,
               "original_ngtdm": 5, "original_glszm": 16, "original_gldm": 14}


def feature_names() -> list[str]:
    return [f"{prefix}_F{k}" for prefix, n in CLASS_SIZES.items() for k in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--rois", type=int, default=97)
    p.add_argument("--methods", type=int, default=12)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--boot", type=int, default=1000)
    args = p.parse_args()
    names = feature_names()
    rng = np.random.default_rng(0)
    case = np.sort(rng.integers(0, args.cases, args.rois))
    std = 10 + rng.normal(0, 1, (args.cases, len(names)))[case] + rng.normal(0, 1, (args.rois, len(names)))
    cands = {f"m{k}": [std + rng.normal(0, 0.2 + 0.05 * k, std.shape) for _ in range(args.seeds)]
             for k in range(args.methods)}
    t0 = time.perf_counter()
    bootstrap_comparison(names, std, cands, case, n_boot=args.boot, seed=0, reference="m0")
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": round(seconds, 3), "cases": args.cases, "rois": args.rois, "features": len(names),
                      "methods": args.methods, "seeds": args.seeds, "replicates": args.boot,
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "numpy": np.__version__}))


if __name__ == "__main__":
    main()

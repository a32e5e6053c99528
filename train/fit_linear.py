"""Fit the radial Wiener-style kernel filter from paired slices (no GPU, about a minute).

    python -m ltdiff_train.fit_linear --config conf/train-linear.toml [--cases DIR] [--out PATH]

Stored in the same checkpoint format as the networks; ``Standardizer`` runs it as variant
"linear" (deterministic) or "linear+noise" (adds noise with the residual's radial NPS).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ltdiff_core.checkpoint import save_checkpoint
from ltdiff_core.linear_filter import LinearFilterFitter
from ltdiff_core.normalize import NORMALIZATION, unit_to_hu

from . import common
from .data import load_split

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"cases": ["data/train"], "source_kernel": "Br40", "target_kernel": "Bl64", "val_cases": 1},
    # window "body": spectra through a smooth window inside the body (ltdiff_core.body); "" for the whole slice
    "filter": {"f_max_lpcm": 10.0, "bin_lpcm": 0.1, "pad": 32, "window": "body"},
    "output": {"path": "runs/linear.safetensors", "name": "linear-kernel-filter", "version": "0.1.0"},
}


def main(argv: list[str] | None = None) -> None:
    args = common.base_parser(__doc__.splitlines()[0], "conf/train-linear.toml").parse_args(argv)
    cfg = common.apply_arguments(common.load_config(args.config, DEFAULTS), args)
    d, fc, out_cfg = cfg["data"], cfg["filter"], cfg["output"]
    out = Path(args.out or out_cfg["path"])
    t0 = time.time()
    train_vols, val_vols = load_split(args.cases or d["cases"], d["val_cases"], d["source_kernel"], d["target_kernel"])
    fitter = LinearFilterFitter(fc["f_max_lpcm"], fc["bin_lpcm"], fc["pad"], window=fc["window"] or None)
    for v in train_vols:
        for z in range(v.source.shape[0]):
            fitter.add(unit_to_hu(v.source[z]), unit_to_hu(v.target[z]), v.pixel_mm)
    filt = fitter.fit(with_residual=True)
    rm_id, rm_f = [], []
    for v in val_vols:
        a, b = unit_to_hu(v.source), unit_to_hu(v.target)
        rm_id.append(float(np.sqrt(np.mean((a - b) ** 2))))
        rm_f.append(float(np.sqrt(np.mean((filt.apply(a, v.pixel_mm) - b) ** 2))))
    metrics = {"val_rmse_hu_identity": float(np.mean(rm_id)), "val_rmse_hu_filter": float(np.mean(rm_f))}
    meta = {
        "name": out_cfg["name"], "version": out_cfg["version"], "method": "linear", "networks": {},
        "normalization": NORMALIZATION, "filter": {"pad": fc["pad"], "bin_lpcm": fc["bin_lpcm"], "window": fc["window"] or "whole slice"},
        "training": common.training_record(cfg, t0, train_vols, val_vols),
        "metrics": {"linear": metrics},
        "code_version": common.code_version(),
    }
    save_checkpoint(out, filt.to_tensors("linear"), meta)
    print(f"fit_linear: spectra through {'the body window' if fc['window'] else 'the whole slice'}")
    print(f"saved {out}: {metrics}")


if __name__ == "__main__":
    main()

"""How much of the target's noise level can any Br40-only method know? A per-case diagnostic.

    python -m ltdiff_train.target_noise --cases data/train --cases data/val [--linear PATH] [--json OUT]

For every paired case it measures, in flat soft tissue (-200..200 HU, low local activity):

* ``k``: the target's noise std over the linear first guess's, ``sigma(B) / sigma(G(A))``. The
  first guess is linear in A, so a case with ``k != 1`` is one where the target's noise level is
  not the one the fitted filter implies; a texture model has to get ``k`` right to match
  GLCM/GLRLM/IH;
* two band ratios of the *input's* noise (difference-of-Gaussians bands at 0.7/1.5/3 px): what an
  input-only model can see of how the input was reconstructed (an IR step reshapes the NPS).

When the cases carry acquisition metadata (``case.json`` ``meta.acquisition`` with
``ir_strength_a``/``ir_strength_b``, as the phantom generators write), it also reports how much
of the variance of ``log k`` the two series' IR levels explain, and how much the input's band
ratios explain (the part a model conditioned on the input could learn). Real paired data
without that metadata still gets the per-case table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ltdiff_core.checkpoint import load_checkpoint
from ltdiff_core.dicomio import list_cases, load_case
from ltdiff_core.linear_filter import LinearKernelFilter
from ltdiff_core.noise_condition import MIN_FLAT_PIXELS, describe_slice, flat_mask, high_pass

def measure_case(source: np.ndarray, target: np.ndarray, pixel_mm: tuple[float, float],
                 first_guess: LinearKernelFilter, stride: int = 2) -> dict[str, float]:
    """``k``, the input's noise std and its band ratios (``ltdiff_core.noise_condition``, the
    denoiser's own descriptors, averaged) over every ``stride``-th slice."""
    pb = pg = 0.0
    described = []
    for z in range(0, source.shape[0], stride):
        a, b = source[z].astype(np.float64), target[z].astype(np.float64)
        m = flat_mask(a)
        if m.sum() < MIN_FLAT_PIXELS:
            continue
        g = first_guess.apply(a[None], pixel_mm)[0]
        pb += float(np.mean(high_pass(b)[m] ** 2))
        pg += float(np.mean(high_pass(g)[m] ** 2))
        described.append(describe_slice(a))
    if not described:
        raise ValueError("no slice has enough flat soft tissue to measure noise")
    log_noise, hi_mid, mid_lo = np.mean(described, axis=0)
    return {"k": float(np.sqrt(pb / pg)), "input_noise_hu": float(np.exp(log_noise)),
            "band_hi_mid": float(hi_mid), "band_mid_lo": float(mid_lo), "slices": len(described)}


def r_squared(y: np.ndarray, columns: Sequence[np.ndarray]) -> float:
    """Share of the variance of ``y`` explained by an ordinary least-squares fit on ``columns``."""
    x = np.column_stack([np.ones(len(y)), *columns])
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - x @ beta) ** 2).sum()) / ss if ss > 0 else float("nan")


def explained(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """R^2 of log k on the IR levels and on the input's band ratios (needs IR metadata, >= 4 cases)."""
    rows = [r for r in rows if r.get("ir_strength_a") is not None and r.get("ir_strength_b") is not None]
    if len(rows) < 4:
        return None
    col = lambda key: np.array([r[key] for r in rows], dtype=np.float64)  # noqa: E731
    logk, ira, irb = np.log(col("k")), col("ir_strength_a"), col("ir_strength_b")
    bands = [col("band_hi_mid"), col("band_mid_lo")]
    return {"cases": len(rows),
            "log_k~ir_source+ir_target": r_squared(logk, [ira, irb]),
            "log_k~ir_source": r_squared(logk, [ira]),
            "log_k~ir_target": r_squared(logk, [irb]),
            "ir_source~input_bands": r_squared(ira, bands),
            "log_k~input_bands": r_squared(logk, bands)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", action="append", type=Path, required=True, help="folder of case folders (repeatable)")
    p.add_argument("--linear", type=Path, default=None, help="linear filter checkpoint (default: the shipped one)")
    p.add_argument("--source-kernel", default="Br40")
    p.add_argument("--target-kernel", default="Bl64")
    p.add_argument("--json", type=Path, default=None, help="write the per-case rows and the fits here")
    args = p.parse_args(argv)
    if args.linear is None:
        from ltdiff_core.weights import default_checkpoint

        args.linear = default_checkpoint("linear")
    first_guess = LinearKernelFilter.from_tensors(load_checkpoint(args.linear).tensors, "linear")
    rows: list[dict[str, Any]] = []
    print(f"{'case':32s} {'k':>6s} {'input HU':>8s} {'IR src':>6s} {'IR tgt':>6s}")
    for root in args.cases:
        for case_dir in list_cases(root):
            case = load_case(case_dir, source_kernel=args.source_kernel, target_kernel=args.target_kernel)
            row: dict[str, Any] = {"case": f"{root.name}/{Path(case_dir).name}",
                                   **measure_case(case.source, case.target, tuple(case.spacing[1:]), first_guess)}
            meta_path = Path(case_dir) / "case.json"
            if meta_path.is_file():
                acq = (json.loads(meta_path.read_text()).get("meta") or {}).get("acquisition") or {}
                row["ir_strength_a"], row["ir_strength_b"] = acq.get("ir_strength_a"), acq.get("ir_strength_b")
            rows.append(row)
            fmt = lambda v: f"{v:6.2f}" if isinstance(v, (int, float)) else f"{'-':>6s}"  # noqa: E731
            print(f"{row['case']:32s} {row['k']:6.3f} {row['input_noise_hu']:8.1f} "
                  f"{fmt(row.get('ir_strength_a'))} {fmt(row.get('ir_strength_b'))}", flush=True)
    ks = np.array([r["k"] for r in rows])
    print(f"k over {len(rows)} cases: {ks.min():.2f}-{ks.max():.2f} (std of log k {np.log(ks).std():.3f})")
    fits = explained(rows)
    if fits is not None:
        for key, value in fits.items():
            if key != "cases":
                print(f"R^2 {key:28s} {value:5.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "fits": fits}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

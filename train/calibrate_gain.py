"""Calibrate a generative checkpoint's residual gain on training slices.

    python -m ltdiff_train.calibrate_gain --checkpoint PATH --cases DIR [--cases DIR ...] [--slices 8] [--out PATH]

A sampler with few steps returns samples with too little variance, even with a perfect denoiser
(``tests/test_diffusion.py``), so the texture the model draws on top of its first guess G(A) comes
out weaker than the texture it learned. This command measures, on whole training slices (body
pixels, HU > -500 in the target), the power of the correction the model draws relative to the
true one, ``P = mean((Y - G)^2) / mean((B - G)^2)``, at the checkpoint's own sampling settings, and
sets ``sampling.residual_gain`` so that P = 1 (secant steps on log P against log gain absorb the
decoder's non-linearity; the round closest to P = 1 is kept). The tensors are not touched (``weights_sha256`` stays the same); the measured P
before and after is recorded in ``sampling.residual_gain_calibration``.

Use training cases only: the held-out sets must never inform a checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ltdiff_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ltdiff_core.standardizer import Standardizer

BODY_HU = -500.0


def _slices(roots: Sequence[str], n: int, source_kernel: str, target_kernel: str
            ) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
    """``n`` slices (HU) spread evenly over every case under ``roots`` (source, target, spacing)."""
    from ltdiff_core.normalize import unit_to_hu

    from .data import find_cases, load_volume

    vols = [load_volume(p, source_kernel, target_kernel) for p in find_cases(roots)]
    index = [(v, z) for v in vols for z in range(v.source.shape[0])]
    pick = np.linspace(0, len(index) - 1, min(n, len(index))).round().astype(int)
    return [(unit_to_hu(index[i][0].source[index[i][1]]), unit_to_hu(index[i][0].target[index[i][1]]),
             index[i][0].spacing) for i in pick]


def residual_power(st: Standardizer, data: Sequence[tuple], seed: int = 0) -> float:
    """``sum((Y - G)^2) / sum((B - G)^2)`` over body pixels of ``data`` at the model's own settings;
    G is the first guess the model itself computes (its embedded linear filter)."""
    if st.first_guess is None:
        raise ValueError("the checkpoint has no first guess")
    num = den = 0.0
    for k, (a, b, spacing) in enumerate(data):
        y = st.standardize(a, spacing[1:], seed=seed + k)
        g = st.first_guess.apply(a, (float(spacing[1]), float(spacing[2])))
        body = b > BODY_HU
        num += float(np.sum((y - g)[body] ** 2))
        den += float(np.sum((b - g)[body] ** 2))
    return num / max(den, 1e-12)


def calibrate(path: str | Path, roots: Sequence[str], n_slices: int = 8, rounds: int = 2,
              out: str | Path | None = None) -> dict[str, Any]:
    """Fit ``sampling.residual_gain`` and write it into the checkpoint (or ``out``)."""
    ck = load_checkpoint(path)
    meta = dict(ck.metadata)
    if meta.get("method") != "latent_diffusion" or meta.get("scheduler", {}).get("parameterization") != "first_guess":
        raise CheckpointError(f"{ck.path}: residual gain applies to first-guess latent diffusion checkpoints")
    data_cfg = ((meta.get("training") or {}).get("config") or {}).get("data") or {}
    data = _slices(roots, n_slices, data_cfg.get("source_kernel", "Br40"), data_cfg.get("target_kernel", "Bl64"))
    sampling = dict(meta.get("sampling") or {})
    gain = 1.0
    history = []
    st = Standardizer(ck, device="cpu")
    for _ in range(rounds + 1):
        st.sampling["residual_gain"] = gain
        p = residual_power(st, data)
        history.append({"gain": float(gain), "residual_power": p})
        if len(history) > rounds:
            break
        # secant on log P = a + b log gain (b = 2 for a linear decoder), from the last two rounds
        slope = 2.0
        if len(history) >= 2:
            (g0, p0), (g1, p1) = ((h["gain"], h["residual_power"]) for h in history[-2:])
            if g0 != g1 and p0 > 0 and p1 > 0:
                slope = float(np.clip(np.log(p1 / p0) / np.log(g1 / g0), 0.5, 4.0))
        gain = gain * max(p, 1e-9) ** (-1.0 / slope)
    best = min(history, key=lambda h: abs(np.log(max(h["residual_power"], 1e-12))))
    sampling["residual_gain"] = float(best["gain"])
    sampling["residual_gain_calibration"] = {"slices": len(data), "cases": [str(r) for r in roots],
                                             "rounds": history}
    meta["sampling"] = sampling
    target = Path(out) if out else ck.path
    save_checkpoint(target, ck.tensors, meta)
    return {"path": str(target), **sampling["residual_gain_calibration"], "residual_gain": sampling["residual_gain"]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ltdiff_train.calibrate_gain", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--cases", action="append", required=True, metavar="DIR", help="training case root (repeatable)")
    p.add_argument("--slices", type=int, default=8, help="whole slices measured (spread over all cases)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", help="write a calibrated copy here instead of in place")
    args = p.parse_args(argv)
    try:
        res = calibrate(args.checkpoint, args.cases, args.slices, args.rounds, args.out)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"train.calibrate_gain: {exc}", file=sys.stderr)
        return 2
    for r in res["rounds"]:
        print(f"gain {r['gain']:.3f}: residual power {r['residual_power']:.3f}")
    print(f"{res['path']}: sampling.residual_gain = {res['residual_gain']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How far a model's output noise moves toward the sharp kernel, per pixel spacing and slice thickness.

    python -m bench.measure_spacing [--model default|linear|direct|PATH] [--size 192] [--slices 2]
                                    [--seed 4242] [--pixel-mm 0.7 0.9] [--thickness 1.5]
                                    [--no-resample]

For each setting one scanner-phantom case is scanned twice from the same truth and draws:
with noise and without (``noise_br40_hu=0``). Noise fields are ``noisy - clean`` for Br40 and
Bl64 and ``model(noisy Br40) - model(clean Br40)`` for the output. Printed per setting (one
JSON line): noise std over the body and the power in 4-8 lp/cm (radial NPS of 32-pixel ROIs
mostly inside the body, cut at Nyquist) of the output and of Br40, each divided by Bl64's, and the
NPS peak frequencies. ``--no-resample`` runs the network on the input grid (the
behaviour before ``ltdiff_core.resample``), as a control.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

BAND_LPCM = (4.0, 8.0)


def noise_metrics(noise: np.ndarray, body: np.ndarray, pixel_mm: float, band: tuple[float, float] = BAND_LPCM,
                  roi: int = 32) -> dict:
    """Std over ``body``, band power (radial NPS summed over ``band``, cut at Nyquist) and NPS peak.

    The NPS uses every ``roi``-pixel square (on a ``roi`` grid) with at least 3/4 of it in the body.
    """
    from ltdiff_core import measure as M

    z, ny, nx = noise.shape
    rois = [noise[k, y:y + roi, x:x + roi] for k in range(z) for y in range(0, ny - roi + 1, roi)
            for x in range(0, nx - roi + 1, roi) if body[k, y:y + roi, x:x + roi].mean() >= 0.75]
    f, nps = M.nps_radial(rois, pixel_mm)
    sel = (f >= band[0]) & (f < band[1])
    return {"std": float(np.std(noise[body])), "band_power": float(nps[sel].sum() * (f[1] - f[0])),
            "nps_peak_lpcm": M.nps_peak_frequency(f, nps), "rois": len(rois)}


def scan(seed: int, slices: int, size: int, thickness_mm: float, pixel_mm: float) -> dict:
    """Truth, noisy and noiseless Br40/Bl64 of one scanner-phantom case."""
    from ltdiff_core.phantom import chest_truth, scanner

    anatomy, acquisition, noise = np.random.default_rng(seed).spawn(3)
    truth, _, _ = chest_truth(anatomy, slices, thickness_mm, size=size, pixel_mm=pixel_mm)
    p = scanner.sample_acquisition(acquisition)
    noisy = scanner.acquire(truth, pixel_mm, noise, noise_br40_hu=p.noise_br40_hu, ir_strength=p.ir_strength)
    clean = scanner.acquire(truth, pixel_mm, np.random.default_rng(0), noise_br40_hu=0.0, ir_strength=(0.0, 0.0))
    return {"truth": truth, "noisy": noisy, "clean": clean, "params": p}


def measure(model, seed: int, slices: int, size: int, thickness_mm: float, pixel_mm: float, resample: bool = True) -> dict:
    """Ratios to Bl64 of output and Br40 noise std and 4-8 lp/cm power for one setting."""
    s = scan(seed, slices, size, thickness_mm, pixel_mm)
    spacing = (thickness_mm, pixel_mm, pixel_mm)
    run = model.standardize_batch if resample else model._standardize_batch_on_grid
    out_noisy, out_clean = run([s["noisy"]["Br40"], s["clean"]["Br40"]], [spacing, spacing], seed=1)
    body = s["truth"] > -500.0
    m = {
        "Bl64": noise_metrics(s["noisy"]["Bl64"] - s["clean"]["Bl64"], body, pixel_mm),
        "Br40": noise_metrics(s["noisy"]["Br40"] - s["clean"]["Br40"], body, pixel_mm),
        "out": noise_metrics(out_noisy - out_clean, body, pixel_mm),
    }
    ref = m["Bl64"]
    return {
        "pixel_mm": pixel_mm, "thickness_mm": thickness_mm, "resample": resample,
        "bl64_std_hu": round(ref["std"], 2),
        "out_std_ratio": round(m["out"]["std"] / ref["std"], 3),
        "out_band_ratio": round(m["out"]["band_power"] / ref["band_power"], 3),
        "br40_std_ratio": round(m["Br40"]["std"] / ref["std"], 3),
        "br40_band_ratio": round(m["Br40"]["band_power"] / ref["band_power"], 3),
        "nps_peak_lpcm": {k: round(v["nps_peak_lpcm"], 2) for k, v in m.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="default, a shipped name (ltdiff, linear, direct) or a checkpoint path")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--slices", type=int, default=2)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--pixel-mm", type=float, nargs="+", default=[0.7, 0.9])
    ap.add_argument("--thickness", type=float, nargs="+", default=[1.5])
    ap.add_argument("--no-resample", dest="resample", action="store_false")
    args = ap.parse_args(argv)
    from ltdiff_core import Standardizer

    model = Standardizer.from_checkpoint(args.model, device="cpu")
    for th in args.thickness:
        for px in args.pixel_mm:
            t0 = time.perf_counter()
            row = measure(model, args.seed, args.slices, args.size, th, px, args.resample)
            row.update(model=args.model, seconds=round(time.perf_counter() - t0, 1))
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Speed and fidelity of the two phantom generators (not a test).

    python -m bench.bench_phantom [--views 240 360 720] [--reference-views 1440] [--seed 5] [--skip-aliasing]

Prints JSON lines:

* ``speed``: seconds per 512^2 slice of ``fbp_generator.scan_slice`` (with and without the
  rescan) per view count, and of the scanner (``scanner.acquire`` with the rescan);
* ``aliasing``: std over the body of the noiseless fbp image at N views minus the one at
  ``--reference-views``, per kernel (view aliasing of fewer views);
* ``mtf_nps``: MTF50 and peak of an edge, noise std and NPS peak on a 160^2 water disc (IR off,
  Br40 noise 25 HU) for both generators.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, nargs="+", default=[240, 360, 720])
    ap.add_argument("--reference-views", type=int, default=1440)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--skip-aliasing", action="store_true")
    args = ap.parse_args(argv)
    from ltdiff_core import measure as M
    from ltdiff_core.phantom import chest_truth, scanner
    from ltdiff_core.phantom import fbp_generator as G

    truth, _, _ = chest_truth(np.random.default_rng(args.seed), 1, 1.5)
    sl = truth[0]
    G.scan_slice(sl[:64, :64], 0.7, np.random.default_rng(0), noise_br40_hu=25.0, ir_strength=(2, 3))  # warm-up
    for v in args.views:
        kw = dict(noise_br40_hu=25.0, ir_strength=(2.0, 3.0), n_views=v)
        _, with_rescan = _timed(G.scan_slice, sl, 0.7, np.random.default_rng(1), rescan_rng=np.random.default_rng(2), **kw)
        _, without = _timed(G.scan_slice, sl, 0.7, np.random.default_rng(1), **kw)
        print(json.dumps({"speed": "fbp", "views": v, "s_per_slice_with_rescan": round(with_rescan, 2),
                          "s_per_slice": round(without, 2)}), flush=True)
    _, t = _timed(scanner.acquire, truth, 0.7, np.random.default_rng(1), noise_br40_hu=25.0, ir_strength=(2.0, 3.0),
                  rescan_rng=np.random.default_rng(2))
    print(json.dumps({"speed": "scanner", "s_per_slice_with_rescan": round(t, 2)}), flush=True)

    if not args.skip_aliasing:
        body = sl > -900.0
        clean = lambda v: G.scan_slice(sl, 0.7, None, noise_br40_hu=0.0, ir_strength=(0, 0), n_views=v)  # noqa: E731
        ref = clean(args.reference_views)
        for v in args.views:
            img = clean(v)
            print(json.dumps({"aliasing": v, "reference_views": args.reference_views,
                              **{f"{k}_std_hu": round(float((img[k] - ref[k])[body].std()), 2) for k in img}}), flush=True)

    n = 160
    yy, xx = np.indices((n, n)) - (n - 1) / 2
    disc = np.where(yy**2 + xx**2 < 70**2, 0.0, -1000.0).astype(np.float32)
    inner = yy**2 + xx**2 < 50**2
    runs = {
        "fbp": (G.scan_slice(disc, 0.7, None, noise_br40_hu=0.0, ir_strength=(0, 0)),
                G.scan_slice(disc, 0.7, np.random.default_rng(1), noise_br40_hu=25.0, ir_strength=(0, 0))),
        "scanner": tuple({k: v[0] for k, v in scanner.acquire(disc[None], 0.7, np.random.default_rng(s),
                                                               noise_br40_hu=nz, ir_strength=(0, 0)).items()}
                         for s, nz in ((0, 0.0), (1, 25.0))),
    }
    for name, (cl, no) in runs.items():
        for k in ("Br40", "Bl64"):
            e = M.edge_mtf(cl[k], 0.7)
            noise = no[k] - cl[k]
            rois = [noise[y:y + 32, x:x + 32] for y in (48, 64, 80) for x in (48, 64, 80)]
            f, nps = M.nps_radial(rois, 0.7)
            print(json.dumps({"mtf_nps": name, "kernel": k, "mtf50_lpcm": round(e.mtf50, 2), "mtf_peak": round(e.peak, 2),
                              "noise_std_hu": round(float(noise[inner].std()), 1),
                              "nps_peak_lpcm": round(M.nps_peak_frequency(f, nps), 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

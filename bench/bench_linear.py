"""The linear kernel filter (the default model): the previous per-slice float64 path against the
current one (single precision, transfer grid computed once per geometry, slices in small FFT
stacks), side by side on the same slices, interleaved. Not a test.

    python -m bench.bench_linear [--slices 64] [--size 512] [--repeats 5]

Prints one JSON object: seconds per slice of each path (median over repeats), the ratio
new/previous, and the output difference in HU (RMS and max).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
from scipy import fft as sfft

from bench.bench_standardize import synthetic_volume


def previous_apply(filt, hu: np.ndarray, pixel_mm: tuple[float, float]) -> np.ndarray:
    """The filter as it was: float64, the transfer function interpolated again for every slice."""
    from ltdiff_core.linear_filter import _padded, radial_frequency

    out = []
    for s in hu:
        p = filt.pad
        x = _padded(s.astype(np.float64), p)
        spec = sfft.rfft2(x, workers=-1) * filt.transfer(radial_frequency(x.shape, pixel_mm))
        out.append(sfft.irfft2(spec, s=x.shape, workers=-1)[p:p + s.shape[0], p:p + s.shape[1]].astype(np.float32))
    return np.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from ltdiff_core.checkpoint import load_checkpoint
    from ltdiff_core.linear_filter import LinearKernelFilter
    from ltdiff_core.weights import default_checkpoint

    filt = LinearKernelFilter.from_tensors(load_checkpoint(default_checkpoint("linear")).tensors, "linear")
    vol = synthetic_volume(args.slices, args.size)
    px = (0.7, 0.7)
    old, new = previous_apply(filt, vol, px), filt.apply(vol, px)  # warm-up, and the outputs compared
    times: dict[str, list[float]] = {"previous": [], "current": []}
    for _ in range(args.repeats):  # interleaved, so load on a shared machine hits both alike
        t0 = time.perf_counter()
        previous_apply(filt, vol, px)
        times["previous"].append((time.perf_counter() - t0) / args.slices)
        t0 = time.perf_counter()
        filt.apply(vol, px)
        times["current"].append((time.perf_counter() - t0) / args.slices)
    med = {k: float(np.median(v)) for k, v in times.items()}
    diff = new - old
    print(json.dumps({
        "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "slices": args.slices, "size": args.size, "repeats": args.repeats,
        "s_per_slice": {k: round(v, 5) for k, v in med.items()},
        "ratio_current_over_previous": round(med["current"] / med["previous"], 3),
        "diff_hu": {"rms": float(np.sqrt(np.mean(diff ** 2))), "max": float(np.abs(diff).max())},
    }))


if __name__ == "__main__":
    main()

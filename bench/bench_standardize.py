"""Seconds per slice and peak memory of ``Standardizer.standardize`` (not a test).

    python -m bench.bench_standardize [--model PATH] [--variant V] [--device cpu|cuda|auto]
                                      [--slices 8] [--size 512] [--steps N] [--threads N]

Prints one JSON object per run (machine, model, timing, memory) so results can be pasted into
docs/benchmarks.md. The input is a synthetic 512^2 chest-like slice stack: timing does not
depend on content.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import numpy as np


def synthetic_volume(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    body = np.hypot(yy / 0.8, xx) < size * 0.42
    lung = (np.hypot(yy, np.abs(xx) - size * 0.18) < size * 0.14)
    img = np.where(body, 40.0, -1000.0) - lung * 820.0
    return (img[None] + rng.normal(0, 20, (n, size, size))).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: shipped ltdiff)")
    p.add_argument("--variant", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    p.add_argument("--max-batch-pixels", type=int, default=4 * 512 * 512)
    args = p.parse_args()

    import torch

    from ltdiff_core import Standardizer

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    s = Standardizer.from_checkpoint(args.model, device=args.device, variant=args.variant,
                                     max_batch_pixels=args.max_batch_pixels)
    load_s = time.perf_counter() - t0
    vol = synthetic_volume(args.slices, args.size)
    s.standardize(vol[:1], (1.5, 0.7, 0.7), steps=args.steps)  # warm-up (allocations, kernels)
    cuda = s.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = s.standardize(vol, (1.5, 0.7, 0.7), steps=args.steps)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    info = s.info.as_dict()
    res = {
        "model": info["name"], "variant": info["variant"], "method": info["method"],
        "steps": args.steps or info["default_steps"], "strength": info["strength"],
        "device": s.device, "slices": args.slices, "size": args.size,
        "seconds_per_slice": round(dt / args.slices, 4), "slices_per_second": round(args.slices / dt, 2),
        "load_seconds": round(load_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "finite": bool(np.isfinite(out).all()),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()

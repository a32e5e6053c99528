"""Time the physics QA gate adds per series, against the linear filter's processing time (not a test).

    python -m bench.bench_qa [--slices 100] [--size 512] [--repeat 5] [--threads 0]

The series is a phantom Br40 acquisition (``--phantom-slices`` distinct slices, repeated to
``--slices``; QA samples ``ltdiff_core.qa.MAX_SLICES`` of them, the filter processes all).
Timed: the linear filter (``Standardizer.standardize`` with the shipped ``linear`` checkpoint)
and the gate's work on the same HU volume: input measures + envelope check
(``qa.assess_input``) and output measures + target check (``qa.assess_output``). Reading and
decoding the DICOM files is shared by both and not timed. Prints one JSON object with the
medians over ``--repeat`` runs, wall-clock and process CPU time (on a shared machine the CPU
time ratio is the steadier one); the issue's budget is QA <= 5 % of the filter's time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--phantom-slices", type=int, default=12)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch/BLAS threads (0: library default)")
    args = p.parse_args()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    from ltdiff_core import Standardizer, qa
    from ltdiff_core.checkpoint import load_checkpoint
    from ltdiff_core.phantom import generate_case
    from ltdiff_core.weights import default_checkpoint

    case = generate_case(7001, args.phantom_slices, size=args.size, thickness_mm=1.5)
    reps = -(-args.slices // args.phantom_slices)
    vol = np.concatenate([case.br40] * reps)[: args.slices].astype(np.float32)
    spacing = case.spacing
    path = default_checkpoint("linear")
    env = qa.envelope_of(load_checkpoint(path).metadata)
    lin = Standardizer.from_checkpoint(path, device="cpu")

    t_lin, t_in, t_out, c_lin, c_qa = [], [], [], [], []
    verdict = None
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = lin.standardize(vol, spacing)
        t_lin.append(time.perf_counter() - t0)
        c_lin.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        verdict = qa.assess_input(vol, spacing, env, spacing[0])
        t_in.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        qa.assess_output(verdict, out, spacing, env)
        t_out.append(time.perf_counter() - t0)
        c_qa.append(time.process_time() - c0)
    lin_s, in_s, out_s, lin_cpu, qa_cpu = (statistics.median(t) for t in (t_lin, t_in, t_out, c_lin, c_qa))
    print(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "series": {"slices": args.slices, "size": args.size, "qa_slices": len(qa.sample_slices(args.slices))},
        "linear_filter_s": round(lin_s, 3),
        "qa_input_s": round(in_s, 4), "qa_output_s": round(out_s, 4), "qa_total_s": round(in_s + out_s, 4),
        "qa_percent_of_linear": round(100 * (in_s + out_s) / lin_s, 2),
        "cpu_s": {"linear_filter": round(lin_cpu, 3), "qa": round(qa_cpu, 4),
                  "qa_percent_of_linear": round(100 * qa_cpu / lin_cpu, 2)},
        "verdict": verdict.status if verdict else None, "repeat": args.repeat,
    }, indent=1))


if __name__ == "__main__":
    main()

"""GPU figures of the default model: slices/s at batch 1-64 (bf16, fp32), peak memory, series latency.

    python -m bench.bench_gpu [--model NAME|PATH ...] [--new-default PATH|derive]
                              [--batches 1,2,4,8,16,32,64] [--seconds 2] [--series-slices 300]
                              [--series DIR] [--out FILE.json]

``--model`` (repeatable) names the models measured, each labelled by its name: by default the
default model (the linear filter, its FFTs in ``torch.fft`` on the GPU) and ``ltdiff`` (the latent
diffusion model, the default before it). ``--new-default`` adds one more, labelled "new default".

1. Throughput: ``Standardizer`` on 512^2 slices with ``max_batch_pixels`` = batch x 512^2, after a
   warm-up batch; each (precision, batch) runs whole batches until ``--seconds`` have passed
   (at least 2 batches), timed with ``torch.cuda.synchronize``. Peak memory is
   ``torch.cuda.max_memory_allocated`` (and reserved) of that configuration. Each row names the
   device the model ran on (``model_device``); bf16 autocast applies to networks only, so the
   linear filter is measured in fp32 alone.
2. Series latency: a ``--series-slices`` phantom series (``python -m ltdiff_train.make_phantom``, Br40)
   through ``dicom-node standardize --device cuda`` (its default batch), wall time of the command.

Without a CUDA device it prints why and exits with status 0 and ``{"cuda": false}``: nothing is
measured. Prints one JSON object per figure; ``--out`` also writes them all to a file.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZE = 512
SPACING = (1.5, 0.7, 0.7)


def emit(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def throughput(model: str | None, label: str, batches: list[int], seconds: float, rows: list[dict[str, Any]],
               device: str = "cuda", size: int = SIZE) -> None:
    import torch

    from bench.bench_standardize import synthetic_volume
    from ltdiff_core import Standardizer

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    networks = Standardizer.from_checkpoint(model, device="cpu").method != "linear"
    for bf16 in ((True, False) if cuda and networks else (False,)):
        for bs in batches:
            s = Standardizer.from_checkpoint(model, device=device, max_batch_pixels=bs * size * size, cuda_bf16=bf16)
            vol = synthetic_volume(bs, size)
            try:
                s.standardize(vol, SPACING)  # warm-up: kernels, allocator
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                n, t0 = 0, time.perf_counter()
                while n < 2 * bs or time.perf_counter() - t0 < seconds:
                    s.standardize(vol, SPACING, seed=n)
                    n += bs
                sync()
                dt = time.perf_counter() - t0
                row = {"figure": "throughput", "model": label, "model_device": s.device, "size": size,
                       "precision": "bf16" if bf16 else "fp32", "batch": bs, "slices": n, "seconds": round(dt, 3),
                       "slices_per_s": round(n / dt, 2)}
                if cuda:
                    row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                    row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
                emit(rows, row)
            except torch.cuda.OutOfMemoryError as exc:
                emit(rows, {"figure": "throughput", "model": label, "precision": "bf16" if bf16 else "fp32",
                            "batch": bs, "error": f"out of memory: {str(exc).splitlines()[0]}"})
            del s
            if cuda:
                torch.cuda.empty_cache()


def series_latency(model: str | None, label: str, series: Path, n: int, rows: list[dict[str, Any]],
                   device: str = "cuda") -> None:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-c", "import sys; from dicom_node.app.cli import main; sys.exit(main())",
               "standardize", str(series), out, "--device", device, "--quiet", "--qa", "off"]
        if model:
            cmd[5:5] = ["--model", str(model)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        dt = time.perf_counter() - t0
        written = sum(1 for p in Path(out).rglob("*") if p.is_file())
    row = {"figure": "series_latency", "model": label, "slices": n, "command": f"dicom-node standardize IN OUT "
           f"--device {device} --quiet --qa off" + (f" --model {model}" if model else ""), "seconds": round(dt, 2),
           "files_written": written, "returncode": proc.returncode}
    if proc.returncode:
        row["stderr_tail"] = proc.stderr[-800:]
    emit(rows, row)


def make_series(n: int, workdir: Path, rows: list[dict[str, Any]], size: int = SIZE) -> Path:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ltdiff_train.make_phantom", "--out", str(workdir), "--cases", "1",
                    "--slices", str(n), "--seed", "7", "--size", str(size)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    emit(rows, {"figure": "phantom_generation", "slices": n, "seconds": round(time.perf_counter() - t0, 1)})
    return workdir / "case-000" / "br40"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None, metavar="NAME|PATH",
                   help="a model to measure, repeatable (default: 'default' and 'ltdiff')")
    p.add_argument("--new-default", default=None, help="second model: checkpoint path or 'derive' "
                   "(see bench/bench_inference.py)")
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--seconds", type=float, default=2.0, help="time per (precision, batch) after warm-up")
    p.add_argument("--series-slices", type=int, default=300)
    p.add_argument("--series", type=Path, default=None, help="existing Br40 series folder (skips the phantom)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cuda", help="'cpu' only to check this script on a small --size")
    p.add_argument("--size", type=int, default=SIZE, help="slice matrix (512 for the figures)")
    args = p.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device is available (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        print(json.dumps({"cuda": False, "torch": torch.__version__}))
        return 0
    rows: list[dict[str, Any]] = []
    cuda = args.device.startswith("cuda")
    emit(rows, {"cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else args.device,
                "torch": torch.__version__, "cuda_version": torch.version.cuda})
    tmp = tempfile.TemporaryDirectory()
    models: list[tuple[str, str | None]] = [(m, m) for m in (args.model or ["default", "ltdiff"])]
    if args.new_default:
        from bench.bench_inference import derive_new_default

        nd = derive_new_default(None, Path(tmp.name)) if args.new_default == "derive" else args.new_default
        models.append(("new default", str(nd)))
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    for label, model in models:
        throughput(model, label, batches, args.seconds, rows, args.device, args.size)
    series = args.series or make_series(args.series_slices, Path(tmp.name) / "phantom", rows, args.size)
    n = sum(1 for f in Path(series).iterdir() if f.is_file())
    for label, model in models:
        series_latency(model, label, Path(series), n, rows, args.device)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

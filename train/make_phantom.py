"""Write the synthetic two-kernel phantom data set in the case layout of ``docs/data-layout.md``.

    python -m ltdiff_train.make_phantom --out DIR --cases N --slices K --seed S [--size 512] [--thickness MM]
        [--pixel-mm 0.7] [--generator {scanner,fbp}] [--no-rescan] [--rescan-mode {independent,split}]

Case ``i`` is generated with seed ``S * 1000 + i`` and written to ``DIR/case-{i:03d}`` as
``br40/``, ``bl64/``, ``rescan/`` (kernel ``RESCAN``, an independent Bl64 realisation; skipped
with ``--no-rescan``), ``seg/`` and ``case.json``. All UIDs are derived from that seed, so the
same command line always produces the same pixel data and the same UIDs. ``--generator fbp``
uses the projection/Poisson/FBP generator (``ltdiff_core.phantom.fbp_generator``) with its own
seed stream, so its cases never repeat the scanner's.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ltdiff_core.dicomio.writer import write_phantom_case

SEEDS_PER_RUN = 1000  # case seeds S*1000+i never collide between runs for fewer cases than this


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` in a run started with ``seed``."""
    return seed * SEEDS_PER_RUN + index


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ltdiff_train.make_phantom", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (one sub-folder per case)")
    parser.add_argument("--cases", type=int, required=True, metavar="N", help="number of cases")
    parser.add_argument("--slices", type=int, required=True, metavar="K", help="slices per case")
    parser.add_argument("--seed", type=int, required=True, metavar="S", help="run seed; case i uses seed*1000+i")
    parser.add_argument("--size", type=int, default=512, metavar="PX", help="image matrix (crop of the 0.7 mm grid), default 512")
    parser.add_argument("--thickness", type=float, default=1.5, metavar="MM", help="slice thickness in mm, default 1.5")
    parser.add_argument("--pixel-mm", type=float, default=0.7, metavar="MM",
                        help="pixel spacing in mm (real series: 0.6-0.9), default 0.7")
    parser.add_argument("--generator", choices=("scanner", "fbp"), default="scanner",
                        help="scanner: image-domain kernel model (default); fbp: projection, Poisson counts, FBP")
    parser.add_argument("--no-rescan", dest="rescan", action="store_false",
                        help="do not write the RESCAN series (an independent Bl64 noise realisation)")
    parser.add_argument("--rescan-mode", choices=("independent", "split"), default="independent",
                        help="scanner only: independent noise draw (default) or split (keep the part of the "
                             "noise that Br40 determines, redraw the rest)")
    args = parser.parse_args(argv)
    if not 0 < args.cases <= SEEDS_PER_RUN:
        parser.error(f"--cases must be between 1 and {SEEDS_PER_RUN}")
    if args.slices < 1 or args.size < 16 or args.thickness <= 0:
        parser.error("--slices must be >= 1, --size >= 16 and --thickness > 0")
    if not 0.3 <= args.pixel_mm <= 2.0:
        parser.error("--pixel-mm must be within 0.3..2.0")
    if args.generator == "fbp" and args.rescan_mode != "independent":
        parser.error("--rescan-mode split exists for the scanner generator only (fbp redraws Poisson counts)")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from ltdiff_core.phantom import generate  # heavy import only once arguments are valid

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for index in tqdm(range(args.cases), desc="phantom cases", unit="case"):
        seed = case_seed(args.seed, index)
        case = generate(args.generator, seed, args.slices, size=args.size, thickness_mm=args.thickness,
                        pixel_mm=args.pixel_mm, rescan=args.rescan_mode if args.rescan else None)
        name = f"case-{index:03d}"
        write_phantom_case(case, args.out / name, uid_key=f"phantom-seed-{seed}", name=name)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.cases} case(s) ({args.generator} generator) to {args.out} in {elapsed:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

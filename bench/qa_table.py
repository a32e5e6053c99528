"""Measured QA values and gate verdicts for the reference inputs (a table for the docs; not a test).

    python -m bench.qa_table [--checkpoint PATH] [--size 256]

Inputs: phantom Br40 and Bl64 series (the Bl64 one is what a Bl64 series tagged ``Br40`` looks
like to the gate: the gate reads pixels, not the tag), a 5 mm phantom Br40 series, pydicom's
bundled ``CT_small.dcm`` (128^2, GE STANDARD) and its 512^2 head CTs. Prints a Markdown table
with each measure and the verdict against the checkpoint's envelope (default: shipped ``ltdiff``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

COLUMNS = ("pixel_spacing_mm", "slice_thickness_mm", "hu_air", "hu_soft_tissue", "body_diameter_mm",
           "sharpness", "nps_peak_lpcm", "nps_mean_lpcm", "noise_hu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--models", default="linear", help="shipped models whose output is measured (comma list)")
    args = p.parse_args()

    import pydicom.data

    from ltdiff_core import qa
    from ltdiff_core.checkpoint import load_checkpoint
    from ltdiff_core.dicomio.reader import read_series
    from ltdiff_core.phantom import generate_case
    from ltdiff_core.weights import default_checkpoint
    from ltdiff_train.make_phantom import case_seed

    path = args.checkpoint or default_checkpoint("ltdiff")
    from ltdiff_core.resample import supported_geometry

    meta = load_checkpoint(path).metadata
    env = qa.envelope_of(meta)
    # the node's gate: geometry against what the Standardizer handles (it resamples in-plane)
    geometry = supported_geometry(meta)
    env["source"]["measures"].update(geometry)
    rows: list[tuple[str, np.ndarray, tuple[float, float, float], float | None]] = []
    # the cases of `python -m ltdiff_train.make_phantom --seed S --cases 1 --slices 2 --size 256` (tests/test_qa_gate.py)
    for seed in (4242, 4243):
        c = generate_case(case_seed(seed, 0), 2, size=args.size, thickness_mm=1.5)
        rows.append((f"phantom Br40 {args.size}^2 (make_phantom --seed {seed})", c.br40, c.spacing, None))
        rows.append((f"phantom Bl64 tagged Br40 {args.size}^2 (--seed {seed})", c.bl64, c.spacing, None))
    c5 = generate_case(case_seed(4243, 0), 2, size=args.size, thickness_mm=5.0)
    rows.append((f"phantom Br40 5 mm {args.size}^2 (--seed 4243 --thickness 5)", c5.br40, c5.spacing, None))
    c9 = generate_case(case_seed(4243, 0), 2, size=args.size, thickness_mm=1.5, pixel_mm=0.9)
    rows.append((f"phantom Br40 0.9 mm pixels {args.size}^2 (--seed 4243 --pixel-mm 0.9)", c9.br40, c9.spacing, None))
    for name in ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm"):
        s = read_series(pydicom.data.get_testdata_file(name, download=False))
        rows.append((f"pydicom {name} ({s.hu.shape[1]}^2, {s.kernel or '-'})", s.hu, s.spacing,
                     qa.series_thickness(s.datasets)))

    print(f"Envelope: {Path(path).name}, source {env['source']['kernel']}, {env['series']} training pairs\n")
    print("| input | " + " | ".join(COLUMNS) + " | verdict (first failed check) |")
    print("|---|" + "---|" * (len(COLUMNS) + 1))
    print("| envelope | " + " | ".join(
        f"[{r['lo']:.3g}, {r['hi']:.3g}]" if (r := env["source"]["measures"].get(k)) else "-" for k in COLUMNS)
        + " | |")
    for label, hu, spacing, thick in rows:
        v = qa.assess_input(hu, spacing, env, thick)
        vals = [("-" if v.inputs.values.get(k) is None else f"{v.inputs.values[k]:.3g}") for k in COLUMNS]
        bad = {f.check for f in v.findings}
        vals = [f"**{x}**" if k in bad else x for k, x in zip(COLUMNS, vals)]
        verdict = "pass" if v.status == "pass" else f"refuse: {v.reason}"
        print(f"| {label} | " + " | ".join(vals) + f" | {verdict} |")

    from ltdiff_core import Standardizer

    label, hu, spacing, thick = rows[0]
    out_cols = list(qa.OUTPUT_MEASURES)
    print(f"\nOutput of `{label}` against the {env['target']['kernel']} envelope (input's patches)\n")
    print("| model | " + " | ".join(out_cols) + " | output verdict |")
    print("|---|" + "---|" * (len(out_cols) + 1))
    print("| envelope | " + " | ".join(f"[{r['lo']:.3g}, {r['hi']:.3g}]" for k in out_cols
                                      if (r := env["target"]["measures"][k])) + " | |")
    for name in [m for m in args.models.split(",") if m]:
        std = Standardizer.from_checkpoint(default_checkpoint(name), device="cpu")
        v = qa.assess_output(qa.assess_input(hu, spacing, env, thick), std.standardize(hu, spacing), spacing, env)
        o = v.outputs.values
        bad = {f.check for f in v.output_findings}
        cells = [f"**{o[k]:.3g}**" if k in bad else f"{o[k]:.3g}" for k in out_cols]
        print(f"| {name} | " + " | ".join(cells) + f" | {'outside: ' + '; '.join(v.output_warnings) if bad else 'pass'} |")


if __name__ == "__main__":
    main()

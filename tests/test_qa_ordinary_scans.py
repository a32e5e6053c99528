"""The QA gate accepts ordinary scans and refuses only another kind of input.

Real Br40 chest series run from about 5 HU noise (small patient, high dose) to 60 HU and more,
at fields of view of 300-500 mm (pixel 0.6-0.98 mm). None of that is a different kind of input
for a kernel conversion: the shipped checkpoint's gate must standardize them (at most flagged,
with the measured reason). What it must still refuse is a sharp kernel tagged smooth."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ltdiff_core import qa
from ltdiff_core.phantom import generate, scanner
from ltdiff_core.phantom.anatomy import chest_truth
from ltdiff_core.standardizer import Standardizer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gate():  # type: ignore[no-untyped-def]
    model = Standardizer.from_checkpoint(ROOT / "ltdiff_core" / "weights" / "linear.safetensors")
    env, geometry = model.qa_envelope(), model.supported_geometry()

    def verdict(hu: np.ndarray, spacing: tuple[float, float, float]) -> qa.Verdict:
        return qa.assess_input(hu, spacing, env, spacing[0], geometry)
    return verdict


def test_fifty_seeds_of_the_default_generator_are_never_refused(gate) -> None:  # type: ignore[no-untyped-def]
    refused, sharp_passed, flags = [], [], Counter()
    for seed in range(50):
        case = generate("scanner", seed, 4, rescan=None)
        v = gate(case.br40, case.spacing)
        if v.status == "fail":
            refused.append((seed, v.reason))
        flags.update(f.check for f in v.flags)
        if gate(case.bl64, case.spacing).status != "fail":  # the same scan's Bl64, tagged Br40
            sharp_passed.append(seed)
    print("flags over 50 seeds:", dict(flags))
    assert refused == []
    assert sharp_passed == []


def test_the_second_generator_is_never_refused(gate) -> None:  # type: ignore[no-untyped-def]
    for seed in (3, 5, 6):
        case = generate("fbp", seed, 3, rescan=None)
        v = gate(case.br40, case.spacing)
        assert v.status != "fail", (seed, v.reason)
        assert gate(case.bl64, case.spacing).status == "fail", seed


def test_a_dose_sweep_from_5_to_60_hu_is_never_refused(gate) -> None:  # type: ignore[no-untyped-def]
    truth, _, _ = chest_truth(np.random.default_rng(11), 4, 1.5, pixel_mm=0.7)
    measured = []
    for noise in (2.5, 10.0, 20.0, 40.0, 60.0, 75.0):
        for ir in (0.0, 5.0):
            out = scanner.acquire(truth, 0.7, np.random.default_rng(1), noise_br40_hu=noise, ir_strength=(ir, ir))
            v = gate(out["Br40"], (1.5, 0.7, 0.7))
            measured.append(v.inputs.values["noise_hu"])
            assert v.status != "fail", (noise, ir, v.reason)
            if noise >= 10 and ir == 0.0:  # a sharp kernel at an ordinary dose, tagged Br40
                assert gate(out["Bl64"], (1.5, 0.7, 0.7)).status == "fail", noise
    print("Br40 noise measured over the sweep (HU):", [round(n, 1) for n in measured])
    assert min(measured) <= 6.0 and max(measured) >= 60.0  # the sweep covers 5-60 HU as measured


@pytest.mark.parametrize("pixel_mm", [0.6, 0.8, 0.98])  # FOV 307, 410, 502 mm at 512^2
def test_fields_of_view_from_300_to_500_mm_are_never_refused(gate, pixel_mm: float) -> None:  # type: ignore[no-untyped-def]
    case = generate("scanner", 21, 4, pixel_mm=pixel_mm, rescan=None)
    v = gate(case.br40, case.spacing)
    assert v.status != "fail", (pixel_mm, v.reason)


def test_kernel_boundary_lies_between_the_two_kernels() -> None:
    env = {"source": {"measures": {"sharpness": {"p_lo": 0.8, "p_hi": 2.0, "median": 1.6}}},
           "target": {"measures": {"sharpness": {"p_lo": 6.0, "p_hi": 12.0, "median": 11.0}}}}
    value, side = qa.kernel_boundary(env)
    assert side == "above" and value == pytest.approx((2.0 * 6.0) ** 0.5)
    flipped = {"source": env["target"], "target": env["source"]}
    value, side = qa.kernel_boundary(flipped)
    assert side == "below" and value == pytest.approx((6.0 * 2.0) ** 0.5)

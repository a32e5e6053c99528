"""The RESCAN reference of the scanner phantom: it leaves Br40/Bl64 as they were and its noise is a new draw."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ltdiff_core.phantom import generate_case, scanner

# sha256 (first 16 hex) of br40 + bl64 bytes of generate_case(5000, 3, size=96, thickness_mm=3.0),
# computed with the generator as it was before the rescan existed: existing data sets stay valid.
PINNED_5000 = "35ed4287a6cc15c4"
N, PIX = 112, 0.7


def _digest(case) -> str:
    return hashlib.sha256(case.br40.tobytes() + case.bl64.tobytes()).hexdigest()[:16]


def test_rescan_leaves_br40_and_bl64_unchanged():
    plain = generate_case(5000, 3, size=96, thickness_mm=3.0)
    assert plain.rescan is None and "rescan" not in plain.meta
    assert _digest(plain) == PINNED_5000
    rescans = {}
    for mode in scanner.RESCAN_MODES:
        case = generate_case(5000, 3, size=96, thickness_mm=3.0, rescan=mode)
        assert _digest(case) == PINNED_5000, mode
        assert case.rescan.shape == case.bl64.shape and case.meta["rescan"]["mode"] == mode
        assert np.array_equal(case.rescan, np.rint(case.rescan))
        assert not np.array_equal(case.rescan, case.bl64)
        rescans[mode] = case.rescan
    again = generate_case(5000, 3, size=96, thickness_mm=3.0, rescan="independent")
    assert np.array_equal(again.rescan, rescans["independent"])  # deterministic per seed


@pytest.fixture(scope="module")
def noise_fields():
    """Noise (noisy - noiseless) of Br40, Bl64 and RESCAN of a water disc, per rescan mode."""
    yy, xx = np.indices((N, N)) - (N - 1) / 2
    truth = np.where(yy**2 + xx**2 < 50**2, 0.0, -1000.0).astype(np.float32)[None].repeat(2, 0)
    inner = yy**2 + xx**2 < 40**2
    clean = scanner.acquire(truth, PIX, np.random.default_rng(0), noise_br40_hu=0.0, ir_strength=(0, 0))
    out = {}
    for mode in scanner.RESCAN_MODES:
        img = scanner.acquire(truth, PIX, np.random.default_rng(1), noise_br40_hu=25.0, ir_strength=(2.0, 3.0),
                              rescan_rng=np.random.default_rng(2), rescan_mode=mode)
        out[mode] = {k: (v - clean["Bl64" if k == "RESCAN" else k])[:, inner] for k, v in img.items()}
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_independent_rescan_is_a_new_draw_at_the_same_level(noise_fields):
    n = noise_fields["independent"]
    shared = _corr(n["Bl64"], n["Br40"])
    assert shared > 0.6  # the two kernels of one scan share their noise
    assert abs(_corr(n["RESCAN"], n["Bl64"])) < 0.1 < shared
    assert abs(_corr(n["RESCAN"], n["Br40"])) < 0.1
    assert n["RESCAN"].std() == pytest.approx(n["Bl64"].std(), rel=0.05)


def test_split_rescan_keeps_what_br40_determines(noise_fields):
    n = noise_fields["split"]
    shared = _corr(n["Bl64"], n["Br40"])
    # as correlated with Br40 as Bl64 itself, but not Bl64's noise again
    assert _corr(n["RESCAN"], n["Br40"]) == pytest.approx(shared, abs=0.06)
    assert shared < _corr(n["RESCAN"], n["Bl64"]) < 0.98
    assert n["RESCAN"].std() == pytest.approx(n["Bl64"].std(), rel=0.05)


def test_unknown_rescan_mode_is_refused():
    with pytest.raises(ValueError, match="rescan_mode"):
        scanner.acquire(np.zeros((1, 16, 16), np.float32), PIX, np.random.default_rng(0), noise_br40_hu=10.0,
                        ir_strength=(0, 0), rescan_rng=np.random.default_rng(1), rescan_mode="other")

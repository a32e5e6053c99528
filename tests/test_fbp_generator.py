"""The second generator (projection, Poisson counts, FBP): CT numbers, noise level and order, rescan, determinism, files."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from ltdiff_core import measure as M
from ltdiff_core.dicomio import find_series, load_case
from ltdiff_core.phantom import fbp_generator as G
from ltdiff_core.phantom import generate
from ltdiff_train.make_phantom import case_seed, main

N, PIX, TARGET = 96, 0.7, 25.0


@pytest.fixture(scope="module")
def disc():
    """Noiseless and noisy scans (IR off) of a water disc, with the rescan."""
    yy, xx = np.indices((N, N)) - (N - 1) / 2
    truth = np.where(yy**2 + xx**2 < 42**2, 0.0, -1000.0).astype(np.float32)
    clean = G.scan_slice(truth, PIX, np.random.default_rng(0), noise_br40_hu=0.0, ir_strength=(0, 0))
    noisy = G.scan_slice(truth, PIX, np.random.default_rng(1), noise_br40_hu=TARGET, ir_strength=(0, 0),
                         rescan_rng=np.random.default_rng(2))
    noise = {k: v - clean["Bl64" if k == "RESCAN" else k] for k, v in noisy.items()}
    return clean, noise, yy**2 + xx**2 < 30**2


def test_ct_numbers_of_water_and_air(disc):
    clean, _, inner = disc
    for img in clean.values():
        assert abs(float(img[inner].mean())) < 5.0
        assert float(img[:4, :4].mean()) == pytest.approx(-1000.0, abs=5.0)


def test_smooth_noise_meets_the_target_and_sharp_is_noisier_at_higher_frequency(disc):
    _, noise, inner = disc
    smooth, sharp = noise["Br40"][inner].std(), noise["Bl64"][inner].std()
    assert smooth == pytest.approx(TARGET, rel=0.15)  # N0 is solved from the analytic FBP variance
    assert sharp > 2.0 * smooth
    peaks = {}
    for k in ("Br40", "Bl64"):
        rois = [noise[k][y:y + 24, x:x + 24] for y in (24, 36, 48) for x in (24, 36, 48)]
        f, nps = M.nps_radial(rois, PIX)
        peaks[k] = M.nps_peak_frequency(f, nps)
    assert peaks["Bl64"] > peaks["Br40"] + 1.0


def test_rescan_is_an_independent_poisson_draw(disc):
    _, noise, inner = disc
    corr = lambda a, b: float(np.corrcoef(noise[a][inner], noise[b][inner])[0, 1])  # noqa: E731
    assert corr("Bl64", "Br40") > 0.5
    assert abs(corr("RESCAN", "Bl64")) < 0.1
    assert noise["RESCAN"][inner].std() == pytest.approx(noise["Bl64"][inner].std(), rel=0.1)


def test_projector_integrates_a_disc():
    """Line integral through the centre of a uniform disc is its diameter times mu."""
    n = 64
    yy, xx = np.indices((n, n)) - (n - 1) / 2
    mu = np.where(yy**2 + xx**2 < 25**2, 0.02, 0.0)
    geo = G.Geometry(n, n, PIX, 36)
    p = G.project(mu, geo)
    centre = p[:, geo.n_det // 2 - 1: geo.n_det // 2 + 1].mean(axis=1)
    assert centre == pytest.approx(np.full(36, 50 * PIX * 0.02), rel=0.03)


def test_same_seed_same_case_and_rescan_leaves_the_pair_alone():
    a = generate("fbp", 7, 1, size=48)
    b = generate("fbp", 7, 1, size=48)
    c = generate("fbp", 7, 1, size=48, rescan=None)
    d = generate("fbp", 8, 1, size=48)
    scanner_case = generate("scanner", 7, 1, size=48)
    for k in ("br40", "bl64", "rescan", "truth"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert np.array_equal(a.br40, c.br40) and np.array_equal(a.bl64, c.bl64) and c.rescan is None
    assert not np.array_equal(a.br40, d.br40)
    assert not np.array_equal(a.truth, scanner_case.truth)  # its own seed stream, not the scanner's anatomy
    assert a.meta["generator"] == "fbp" and 15.0 <= a.meta["acquisition"]["noise_br40_hu"] <= 40.0
    with pytest.raises(ValueError, match="independent"):
        generate("fbp", 7, 1, size=48, rescan="split")


def test_written_like_the_scanner_cases(tmp_path, dciodvfy):
    assert main(["--out", str(tmp_path), "--generator", "fbp", "--seed", "3", "--cases", "1", "--slices", "2",
                 "--size", "64", "--thickness", "3"]) == 0
    case_dir = tmp_path / "case-000"
    assert {p.name for p in case_dir.iterdir()} == {"br40", "bl64", "rescan", "seg", "case.json"}
    loaded = load_case(case_dir)  # Br40/Bl64 prefixes select exactly one series each: RESCAN is not matched
    assert loaded.source.shape == (2, 64, 64) and loaded.spacing == pytest.approx((3.0, 0.7, 0.7))
    assert len(loaded.rois) == len(loaded.meta["tumour_info"]) >= 1
    assert all(r.any() for r in loaded.rois)
    assert loaded.meta["meta"]["generator"] == "fbp" and loaded.meta["meta"]["seed"] == case_seed(3, 0)
    rescan = load_case(case_dir, target_kernel="RESCAN")
    assert np.array_equal(rescan.source, loaded.source) and not np.array_equal(rescan.target, loaded.target)
    summary = json.loads((case_dir / "case.json").read_text())
    assert summary["rescan_kernel"] == "RESCAN" and set(summary["series_instance_uids"]) == {"Br40", "Bl64", "RESCAN"}
    groups = find_series(case_dir)
    assert len(groups) == 4
    for files in groups.values():
        assert dciodvfy(files[0]) == [], files[0]
    ds = pydicom.dcmread(sorted((case_dir / "rescan").iterdir())[0])
    assert ds.ConvolutionKernel == "RESCAN" and "independent Bl64" in ds.SeriesDescription and ds.SeriesNumber == 3

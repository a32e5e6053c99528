"""Training scripts end to end on tiny data: configs, checkpoints, resume, and a 2-process DDP step."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ltdiff_core import Standardizer
from ltdiff_train import fit_autoencoder, fit_diffusion, fit_direct, fit_linear
from ltdiff_train.common import ConfigError, load_config
from ltdiff_train.data import CropSampler, load_split

ROOT = Path(__file__).resolve().parents[1]
TINY_AE = """
[data]
cases = ["{cases}"]
crop = 32
batch = 2
val_cases = 1
[model]
features = [4, 8, 16]
latent_channels = [1, 2, 4]
[train]
steps = {steps}
threads = 1
log_every = 1
val_every = 2
save_every = 1
val_batches = 1
[output]
path = "{out}"
"""


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Three paired npz cases: a smooth source and a sharper, noisier target."""
    from scipy import ndimage

    root = tmp_path_factory.mktemp("cases")
    for i in range(3):
        rng = np.random.default_rng(i)
        base = np.where(np.hypot(*np.mgrid[-32:32, -32:32]) < 26, 40.0, -1000.0)[None].repeat(2, 0)
        noise = rng.normal(0, 60, base.shape)
        target = base + noise
        source = ndimage.gaussian_filter(target, (0, 1.2, 1.2))  # the smooth kernel blurs anatomy and noise alike
        np.savez(root / f"c{i}.npz", source=source.astype(np.float32), target=target.astype(np.float32),
                 spacing=np.array([1.5, 0.7, 0.7]))
    return root


def _ae_config(tmp: Path, cases: Path, steps: int = 3) -> Path:
    p = tmp / "ae.toml"
    p.write_text(TINY_AE.format(cases=cases.as_posix(), steps=steps, out=(tmp / "ae.safetensors").as_posix()))
    return p


def _diffusion_config(path: Path, cases: Path, autoencoder: Path, out: Path, steps: int,
                      extra: str = "", schedule: str = "") -> Path:
    """Tiny fit_diffusion config; ``extra`` adds [model] lines, ``schedule`` the [schedule] section."""
    path.write_text(f"""
[data]
cases = ["{cases.as_posix()}"]
crop = 32
batch = 2
stat_slices = 2
[model]
autoencoder = "{autoencoder.as_posix()}"
{extra}channels = [8, 8, 8]
norm_num_groups = 4
num_head_channels = 4
[schedule]
{schedule}[sampling]
default_steps = 2
strength = 0.5
[train]
steps = {steps}
threads = 1
log_every = 1
val_every = 1
val_batches = 1
[output]
path = "{out.as_posix()}"
""")
    return path


def test_config_errors_name_the_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nstep = 3\n")
    with pytest.raises(ConfigError, match="'train.step'"):
        load_config(p, fit_autoencoder.DEFAULTS)
    p.write_text("[train]\nsteps = 'many'\n")
    with pytest.raises(ConfigError, match="'train.steps' must be an integer"):
        load_config(p, fit_autoencoder.DEFAULTS)
    p.write_text("[optim]\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"\[optim\]"):
        load_config(p, fit_autoencoder.DEFAULTS)
    p.write_text("[train]\nlr = true\nsteps = 1.5\n[data]\ncases = 'x'\n")  # every error at once, no coercion
    with pytest.raises(ConfigError) as exc:
        load_config(p, fit_autoencoder.DEFAULTS)
    assert str(exc.value).splitlines() == ["config key 'data.cases' must be a list, got 'x'",
                                           "config key 'train.steps' must be an integer, got 1.5",
                                           "config key 'train.lr' must be a number, got True"]
    p.write_text("[train]\nlr = 1\n")
    assert load_config(p, fit_autoencoder.DEFAULTS)["train"]["lr"] == 1.0


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("train-*.toml")), ids=lambda p: p.name)
def test_shipped_training_configs_validate(path: Path) -> None:
    script = {"autoencoder": fit_autoencoder, "diffusion": fit_diffusion, "direct": fit_direct,
              "linear": fit_linear}[path.stem.split("-")[1]]
    cfg = load_config(path, script.DEFAULTS)
    assert set(cfg) == set(script.DEFAULTS) and all(set(cfg[s]) == set(script.DEFAULTS[s]) for s in cfg)


def test_split_is_by_case_and_crops_are_reproducible(cases):
    train, val = load_split([cases], 1)
    assert [v.name.split("/")[-1] for v in train] == ["c0", "c1"] and val[0].name.endswith("c2")
    s1, s2 = CropSampler(train, 32, 2, seed=0), CropSampler(train, 32, 2, seed=0, rank=1)
    np.testing.assert_array_equal(s1.paired(5)[0], CropSampler(train, 32, 2, seed=0).paired(5)[0])
    assert not np.array_equal(s1.paired(5)[0], s2.paired(5)[0])


def test_autoencoder_diffusion_pipeline_and_resume(tmp_path, cases):
    cfg = _ae_config(tmp_path, cases, steps=2)
    fit_autoencoder.main(["--config", str(cfg)])
    ae_path = tmp_path / "ae.safetensors"
    log = json.loads(ae_path.with_suffix(".log.json").read_text())
    assert [r["step"] for r in log["rows"]] == [1, 2] and "val_total" in log["rows"][-1]
    # resume to 4 steps continues at step 3 instead of restarting
    fit_autoencoder.main(["--config", str(cfg), "--resume", "--steps", "4"])
    log = json.loads(ae_path.with_suffix(".log.json").read_text())
    assert [r["step"] for r in log["rows"]] == [1, 2, 3, 4]
    assert "step,lr" in ae_path.with_suffix(".log.csv").read_text().splitlines()[0]

    diff_cfg = _diffusion_config(tmp_path / "diff.toml", cases, ae_path, tmp_path / "ltdiff.safetensors", steps=2)
    fit_diffusion.main(["--config", str(diff_cfg)])
    s = Standardizer.from_checkpoint(tmp_path / "ltdiff.safetensors", device="cpu")
    meta = s.ckpt.metadata
    assert meta["training"]["autoencoder"]["weights_sha256"] == json.loads(ae_path.with_suffix(".json").read_text())["weights_sha256"]
    assert len(meta["latent"]["scale"]) == s.inferer.scale.numel() and min(meta["latent"]["scale"]) > 0
    out = s.standardize(np.zeros((1, 50, 40), np.float32) - 500, (1.5, 0.7, 0.7))
    assert out.shape == (1, 50, 40) and np.isfinite(out).all()


def test_direct_and_linear_scripts(tmp_path, cases):
    p = tmp_path / "direct.toml"
    p.write_text(f"""
[data]
cases = ["{cases.as_posix()}"]
crop = 32
batch = 2
[model]
features = [4, 4, 8, 8, 16, 4]
[train]
steps = 1
threads = 1
log_every = 1
val_batches = 1
[output]
path = "{(tmp_path / 'direct.safetensors').as_posix()}"
""")
    fit_direct.main(["--config", str(p)])
    assert Standardizer.from_checkpoint(tmp_path / "direct.safetensors", device="cpu").info.method == "direct"
    fit_linear.main(["--config", str(ROOT / "conf/train-linear.toml"), "--cases", str(cases),
                     "--out", str(tmp_path / "linear.safetensors")])
    lin = Standardizer.from_checkpoint(tmp_path / "linear.safetensors")
    m = lin.ckpt.metadata["metrics"]["linear"]
    assert m["val_rmse_hu_filter"] < m["val_rmse_hu_identity"]
    # the QA envelope of the training data (train + validation cases) is written with the checkpoint
    from ltdiff_core import qa

    env = qa.envelope_of(lin.ckpt.metadata)
    assert env is not None and env["series"] == 3 and env["source"]["kernel"] == "Br40"
    assert env["source"]["measures"]["pixel_spacing_mm"]["n"] == 3


def test_ddp_two_processes_end_with_identical_weights(tmp_path, cases):
    cfg = _ae_config(tmp_path, cases, steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # ``python -m torch.distributed.run`` is the ``torchrun`` console script
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ltdiff_train.fit_autoencoder",
                           "--config", str(cfg)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "ae.json").read_text())
    digests = meta["training"]["rank_weight_digests"]
    assert meta["training"]["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    # the two ranks drew different crops, so the averaged step differs from a single-process step
    single = tmp_path / "single"
    single.mkdir()
    fit_autoencoder.main(["--config", str(_ae_config(single, cases, steps=1))])
    assert json.loads((single / "ae.json").read_text())["training"]["rank_weight_digests"][0] != digests[0]


def test_first_guess_diffusion_embeds_the_linear_filter(tmp_path, cases):
    fit_autoencoder.main(["--config", str(_ae_config(tmp_path, cases, steps=1))])
    lin_path = tmp_path / "linear.safetensors"
    fit_linear.main(["--config", str(ROOT / "conf/train-linear.toml"), "--cases", str(cases), "--out", str(lin_path)])
    cfg = _diffusion_config(tmp_path / "diff-fg.toml", cases, Path("does-not-exist.safetensors"),
                            tmp_path / "ltdiff-fg.safetensors", steps=1,
                            extra='linear = "does-not-exist.safetensors"\n',
                            schedule='parameterization = "first_guess"\ndecoding = "delta"\n')
    # the command-line paths override the config's
    fit_diffusion.main(["--config", str(cfg), "--autoencoder", str(tmp_path / "ae.safetensors"),
                        "--linear", str(lin_path)])
    lin_path.unlink()  # the ltdiff checkpoint must be self-contained
    s = Standardizer.from_checkpoint(tmp_path / "ltdiff-fg.safetensors", device="cpu")
    meta = s.ckpt.metadata
    assert meta["scheduler"]["parameterization"] == "first_guess" and meta["scheduler"]["decoding"] == "delta"
    # validation samples like inference does, besides the teacher-forced losses
    assert math.isfinite(meta["metrics"]["diffusion"]["val_sampled_image"]) and meta["metrics"]["diffusion"]["val_sampled_image"] > 0
    assert meta["networks"]["denoiser"]["config"]["cond_dim"] == 2 * s.inferer.scale.numel()
    assert meta["first_guess"]["weights_sha256"] == json.loads(lin_path.with_suffix(".json").read_text())["weights_sha256"]
    assert s.first_guess is not None and s.first_guess.h_real.size > 10
    out = s.standardize(np.zeros((1, 50, 40), np.float32) - 500, (1.5, 0.7, 0.7))
    assert out.shape == (1, 50, 40) and np.isfinite(out).all()


def test_init_fine_tunes_an_existing_denoiser_in_its_own_latent(tmp_path, cases):
    """--init starts from the given checkpoint's denoiser and keeps its latent statistics, even on
    other data (a generator mix), and refuses a checkpoint made on another autoencoder."""
    from ltdiff_core.checkpoint import load_checkpoint

    fit_autoencoder.main(["--config", str(_ae_config(tmp_path, cases, steps=1))])
    ae = tmp_path / "ae.safetensors"
    first = tmp_path / "first.safetensors"
    fit_diffusion.main(["--config", str(_diffusion_config(tmp_path / "a.toml", cases, ae, first, steps=1))])
    # other data: the same anatomy with twice the target noise, so recomputed statistics would differ
    other = tmp_path / "other"
    other.mkdir()
    for f in sorted(cases.glob("*.npz")):
        with np.load(f) as d:
            np.savez(other / f.name, source=d["source"], target=d["source"] + 2 * (d["target"] - d["source"]),
                     spacing=d["spacing"])
    frozen = _diffusion_config(tmp_path / "b.toml", other, ae, tmp_path / "frozen.safetensors", steps=1)
    frozen.write_text(frozen.read_text().replace("[train]\n", "[train]\nlr = 0.0\n"))
    fit_diffusion.main(["--config", str(frozen), "--init", str(first)])
    a, b = load_checkpoint(first), load_checkpoint(tmp_path / "frozen.safetensors")
    for k in a.prefixed("denoiser"):  # lr 0: the fine-tune starts, and stays, at the given weights
        np.testing.assert_array_equal(a.tensors[f"denoiser.{k}"], b.tensors[f"denoiser.{k}"])
    for k in ("shift", "scale", "residual_scale"):
        np.testing.assert_array_equal(a.tensors[f"latent.{k}"], b.tensors[f"latent.{k}"])
    assert b.metadata["training"]["init"]["weights_sha256"] == a.metadata["weights_sha256"]
    fresh = tmp_path / "fresh.safetensors"
    fit_diffusion.main(["--config", str(_diffusion_config(tmp_path / "c.toml", other, ae, fresh, steps=1))])
    assert not np.array_equal(load_checkpoint(fresh).tensors["latent.residual_scale"], a.tensors["latent.residual_scale"])
    moved = tmp_path / "moved.safetensors"
    fit_diffusion.main(["--config", str(_diffusion_config(tmp_path / "d.toml", other, ae, moved, steps=2)),
                        "--init", str(first)])
    assert load_checkpoint(moved).metadata["weights_sha256"] != a.metadata["weights_sha256"]
    # a checkpoint made on another autoencoder: its latent means something else
    ae2_dir = tmp_path / "ae2"
    ae2_dir.mkdir()
    fit_autoencoder.main(["--config", str(_ae_config(ae2_dir, cases, steps=2))])
    with pytest.raises(SystemExit, match="another autoencoder"):
        fit_diffusion.main(["--config", str(frozen), "--autoencoder", str(ae2_dir / "ae.safetensors"),
                            "--init", str(first)])
    with pytest.raises(SystemExit, match="latent diffusion"):
        fit_diffusion.main(["--config", str(frozen), "--init", str(ae)])


def test_latent_cache_crops_whole_slice_latents_reproducibly():
    """The cache encodes each slice once and crops latents at body-biased places from (seed, step)."""
    import torch

    from ltdiff_train.data import LatentCache, PairedVolume

    rng = np.random.default_rng(0)
    src = rng.normal(0, 0.05, (2, 64, 64)).astype(np.float32) - 1.0
    src[:, 16:48, 16:48] += 1.0  # "body"
    vol = PairedVolume("v", src, src + 0.01, (1.0, 0.7, 0.7), guide=src * 0.5)
    calls = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return torch.nn.functional.avg_pool2d(x, 4).repeat(1, 3, 1, 1)

    cache = LatentCache([vol], encode, factor=4, crop=32, batch=5, seed=1, first_guess=True)
    assert len(cache) == 2 and len(calls) == 6  # A, G, B of each slice, once
    za, zg, zb = cache.batch_at(3)
    assert za.shape == zg.shape == zb.shape == (5, 3, 8, 8)
    assert torch.allclose(zb - za, torch.full_like(za, 0.01), atol=1e-5)  # same place in A and B
    again = cache.batch_at(3)
    assert torch.equal(again[0], za) and not torch.equal(cache.batch_at(4)[0], za)
    with pytest.raises(ValueError, match="multiple"):
        LatentCache([vol], encode, factor=4, crop=30, batch=1, seed=0)


def test_calibrate_gain_brings_the_drawn_residual_to_the_true_power(tmp_path):
    """The calibration writes sampling.residual_gain so that the drawn correction's power matches the
    true residual's on the given slices, leaves the tensors alone, and refuses other checkpoints."""
    from test_standardizer import _first_guess_ckpt

    from ltdiff_core.checkpoint import CheckpointError, load_checkpoint
    from ltdiff_train import calibrate_gain

    ck = _first_guess_ckpt(tmp_path / "fg.safetensors", decoding="delta")
    rng = np.random.default_rng(0)
    from test_standardizer import _test_filter

    a = rng.normal(40, 20, (2, 48, 48)).astype(np.float32)
    b = _test_filter().apply(a, (0.7, 0.7)) + rng.normal(0, 0.3, a.shape).astype(np.float32)  # G(A) + small residual
    np.savez(tmp_path / "case.npz", source=a, target=b, spacing=np.array([1.0, 0.7, 0.7]))
    before = load_checkpoint(ck)
    res = calibrate_gain.calibrate(ck, [str(tmp_path / "case.npz")], n_slices=2, rounds=3)
    after = load_checkpoint(ck)
    assert after.metadata["weights_sha256"] == before.metadata["weights_sha256"]
    gain = after.metadata["sampling"]["residual_gain"]
    assert gain == res["residual_gain"] and gain != 1.0
    best = min(res["rounds"], key=lambda r: abs(np.log(r["residual_power"])))
    assert best["gain"] == gain and abs(best["residual_power"] - 1) < 0.2, res["rounds"]
    assert abs(np.log(res["rounds"][0]["residual_power"])) > abs(np.log(best["residual_power"]))
    with pytest.raises(CheckpointError, match="first-guess"):
        calibrate_gain.calibrate(default_checkpoint_path("linear"), [str(tmp_path / "case.npz")])


def default_checkpoint_path(name: str):
    from ltdiff_core.weights import default_checkpoint

    return default_checkpoint(name)

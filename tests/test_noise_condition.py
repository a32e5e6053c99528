"""The input-noise condition of the latent denoiser: descriptors, training, inference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from ltdiff_core import Standardizer
from ltdiff_core import noise_condition as nc
from ltdiff_core.nets import ConditionalDenoiser, DenoiserConfig


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _tissue(noise_hu: float, seed: int = 0, blur_px: float = 0.0, size: int = 128) -> np.ndarray:
    """A soft-tissue disc in air with white (or blurred, IR-like) noise of the given std."""
    rng = np.random.default_rng(seed)
    disc = np.hypot(*np.mgrid[-size // 2:size // 2, -size // 2:size // 2]) < size * 0.42
    noise = rng.normal(0.0, 1.0, (size, size))
    if blur_px:
        noise = ndimage.gaussian_filter(noise, blur_px)
    noise *= noise_hu / noise[disc].std()
    return np.where(disc, 40.0 + noise, -1000.0)


def test_descriptors_follow_noise_level_and_spectrum():
    """Twice the noise moves only the level by log 2; a blurred (IR-like) noise moves the band ratio;
    a slice without soft tissue has none, and standardising gives the training mean for it."""
    a, b = nc.describe_slice(_tissue(10.0)), nc.describe_slice(_tissue(20.0))
    assert b[0] - a[0] == pytest.approx(np.log(2.0), abs=0.08)
    np.testing.assert_allclose(a[1:], b[1:], atol=0.08)
    smooth = nc.describe_slice(_tissue(20.0, blur_px=1.0))
    assert smooth[1] < a[1] - 1.0  # far less power in the finest band
    air = nc.describe_slice(np.full((64, 64), -1000.0))
    assert np.isnan(air).all()
    shift, scale = nc.statistics(np.stack([a, b, smooth, air]))  # the air slice is ignored
    z = nc.standardise(np.stack([air, a, b * 100]), shift, scale)
    np.testing.assert_array_equal(z[0], 0.0)
    assert np.abs(z).max() <= nc.CLIP and z.dtype == np.float32
    with pytest.raises(ValueError, match="flat soft tissue"):
        nc.statistics(np.stack([air, air]))


def test_zero_initialised_embedding_keeps_the_function_until_trained():
    """A denoiser continued with the condition starts as the one without it; once the embedding has
    weights, the descriptors change its output, on the training and the split inference path alike."""
    from ltdiff_train.fit_diffusion import with_noise_condition

    torch.manual_seed(0)
    cfg = DenoiserConfig(latent_dim=4, cond_dim=8, channels=(8, 8), attention_levels=(False, False),
                         norm_num_groups=4, num_head_channels=4)
    plain = ConditionalDenoiser(cfg).eval()
    for prm in plain.parameters():  # MONAI zero-initialises output layers (a fresh net ignores t): give it weights
        torch.nn.init.normal_(prm, std=0.2)
    cond = with_noise_condition(plain, 3).eval()
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    spatial = torch.randn(2, 8, 8, 8)
    d1 = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    planes = lambda d: torch.cat([spatial, d[:, :, None, None].expand(-1, -1, 8, 8)], 1)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(cond(z, t, planes(d1)), plain(z, t, spatial))
        torch.nn.init.normal_(cond.noise_embed[2].weight, std=0.5)
        a, b = cond(z, t, planes(d1)), cond(z, t, planes(-d1))
    assert (a - b).abs().max() > 1e-3
    with torch.inference_mode():  # split path (condition features reused across steps)
        torch.testing.assert_close(cond(z, t, planes(d1)), a)
    with pytest.raises(SystemExit, match="takes 3"):
        with_noise_condition(cond, 2)


def test_noise_conditioned_checkpoint_trains_and_runs_per_slice(tmp_path):
    """fit_diffusion --init with model.noise_condition stores the descriptor statistics; the
    Standardizer measures each slice on its own, so a slice gives the same pixels alone or in a volume."""
    from test_training import _ae_config, _diffusion_config

    from ltdiff_core.checkpoint import load_checkpoint
    from ltdiff_train import fit_autoencoder, fit_diffusion, fit_linear

    cases = tmp_path / "cases"
    cases.mkdir()
    for i in range(3):
        src = np.stack([_tissue(12.0 + 4 * i + z, seed=10 * i + z, blur_px=0.8, size=64) for z in range(2)])
        tgt = src + np.stack([_tissue(25.0, seed=100 + 10 * i + z, size=64) for z in range(2)]) - src.clip(-1000, 40)
        np.savez(cases / f"c{i}.npz", source=src.astype(np.float32), target=tgt.astype(np.float32),
                 spacing=np.array([1.5, 0.7, 0.7]))
    fit_autoencoder.main(["--config", str(_ae_config(tmp_path, cases, steps=1))])
    ae, lin = tmp_path / "ae.safetensors", tmp_path / "linear.safetensors"
    fit_linear.main(["--config", str(Path(__file__).resolve().parents[1] / "conf/train-linear.toml"),
                     "--cases", str(cases), "--out", str(lin)])
    schedule = 'parameterization = "first_guess"\ndecoding = "delta"\n'
    first = tmp_path / "first.safetensors"
    fit_diffusion.main(["--config", str(_diffusion_config(tmp_path / "a.toml", cases, ae, first, steps=1,
                                                          schedule=schedule)), "--linear", str(lin)])
    cfg = _diffusion_config(tmp_path / "b.toml", cases, ae, tmp_path / "noise.safetensors", steps=2,
                            extra="noise_condition = true\n", schedule=schedule)
    with pytest.raises(SystemExit, match="latent_cache"):
        fit_diffusion.main(["--config", str(cfg), "--linear", str(lin), "--init", str(first)])
    cfg.write_text(cfg.read_text().replace("[train]\n", "[train]\nlatent_cache = true\n")
                   .replace("[data]\n", "[data]\nval_cases = 1\n").replace("[sampling]\n", "[loss]\nimage = 0.0\n[sampling]\n"))
    fit_diffusion.main(["--config", str(cfg), "--linear", str(lin), "--init", str(first)])
    ck = load_checkpoint(tmp_path / "noise.safetensors")
    assert ck.metadata["networks"]["denoiser"]["config"]["noise_dim"] == len(nc.NAMES)
    assert ck.metadata["noise_condition"]["descriptors"] == list(nc.NAMES)
    assert np.all(ck.tensors["noise_condition.scale"] > 0)
    assert any(k.startswith("denoiser.noise_embed.") for k in ck.tensors)
    s = Standardizer.from_checkpoint(tmp_path / "noise.safetensors", device="cpu")
    vol = np.stack([_tissue(15.0, seed=7, size=64), _tissue(30.0, seed=8, size=64)]).astype(np.float32)
    keys = [11, 12]
    whole = s.standardize(vol, (1.5, 0.7, 0.7), slice_keys=keys)
    alone = s.standardize(vol[1:], (1.5, 0.7, 0.7), slice_keys=keys[1:])
    np.testing.assert_array_equal(whole[1], alone[0])
    assert np.isfinite(whole).all()


def test_onnx_runtime_refuses_a_noise_conditioned_denoiser():
    """The exported step graph has no descriptor input: refusing beats silently dropping the condition."""
    pytest.importorskip("onnxruntime")
    from ltdiff_core.onnx_runtime import onnx_networks

    den = ConditionalDenoiser(DenoiserConfig(latent_dim=4, cond_dim=8, channels=(8, 8), attention_levels=(False, False),
                                             norm_num_groups=4, num_head_channels=4, noise_dim=3))
    with pytest.raises(RuntimeError, match="noise descriptors"):
        onnx_networks({"denoiser": den}, "0" * 64)


def test_target_noise_measures_k_and_explains_it_by_the_ir_levels(tmp_path):
    """On phantom cases the target's noise level relative to the first guess (k) varies per case
    and the two series' IR levels (case metadata) explain it; the input's descriptors are finite."""
    import json
    import subprocess
    import sys

    from ltdiff_train import target_noise

    subprocess.run([sys.executable, "-m", "ltdiff_train.make_phantom", "--out", str(tmp_path / "cases"), "--cases", "6",
                    "--slices", "1", "--seed", "4343", "--size", "256", "--no-rescan"],
                   check=True, capture_output=True, timeout=600)
    out = tmp_path / "tn.json"
    assert target_noise.main(["--cases", str(tmp_path / "cases"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    ks = [r["k"] for r in res["rows"]]
    assert len(ks) == 6 and min(ks) > 0.3 and max(ks) / min(ks) > 1.1, ks
    assert all(np.isfinite([r["band_hi_mid"], r["band_mid_lo"], r["input_noise_hu"]]).all() for r in res["rows"])
    assert res["fits"]["log_k~ir_source+ir_target"] > 0.8, res["fits"]

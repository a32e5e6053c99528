"""Standardizer: any size in, same size out, determinism, batching invariance, all methods."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ltdiff_core import Standardizer
from ltdiff_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, state_dict_to_numpy
from ltdiff_core.diffusion import ScheduleConfig
from ltdiff_core.linear_filter import LinearKernelFilter
from ltdiff_core.nets import ConditionalDenoiser, DenoiserConfig, DirectUNetPlusPlus
from ltdiff_core.normalize import NORMALIZATION
from ltdiff_core.tiling import pad_to_multiple, run_tiled
from ltdiff_core.weights import default_checkpoint
from test_checkpoint import tiny_latent_checkpoint


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory) -> Path:
    return tiny_latent_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors")


def _direct_ckpt(path: Path) -> Path:
    torch.manual_seed(0)
    net = DirectUNetPlusPlus({"features": [4, 4, 8, 8, 16, 4]})
    meta = {"name": "d", "version": "0", "method": "direct",
            "networks": {"direct": {"kind": "direct", "config": net.config.to_dict()}}, "normalization": NORMALIZATION}
    save_checkpoint(path, state_dict_to_numpy(net.state_dict(), "direct"), meta)
    return path


def _linear_ckpt(path: Path) -> Path:
    f = np.linspace(0, 10, 101)
    filt = LinearKernelFilter(f, 1 + 0.1 * f, np.zeros_like(f), np.full_like(f, 50.0))
    save_checkpoint(path, filt.to_tensors(), {"name": "l", "version": "0", "method": "linear", "networks": {},
                                              "normalization": NORMALIZATION})
    return path


def _volume(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 30, shape) + np.linspace(-900, 100, shape[-1])).astype(np.float32)


@pytest.mark.parametrize("variant", ["diffusion", "autoencoder"])
@pytest.mark.parametrize("shape", [(2, 70, 90), (33, 17), (1, 64, 64)])
def test_shapes_any_size(latent_ckpt, variant, shape):
    s = Standardizer.from_checkpoint(latent_ckpt, device="cpu", variant=variant)
    spacing = (0.7, 0.7) if len(shape) == 2 else (1.5, 0.7, 0.7)
    out = s.standardize(_volume(shape), spacing)
    assert out.shape == shape and out.dtype == np.float32 and np.isfinite(out).all()


def test_deterministic_per_seed_and_batching_invariant(latent_ckpt):
    vol = _volume((3, 40, 48))
    s = Standardizer.from_checkpoint(latent_ckpt, device="cpu")
    a = s.standardize(vol, (1, 0.7, 0.7), seed=3)
    b = Standardizer.from_checkpoint(latent_ckpt, device="cpu", max_batch_pixels=40 * 48).standardize(
        vol, (1, 0.7, 0.7), seed=3)
    c = s.standardize(vol, (1, 0.7, 0.7), seed=4)
    np.testing.assert_allclose(a, b, atol=1e-3)
    assert np.abs(a - c).max() > 1e-3
    np.testing.assert_array_equal(a, s.standardize(vol, (1, 0.7, 0.7), seed=3))


def test_batch_of_volumes_equals_single_calls_and_reports_progress(latent_ckpt):
    s = Standardizer.from_checkpoint(latent_ckpt, device="cpu")
    v1, v2 = _volume((2, 32, 32), 1), _volume((3, 48, 40), 2)
    calls: list[tuple[int, int]] = []
    o1, o2 = s.standardize_batch([v1, v2], [(1, .7, .7), (1, .7, .7)], seed=5, progress=lambda d, n: calls.append((d, n)))
    np.testing.assert_allclose(o1, s.standardize(v1, (1, .7, .7), seed=5), atol=1e-3)
    np.testing.assert_allclose(o2, s.standardize(v2, (1, .7, .7), seed=5), atol=1e-3)
    assert calls[-1] == (5, 5) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_steps_parameter_changes_output(latent_ckpt):
    s = Standardizer.from_checkpoint(latent_ckpt, device="cpu")
    vol = _volume((1, 32, 32))
    assert np.abs(s.standardize(vol, (1, .7, .7), steps=1) - s.standardize(vol, (1, .7, .7), steps=3)).max() > 1e-4


def test_info_and_bad_variant(latent_ckpt):
    s = Standardizer.from_checkpoint(latent_ckpt, device="cpu")
    info = s.info
    assert info.method == "latent_diffusion" and info.variant == "diffusion" and info.default_steps == 2
    assert len(info.sha256) == 64
    with pytest.raises(ValueError, match="variant .linear. not available"):
        Standardizer.from_checkpoint(latent_ckpt, device="cpu", variant="linear")


def test_direct_and_linear_methods(tmp_path):
    d = Standardizer.from_checkpoint(_direct_ckpt(tmp_path / "d.safetensors"), device="cpu")
    assert d.standardize(_volume((2, 70, 90)), (1, .7, .7)).shape == (2, 70, 90)
    lin = Standardizer.from_checkpoint(_linear_ckpt(tmp_path / "l.safetensors"))
    vol = _volume((2, 70, 90))
    out = lin.standardize(vol, (1, .7, .7))
    assert out.shape == vol.shape and lin.info.variant == "linear"
    noisy = Standardizer.from_checkpoint(tmp_path / "l.safetensors", variant="linear+noise")
    n1, n2 = noisy.standardize(vol, (1, .7, .7), seed=1), noisy.standardize(vol, (1, .7, .7), seed=2)
    np.testing.assert_array_equal(n1, noisy.standardize(vol, (1, .7, .7), seed=1))
    assert np.abs(n1 - n2).max() > 1 and np.abs(n1 - out).std() > 1


def test_other_pixel_spacing_is_resampled_for_networks(latent_ckpt, caplog):
    """A 2 mm series runs on the model's 0.7 mm grid and comes back on its own grid (no warning)."""
    s = Standardizer.from_checkpoint(latent_ckpt, device="cpu", variant="autoencoder")
    out = s.standardize(_volume((1, 32, 32)), (1, 2.0, 2.0))
    assert out.shape == (1, 32, 32) and np.isfinite(out).all()
    assert "differs from the training spacing" not in caplog.text


def test_tiles_blend_without_seams():
    img = np.random.default_rng(0).normal(size=(2, 100, 130)).astype(np.float32)
    np.testing.assert_allclose(run_tiled(img, lambda t, y, x: t, 48, 16), img, atol=1e-5)
    smooth = lambda t, y, x: (t + np.roll(t, 1, -1) + np.roll(t, -1, -1)) / 3  # noqa: E731
    tiled, full = run_tiled(img, smooth, 48, 16), smooth(img, 0, 0)
    err = np.abs(tiled - full)[..., 1:-1]
    # a tile's wrong border pixels only enter with the ramp's smallest weight
    assert err.max() < 0.1 and err.mean() < 0.005


def test_tiled_standardize_matches_shape(latent_ckpt):
    s = Standardizer.from_checkpoint(latent_ckpt, device="cpu", variant="autoencoder", tile_size=48, tile_overlap=16)
    out = s.standardize(_volume((1, 100, 70)), (1, .7, .7))
    assert out.shape == (1, 100, 70) and np.isfinite(out).all()


def test_pad_to_multiple_crops_back():
    img = np.arange(7 * 9, dtype=np.float32).reshape(7, 9)
    padded, crop = pad_to_multiple(img, 4, extra=2)
    assert padded.shape[0] % 4 == 0 and padded.shape[1] % 4 == 0 and padded.shape[0] >= 11
    np.testing.assert_array_equal(padded[crop], img)


def test_package_import_is_cheap_and_default_paths():
    code = "import sys, ltdiff_core; assert 'torch' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    for name in ("ltdiff", "linear", "direct"):
        assert default_checkpoint(name).name == f"{name}.safetensors"
    with pytest.raises(ValueError):
        default_checkpoint("gan")


def test_autoencoder_only_checkpoint_runs_reconstruction(tmp_path):
    from ltdiff_core.checkpoint import load_checkpoint

    ck = load_checkpoint(tiny_latent_checkpoint(tmp_path / "full.safetensors"))
    meta = dict(ck.metadata)
    meta["networks"] = {"autoencoder": meta["networks"]["autoencoder"]}
    tensors = {k: v for k, v in ck.tensors.items() if k.startswith("autoencoder.")}
    save_checkpoint(tmp_path / "ae.safetensors", tensors, meta)
    s = Standardizer.from_checkpoint(tmp_path / "ae.safetensors", device="cpu")
    assert s.variant == "autoencoder"
    assert s.standardize(_volume((1, 30, 50)), (1, .7, .7)).shape == (1, 30, 50)
    with pytest.raises(ValueError, match="not available"):
        Standardizer.from_checkpoint(tmp_path / "ae.safetensors", device="cpu", variant="diffusion")


def test_default_resolves_to_the_declared_default_checkpoint():
    """``None`` and ``"default"`` mean ltdiff_core.weights.DEFAULT everywhere (library, CLI, rules)."""
    from ltdiff_core.weights import DEFAULT, NAMES, resolve_model

    assert DEFAULT in NAMES
    assert resolve_model(None) == resolve_model("default") == default_checkpoint(DEFAULT) == default_checkpoint()
    assert Standardizer.from_checkpoint(None, device="cpu").ckpt.path.resolve() == default_checkpoint(DEFAULT).resolve()
    assert resolve_model("runs/x.safetensors") == Path("runs/x.safetensors")


@pytest.mark.parametrize("name", ["ltdiff", "linear", "direct"])
def test_each_method_is_a_registered_class_behind_the_model_seam(name):
    """A checkpoint loads as the class registered for its method, which implements KernelModel;
    its ModelInfo carries the training facts the node checks (pixel spacing, kernel pair)."""
    from ltdiff_core.kernel_model import KernelModel
    from ltdiff_core.standardizer import METHODS, model_class

    ckpt = load_checkpoint(default_checkpoint(name))
    s = Standardizer(ckpt, device="cpu")  # the base class builds the method's class, as from_checkpoint does
    assert type(s) is METHODS[ckpt.metadata["method"]] and isinstance(s, KernelModel)
    assert s.info.training_pixel_mm == 0.7 and s.info.kernels == (("Br40", "Bl64"),)
    assert s.qa_envelope() is not None and s.supported_geometry()["pixel_spacing_mm"]["lo"] == pytest.approx(0.49)
    other = next(cls for method, cls in METHODS.items() if method != ckpt.metadata["method"])
    with pytest.raises(CheckpointError, match="is not run by"):
        other(ckpt, device="cpu")
    with pytest.raises(CheckpointError, match="no model class"):
        model_class("not-a-method")


@pytest.mark.parametrize("name", ["ltdiff", "linear", "direct"])
def test_shipped_default_weights_load_and_run(name):
    s = Standardizer.from_checkpoint(name, device="cpu")  # a shipped name resolves like its path
    assert s.ckpt.path.resolve() == default_checkpoint(name).resolve()
    info = s.info
    assert info.method == {"ltdiff": "latent_diffusion", "linear": "linear", "direct": "direct"}[name]
    assert s.ckpt.metadata["training"]["command"].startswith("python -m train.fit_")
    vol = _volume((1, 40, 56))
    out = s.standardize(vol, (1.5, 0.7, 0.7))
    assert out.shape == vol.shape and np.isfinite(out).all() and np.abs(out - vol).max() > 0.1


def _test_filter(gain: float = 0.1) -> LinearKernelFilter:
    f = np.linspace(0, 10, 101)
    return LinearKernelFilter(f, 1 + gain * f, np.zeros_like(f), np.zeros_like(f))


def _first_guess_ckpt(path: Path, gain: float = 0.1, embed: bool = True, decoding: str = "full") -> Path:
    """Tiny first_guess checkpoint: denoiser conditioned on [Z_A, Z_G], linear filter embedded."""
    base = load_checkpoint(tiny_latent_checkpoint(path.with_name(path.stem + "-base.safetensors")))
    torch.manual_seed(1)
    ae_meta = base.metadata["networks"]["autoencoder"]
    latent_dim = int(np.asarray(base.tensors["latent.shift"]).shape[0])
    den_cfg = DenoiserConfig(latent_dim=latent_dim, channels=(8, 8, 8), norm_num_groups=4, num_head_channels=4,
                             cond_dim=2 * latent_dim)
    den = ConditionalDenoiser(den_cfg)
    tensors = {k: v for k, v in base.tensors.items() if not k.startswith("denoiser.")}
    tensors.update(state_dict_to_numpy(den.state_dict(), "denoiser"))
    if embed:
        tensors.update(_test_filter(gain).to_tensors("first_guess"))
    meta = {k: v for k, v in base.metadata.items() if k not in ("weights_sha256", "format", "format_version")}
    meta["networks"] = {"autoencoder": ae_meta, "denoiser": {"kind": "denoiser", "config": den_cfg.to_dict()}}
    meta["scheduler"] = ScheduleConfig(parameterization="first_guess", decoding=decoding).to_dict()
    meta["first_guess"] = {"method": "linear", "prefix": "first_guess"}
    save_checkpoint(path, tensors, meta)
    return path


@pytest.fixture(scope="module")
def fg_ckpt(tmp_path_factory) -> Path:
    return _first_guess_ckpt(tmp_path_factory.mktemp("fg") / "fg.safetensors")


@pytest.mark.parametrize("shape", [(2, 70, 90), (33, 17)])
def test_first_guess_shapes_and_determinism(fg_ckpt, shape):
    s = Standardizer.from_checkpoint(fg_ckpt, device="cpu")
    assert s.first_guess is not None
    spacing = (0.7, 0.7) if len(shape) == 2 else (1.5, 0.7, 0.7)
    vol = _volume(shape)
    a = s.standardize(vol, spacing, seed=3)
    assert a.shape == shape and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, s.standardize(vol, spacing, seed=3))
    assert np.abs(a - s.standardize(vol, spacing, seed=4)).max() > 1e-3


def test_first_guess_filter_round_trip_and_use(fg_ckpt, tmp_path):
    s = Standardizer.from_checkpoint(fg_ckpt, device="cpu")
    ref = _test_filter()
    np.testing.assert_allclose(s.first_guess.h_real, ref.h_real, rtol=1e-6)
    np.testing.assert_allclose(s.first_guess.freq_lpcm, ref.freq_lpcm, rtol=1e-6)
    vol = _volume((1, 40, 48))
    other = Standardizer.from_checkpoint(_first_guess_ckpt(tmp_path / "fg2.safetensors", gain=0.5), device="cpu")
    # same networks, different embedded filter -> different output: the first guess is used
    assert np.abs(s.standardize(vol, (1, .7, .7)) - other.standardize(vol, (1, .7, .7))).max() > 1e-3


def test_delta_decoding_keeps_the_first_guess_when_the_residual_is_small(tmp_path):
    """Near-zero residual: "delta" returns about G(A); "full" returns D(E(G(A))), far off when untrained."""
    vol = _volume((1, 40, 48))
    g = _test_filter().apply(vol[0], (0.7, 0.7))
    out = {}
    for decoding in ("full", "delta"):
        ckpt = _first_guess_ckpt(tmp_path / f"{decoding}.safetensors", decoding=decoding)
        s = Standardizer.from_checkpoint(ckpt, device="cpu", strength=0.005)
        out[decoding] = s.standardize(vol, (1, .7, .7), steps=1)[0]
    err = {k: float(np.abs(v - g).mean()) for k, v in out.items()}
    assert err["delta"] < 0.2 * err["full"], err


def test_first_guess_tiled_matches_shape(fg_ckpt):
    s = Standardizer.from_checkpoint(fg_ckpt, device="cpu", tile_size=48, tile_overlap=16)
    out = s.standardize(_volume((1, 100, 70)), (1, .7, .7))
    assert out.shape == (1, 100, 70) and np.isfinite(out).all()


def test_first_guess_without_embedded_filter_is_refused(tmp_path):
    p = _first_guess_ckpt(tmp_path / "nofilter.safetensors", embed=False)
    with pytest.raises(CheckpointError, match="embedded linear filter"):
        Standardizer.from_checkpoint(p, device="cpu")
    # the autoencoder variant does not need the filter
    assert Standardizer.from_checkpoint(p, device="cpu", variant="autoencoder").variant == "autoencoder"


def test_strength_override_changes_output(latent_ckpt):
    vol = _volume((1, 32, 32))
    a = Standardizer.from_checkpoint(latent_ckpt, device="cpu").standardize(vol, (1, .7, .7))
    s = Standardizer.from_checkpoint(latent_ckpt, device="cpu", strength=0.2)
    assert s.info.strength == 0.2
    assert np.abs(a - s.standardize(vol, (1, .7, .7))).max() > 1e-4


def test_stochastic_sampling_is_per_slice_deterministic_and_draws_fresh_noise(tmp_path):
    """eta > 0: each step draws from the slice's own generator, so results do not depend on batching,
    repeat exactly for a seed, and differ from deterministic sampling of the same start noise."""
    p = _first_guess_ckpt(tmp_path / "eta.safetensors", decoding="delta")
    ck = load_checkpoint(p)
    meta = {k: v for k, v in ck.metadata.items() if k not in ("weights_sha256", "format", "format_version")}
    meta["sampling"] = {"default_steps": 4, "strength": 1.0, "eta": 1.0}
    save_checkpoint(tmp_path / "eta1.safetensors", dict(ck.tensors), meta)
    meta["sampling"] = {"default_steps": 4, "strength": 1.0, "eta": 0.0}
    save_checkpoint(tmp_path / "eta0.safetensors", dict(ck.tensors), meta)
    vol = _volume((3, 32, 40))
    one = Standardizer.from_checkpoint(tmp_path / "eta1.safetensors", device="cpu")
    small = Standardizer.from_checkpoint(tmp_path / "eta1.safetensors", device="cpu", max_batch_pixels=32 * 40)
    a = one.standardize(vol, (1, .7, .7), seed=5)
    np.testing.assert_allclose(a, small.standardize(vol, (1, .7, .7), seed=5), atol=1e-3)  # float reordering only
    np.testing.assert_array_equal(a, one.standardize(vol, (1, .7, .7), seed=5))
    det = Standardizer.from_checkpoint(tmp_path / "eta0.safetensors", device="cpu").standardize(vol, (1, .7, .7), seed=5)
    assert np.abs(a - det).max() > 1e-3

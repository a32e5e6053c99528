"""The fast inference paths give the outputs of the previous paths (timings live in bench/)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ltdiff_core import Standardizer
from ltdiff_core.nets import ConditionalDenoiser, DenoiserConfig, MultiscaleLatentAutoencoder
from ltdiff_core.runtime import channels_last_enabled, prepare_for_inference, set_fused_attention

TINY = {"features": [4, 8, 16], "latent_channels": [1, 2, 4]}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.mark.parametrize("levels", ["multiscale", "bottleneck"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_decode_equals_last_deep_supervision_head(levels, channels_last):
    cfg = dict(TINY, latent_levels=levels) if levels == "multiscale" else dict(TINY, latent_levels=levels,
                                                                                ds_weights=[1.0])
    ae = MultiscaleLatentAutoencoder(cfg).eval()
    with torch.no_grad():
        for p in ae.parameters():  # non-trivial weights, so every path carries signal
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1, 32, 40)
    with torch.inference_mode():
        z = ae.encode(x)
        ref = ae.decode_all(z)[-1]
        if channels_last:
            prepare_for_inference({"autoencoder": ae}, "cpu", channels_last=True)
            assert ae.enc[0].conv_1.conv.weight.is_contiguous(memory_format=torch.channels_last)
            z2 = ae.encode(x)
            torch.testing.assert_close(z2, z, rtol=0, atol=1e-5)
        got = ae.decode(z)
    assert got.shape == ref.shape
    if channels_last:
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    else:
        assert torch.equal(got, ref)


def _denoiser() -> ConditionalDenoiser:
    d = ConditionalDenoiser(DenoiserConfig(latent_dim=8, channels=(16, 16), attention_levels=(False, False),
                                           norm_num_groups=8, num_head_channels=8, cond_dim=16)).eval()
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return d


def test_denoiser_split_first_conv_equals_concatenated_input():
    d = _denoiser()
    z, t = torch.randn(2, 8, 16, 12), torch.tensor([10, 700])
    cond = torch.randn(2, 16, 16, 12)
    with torch.inference_mode():
        ref = d.unet(torch.cat([z, cond], dim=1), timesteps=t)
        got = d(z, t, cond)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        feats = d._cond_cache[1]
        z2 = torch.randn_like(z)  # second step, same condition object: reused, still right
        torch.testing.assert_close(d(z2, t, cond), d.unet(torch.cat([z2, cond], dim=1), timesteps=t),
                                   rtol=0, atol=1e-5)
        assert d._cond_cache[1] is feats
        cond2 = cond + 1.0  # another condition: recomputed, never served from the cache
        torch.testing.assert_close(d(z, t, cond2), d.unet(torch.cat([z, cond2], dim=1), timesteps=t),
                                   rtol=0, atol=1e-5)
        assert d._cond_cache[1] is not feats
        del cond2  # the cached features go with their condition
        assert d._cond_cache is None


def test_fused_attention_equals_explicit_attention():
    d = _denoiser()
    z, t, cond = torch.randn(1, 8, 16, 16), torch.tensor([300]), torch.randn(1, 16, 16, 16)
    with torch.inference_mode():
        ref = d(z, t, cond)
        assert set_fused_attention(d, True) >= 1  # MONAI always has one in the middle block
        got = d(z, t, cond)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_denoiser_training_path_keeps_gradients_to_every_input_weight():
    d = _denoiser().train()
    z, t, cond = torch.randn(1, 8, 8, 8), torch.tensor([5]), torch.randn(1, 16, 8, 8)
    d(z, t, cond).square().mean().backward()
    g = d.unet.conv_in.conv.weight.grad
    assert g is not None and g[:, :8].abs().sum() > 0 and g[:, 8:].abs().sum() > 0
    assert d._cond_cache is None  # the cache is an inference-only path


def _reference(s: Standardizer) -> Standardizer:
    """Switch a loaded model back to the previous code path (NCHW, all heads, concatenated input)."""
    ae = s._nets["autoencoder"]
    ae.to(memory_format=torch.contiguous_format)
    ae.decode = lambda z: type(ae).decode_all(ae, z)[-1]
    if "denoiser" in s._nets:
        den = s._nets["denoiser"]
        den.forward = lambda z, t, c: den.unet(torch.cat([z, c], dim=1), timesteps=t)
        assert set_fused_attention(den, False) >= 1
    return s


@pytest.mark.parametrize("steps", [None, 3])
def test_shipped_model_output_unchanged_within_tolerance(steps):
    """Default path vs previous path on the shipped model: far inside the 0.5 HU RMS budget."""
    assert channels_last_enabled()
    rng = np.random.default_rng(0)
    img = (np.where(np.hypot(*np.mgrid[-40:40, -40:40]) < 30, 40.0, -1000.0)
           + rng.normal(0, 30, (80, 80))).astype(np.float32)
    fast = Standardizer.from_checkpoint("ltdiff", device="cpu")
    ref = _reference(Standardizer.from_checkpoint("ltdiff", device="cpu"))
    assert fast._nets["autoencoder"].enc[0].conv_1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert any(getattr(m, "use_flash_attention", False) for m in fast._nets["denoiser"].modules())
    a = fast.standardize(img, (1.0, 0.7, 0.7), steps=steps, seed=1)
    b = ref.standardize(img, (1.0, 0.7, 0.7), steps=steps, seed=1)
    rms = float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))
    assert rms < 0.05, rms
    assert float(np.abs(a - b).max()) < 0.5
    assert not any(p.requires_grad for p in fast._nets["denoiser"].parameters())


def test_reference_layout_switch(monkeypatch):
    monkeypatch.setenv("LTDIFF_CHANNELS_LAST", "0")
    assert not channels_last_enabled()
    s = Standardizer.from_checkpoint("ltdiff", device="cpu")
    assert s._nets["autoencoder"].enc[0].conv_1.conv.weight.is_contiguous()


def test_thread_setting_from_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LTDIFF_TORCH_THREADS", "1")
        torch.set_num_threads(2)
        Standardizer.from_checkpoint("ltdiff", device="cpu")
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("LTDIFF_TORCH_THREADS", "zero")
        with pytest.raises(ValueError, match="LTDIFF_TORCH_THREADS"):
            Standardizer.from_checkpoint("ltdiff", device="cpu")
    finally:
        torch.set_num_threads(before)


def test_gpu_bench_without_cuda_exits_cleanly_with_a_message():
    import json
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run the full measurement")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_gpu.py")], capture_output=True, text=True,
                          timeout=120, cwd=root)
    assert proc.returncode == 0
    assert "no CUDA device" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["cuda"] is False

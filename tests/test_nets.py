"""Networks: shapes at several sizes, latent packing, and that the autoencoder can learn."""
from __future__ import annotations

import pytest
import torch

from ltdiff_core.nets import (AutoencoderConfig, ConditionalDenoiser, DenoiserConfig, DirectUNetPlusPlus,
                              MultiscaleLatentAutoencoder, build_network)

TINY = {"features": [4, 8, 16], "latent_channels": [1, 2, 4]}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.mark.parametrize("size", [(32, 32), (72, 88), (64, 40)])
def test_autoencoder_shapes(size):
    ae = MultiscaleLatentAutoencoder(TINY)
    x = torch.randn(2, 1, *size)
    z = ae.encode(x)
    assert z.shape == (2, ae.config.latent_dim, size[0] // 4, size[1] // 4)
    assert ae.config.latent_dim == 16 * 1 + 4 * 2 + 4
    outs = ae(x)
    assert len(outs) == 2 and all(o.shape == x.shape for o in outs)


def test_pack_unpack_roundtrip_keeps_every_level():
    ae = MultiscaleLatentAutoencoder(TINY)
    zs = [torch.randn(1, 1, 16, 20), torch.randn(1, 2, 8, 10), torch.randn(1, 4, 4, 5)]
    back = ae.unpack(ae.pack(zs))
    for a, b in zip(zs, back):
        assert torch.equal(a, b)


def test_decoder_depends_on_full_resolution_latent():
    """The fine level must reach the output (no path around the latent, but through it)."""
    ae = MultiscaleLatentAutoencoder(TINY)
    z = torch.randn(1, ae.config.latent_dim, 8, 8)
    zs = ae.unpack(z)
    zs[0] = zs[0] + 1.0
    assert (ae.decode(ae.pack(zs)) - ae.decode(z)).abs().max() > 1e-4


def test_bottleneck_ablation_has_only_coarse_latent():
    ae = MultiscaleLatentAutoencoder({**TINY, "latent_levels": "bottleneck"})
    x = torch.randn(1, 1, 40, 48)
    z = ae.encode(x)
    assert z.shape == (1, 4, 10, 12)
    assert ae(x)[-1].shape == x.shape


def test_size_not_multiple_is_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        MultiscaleLatentAutoencoder(TINY).encode(torch.zeros(1, 1, 30, 32))


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="latent_levels"):
        AutoencoderConfig(latent_levels="skip")
    with pytest.raises(ValueError, match="bad config for network 'autoencoder'"):
        build_network("autoencoder", {"feature": [1, 2]})


def test_denoiser_and_direct_shapes():
    den = ConditionalDenoiser(DenoiserConfig(latent_dim=6, channels=(8, 8, 8), norm_num_groups=4, num_head_channels=4))
    z = torch.randn(2, 6, 12, 16)
    assert den(z, torch.tensor([0, 999]), z).shape == z.shape
    direct = DirectUNetPlusPlus({"features": [4, 4, 8, 8, 16, 4]})
    x = torch.randn(1, 1, 48, 32)
    outs = direct.forward_all(x)
    assert len(outs) == 4 and all(o.shape == x.shape for o in outs)


def test_autoencoder_overfits_tiny_batch():
    from ltdiff_train.fit_autoencoder import deep_supervised

    ae = MultiscaleLatentAutoencoder(TINY)
    g = torch.Generator().manual_seed(1)
    x = 0.3 * torch.randn(2, 1, 24, 24, generator=g) + torch.linspace(-1, 0.5, 24).view(1, 1, 1, 24)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-2)
    w = {"l1": 1.0, "fft": 0.5, "grad": 0.5}
    first = None
    for _ in range(200):
        loss = deep_supervised(ae(x), x, ae.head_weights(), w)["total"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(deep_supervised(ae(x), x, ae.head_weights(), w)["total"])
    assert final < first / 8, (first, final)

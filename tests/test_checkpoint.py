"""Checkpoint round trip and refusal of every kind of bad file with a message naming it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ltdiff_core.checkpoint import (CheckpointError, load_checkpoint, load_networks, save_checkpoint,
                                    state_dict_to_numpy)
from ltdiff_core.diffusion import ScheduleConfig
from ltdiff_core.nets import ConditionalDenoiser, DenoiserConfig, MultiscaleLatentAutoencoder
from ltdiff_core.normalize import NORMALIZATION

AE_CFG = {"features": [4, 8, 16], "latent_channels": [1, 2, 4], "latent_levels": "multiscale",
          "ds_weights": [0.25, 1.0]}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def tiny_latent_checkpoint(path: Path, seed: int = 0, ae_cfg: dict | None = None) -> Path:
    """An untrained but complete latent-diffusion checkpoint (tiny networks)."""
    torch.manual_seed(seed)
    ae = MultiscaleLatentAutoencoder(ae_cfg or AE_CFG)
    den_cfg = DenoiserConfig(latent_dim=ae.config.latent_dim, channels=(8, 8, 8), norm_num_groups=4,
                             num_head_channels=4)
    den = ConditionalDenoiser(den_cfg)
    c = ae.config.latent_dim
    tensors = {**state_dict_to_numpy(ae.state_dict(), "autoencoder"), **state_dict_to_numpy(den.state_dict(), "denoiser"),
               "latent.shift": np.zeros(c, np.float32), "latent.scale": np.full(c, 0.5, np.float32),
               "latent.residual_shift": np.zeros(c, np.float32), "latent.residual_scale": np.full(c, 0.3, np.float32)}
    meta = {"name": "tiny", "version": "0.0.1", "method": "latent_diffusion",
            "networks": {"autoencoder": {"kind": "autoencoder", "config": ae.config.to_dict()},
                         "denoiser": {"kind": "denoiser", "config": den_cfg.to_dict()}},
            "normalization": NORMALIZATION, "scheduler": ScheduleConfig(parameterization="residual").to_dict(),
            "sampling": {"default_steps": 2, "strength": 0.5}, "training": {"pixel_mm": 0.7, "data": "random"}}
    save_checkpoint(path, tensors, meta)
    return path


def test_round_trip(tmp_path):
    p = tiny_latent_checkpoint(tmp_path / "m.safetensors")
    ck = load_checkpoint(p)
    assert ck.metadata["method"] == "latent_diffusion"
    side = json.loads(p.with_suffix(".json").read_text())
    assert side["weights_sha256"] == ck.metadata["weights_sha256"] and side["file_sha256"] == ck.file_sha256
    nets = load_networks(ck)
    torch.manual_seed(0)
    ref = MultiscaleLatentAutoencoder(AE_CFG)
    for k, v in ref.state_dict().items():
        assert torch.equal(nets["autoencoder"].state_dict()[k], v)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_wrong_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"DICM" + b"\0" * 300)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(p)


def test_foreign_safetensors_file(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(p))
    with pytest.raises(CheckpointError, match="not an ltdiff checkpoint"):
        load_checkpoint(p)


def test_truncated(tmp_path):
    p = tiny_latent_checkpoint(tmp_path / "m.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(p)


def test_tampered_weights(tmp_path):
    p = tiny_latent_checkpoint(tmp_path / "m.safetensors")
    data = bytearray(p.read_bytes())
    data[-8:-4] = np.float32(123.0).tobytes()
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(p)


def test_sidecar_from_other_weights(tmp_path):
    p = tiny_latent_checkpoint(tmp_path / "m.safetensors")
    q = tiny_latent_checkpoint(tmp_path / "other.safetensors", seed=1)
    p.with_suffix(".json").write_text(q.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="sidecar"):
        load_checkpoint(p)


def test_shapes_not_matching_architecture(tmp_path):
    p = tiny_latent_checkpoint(tmp_path / "m.safetensors")
    ck = load_checkpoint(p)
    meta = dict(ck.metadata)
    meta["networks"] = json.loads(json.dumps(meta["networks"]))
    meta["networks"]["autoencoder"]["config"]["features"] = [4, 8, 32]
    save_checkpoint(p, ck.tensors, meta)
    with pytest.raises(CheckpointError, match="shape"):
        load_networks(load_checkpoint(p))


def test_missing_tensors_and_unknown_architecture(tmp_path):
    p = tiny_latent_checkpoint(tmp_path / "m.safetensors")
    ck = load_checkpoint(p)
    t = {k: v for k, v in ck.tensors.items() if not k.startswith("denoiser.unet.out")}
    save_checkpoint(p, t, ck.metadata)
    with pytest.raises(CheckpointError, match="missing"):
        load_networks(load_checkpoint(p))
    meta = json.loads(json.dumps(ck.metadata))
    meta["networks"]["denoiser"]["kind"] = "transformer"
    save_checkpoint(p, ck.tensors, meta)
    with pytest.raises(CheckpointError, match="cannot be built"):
        load_networks(load_checkpoint(p))


def test_bad_metadata_refused_on_save(tmp_path):
    with pytest.raises(CheckpointError, match="lacks keys"):
        save_checkpoint(tmp_path / "m.safetensors", {"a": np.zeros(1, np.float32)}, {"name": "x"})
    with pytest.raises(CheckpointError, match="unknown method"):
        save_checkpoint(tmp_path / "m.safetensors", {"a": np.zeros(1, np.float32)},
                        {"name": "x", "version": "1", "method": "gan", "networks": {}, "normalization": NORMALIZATION})

"""Networks of the LTDiff++ method, built from MONAI blocks.

``build_network(kind, config)`` is the single factory used by checkpoints, so a stored
``{"kind": ..., "config": ...}`` entry is enough to rebuild any network.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .autoencoder import AutoencoderConfig, MultiscaleLatentAutoencoder
from .denoiser import ConditionalDenoiser, DenoiserConfig
from .direct import DirectConfig, DirectUNetPlusPlus

NETWORKS: dict[str, tuple[type, type]] = {
    "autoencoder": (MultiscaleLatentAutoencoder, AutoencoderConfig),
    "denoiser": (ConditionalDenoiser, DenoiserConfig),
    "direct": (DirectUNetPlusPlus, DirectConfig),
}


def build_network(kind: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a network by kind name; unknown kinds or config keys raise ``ValueError``."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown network kind {kind!r} (known: {sorted(NETWORKS)})")
    cls, cfg_cls = NETWORKS[kind]
    try:
        cfg = cfg_cls(**(config or {}))
    except TypeError as exc:
        raise ValueError(f"bad config for network {kind!r}: {exc}") from exc
    return cls(cfg)


__all__ = [
    "AutoencoderConfig", "MultiscaleLatentAutoencoder", "ConditionalDenoiser", "DenoiserConfig",
    "DirectConfig", "DirectUNetPlusPlus", "build_network", "NETWORKS",
]

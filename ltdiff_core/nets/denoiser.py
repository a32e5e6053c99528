"""Conditional latent denoiser: MONAI ``DiffusionModelUNet`` on [noisy Z_B, Z_A]."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn


@dataclass
class DenoiserConfig:
    """Small UNet: the latent grid is H/4, and few steps run per slice on CPU.

    MONAI always puts self-attention in the middle block; a third level keeps that block at
    H/16 (1024 tokens for a 512 slice) so its cost stays small.
    """

    latent_dim: int = 56
    channels: Sequence[int] = (32, 64, 64)
    attention_levels: Sequence[bool] = (False, False, False)
    num_res_blocks: int = 1
    norm_num_groups: int = 16
    num_head_channels: int = 16
    cond_dim: int = 0  # condition channels; 0 = latent_dim (Z_A only), 2 * latent_dim for [Z_A, Z_G]

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if len(self.channels) != len(self.attention_levels):
            raise ValueError("channels and attention_levels need the same length")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError("every channel count must be divisible by norm_num_groups")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class ConditionalDenoiser(nn.Module):
    """Predicts the diffusion target for Z_B given the noisy Z_B, the condition Z_A and t."""

    def __init__(self, config: DenoiserConfig | dict[str, Any] | None = None) -> None:
        super().__init__()
        cfg = config if isinstance(config, DenoiserConfig) else DenoiserConfig(**(config or {}))
        self.config = cfg
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=cfg.latent_dim + (cfg.cond_dim or cfg.latent_dim),
            out_channels=cfg.latent_dim,
            num_res_blocks=cfg.num_res_blocks,
            channels=cfg.channels,
            attention_levels=cfg.attention_levels,
            norm_num_groups=cfg.norm_num_groups,
            num_head_channels=cfg.num_head_channels,
        )

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([z_t, cond], dim=1), timesteps=t)

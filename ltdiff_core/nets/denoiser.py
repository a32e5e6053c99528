"""Conditional latent denoiser: MONAI ``DiffusionModelUNet`` on [noisy Z_B, Z_A]."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import weakref

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
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
    noise_dim: int = 0  # series-level descriptors (ltdiff_core.noise_condition) appended to the condition

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

        self._cond_cache: tuple[weakref.ref, torch.Tensor] | None = None
        self._noise_emb: torch.Tensor | None = None
        if cfg.noise_dim:
            # Descriptors enter where the timestep does (every res block), not as constant input
            # channels, which the first GroupNorm would mostly normalise away. The last layer starts
            # at zero, so a denoiser continued from one without the condition starts unchanged.
            width = self.unet.block_out_channels[0] * 4
            self.noise_embed = nn.Sequential(nn.Linear(cfg.noise_dim, width), nn.SiLU(), nn.Linear(width, width))
            nn.init.zeros_(self.noise_embed[2].weight)
            nn.init.zeros_(self.noise_embed[2].bias)
            self.unet.time_embed.register_forward_hook(self._add_noise_embedding)

    def _add_noise_embedding(self, module: nn.Module, args: Any, emb: torch.Tensor) -> torch.Tensor:
        return emb if self._noise_emb is None else emb + self._noise_emb.to(emb.dtype)

    def split_condition(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Spatial condition channels, and the descriptors (constant channels at the end) as (N, noise_dim)."""
        k = self.config.noise_dim
        if not k:
            return cond, None
        return cond[:, :-k], cond[:, -k:].mean(dim=(2, 3))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        spatial, noise = self.split_condition(cond)
        self._noise_emb = self.noise_embed(noise.to(z_t.dtype)) if noise is not None else None
        try:
            if self.training or torch.is_grad_enabled():
                return self.unet(torch.cat([z_t, spatial], dim=1), timesteps=t)
            return self._forward_split(z_t, t, spatial)
        finally:
            self._noise_emb = None

    def condition_features(self, cond: torch.Tensor) -> torch.Tensor:
        """The condition's share of the first convolution (bias included).

        The first convolution is linear in its input channels, so ``conv([z, c]) = conv_z(z) +
        conv_c(c)``. The condition is fixed during sampling: its part is computed once per
        condition tensor (cached while that tensor object is alive) instead of once per step.
        """
        cached = self._cond_cache
        if cached is not None and cached[0]() is cond:
            return cached[1]
        conv = self.unet.conv_in.conv
        n = self.config.latent_dim
        feats = F.conv2d(cond, conv.weight[:, n:].contiguous(), conv.bias, padding=conv.padding)
        self._cond_cache = (weakref.ref(cond, self._drop_cond_cache), feats)
        return feats

    def _drop_cond_cache(self, ref: weakref.ref) -> None:
        """Free the cached features with their condition (a GPU batch's would otherwise stay allocated)."""
        if self._cond_cache is not None and self._cond_cache[0] is ref:
            self._cond_cache = None

    def _forward_split(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``unet(cat([z_t, cond]))`` with the condition's first-layer share reused across steps.

        Follows ``DiffusionModelUNet.forward`` (no context, no class labels, no ControlNet
        residuals: none are configured here).
        """
        return self.forward_with_condition_features(z_t, t, self.condition_features(cond))

    def forward_with_condition_features(self, z_t: torch.Tensor, t: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """One step from the noisy latent and the condition's precomputed first-layer share
        (:meth:`condition_features`); also the graph ``ltdiff_core.onnx_runtime`` exports."""
        unet = self.unet
        conv = unet.conv_in.conv
        h = F.conv2d(z_t, conv.weight[:, :self.config.latent_dim].contiguous(), None, padding=conv.padding)
        h = h + feats
        emb = unet.time_embed(get_timestep_embedding(t, unet.block_out_channels[0]).to(dtype=h.dtype))
        res: list[torch.Tensor] = [h]
        for block in unet.down_blocks:
            h, res_samples = block(hidden_states=h, temb=emb, context=None)
            res.extend(res_samples)
        h = unet.middle_block(hidden_states=h, temb=emb, context=None)
        for block in unet.up_blocks:
            idx = -len(block.resnets)
            h = block(hidden_states=h, res_hidden_states_list=res[idx:], temb=emb, context=None)
            res = res[:idx]
        return unet.out(h)

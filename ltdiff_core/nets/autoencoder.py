"""UNet++ autoencoder whose skip information all passes through a multiscale latent.

Plain UNet++ skip pathways would carry the source kernel's texture around a bottleneck
latent, so diffusing only the bottleneck could not change it; a single compressed bottleneck
cannot hold a sharp kernel's fine noise. Here the encoder column ``X^{i,0}`` is projected to a
few channels at *every* level (``z_i``), the levels are packed onto the coarsest grid by
pixel-unshuffle, and the decoder rebuilds the UNet++ nested dense pathways ``X^{i,j}`` from the
unpacked latent only. Diffusing the packed latent therefore changes every scale.

``latent_levels="bottleneck"`` keeps only ``z_L`` and a skip-free decoder: the ablation
"diffusion without the multiscale design".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets.basic_unet import TwoConv, UpCat
from torch import nn

ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})


@dataclass
class AutoencoderConfig:
    """Architecture of :class:`MultiscaleLatentAutoencoder` (stored in checkpoints)."""

    features: Sequence[int] = (16, 32, 64)
    latent_channels: Sequence[int] = (2, 4, 8)
    latent_levels: str = "multiscale"  # or "bottleneck"
    ds_weights: Sequence[float] = (0.25, 1.0)

    def __post_init__(self) -> None:
        self.features = tuple(int(f) for f in self.features)
        self.latent_channels = tuple(int(c) for c in self.latent_channels)
        self.ds_weights = tuple(float(w) for w in self.ds_weights)
        if len(self.features) < 2 or len(self.features) != len(self.latent_channels):
            raise ValueError("features and latent_channels need the same length (>= 2)")
        if self.latent_levels not in ("multiscale", "bottleneck"):
            raise ValueError(f"latent_levels must be 'multiscale' or 'bottleneck', not {self.latent_levels!r}")
        if self.latent_levels == "multiscale" and len(self.ds_weights) != self.depth:
            raise ValueError(f"ds_weights needs {self.depth} entries (one per head X^(0,1..L))")

    @property
    def depth(self) -> int:
        """Number of downsamplings L."""
        return len(self.features) - 1

    @property
    def factor(self) -> int:
        """Spatial reduction of the packed latent (inputs must be a multiple of it)."""
        return 2**self.depth

    @property
    def latent_dim(self) -> int:
        """Channels of the packed latent Z."""
        if self.latent_levels == "bottleneck":
            return self.latent_channels[-1]
        return sum(c * 4 ** (self.depth - i) for i, c in enumerate(self.latent_channels))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _conv(cin: int, cout: int, *, k: int = 3, stride: int = 1, act: bool = True) -> Convolution:
    return Convolution(2, cin, cout, strides=stride, kernel_size=k, act=ACT if act else None, norm=None,
                       conv_only=not act, padding=k // 2)


class MultiscaleLatentAutoencoder(nn.Module):
    """Encoder ``E`` (UNet++ backbone column) and decoder ``D`` (nested dense pathways).

    No normalisation layers: statistics of 128-pixel training crops and 512-pixel slices differ,
    and a per-image normalisation would also drop the absolute HU level from the latent.
    """

    def __init__(self, config: AutoencoderConfig | dict[str, Any] | None = None) -> None:
        super().__init__()
        cfg = config if isinstance(config, AutoencoderConfig) else AutoencoderConfig(**(config or {}))
        self.config = cfg
        f, c, L = cfg.features, cfg.latent_channels, cfg.depth
        self.multiscale = cfg.latent_levels == "multiscale"
        self.enc = nn.ModuleList([TwoConv(2, 1, f[0], ACT, None, True)])
        for i in range(1, L + 1):
            self.enc.append(nn.Sequential(_conv(f[i - 1], f[i], stride=2), TwoConv(2, f[i], f[i], ACT, None, True)))
        levels = range(L + 1) if self.multiscale else [L]
        self.proj = nn.ModuleDict({str(i): _conv(f[i], c[i], k=1, act=False) for i in levels})
        self.lift = nn.ModuleDict({str(i): _conv(c[i], f[i]) for i in levels})
        self.up = nn.ModuleDict()
        if self.multiscale:
            for j in range(1, L + 1):
                for i in range(0, L - j + 1):
                    self.up[f"{i}_{j}"] = UpCat(2, f[i + 1], f[i] * j, f[i], ACT, None, True, halves=True)
            self.heads = nn.ModuleList([_conv(f[0], 1, k=1, act=False) for _ in range(L)])
        else:
            for i in range(L - 1, -1, -1):
                self.up[f"{i}"] = UpCat(2, f[i + 1], 0, f[i], ACT, None, True, halves=True)
            self.heads = nn.ModuleList([_conv(f[0], 1, k=1, act=False)])

    # --- latent packing -------------------------------------------------------------------
    def pack(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """Space-to-depth every level onto the coarsest grid and concatenate."""
        L = self.config.depth
        if not self.multiscale:
            return zs[-1]
        return torch.cat([F.pixel_unshuffle(z, 2 ** (L - i)) if i < L else z for i, z in enumerate(zs)], dim=1)

    def unpack(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of :meth:`pack`."""
        L, c = self.config.depth, self.config.latent_channels
        if not self.multiscale:
            return [z]
        sizes = [c[i] * 4 ** (L - i) for i in range(L + 1)]
        parts = torch.split(z, sizes, dim=1)
        return [F.pixel_shuffle(p, 2 ** (L - i)) if i < L else p for i, p in enumerate(parts)]

    # --- E and D --------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B,1,H,W), H and W multiples of ``config.factor`` -> packed latent (B,C,H/f,W/f)."""
        fct = self.config.factor
        if x.shape[-1] % fct or x.shape[-2] % fct:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not a multiple of {fct}")
        feats = []
        h = _like_weights(x, self.enc[0].conv_1.conv.weight)
        for block in self.enc:
            h = block(h)
            feats.append(h)
        if not self.multiscale:
            return self.proj[str(self.config.depth)](feats[-1])
        return self.pack([self.proj[str(i)](h) for i, h in enumerate(feats)])

    def decode_all(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Packed latent -> list of deep-supervision outputs (last one is the final image)."""
        L = self.config.depth
        zs = self.unpack(z)
        if not self.multiscale:
            h = self.lift[str(L)](zs[0])
            for i in range(L - 1, -1, -1):
                h = self.up[str(i)](h, None)
            return [self.heads[0](h)]
        grid: dict[tuple[int, int], torch.Tensor] = {(i, 0): self.lift[str(i)](zi) for i, zi in enumerate(zs)}
        for j in range(1, L + 1):
            for i in range(0, L - j + 1):
                skips = torch.cat([grid[(i, k)] for k in range(j)], dim=1)
                grid[(i, j)] = self.up[f"{i}_{j}"](grid[(i + 1, j - 1)], skips)
        return [head(grid[(0, j + 1)]) for j, head in enumerate(self.heads)]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Packed latent -> image (the last deep-supervision head), inference path.

        Same values as ``decode_all(z)[-1]`` but without the unused shallow heads, and with the
        UpCat blocks run without their no-op border pad (inputs are multiples of ``factor``).
        """
        L = self.config.depth
        z = _like_weights(z, self.enc[0].conv_1.conv.weight)
        zs = self.unpack(z)
        if not self.multiscale:
            h = self.lift[str(L)](zs[0])
            for i in range(L - 1, -1, -1):
                h = _upcat(self.up[str(i)], h, None)
            return self.heads[0](h)
        grid: dict[tuple[int, int], torch.Tensor] = {(i, 0): self.lift[str(i)](zi) for i, zi in enumerate(zs)}
        for j in range(1, L + 1):
            for i in range(0, L - j + 1):
                skips = torch.cat([grid[(i, k)] for k in range(j)], dim=1)
                grid[(i, j)] = _upcat(self.up[f"{i}_{j}"], grid[(i + 1, j - 1)], skips)
        return self.heads[-1](grid[(0, L)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.decode_all(self.encode(x))

    def head_weights(self) -> tuple[float, ...]:
        """Loss weights of the deep-supervision heads, aligned with :meth:`decode_all`."""
        return tuple(self.config.ds_weights) if self.multiscale else (1.0,)


def _like_weights(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Give the input the memory layout of the network's weights (see ``ltdiff_core.runtime``)."""
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _upcat(block: UpCat, x: torch.Tensor, x_e: torch.Tensor | None) -> torch.Tensor:
    """``UpCat.forward`` without the replicate pad when the upsampled size already matches."""
    x_0 = block.upsample(x)
    if x_e is None:
        return block.convs(x_0)
    if x_e.shape[-2:] != x_0.shape[-2:]:
        return block(x, x_e)
    return block.convs(torch.cat([x_e, x_0], dim=1))

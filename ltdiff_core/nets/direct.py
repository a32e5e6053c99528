"""Baseline: MONAI ``BasicUNetPlusPlus`` trained directly A -> B (the papers' UNet++ row)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from monai.networks.nets import BasicUNetPlusPlus
from torch import nn


@dataclass
class DirectConfig:
    features: Sequence[int] = (16, 16, 32, 64, 128, 16)
    ds_weights: Sequence[float] = (0.1, 0.2, 0.3, 1.0)

    def __post_init__(self) -> None:
        self.features = tuple(int(f) for f in self.features)
        self.ds_weights = tuple(float(w) for w in self.ds_weights)
        if len(self.features) != 6 or len(self.ds_weights) != 4:
            raise ValueError("features needs 6 entries and ds_weights 4 (BasicUNetPlusPlus depth 4)")

    factor = 16

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class DirectUNetPlusPlus(nn.Module):
    """Residual UNet++: ``B = A + net(A)``; deep-supervision outputs in training."""

    def __init__(self, config: DirectConfig | dict[str, Any] | None = None) -> None:
        super().__init__()
        cfg = config if isinstance(config, DirectConfig) else DirectConfig(**(config or {}))
        self.config = cfg
        # no normalisation layers: crop and full-slice statistics differ (see autoencoder.py)
        self.net = BasicUNetPlusPlus(2, 1, 1, features=cfg.features, deep_supervision=True, norm=None)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Deep-supervision outputs ordered shallow -> deep (last = final)."""
        return [x + o for o in self.net(x)]  # MONAI order: X^{0,1} .. X^{0,4}

    def forward(self, x: torch.Tensor, all_heads: bool = False) -> torch.Tensor | list[torch.Tensor]:
        outs = self.forward_all(x)
        return outs if all_heads else outs[-1]

"""Shipped default checkpoints (safetensors + sidecar JSON next to this file)."""
from __future__ import annotations

from pathlib import Path

NAMES = ("ltdiff", "linear", "direct", "ltdiff-bottleneck")


def default_checkpoint(name: str = "ltdiff") -> Path:
    """Path of a shipped checkpoint.

    ``"ltdiff"`` (latent diffusion, default), ``"linear"``, ``"direct"`` (UNet++ A -> B), and
    ``"ltdiff-bottleneck"`` (the ablation without the multiscale latent, for evaluation only).
    """
    if name not in NAMES:
        raise ValueError(f"unknown shipped checkpoint {name!r} (known: {NAMES})")
    return Path(__file__).resolve().parent / f"{name}.safetensors"

"""Shipped checkpoints (safetensors + sidecar JSON next to this file) and which one is the default."""
from __future__ import annotations

from pathlib import Path

NAMES = ("ltdiff", "linear", "direct", "ltdiff-bottleneck")

#: The checkpoint ``model = "default"`` (node rules), ``dicom-node standardize`` and
#: ``Standardizer.from_checkpoint(None)`` use: the best method measured on both held-out sets
#: (docs/results.md, "Which method is the default"), not necessarily the latent diffusion.
DEFAULT = "linear"


def default_checkpoint(name: str | None = None) -> Path:
    """Path of a shipped checkpoint (``None``: the default, :data:`DEFAULT`).

    ``"ltdiff"`` (latent diffusion), ``"linear"`` (fitted kernel filter), ``"direct"`` (UNet++
    A -> B), and ``"ltdiff-bottleneck"`` (the ablation without the multiscale latent, for
    evaluation only).
    """
    name = DEFAULT if name is None else name
    if name not in NAMES:
        raise ValueError(f"unknown shipped checkpoint {name!r} (known: {NAMES})")
    return Path(__file__).resolve().parent / f"{name}.safetensors"


def resolve_model(model: str | Path | None) -> Path:
    """A node rule's or a command's ``model``: ``None``/``"default"``, a shipped name, or a path."""
    if model is None or str(model) == "default":
        return default_checkpoint()
    if str(model) in NAMES:
        return default_checkpoint(str(model))
    return Path(model)

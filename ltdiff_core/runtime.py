"""Inference settings for the torch networks: threads, memory layout, fused attention.

Kept in one place so the service, the offline command and the benchmarks run the same fast
path. ``bench/bench_inference.py`` measures each setting against the previous one; only the
settings that won there (and changed the output by far less than 0.5 HU RMS) are defaults.

* Autoencoder in ``channels_last``: oneDNN runs its convolutions (no normalisation layers) in
  NHWC without reordering around every layer (about 0.6-0.7x the encoder and decoder CPU time).
* Denoiser self-attention through ``scaled_dot_product_attention`` (about 0.88x per step).
* The denoiser stays NCHW: with its GroupNorms, ``channels_last`` measured slower per step.
* Threads: torch's default (one per core) unless ``LTDIFF_TORCH_THREADS`` says otherwise.
"""
from __future__ import annotations

import os
from typing import Any

#: Environment switch to run the previous (reference) layout, for A/B measurements.
LAYOUT_ENV = "LTDIFF_CHANNELS_LAST"
#: Environment setting of torch's intra-op threads for every process that loads a model.
THREADS_ENV = "LTDIFF_TORCH_THREADS"


def channels_last_enabled() -> bool:
    """``LTDIFF_CHANNELS_LAST=0`` keeps every network NCHW (reference path)."""
    return os.environ.get(LAYOUT_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def configure_threads(intra_op: int = 0, inter_op: int = 0) -> None:
    """Set torch's thread pools (0 = leave torch's default, one intra-op thread per core).

    Inter-op threads only matter for graphs with parallel branches; these networks run one
    operator at a time, so the default is kept. Must be called before the first parallel op.
    """
    import torch

    if intra_op > 0:
        torch.set_num_threads(int(intra_op))
    if inter_op > 0:
        try:
            torch.set_num_interop_threads(int(inter_op))
        except RuntimeError:  # already started: torch allows setting it once, before any parallel work
            pass


def configure_threads_from_env() -> int | None:
    """Apply ``LTDIFF_TORCH_THREADS`` when set (unset: torch's default, one thread per core).

    On cores shared with other busy processes one intra-op thread was about 3x faster per slice
    than two (docs/benchmarks.md): every parallel region waits for its slowest, descheduled thread.
    Returns the thread count applied, or None.
    """
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError as exc:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, not {raw!r}") from exc
    if n < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, not {raw!r}")
    configure_threads(n)
    return n


def prepare_for_inference(nets: dict[str, Any], device: str = "cpu", channels_last: bool | None = None,
                          fused_attention: bool = True) -> None:
    """Freeze parameters, pick each network's memory layout, use fused attention (weights and keys unchanged).

    ``channels_last=None`` follows :func:`channels_last_enabled`; only CPU autoencoders switch.
    ``fused_attention`` runs MONAI self-attention blocks through ``scaled_dot_product_attention``
    (one kernel instead of einsum, softmax, einsum) where that is exact in eval: no dropout, no
    relative positions, no saved attention maps.
    """
    import torch

    if channels_last is None:
        channels_last = channels_last_enabled()
    for prefix, net in nets.items():
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        if channels_last and device == "cpu" and prefix == "autoencoder":
            net.to(memory_format=torch.channels_last)
        if fused_attention:
            set_fused_attention(net, True)


def set_fused_attention(net: Any, enabled: bool) -> int:
    """Switch MONAI ``SABlock`` modules to (or from) ``scaled_dot_product_attention``; returns how many."""
    from monai.networks.blocks.selfattention import SABlock

    n = 0
    for m in net.modules():
        if isinstance(m, SABlock) and not m.save_attn and m.rel_positional_embedding is None \
                and float(m.dropout_rate) == 0.0:
            m.use_flash_attention = enabled
            n += 1
    return n

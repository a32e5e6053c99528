"""Padding and tiling so fully convolutional models run on any slice size.

Reflect padding to a multiple of the network's stride keeps statistics natural at the border;
very large slices are processed in overlapping tiles blended with a separable ramp window
normalised by the summed weights, so there are no seams.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def pad_to_multiple(img: np.ndarray, multiple: int, extra: int = 0) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Reflect-pad the last two axes by ``extra`` plus up to a multiple; returns crop slices back."""
    h, w = img.shape[-2:]
    th = -(-(h + 2 * extra) // multiple) * multiple
    tw = -(-(w + 2 * extra) // multiple) * multiple
    top, left = (th - h) // 2, (tw - w) // 2
    pads = [(0, 0)] * (img.ndim - 2) + [(top, th - h - top), (left, tw - w - left)]
    mode = "reflect" if min(h, w) > max(th - h, tw - w) else "symmetric"
    return np.pad(img, pads, mode=mode), (slice(top, top + h), slice(left, left + w))


def _ramp(n: int, overlap: int) -> np.ndarray:
    w = np.ones(n, np.float32)
    if overlap > 0:
        r = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        w[:overlap] = r
        w[-overlap:] = r[::-1]
    return w


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering ``[0, n)`` with at least ``overlap`` pixels shared."""
    if n <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, n - tile, step)) + [n - tile]
    return sorted(set(starts))


def run_tiled(
    img: np.ndarray, fn: Callable[[np.ndarray, int, int], np.ndarray], tile: int, overlap: int
) -> np.ndarray:
    """Apply ``fn(tile, y, x)`` over overlapping tiles of the last two axes and blend.

    ``fn`` gets the tile origin so callers can derive per-tile random streams.
    """
    h, w = img.shape[-2:]
    if h <= tile and w <= tile:
        return fn(img, 0, 0)
    out = np.zeros(img.shape, np.float32)
    norm = np.zeros((h, w), np.float32)
    for y in tile_starts(h, tile, overlap):
        for x in tile_starts(w, tile, overlap):
            th, tw = min(tile, h), min(tile, w)
            wy = _ramp(th, overlap if h > tile else 0)
            wx = _ramp(tw, overlap if w > tile else 0)
            win = wy[:, None] * wx[None, :]
            out[..., y:y + th, x:x + tw] += fn(img[..., y:y + th, x:x + tw], y, x) * win
            norm[y:y + th, x:x + tw] += win
    return out / norm

"""Synthetic two-kernel chest phantom: one seeded 3D anatomy, scanned once, reconstructed as Br40 and Bl64."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from .anatomy import FULL_SIZE, LABELS, chest_truth
from .case import PhantomCase

__all__ = ["FULL_SIZE", "LABELS", "PhantomCase", "chest_truth", "generate_case"]


def generate_case(seed: int, n_slices: int, size: int = FULL_SIZE, thickness_mm: float = 1.5,
                  pixel_mm: float = 0.7) -> PhantomCase:
    """Build one phantom case; the same arguments always give bit-identical arrays.

    The seed feeds independent child generators for the anatomy, the acquisition settings and
    the noise, so changing one stage's draws never shifts another's.
    """
    from . import scanner  # imported here so that the anatomy works without the scanner model

    rng = np.random.default_rng(seed)
    anatomy_rng, acquisition_rng, noise_rng = rng.spawn(3)
    truth, labels, vol = chest_truth(anatomy_rng, n_slices, thickness_mm, size=size, pixel_mm=pixel_mm)
    params = scanner.sample_acquisition(acquisition_rng)
    br40, bl64 = scanner.acquire_pair(truth, pixel_mm, noise_rng, noise_br40_hu=params.noise_br40_hu,
                                      ir_strength=(params.ir_strength_a, params.ir_strength_b))
    meta = {
        "seed": int(seed),
        "size": int(size),
        "n_slices": int(n_slices),
        "thickness_mm": float(thickness_mm),
        "pixel_mm": float(pixel_mm),
        "acquisition": asdict(params),
        "tumours": vol.tumours,
        "slice_z_mm": [round(float(z), 4) for z in vol.slice_z_mm],
        "crop_origin": list(vol.crop_origin),
        "full_size": FULL_SIZE,
    }
    return PhantomCase(
        br40=br40, bl64=bl64, truth=truth, labels=labels, label_names=dict(LABELS),
        tumour_masks=vol.masks, tumour_info=vol.tumours,
        spacing=(float(thickness_mm), float(pixel_mm), float(pixel_mm)), meta=meta,
    )

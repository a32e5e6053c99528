"""Synthetic two-kernel chest phantom: one seeded 3D anatomy, scanned once, reconstructed as Br40 and Bl64.

Two generators share the anatomy: ``scanner`` (image-domain kernel model, :func:`generate_case`)
and ``fbp`` (projection, Poisson counts and filtered back-projection with its own filters,
:func:`~ltdiff_core.phantom.fbp_generator.generate_fbp_case`). Both can add a ``RESCAN`` series.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from .anatomy import FULL_SIZE, LABELS, chest_truth
from .case import PhantomCase

__all__ = ["FULL_SIZE", "GENERATORS", "LABELS", "PhantomCase", "chest_truth", "generate", "generate_case"]

#: Names accepted by :func:`generate` (and ``make_phantom --generator``).
GENERATORS: tuple[str, str] = ("scanner", "fbp")
#: Child stream of the case seed that feeds the rescan noise (0-2: anatomy, acquisition, noise).
RESCAN_STREAM = 3


def generate_case(seed: int, n_slices: int, size: int = FULL_SIZE, thickness_mm: float = 1.5,
                  pixel_mm: float = 0.7, rescan: str | None = None) -> PhantomCase:
    """Build one phantom case; the same arguments always give bit-identical arrays.

    The seed feeds independent child generators for the anatomy, the acquisition settings and
    the noise, so changing one stage's draws never shifts another's. ``rescan`` (``None``,
    ``"independent"`` or ``"split"``, see ``scanner.RESCAN_MODES``) adds a rescan whose noise comes
    from a fourth child stream: Br40 and Bl64 are the same with or without it.
    """
    from . import scanner  # imported here so that the anatomy works without the scanner model

    rng = np.random.default_rng(seed)
    # spawn(n) children are fixed by their index, so the fourth stream leaves the first three as they were
    anatomy_rng, acquisition_rng, noise_rng, rescan_rng = rng.spawn(RESCAN_STREAM + 1)
    truth, labels, vol = chest_truth(anatomy_rng, n_slices, thickness_mm, size=size, pixel_mm=pixel_mm)
    params = scanner.sample_acquisition(acquisition_rng)
    images = scanner.acquire(truth, pixel_mm, noise_rng, noise_br40_hu=params.noise_br40_hu,
                             ir_strength=(params.ir_strength_a, params.ir_strength_b),
                             rescan_rng=rescan_rng if rescan else None, rescan_mode=rescan or "independent")
    meta = {
        "generator": "scanner",
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
    if rescan:
        meta["rescan"] = {"mode": rescan, "kernel": "Bl64", "stream": RESCAN_STREAM}
    return PhantomCase(
        br40=images["Br40"], bl64=images["Bl64"], rescan=images.get("RESCAN"), truth=truth, labels=labels, label_names=dict(LABELS),
        tumour_masks=vol.masks, tumour_info=vol.tumours,
        spacing=(float(thickness_mm), float(pixel_mm), float(pixel_mm)), meta=meta,
    )


def generate(generator: str, seed: int, n_slices: int, *, size: int = FULL_SIZE, thickness_mm: float = 1.5,
             pixel_mm: float = 0.7, rescan: str | None = "independent") -> PhantomCase:
    """One case from the named generator (``GENERATORS``); same arguments, same arrays."""
    if generator == "scanner":
        return generate_case(seed, n_slices, size=size, thickness_mm=thickness_mm, pixel_mm=pixel_mm, rescan=rescan)
    if generator == "fbp":
        from .fbp_generator import generate_fbp_case

        if rescan not in (None, "independent"):
            raise ValueError("the fbp generator draws its rescan from independent Poisson counts only")
        return generate_fbp_case(seed, n_slices, size=size, thickness_mm=thickness_mm, pixel_mm=pixel_mm,
                                 rescan=rescan is not None)
    raise ValueError(f"unknown generator {generator!r}; expected one of {GENERATORS}")

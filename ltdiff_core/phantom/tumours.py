"""Lung tumours as continuous 3D objects: sampling, rasterisation on an axial plane, texture.

A tumour is defined in mm around its centre (lobulated radius function + tapering spicules,
optional necrosis, cavitation, calcification, or a ground-glass halo around a solid core),
so every slice thickness of one seed cuts the same object.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage

# Compartment offsets inside a tumour's block of label codes (see ``Tumour.code_base``).
SOLID, GGO, NECROSIS, CAVITY, CALCIFICATION = range(5)
N_COMPARTMENTS = 5
COMPARTMENT_NAMES = ("tumour_solid", "tumour_ground_glass", "tumour_necrosis", "tumour_cavity", "tumour_calcification")

# Kind mix: weighted towards solid tumours because their texture carries the kernel effect
# on GLCM/GLRLM features that the default data must show.
KINDS = ("solid", "part_solid", "ground_glass")
KIND_P = (0.7, 0.15, 0.15)
TEXTURE_DZ_MM = 0.5  # z step of a tumour's private texture grid


@dataclass
class Tumour:
    """Shape, composition and HU of one tumour; geometry in mm (x right, y posterior, z caudal)."""

    kind: str
    radius_mm: float
    centre_mm: np.ndarray
    axes: np.ndarray  # anisotropic scale of the radius along x, y, z
    bump_dirs: np.ndarray  # (K, 3) unit vectors of lobulation bumps
    bump_amp: np.ndarray  # (K,) relative radius change of each bump
    bump_kappa: np.ndarray  # (K,) sharpness of each bump
    spicules: list[tuple[np.ndarray, float, float]]  # (unit direction, length mm, base half-width mm)
    core_frac: float  # part-solid: solid core radius / radius
    necrosis: tuple[np.ndarray, float] | None  # (offset mm, radius mm)
    cavity: tuple[np.ndarray, float] | None
    calcifications: list[tuple[np.ndarray, float]]
    hu: dict[str, float]
    texture_std: dict[str, float]
    texture_sigma_mm: float
    code_base: int = 0
    texture: np.ndarray | None = field(default=None, repr=False)  # (nz, ny, nx) unit-std field
    texture_origin: tuple[int, int, int] = (0, 0, 0)  # (z index, row, column) of texture[0, 0, 0]

    @property
    def extent_mm(self) -> float:
        """Radius of a sphere that contains the whole tumour, spicules included."""
        body = self.radius_mm * (1.0 + float(np.clip(self.bump_amp, 0, None).sum()))
        spic = max((self.radius_mm + length for _, length, _ in self.spicules), default=0.0)
        return max(body, spic) * float(self.axes.max()) + 1.0

    def info(self) -> dict[str, Any]:
        """JSON-friendly description for case metadata."""
        return {
            "type": self.kind,
            "radius_mm": round(float(self.radius_mm), 3),
            "centre_mm": [round(float(v), 3) for v in self.centre_mm],
            "extent_mm": round(self.extent_mm, 3),
            "necrosis": self.necrosis is not None,
            "cavitation": self.cavity is not None,
            "calcifications": len(self.calcifications),
            "spicules": len(self.spicules),
            "hu": {k: round(float(v), 1) for k, v in self.hu.items()},
            "texture_std_hu": {k: round(float(v), 1) for k, v in self.texture_std.items()},
        }


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


MIN_RADIUS_MM = 6.0


def scaled(t: Tumour, factor: float) -> Tumour:
    """The same tumour scaled in size (composition and HU unchanged), for placement retries."""
    return replace(
        t,
        radius_mm=t.radius_mm * factor,
        spicules=[(d, length * factor, width) for d, length, width in t.spicules],
        necrosis=None if t.necrosis is None else (t.necrosis[0] * factor, t.necrosis[1] * factor),
        cavity=None if t.cavity is None else (t.cavity[0] * factor, t.cavity[1] * factor),
        calcifications=[(o * factor, r) for o, r in t.calcifications],
    )


def sample_tumour(rng: np.random.Generator) -> Tumour:
    """Draw kind, size and composition (not the position) of one tumour."""
    kind = str(rng.choice(KINDS, p=KIND_P))
    if kind == "solid" and rng.random() < 0.75:
        lo, hi = 10.0, 20.0
    else:
        lo, hi = 6.0, 20.0
    radius = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    n_bumps = 8
    bump_amp = rng.uniform(-0.22, 0.26, n_bumps)
    if kind == "ground_glass":
        bump_amp *= 1.3  # ground-glass nodules have looser, more irregular margins
    n_spic = {"solid": int(rng.integers(4, 11)), "part_solid": int(rng.integers(0, 4)), "ground_glass": 0}[kind]
    spicules = [
        (d, float(rng.uniform(0.4, 1.2) * radius), float(rng.uniform(0.8, 1.8)))
        for d in _unit_vectors(rng, n_spic)
    ]
    solid_hu = float(rng.uniform(20.0, 40.0))
    ggo_hu = float(np.clip(rng.normal(-550.0, 120.0), -780.0, -300.0))
    hu = {"solid": solid_hu, "ground_glass": ggo_hu, "necrosis": solid_hu - float(rng.uniform(15.0, 30.0)),
          "cavity": -950.0, "calcification": float(rng.uniform(350.0, 900.0))}
    texture_std = {"solid": float(rng.uniform(10.0, 35.0)), "ground_glass": float(rng.uniform(15.0, 40.0))}
    necrosis = cavity = None
    calcs: list[tuple[np.ndarray, float]] = []
    if kind == "solid" and radius >= 10.0:
        u = rng.random()
        if u < 0.3:
            necrosis = (rng.normal(0, 0.12 * radius, 3), float(rng.uniform(0.3, 0.5) * radius))
        elif u < 0.45:
            cavity = (rng.normal(0, 0.12 * radius, 3), float(min(rng.uniform(0.25, 0.45) * radius, radius - 3.5)))
    if kind != "ground_glass" and rng.random() < 0.25:
        for _ in range(int(rng.integers(1, 4))):
            calcs.append((rng.uniform(-0.45, 0.45, 3) * radius, float(rng.uniform(0.7, 1.8))))
    return Tumour(
        kind=kind,
        radius_mm=radius,
        centre_mm=np.zeros(3),
        axes=rng.uniform(0.85, 1.15, 3),
        bump_dirs=_unit_vectors(rng, n_bumps),
        bump_amp=bump_amp,
        bump_kappa=rng.uniform(3.0, 12.0, n_bumps),
        spicules=spicules,
        core_frac=float(rng.uniform(0.35, 0.6)),
        necrosis=necrosis,
        cavity=cavity,
        calcifications=calcs,
        hu=hu,
        texture_std=texture_std,
        texture_sigma_mm=float(rng.uniform(0.8, 2.0)),
    )


def _lobulated_inside(t: Tumour, qx: np.ndarray, qy: np.ndarray, qz: float, scale: float) -> np.ndarray:
    """Points (relative, axis-scaled, mm) inside the lobulated surface of radius ``scale * R``."""
    d = np.sqrt(qx * qx + qy * qy + qz * qz) + 1e-6
    cos = (qx[..., None] * t.bump_dirs[:, 0] + qy[..., None] * t.bump_dirs[:, 1] + qz * t.bump_dirs[:, 2]) / d[..., None]
    rad = scale * t.radius_mm * (1.0 + (t.bump_amp * np.exp(t.bump_kappa * (cos - 1.0))).sum(axis=-1))
    return d <= rad


def rasterise(t: Tumour, xs: np.ndarray, ys: np.ndarray, z: float) -> tuple[slice, slice, np.ndarray] | None:
    """Compartment codes (-1 outside) of tumour ``t`` on the plane ``z`` sampled at ``xs``/``ys`` (mm).

    Returns the row/column slices of the bounding box and the int8 compartment array, or
    ``None`` when the plane misses the tumour.
    """
    cx, cy, cz = t.centre_mm
    ext = t.extent_mm
    if abs(z - cz) > ext:
        return None
    c0, c1 = np.searchsorted(xs, [cx - ext, cx + ext])
    r0, r1 = np.searchsorted(ys, [cy - ext, cy + ext])
    if c1 <= c0 or r1 <= r0:
        return None
    rows, cols = slice(int(r0), int(r1)), slice(int(c0), int(c1))
    dx = (xs[cols] - cx)[None, :]
    dy = (ys[rows] - cy)[:, None]
    dz = z - cz
    qx, qy, qz = dx / t.axes[0], dy / t.axes[1], dz / t.axes[2]
    qx, qy = np.broadcast_arrays(qx, qy)
    body = _lobulated_inside(t, qx, qy, qz, 1.0)
    for direction, length, width in t.spicules:
        p0 = 0.6 * t.radius_mm * direction
        seg = (t.radius_mm + length) * direction - p0
        tt = np.clip(((qx - p0[0]) * seg[0] + (qy - p0[1]) * seg[1] + (qz - p0[2]) * seg[2]) / (seg @ seg), 0, 1)
        ex, ey, ez = qx - p0[0] - tt * seg[0], qy - p0[1] - tt * seg[1], qz - p0[2] - tt * seg[2]
        r = width * (1.0 - tt) + 0.15 * tt
        body |= ex * ex + ey * ey + ez * ez <= r * r
    out = np.full(body.shape, -1, dtype=np.int8)
    if t.kind == "ground_glass":
        out[body] = GGO
    elif t.kind == "part_solid":
        out[body] = GGO
        out[body & _lobulated_inside(t, qx, qy, qz, t.core_frac)] = SOLID
    else:
        out[body] = SOLID
    for sub, code in ((t.necrosis, NECROSIS), (t.cavity, CAVITY)):
        if sub is not None:
            off, rad = sub
            inside = (dx - off[0]) ** 2 + (dy - off[1]) ** 2 + (dz - off[2]) ** 2 <= rad * rad
            out[body & inside] = code
    for off, rad in t.calcifications:
        out[(dx - off[0]) ** 2 + (dy - off[1]) ** 2 + (dz - off[2]) ** 2 <= rad * rad] = CALCIFICATION
    return rows, cols, out


def build_texture(t: Tumour, rng: np.random.Generator, pixel_mm: float) -> None:
    """Attach a unit-std 3D texture field on the output pixel grid around the tumour.

    The grid is aligned to global pixel indices (columns/rows of the full field of view) and to
    global multiples of ``TEXTURE_DZ_MM`` so that crops and slice thicknesses sample one field.
    """
    ext = t.extent_mm + 2.0
    cx, cy, cz = t.centre_mm
    col0 = int(np.floor((cx - ext) / pixel_mm))
    row0 = int(np.floor((cy - ext) / pixel_mm))
    k0 = int(np.floor((cz - ext) / TEXTURE_DZ_MM))
    n_xy = int(np.ceil(2 * ext / pixel_mm)) + 2
    n_z = int(np.ceil(2 * ext / TEXTURE_DZ_MM)) + 2
    white = rng.standard_normal((n_z, n_xy, n_xy), dtype=np.float32)
    sig = (t.texture_sigma_mm / TEXTURE_DZ_MM, t.texture_sigma_mm / pixel_mm, t.texture_sigma_mm / pixel_mm)
    tex = ndimage.gaussian_filter(white, sig, mode="wrap")
    tex /= tex.std() + 1e-12
    t.texture = tex.astype(np.float32)
    t.texture_origin = (k0, row0, col0)


def texture_plane(t: Tumour, zs: np.ndarray, row0_mm_idx: int, col0_mm_idx: int, shape: tuple[int, int]) -> np.ndarray:
    """Mean of the tumour texture over sub-slice positions ``zs`` on an output window.

    ``row0_mm_idx``/``col0_mm_idx`` are the signed pixel indices (relative to the FOV centre) of
    the window's first row/column. Points outside the texture box get 0.
    """
    assert t.texture is not None
    k0, r0, c0 = t.texture_origin
    tex = t.texture
    acc = np.zeros(tex.shape[1:], dtype=np.float32)
    for z in zs:
        q = z / TEXTURE_DZ_MM - 0.5 - k0
        k = int(np.floor(q))
        w = float(q - k)
        k_a, k_b = np.clip([k, k + 1], 0, tex.shape[0] - 1)
        acc += (1 - w) * tex[k_a] + w * tex[k_b]
    acc /= len(zs)
    out = np.zeros(shape, dtype=np.float32)
    rs, re = max(r0, row0_mm_idx), min(r0 + tex.shape[1], row0_mm_idx + shape[0])
    cs, ce = max(c0, col0_mm_idx), min(c0 + tex.shape[2], col0_mm_idx + shape[1])
    if re > rs and ce > cs:
        out[rs - row0_mm_idx:re - row0_mm_idx, cs - col0_mm_idx:ce - col0_mm_idx] = acc[rs - r0:re - r0, cs - c0:ce - c0]
    return out

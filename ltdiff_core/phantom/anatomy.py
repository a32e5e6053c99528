"""Seedable 3D synthetic chest: ground-truth HU, label map and lung tumours.

The anatomy is a continuous object defined in mm (x to the patient's left = image right,
y posterior = image down, z caudal from about the lung apex), so one seed gives the same body
for any slice thickness or crop. Sharp structures are rasterised at 2x in-plane on a few
sub-slices per slice and area-averaged (partial volume without aliasing); smooth textures come
from FFT-filtered random fields seeded per z plane, added at output resolution by tissue fraction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from . import tumours as tm

FULL_SIZE = 512  # the field of view is always FULL_SIZE pixels; smaller images are crops

LABELS: dict[int, str] = {
    0: "air",
    1: "fat",
    2: "muscle",
    3: "mediastinal_fat",
    4: "heart",
    5: "great_vessel",
    6: "oesophagus",
    7: "airway_wall",
    8: "airway_lumen",
    9: "lung",
    10: "lung_vessel",
    11: "cortical_bone",
    12: "cancellous_bone",
    13: "cartilage",
    14: "spinal_cord",
    15: "intervertebral_disc",
    16: "abdomen",
    17: "tumour_solid",
    18: "tumour_ground_glass",
    19: "tumour_necrosis",
    20: "tumour_cavity",
    21: "tumour_calcification",
}
(AIR, FAT, MUSCLE, MED_FAT, HEART, GREAT_VESSEL, OESOPHAGUS, AIRWAY_WALL, AIRWAY_LUMEN, LUNG, LUNG_VESSEL,
 CORTEX, CANCELLOUS, CARTILAGE, CORD, DISC, ABDOMEN) = range(17)
TUMOUR_LABEL0 = 17  # + compartment index (tumours.SOLID ...)
TUMOUR_CODE0 = 32  # internal raster codes: TUMOUR_CODE0 + N_COMPARTMENTS * k + compartment
LUNG_FAMILY = (LUNG, LUNG_VESSEL, AIRWAY_WALL, AIRWAY_LUMEN)

# Texture groups (fractions are accumulated per group and textured at output resolution).
G_LUNG, G_CANCELLOUS, G_MUSCLE, G_SOFT = 1, 2, 3, 4


def _lut(codes: tuple[int, ...] | list[int]) -> np.ndarray:
    lut = np.zeros(256, dtype=bool)
    lut[list(codes)] = True
    return lut


ANY = np.ones(256, dtype=bool)
ONLY_LUNG = _lut(LUNG_FAMILY)
ONLY_MED = _lut([MED_FAT])
ONLY_MED_LUNG = _lut([MED_FAT, *LUNG_FAMILY])
ONLY_WALL = _lut([MUSCLE, FAT])


def _smoothstep(x: float, lo: float, hi: float) -> float:
    t = min(max((x - lo) / (hi - lo), 0.0), 1.0)
    return t * t * (3 - 2 * t)


# --------------------------------------------------------------------------------------------
# Geometry


@dataclass
class Segments:
    """Tapered capsules (vessels, airways, ribs) painted as a batch on each plane."""

    p0: np.ndarray  # (N, 3)
    p1: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    code: np.ndarray  # outer label
    inner_code: np.ndarray  # lumen/marrow label, 0 = none
    wall: np.ndarray  # wall thickness (mm) when inner_code > 0
    only: list[np.ndarray]  # allowed-LUT per segment

    @classmethod
    def from_list(cls, items: list[tuple]) -> Segments:
        if not items:
            z = np.zeros((0, 3))
            return cls(z, z, np.zeros(0), np.zeros(0), np.zeros(0, int), np.zeros(0, int), np.zeros(0), [])
        p0, p1, r0, r1, code, inner, wall, only = zip(*items)
        return cls(np.array(p0, float), np.array(p1, float), np.array(r0, float), np.array(r1, float),
                   np.array(code, int), np.array(inner, int), np.array(wall, float), list(only))

    def __post_init__(self) -> None:
        rmax = np.maximum(self.r0, self.r1) if len(self.r0) else np.zeros(0)
        self.zlo = np.minimum(self.p0[:, 2], self.p1[:, 2]) - rmax
        self.zhi = np.maximum(self.p0[:, 2], self.p1[:, 2]) + rmax

    def paint(self, L: np.ndarray, xs: np.ndarray, ys: np.ndarray, z: float) -> None:
        for i in np.flatnonzero((self.zlo <= z) & (self.zhi >= z)):
            _capsule(L, xs, ys, z, self.p0[i], self.p1[i], self.r0[i], self.r1[i],
                     int(self.code[i]), int(self.inner_code[i]), float(self.wall[i]), self.only[i])


def _capsule(L: np.ndarray, xs: np.ndarray, ys: np.ndarray, z: float, p0: np.ndarray, p1: np.ndarray,
             r0: float, r1: float, code: int, inner: int, wall: float, only: np.ndarray) -> None:
    """Paint the cut of a tapered capsule with the plane ``z`` (only over codes allowed by ``only``)."""
    d = p1 - p0
    rmax = max(r0, r1)
    if abs(d[2]) < 1e-9:
        t_lo, t_hi = 0.0, 1.0
    else:
        ta, tb = (z - rmax - p0[2]) / d[2], (z + rmax - p0[2]) / d[2]
        t_lo, t_hi = max(0.0, min(ta, tb)), min(1.0, max(ta, tb))
        if t_lo > t_hi:
            return
    qa, qb = p0 + t_lo * d, p0 + t_hi * d
    c0, c1 = np.searchsorted(xs, [min(qa[0], qb[0]) - rmax, max(qa[0], qb[0]) + rmax])
    r_0, r_1 = np.searchsorted(ys, [min(qa[1], qb[1]) - rmax, max(qa[1], qb[1]) + rmax])
    if c1 <= c0 or r_1 <= r_0:
        return
    sub = L[r_0:r_1, c0:c1]
    wx = (xs[c0:c1] - p0[0])[None, :]
    wy = (ys[r_0:r_1] - p0[1])[:, None]
    wz = z - p0[2]
    t = np.clip((wx * d[0] + wy * d[1] + wz * d[2]) / float(d @ d), 0.0, 1.0)
    ex, ey, ez = wx - t * d[0], wy - t * d[1], wz - t * d[2]
    dist2 = ex * ex + ey * ey + ez * ez
    r = r0 + (r1 - r0) * t
    allowed = only[sub]
    sub[(dist2 <= r * r) & allowed] = code
    if inner:
        ri = np.maximum(r - wall, 0.0)
        sub[(dist2 <= ri * ri) & allowed] = inner


def _ellipse_mask(xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, a: float, b: float,
                  angle: float = 0.0) -> tuple[slice, slice, np.ndarray] | None:
    """Bounding-box slices and mask of an (optionally rotated) ellipse; None if empty."""
    if a <= 0 or b <= 0:
        return None
    r = max(a, b) if angle else None
    hx, hy = (r, r) if angle else (a, b)
    c0, c1 = np.searchsorted(xs, [cx - hx, cx + hx])
    r0, r1 = np.searchsorted(ys, [cy - hy, cy + hy])
    if c1 <= c0 or r1 <= r0:
        return None
    X = (xs[c0:c1] - cx)[None, :]
    Y = (ys[r0:r1] - cy)[:, None]
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        X, Y = X * c + Y * s, -X * s + Y * c
    return slice(int(r0), int(r1)), slice(int(c0), int(c1)), (X / a) ** 2 + (Y / b) ** 2 <= 1.0


def _paint_ellipse(L: np.ndarray, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, a: float, b: float,
                   code: int, only: np.ndarray = ANY, angle: float = 0.0, ymax: float | None = None) -> None:
    got = _ellipse_mask(xs, ys, cx, cy, a, b, angle)
    if got is None:
        return
    rows, cols, m = got
    sub = L[rows, cols]
    if ymax is not None:
        m = m & (ys[rows] <= ymax)[:, None]
    sub[m & only[sub]] = code


def _paint_bone_ellipse(L, xs, ys, cx, cy, a, b, cortex_mm, only=ANY, angle=0.0) -> None:
    _paint_ellipse(L, xs, ys, cx, cy, a, b, CORTEX, only, angle)
    _paint_ellipse(L, xs, ys, cx, cy, a - cortex_mm, b - cortex_mm, CANCELLOUS, _lut([CORTEX]), angle)


@dataclass
class Chest:
    """All per-case anatomical parameters (mm) and the 3D segment sets."""

    a: float  # body half-width
    b: float  # body AP half-depth
    y_back: float  # flat back
    fat: tuple[float, float, float]  # lateral, anterior, posterior subcutaneous fat
    muscle: tuple[float, float, float]
    z_arch: float
    z_dome: tuple[float, float]  # right, left diaphragm dome tops
    r_vert: float
    vert_period: float
    vert_phase: float
    heart: tuple[float, float, float, float, float, float, float]  # cx, cy, cz, ax, ay, az, fat
    sternum_z: tuple[float, float]
    scapula_z: tuple[float, float]
    hu: dict[str, float]
    tex: dict[str, float]
    med_segments: Segments = field(repr=False, default=None)  # type: ignore[assignment]
    lung_segments: Segments = field(repr=False, default=None)  # type: ignore[assignment]
    rib_segments: Segments = field(repr=False, default=None)  # type: ignore[assignment]

    # Derived shapes as functions of z -----------------------------------------------------
    def body_axes(self, z: float) -> tuple[float, float]:
        w = 0.94 + 0.06 * _smoothstep(z, -60.0, 120.0)
        return self.a * w, self.b * w

    def cavity(self, z: float) -> tuple[float, float, float]:
        """(half-width, centre y, AP half-depth) of the pleural cavity at z (0 above the apex)."""
        a, b = self.body_axes(z)
        front = -b + self.fat[1] + self.muscle[1]
        back = self.y_back - self.fat[2] - self.muscle[2]
        grow = np.sqrt(min(max((z + 25.0) / 100.0, 0.0), 1.0))
        ac = (a - self.fat[0] - self.muscle[0]) * grow
        bc = 0.5 * (back - front) * (0.55 + 0.45 * grow)
        return float(ac), float(back - bc), float(bc)

    def spine_y(self) -> float:
        _, yc, bc = self.cavity(150.0)
        return yc + bc - 0.35 * self.r_vert

    def front_y(self) -> float:
        _, yc, bc = self.cavity(150.0)
        return yc - bc

    def mediastinum(self, z: float) -> tuple[float, float, float, float]:
        """(cx, cy, half-width, half-depth) of the mediastinal envelope at z."""
        mx = float(np.interp(z, [-40, 40, self.z_arch, self.z_arch + 30, 400], [20, 24, 34, 38, 38]))
        front, back = self.front_y(), self.spine_y() - self.r_vert + 4.0
        return 4.0, 0.5 * (front + back), mx, 0.5 * (back - front) + 8.0

    def heart_axes(self, z: float, grow: float = 0.0) -> tuple[float, float] | None:
        cx, cy, cz, ax, ay, az, _ = self.heart
        q = 1.0 - ((z - cz) / (az + grow)) ** 2
        if q <= 0:
            return None
        return (ax + grow) * np.sqrt(q), (ay + grow) * np.sqrt(q)

    def dome_radius(self, z: float, side: int) -> float:
        zd = self.z_dome[0 if side < 0 else 1]
        return 14.0 * np.sqrt(z - zd) if z > zd else 0.0

    def dome_centre(self, side: int) -> tuple[float, float]:
        ac, yc, bc = self.cavity(150.0)
        return side * 0.42 * ac, yc + 0.1 * bc

    def paravertebral(self) -> tuple[float, float, float, float]:
        return 0.0, self.spine_y() + 4.0, self.r_vert + 13.0, self.r_vert + 9.0

    def in_lung(self, x: np.ndarray, y: np.ndarray, z: float, margin: float = 0.0) -> np.ndarray:
        """Whether points lie in lung parenchyma at least ``margin`` mm from its boundary (approx.)."""
        ac, yc, bc = self.cavity(z)
        if ac <= margin or bc <= margin:
            return np.zeros(np.shape(x), bool)
        ok = (x / (ac - margin)) ** 2 + ((y - yc) / (bc - margin)) ** 2 <= 1.0
        mcx, mcy, mx, my = self.mediastinum(z)
        ok &= ((x - mcx) / (mx + margin)) ** 2 + ((y - mcy) / (my + margin)) ** 2 > 1.0
        hx = self.heart_axes(z, grow=self.heart[6] + margin)
        if hx is not None:
            ok &= ((x - self.heart[0]) / hx[0]) ** 2 + ((y - self.heart[1]) / hx[1]) ** 2 > 1.0
        px, py, pa, pb = self.paravertebral()
        ok &= ((x - px) / (pa + margin)) ** 2 + ((y - py) / (pb + margin)) ** 2 > 1.0
        for side in (-1, 1):
            rd = self.dome_radius(z + margin, side)
            if rd > 0:
                dx, dy = self.dome_centre(side)
                ok &= (x - dx) ** 2 + (y - dy) ** 2 > (rd + margin) ** 2
        # keep away from the hila, where the large vessels and bronchi enter
        zh = self.z_arch + 35.0
        ok &= ~((np.abs(z - zh) < 25 + margin) & (np.abs(x - 4.0) < mx_hilum(self, margin)))
        return ok


def mx_hilum(chest: Chest, margin: float) -> float:
    return chest.mediastinum(chest.z_arch + 35.0)[2] + 25.0 + margin


def sample_chest(rng: np.random.Generator) -> Chest:
    """Draw one body (sizes in mm, HU levels, texture amplitudes); segments added separately."""
    a = rng.uniform(140.0, 168.0)
    b = a * rng.uniform(0.62, 0.74)
    f_lat = rng.uniform(5.0, 24.0)
    fat = (f_lat, f_lat * rng.uniform(0.5, 1.0), f_lat * rng.uniform(0.4, 0.8))
    muscle = (rng.uniform(10.0, 15.0), rng.uniform(10.0, 16.0), rng.uniform(26.0, 36.0))
    z_arch = rng.uniform(55.0, 70.0)
    z_dome_r = rng.uniform(195.0, 215.0)
    r_vert = rng.uniform(14.0, 18.0)
    chest = Chest(
        a=a, b=b, y_back=b * rng.uniform(0.80, 0.88), fat=fat, muscle=muscle, z_arch=z_arch,
        z_dome=(z_dome_r, z_dome_r + rng.uniform(8.0, 20.0)), r_vert=r_vert,
        vert_period=rng.uniform(24.0, 28.0), vert_phase=rng.uniform(0.0, 30.0),
        heart=(0.0,) * 7, sternum_z=(0.0, 0.0), scapula_z=(0.0, 0.0),
        hu={
            "fat": rng.uniform(-110.0, -90.0), "muscle": rng.uniform(45.0, 55.0), "heart": rng.uniform(35.0, 45.0),
            "blood": rng.uniform(35.0, 45.0), "lung": rng.uniform(-880.0, -840.0),
            "cortex": rng.uniform(850.0, 1200.0), "cancellous": rng.uniform(200.0, 300.0),
            "cartilage": rng.uniform(100.0, 140.0), "abdomen": rng.uniform(50.0, 60.0),
        },
        tex={
            "lung_fine": rng.uniform(15.0, 30.0), "lung_coarse": rng.uniform(15.0, 30.0),
            "lung_rho": rng.uniform(0.3, 0.6), "lung_gradient": rng.uniform(20.0, 50.0),
            "cancellous": rng.uniform(55.0, 80.0), "streak": rng.uniform(0.05, 0.09), "soft": 5.0,
        },
    )
    ac, yc, bc = chest.cavity(150.0)
    front = yc - bc
    ay = rng.uniform(36.0, 42.0)
    chest.heart = (rng.uniform(10.0, 25.0), front + ay + 2.0, z_arch + rng.uniform(90.0, 105.0),
                   rng.uniform(50.0, 60.0), ay, rng.uniform(50.0, 60.0), rng.uniform(2.5, 6.0))
    chest.sternum_z = (z_arch - 25.0, chest.heart[2] + 40.0)
    chest.scapula_z = (rng.uniform(-35.0, -20.0), rng.uniform(110.0, 140.0))
    return chest


def _tree(rng: np.random.Generator, root: np.ndarray, direction: np.ndarray, r: float, length: float,
          generations: int) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Bifurcating tapering tree: (p0, p1, r0, r1) per segment."""
    out = []
    stack = [(root, direction / np.linalg.norm(direction), r, length, 0)]
    while stack:
        p, d, rr, ll, g = stack.pop()
        q = p + ll * d
        out.append((p, q, rr, rr * 0.85))
        if g + 1 >= generations:
            continue
        e = np.cross(d, rng.normal(size=3))
        e /= np.linalg.norm(e) + 1e-12
        for sgn in (-1.0, 1.0):
            ang = np.deg2rad(rng.uniform(20.0, 40.0))
            nd = d * np.cos(ang) + sgn * e * np.sin(ang) + rng.normal(0, 0.08, 3)
            stack.append((q, nd / np.linalg.norm(nd), rr * 0.74, ll * rng.uniform(0.7, 0.85), g + 1))
    return out


def build_segments(chest: Chest, rng: np.random.Generator) -> None:
    """Mediastinal vessels and airways, the lung vessel/bronchus trees and the ribs."""
    front, ys = chest.front_y(), chest.spine_y()
    za, zh = chest.z_arch, chest.z_arch + 35.0
    hx, hy, hz = chest.heart[:3]
    med: list[tuple] = []
    V, W = GREAT_VESSEL, AIRWAY_WALL
    y_oes = ys - chest.r_vert - 9.0
    y_tr = y_oes - 16.0
    x_desc, y_desc = chest.r_vert * 0.6 + 13.0, ys - 0.3 * chest.r_vert
    y_asc = front + 40.0
    z_car = za + 20.0
    p = np.array
    # trachea, oesophagus, main bronchi
    med.append((p([0, y_tr, -200]), p([0, y_tr, z_car]), 9.0, 9.0, CARTILAGE, AIRWAY_LUMEN, 2.0, ONLY_MED))
    med.append((p([3, y_oes, -200]), p([8, y_oes, 400]), 7.5, 7.5, OESOPHAGUS, 0, 0.0, ONLY_MED))
    x_hil = {s: 4.0 + s * (chest.mediastinum(zh)[2] + 6.0) for s in (-1, 1)}
    for s in (-1, 1):
        med.append((p([0, y_tr, z_car]), p([x_hil[s], y_tr + 4, zh]), 6.5, 5.5, W, AIRWAY_LUMEN, 1.5, ONLY_MED_LUNG))
    # aorta: ascending, arch, descending; pulmonary trunk and arteries; great vessels, veins
    med.append((p([-8, y_asc, hz - 30]), p([-8, y_asc, za + 12]), 15.0, 15.0, V, 0, 0.0, ONLY_MED))
    mid = p([-2, 0.5 * (y_asc + y_desc) - 5, za])
    med.append((p([-8, y_asc, za + 12]), mid, 13.0, 13.0, V, 0, 0.0, ONLY_MED))
    med.append((mid, p([x_desc, y_desc, za + 12]), 13.0, 12.0, V, 0, 0.0, ONLY_MED))
    med.append((p([x_desc, y_desc, za + 12]), p([x_desc + 3, y_desc, 400]), 12.0, 11.0, V, 0, 0.0, ONLY_MED))
    pt_top = p([12, front + 38, z_car + 22])
    med.append((p([15, front + 30, hz - 40]), pt_top, 13.0, 12.0, V, 0, 0.0, ONLY_MED))
    for s in (-1, 1):
        med.append((pt_top, p([x_hil[s], y_tr + 14, zh + 4]), 9.0, 8.0, V, 0, 0.0, ONLY_MED_LUNG))
    for x, y, r in ((-10, front + 32, 6.0), (5, front + 36, 4.5), (16, y_desc - 10, 5.0)):
        med.append((p([x, y, za + 5]), p([x * 1.6, y - 5, -200]), r, r, V, 0, 0.0, ONLY_MED))
    med.append((p([-22, front + 22, hz - 35]), p([-24, front + 20, -200]), 9.0, 8.0, V, 0, 0.0, ONLY_MED))
    med.append((p([26, front + 14, za - 12]), p([-20, front + 21, za + 2]), 6.0, 6.0, V, 0, 0.0, ONLY_MED))
    chest.med_segments = Segments.from_list(med)

    # lung vessel trees from the hila (~6 generations) with bronchi along the first generations
    lung: list[tuple] = []
    for s in (-1, 1):
        root = p([x_hil[s], y_tr + 14, zh + 4])
        for direction in (p([s * 0.6, 0.1, -1.0]), p([s * 1.0, -0.3, 0.2]), p([s * 0.5, 0.5, 1.0]),
                          p([s * 0.6, -0.6, 0.8])):
            for q0, q1, r0, r1 in _tree(rng, root, direction, 5.5, rng.uniform(24.0, 32.0), 6):
                lung.append((q0, q1, r0, r1, LUNG_VESSEL, 0, 0.0, ONLY_LUNG))
                if r0 > 2.2:
                    off = np.cross(q1 - q0, p([0, 0, 1.0]))
                    off = off / (np.linalg.norm(off) + 1e-9) * (r0 + 0.8 * r0 + 1.0)
                    rb = 0.8 * r0
                    lung.append((q0 + off, q1 + off, rb, 0.8 * r1, AIRWAY_WALL, AIRWAY_LUMEN,
                                 max(0.5, 0.22 * rb), ONLY_LUNG))
    # small cross-sectional vessels, each with its bronchus
    placed = 0
    for _ in range(4000):
        if placed >= 450:
            break
        z = rng.uniform(-15.0, 250.0)
        ac, yc, bc = chest.cavity(z)
        x, y = rng.uniform(-ac, ac), yc + rng.uniform(-bc, bc)
        if not chest.in_lung(np.array(x), np.array(y), z, margin=3.0):
            continue
        d = p([rng.normal(0, 0.35), rng.normal(0, 0.35), 1.0])
        d /= np.linalg.norm(d)
        h = rng.uniform(8.0, 20.0)
        rv = rng.uniform(0.7, 2.0)
        rb = rv * rng.uniform(0.8, 1.2)
        phi = rng.uniform(0, 2 * np.pi)
        off = (rv + rb + rng.uniform(0.3, 1.0)) * p([np.cos(phi), np.sin(phi), 0.0])
        c = p([x, y, z])
        lung.append((c - h * d, c + h * d, rv, rv * 0.85, LUNG_VESSEL, 0, 0.0, ONLY_LUNG))
        lung.append((c + off - h * d, c + off + h * d, rb, rb * 0.9, AIRWAY_WALL, AIRWAY_LUMEN,
                     max(0.35, 0.22 * rb), ONLY_LUNG))
        placed += 1
    chest.lung_segments = Segments.from_list(lung)

    # ribs: oblique tubes around the cavity, descending anteriorly; anterior ends are cartilage
    ribs: list[tuple] = []
    z0, spacing, drop = rng.uniform(-45.0, -35.0), rng.uniform(20.0, 24.0), rng.uniform(95.0, 120.0)
    ac_ref = chest.cavity(150.0)[0]
    for s in (-1, 1):
        for k in range(12):
            rr = rng.uniform(4.0, 5.5)
            zk = z0 + k * spacing + rng.normal(0, 1.5)
            us = np.linspace(0.0, 1.0, 15)
            pts = []
            for u in us:
                z = zk + drop * u ** 1.3
                ac, yc, bc = chest.cavity(max(z, -20.0))
                ac = max(ac, 0.6 * ac_ref)
                phi = np.deg2rad(16.0 + 150.0 * u)
                pts.append(p([s * (ac + rr + 1.5) * np.sin(phi), yc + (bc + rr + 1.5) * np.cos(phi), z]))
            for i in range(len(us) - 1):
                if us[i] >= 0.78:
                    ribs.append((pts[i], pts[i + 1], 0.9 * rr, 0.9 * rr, CARTILAGE, 0, 0.0, ONLY_WALL))
                else:
                    ribs.append((pts[i], pts[i + 1], rr, rr, CORTEX, CANCELLOUS, 1.3, ONLY_WALL))
    chest.rib_segments = Segments.from_list(ribs)


# --------------------------------------------------------------------------------------------
# Rasterisation of one plane


def render_plane(chest: Chest, tumours: list[tm.Tumour], z: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Raster codes (uint8) of the plane ``z`` sampled at ``xs`` (columns) and ``ys`` (rows), mm."""
    L = np.zeros((len(ys), len(xs)), dtype=np.uint8)
    a, b = chest.body_axes(z)
    _paint_ellipse(L, xs, ys, 0.0, 0.0, a, b, FAT, ymax=chest.y_back)
    f_lat, f_ant, f_post = chest.fat
    m_lat, m_ant, m_post = chest.muscle
    ym = 0.5 * ((chest.y_back - f_post) + (-b + f_ant))
    _paint_ellipse(L, xs, ys, 0.0, ym, a - f_lat, 0.5 * ((chest.y_back - f_post) - (-b + f_ant)) * 1.12, MUSCLE,
                   _lut([FAT]), ymax=chest.y_back - f_post)
    # scapulae (thin plates in the posterior chest wall)
    z0, z1 = chest.scapula_z
    if z0 < z < z1:
        ac, yc, bc = chest.cavity(max(z, 60.0))
        half = 38.0 * np.sqrt(max(1.0 - ((z - 0.5 * (z0 + z1)) / (0.5 * (z1 - z0))) ** 2, 0.0))
        phi = np.deg2rad(52.0)
        for s in (-1, 1):
            angle = np.arctan2(-bc * np.sin(phi), s * ac * np.cos(phi))
            _paint_ellipse(L, xs, ys, s * (ac + 12.0) * np.sin(phi), yc + (bc + 12.0) * np.cos(phi), half, 2.2,
                           CORTEX, ONLY_WALL, angle=float(angle))
    chest.rib_segments.paint(L, xs, ys, z)
    # sternum
    sz0, sz1 = chest.sternum_z
    if sz0 < z < sz1:
        half_w = 25.0 if z < chest.z_arch + 5.0 else 15.0
        _paint_bone_ellipse(L, xs, ys, 0.0, chest.front_y() - 7.0, half_w, 6.0, 1.2, _lut([MUSCLE, FAT]))
    # pleural cavity -> lung, then mediastinum, heart, domes, spine
    ac, yc, bc = chest.cavity(z)
    _paint_ellipse(L, xs, ys, 0.0, yc, ac, bc, LUNG, _lut([MUSCLE]))
    mcx, mcy, mx, my = chest.mediastinum(z)
    _paint_ellipse(L, xs, ys, mcx, mcy, mx, my, MED_FAT, _lut([LUNG]))
    hcx, hcy = chest.heart[:2]
    fat_axes = chest.heart_axes(z, grow=chest.heart[6])
    if fat_axes is not None:
        _paint_ellipse(L, xs, ys, hcx, hcy, *fat_axes, MED_FAT, _lut([LUNG, MED_FAT]))
        heart_axes = chest.heart_axes(z)
        if heart_axes is not None:
            _paint_ellipse(L, xs, ys, hcx, hcy, *heart_axes, HEART, _lut([MED_FAT]))
    chest.med_segments.paint(L, xs, ys, z)
    px, py, pa, pb = chest.paravertebral()
    _paint_ellipse(L, xs, ys, px, py, pa, pb, MUSCLE, _lut([LUNG, MED_FAT]))
    _paint_vertebra(L, xs, ys, z, chest)
    # lung vessels and bronchi, then the diaphragm domes (abdomen below), then tumours
    chest.lung_segments.paint(L, xs, ys, z)
    for side in (-1, 1):
        rd = chest.dome_radius(z, side)
        if rd > 0:
            dx, dy = chest.dome_centre(side)
            _paint_ellipse(L, xs, ys, dx, dy, rd, rd, ABDOMEN, _lut([*LUNG_FAMILY, MED_FAT, HEART]))
    for k, t in enumerate(tumours):
        got = tm.rasterise(t, xs, ys, z)
        if got is None:
            continue
        rows, cols, comp = got
        sub = L[rows, cols]
        m = (comp >= 0) & ONLY_LUNG[sub]
        sub[m] = (TUMOUR_CODE0 + tm.N_COMPARTMENTS * k + comp[m]).astype(np.uint8)
    return L


def _paint_vertebra(L: np.ndarray, xs: np.ndarray, ys: np.ndarray, z: float, chest: Chest) -> None:
    """Vertebral body (disc between bodies, cortical end plates), canal with cord, posterior arch."""
    yv, rv = chest.spine_y(), chest.r_vert
    phase = (z - chest.vert_phase) % chest.vert_period
    only = _lut([MUSCLE, MED_FAT, LUNG, FAT])
    if phase < 5.0:
        _paint_ellipse(L, xs, ys, 0.0, yv, rv, rv * 0.9, DISC, only)
    elif phase < 6.2 or phase > chest.vert_period - 1.2:
        _paint_ellipse(L, xs, ys, 0.0, yv, rv, rv * 0.9, CORTEX, only)
    else:
        _paint_bone_ellipse(L, xs, ys, 0.0, yv, rv, rv * 0.9, 1.6, only)
    yc = yv + 0.9 * rv + 9.0
    _paint_bone_ellipse(L, xs, ys, 0.0, yc, 14.0, 13.0, 1.5, only)
    for s in (-1, 1):
        _paint_bone_ellipse(L, xs, ys, s * 22.0, yc + 2.0, 13.0, 5.0, 1.2, only, angle=s * np.deg2rad(15.0))
    back = chest.y_back - chest.fat[2] - 6.0
    length = max(min(40.0, back - yc), 12.0)
    _paint_bone_ellipse(L, xs, ys, 0.0, yc + 0.5 * length, 4.0, 0.5 * length, 1.2, only)
    _paint_ellipse(L, xs, ys, 0.0, yc, 8.0, 7.5, CORD, _lut([CORTEX, CANCELLOUS]))


# --------------------------------------------------------------------------------------------
# Smooth random fields, seeded per z plane so that any slab of one seed samples the same field


@dataclass(frozen=True)
class FieldSpec:
    fid: int
    grid: int  # in-plane decimation of the pixel grid
    sigma_mm: float


FIELDS = {
    "lung_fine": FieldSpec(1, 2, 1.2),
    "lung_coarse": FieldSpec(2, 4, 4.5),
    "muscle": FieldSpec(3, 4, 5.0),
    "bone": FieldSpec(4, 2, 1.0),
}
FIELD_DZ_BASE_MM = 0.7  # plane spacing = grid * this


class PlaneField:
    """A unit-std 3D Gaussian-correlated field on planes k * dz, generated for a z range."""

    def __init__(self, key: int, spec: FieldSpec, z_lo: float, z_hi: float, pixel_mm: float) -> None:
        self.spec, self.dz = spec, spec.grid * FIELD_DZ_BASE_MM
        self.m = FULL_SIZE // spec.grid
        self.grid_mm = spec.grid * pixel_mm
        sig_xy = spec.sigma_mm / self.grid_mm
        sig_z = spec.sigma_mm / self.dz
        margin = int(np.ceil(3 * sig_z)) + 1
        self.k0 = int(np.floor(z_lo / self.dz)) - 1
        k1 = int(np.ceil(z_hi / self.dz)) + 1
        ks = range(self.k0 - margin, k1 + margin + 1)
        white = np.stack([
            np.random.default_rng(np.random.SeedSequence([key, spec.fid, k + (1 << 20)]))
            .standard_normal((self.m, self.m), dtype=np.float32) for k in ks])
        f = np.fft.fftfreq(self.m)
        fr = np.fft.rfftfreq(self.m)
        h = np.exp(-2 * np.pi ** 2 * sig_xy ** 2 * (f[:, None] ** 2 + fr[None, :] ** 2)).astype(np.float32)
        planes = np.fft.irfft2(np.fft.rfft2(white) * h, s=(self.m, self.m)).astype(np.float32)
        planes = ndimage.gaussian_filter1d(planes, sig_z, axis=0, mode="constant", truncate=3.0)
        planes = planes[margin:len(ks) - margin]
        # exact variance of the filter: in-plane energy of h (full spectrum) times the z kernel energy
        h_full = np.exp(-2 * np.pi ** 2 * sig_xy ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
        kz = np.exp(-0.5 * (np.arange(-int(3 * sig_z + 0.5), int(3 * sig_z + 0.5) + 1) / sig_z) ** 2)
        kz /= kz.sum()
        var = float((h_full ** 2).mean()) * float((kz ** 2).sum())
        self.planes = planes / np.float32(np.sqrt(var))

    def sample(self, zs: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Mean over sub-slice positions ``zs`` of the field, bilinear on output pixels ``rows``/``cols``."""
        acc = np.zeros((self.m, self.m), dtype=np.float32)
        for z in zs:
            q = z / self.dz - self.k0
            k = int(np.floor(q))
            w = np.float32(q - k)
            acc += (1 - w) * self.planes[k] + w * self.planes[k + 1]
        acc /= len(zs)
        g = self.spec.grid
        rc, cc = (rows + 0.5) / g - 0.5, (cols + 0.5) / g - 0.5
        r0, c0 = np.floor(rc).astype(int), np.floor(cc).astype(int)
        fr, fc = (rc - r0).astype(np.float32)[:, None], (cc - c0).astype(np.float32)[None, :]
        r0m, r1m, c0m, c1m = r0 % self.m, (r0 + 1) % self.m, c0 % self.m, (c0 + 1) % self.m
        top = acc[r0m][:, c0m] * (1 - fc) + acc[r0m][:, c1m] * fc
        bot = acc[r1m][:, c0m] * (1 - fc) + acc[r1m][:, c1m] * fc
        return top * (1 - fr) + bot * fr


# --------------------------------------------------------------------------------------------
# Tumour placement and the whole volume


def place_tumours(chest: Chest, rng: np.random.Generator, half_slab_mm: float) -> list[tm.Tumour]:
    """1-3 tumours fully inside the lungs, the later ones within the slab around the first.

    A tumour that finds no room (a large, spiculated one in a small lung) is shrunk and tried
    again, down to the 6 mm minimum radius, so every case gets at least one tumour.
    """
    n = int(rng.integers(1, 4))
    draws = [(tm.sample_tumour(r), r) for r in rng.spawn(n)]
    placed: list[tm.Tumour] = []
    for t, trng in draws:
        while True:
            if _try_place(chest, t, trng, placed, half_slab_mm):
                placed.append(t)
                break
            if t.radius_mm <= tm.MIN_RADIUS_MM:
                break
            t = tm.scaled(t, max(0.85, tm.MIN_RADIUS_MM / t.radius_mm))
    return placed


def _try_place(chest: Chest, t: tm.Tumour, rng: np.random.Generator, placed: list[tm.Tumour],
               half_slab_mm: float, tries: int = 200) -> bool:
    """Draw positions for ``t`` until one lies inside a lung, clear of the tumours placed."""
    ext = t.extent_mm
    for _ in range(tries):
        if not placed:
            z = rng.uniform(25.0 + ext, chest.z_dome[0] - ext - 12.0)
        else:
            z0 = placed[0].centre_mm[2]
            z = z0 + rng.uniform(-1, 1) * max(half_slab_mm - 0.5 * t.radius_mm, 0.0)
        ac, yc, bc = chest.cavity(z)
        x = rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.95) * ac
        y = yc + rng.uniform(-0.9, 0.9) * bc
        if not _sphere_in_lung(chest, np.array([x, y, z]), ext + 2.0):
            continue
        if any(np.linalg.norm(o.centre_mm - [x, y, z]) < o.extent_mm + ext + 3.0 for o in placed):
            continue
        t.centre_mm = np.array([x, y, z])
        return True
    return False


def _sphere_in_lung(chest: Chest, c: np.ndarray, r: float) -> bool:
    pts = np.array([[0, 0, 0]] + [[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)
                                  if (i, j, k) != (0, 0, 0)], float)
    pts[1:] /= np.linalg.norm(pts[1:], axis=1, keepdims=True)
    pts = c + r * pts
    for zz in np.unique(pts[:, 2]):
        sel = pts[:, 2] == zz
        if not chest.in_lung(pts[sel, 0], pts[sel, 1], float(zz), margin=1.0).all():
            return False
    return True


def sub_slice_count(thickness_mm: float) -> int:
    """Sub-slices averaged per slice: enough for partial volume along z, bounded for speed."""
    return int(np.clip(np.ceil(thickness_mm / 0.75), 2, 7))


@dataclass
class ChestVolume:
    """What ``chest_truth`` produces besides the arrays: the geometry of the slab."""

    tumours: list[dict[str, Any]]
    masks: list[np.ndarray]
    slice_z_mm: np.ndarray
    crop_origin: tuple[int, int]  # (row, column) of the crop in the full 512 grid
    chest: Chest


def chest_truth(rng: np.random.Generator, n_slices: int, thickness_mm: float, size: int = FULL_SIZE,
                pixel_mm: float = 0.7) -> tuple[np.ndarray, np.ndarray, ChestVolume]:
    """Ground-truth HU ``(n_slices, size, size)`` float32, labels (uint8, ``LABELS``) and geometry.

    Contiguous slices of ``thickness_mm`` centred on the tumours' z range; each slice is the
    mean of the 3D object over its thickness. ``size < 512`` is a crop of the 512 grid centred on
    the first tumour. Tumours whose mask is empty in the slab/crop are dropped.
    """
    if not 1 <= size <= FULL_SIZE:
        raise ValueError(f"size must be in 1..{FULL_SIZE}, got {size}")
    if n_slices < 1 or thickness_mm <= 0:
        raise ValueError("need n_slices >= 1 and thickness_mm > 0")
    body_rng, seg_rng, tum_rng, tex_rng, key_rng = rng.spawn(5)
    field_key = int(key_rng.integers(0, 2 ** 62))
    chest = sample_chest(body_rng)
    build_segments(chest, seg_rng)
    half = 0.5 * n_slices * thickness_mm
    tumours = place_tumours(chest, tum_rng, half)
    for t, r in zip(tumours, tex_rng.spawn(len(tumours))):
        tm.build_texture(t, r, pixel_mm)
    if tumours:
        lo = min(t.centre_mm[2] - t.extent_mm for t in tumours)
        hi = max(t.centre_mm[2] + t.extent_mm for t in tumours)
        zc = 0.5 * (lo + hi)
    else:
        zc = 120.0
    z_start = zc - half
    # crop window (full-grid pixel indices), centred on the first tumour
    if size < FULL_SIZE and tumours:
        ccol = int(np.floor(tumours[0].centre_mm[0] / pixel_mm)) + FULL_SIZE // 2
        crow = int(np.floor(tumours[0].centre_mm[1] / pixel_mm)) + FULL_SIZE // 2
        row0 = int(np.clip(crow - size // 2, 0, FULL_SIZE - size))
        col0 = int(np.clip(ccol - size // 2, 0, FULL_SIZE - size))
    else:
        row0 = col0 = (FULL_SIZE - size) // 2
    rows, cols = np.arange(row0, row0 + size), np.arange(col0, col0 + size)
    y_out = (rows + 0.5 - FULL_SIZE / 2) * pixel_mm
    xs2 = (np.arange(2 * size) + 0.5) * (pixel_mm / 2) + (col0 - FULL_SIZE / 2) * pixel_mm
    ys2 = (np.arange(2 * size) + 0.5) * (pixel_mm / 2) + (row0 - FULL_SIZE / 2) * pixel_mm

    fields = {name: PlaneField(field_key, spec, z_start, z_start + 2 * half, pixel_mm) for name, spec in FIELDS.items()}
    hu_lut, grp_lut, lab_lut, tum_lut = _luts(chest, tumours)
    n_sub = sub_slice_count(thickness_mm)
    truth = np.empty((n_slices, size, size), np.float32)
    labels = np.empty((n_slices, size, size), np.uint8)
    masks = [np.zeros((n_slices, size, size), bool) for _ in tumours]
    n_t = len(tumours)
    for s in range(n_slices):
        z_a = z_start + s * thickness_mm
        zs = z_a + (np.arange(n_sub) + 0.5) * thickness_mm / n_sub
        hu2 = np.zeros((2 * size, 2 * size), np.float32)
        grp_frac = np.zeros((5, 2 * size, 2 * size), np.float32)
        tfrac = np.zeros((3 * n_t, 2 * size, 2 * size), np.float32)
        for i, z in enumerate(zs):
            L = render_plane(chest, tumours, float(z), xs2, ys2)
            hu2 += hu_lut[L]
            G = grp_lut[L]
            for g in (G_LUNG, G_CANCELLOUS, G_MUSCLE, G_SOFT):
                grp_frac[g] += G == g
            if n_t:
                T = tum_lut[L]
                for j in range(3 * n_t):
                    tfrac[j] += T == j + 1
            if i == n_sub // 2:
                labels[s] = lab_lut[L[1::2, 1::2]]
        scale = np.float32(1.0 / (4 * n_sub))
        hu = _down(hu2) * scale
        frac = {g: _down(grp_frac[g]) * scale for g in (G_LUNG, G_CANCELLOUS, G_MUSCLE, G_SOFT)}
        lung_fine = fields["lung_fine"].sample(zs, rows, cols)
        lung_coarse = fields["lung_coarse"].sample(zs, rows, cols)
        rho = chest.tex["lung_rho"]
        _, ycav, bcav = chest.cavity(float(zs.mean()))
        gradient = chest.tex["lung_gradient"] * np.clip((y_out - ycav) / max(bcav, 1.0), -1, 1)[:, None]
        hu += frac[G_LUNG] * (chest.tex["lung_fine"] * lung_fine
                              + chest.tex["lung_coarse"] * (rho * lung_fine + np.sqrt(1 - rho ** 2) * lung_coarse)
                              + gradient)
        hu += frac[G_CANCELLOUS] * chest.tex["cancellous"] * fields["bone"].sample(zs, rows, cols)
        muscle_field = fields["muscle"].sample(zs, rows, cols)
        streak = np.clip(1.0 - np.abs(muscle_field) / chest.tex["streak"], 0.0, 1.0)
        hu += frac[G_MUSCLE] * (streak * (chest.hu["fat"] - chest.hu["muscle"]) + chest.tex["soft"] * muscle_field)
        hu += frac[G_SOFT] * chest.tex["soft"] * lung_coarse
        lab = labels[s]
        lab[(lab == MUSCLE) & (streak > 0.5)] = FAT
        for k, t in enumerate(tumours):
            f_solid, f_ggo, f_rest = (_down(tfrac[3 * k + j]) * scale for j in range(3))
            if f_solid.any() or f_ggo.any():
                tex = tm.texture_plane(t, zs, row0 - FULL_SIZE // 2, col0 - FULL_SIZE // 2, (size, size))
                hu += (f_solid * t.texture_std["solid"] + f_ggo * t.texture_std["ground_glass"]) * tex
            masks[k][s] = (f_solid + f_ggo + f_rest) >= 0.5
        truth[s] = hu
    keep = [k for k in range(n_t) if masks[k].any()]
    info = []
    for k in keep:
        d = tumours[k].info()
        zk = np.flatnonzero(masks[k].any(axis=(1, 2)))
        d["slices"] = [int(zk[0]), int(zk[-1])]
        c, e = tumours[k].centre_mm[2], tumours[k].extent_mm
        d["z_range_mm"] = [round(float(c - e), 3), round(float(c + e), 3)]
        info.append(d)
    vol = ChestVolume(tumours=info, masks=[masks[k] for k in keep],
                      slice_z_mm=z_start + (np.arange(n_slices) + 0.5) * thickness_mm,
                      crop_origin=(row0, col0), chest=chest)
    return truth, labels, vol


def _down(a: np.ndarray) -> np.ndarray:
    """Sum of each 2x2 block (strided adds are much faster than a reshaped reduction)."""
    return (a[0::2, 0::2] + a[1::2, 0::2]) + (a[0::2, 1::2] + a[1::2, 1::2])


def _luts(chest: Chest, tumours: list[tm.Tumour]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per raster code: HU, texture group, output label, and tumour fraction slot (1-based)."""
    h = chest.hu
    hu = np.full(256, -1000.0, np.float32)
    hu[[FAT, MED_FAT]] = h["fat"]
    hu[MUSCLE] = h["muscle"]
    hu[HEART] = h["heart"]
    hu[GREAT_VESSEL] = h["blood"]
    hu[OESOPHAGUS] = h["muscle"] - 5.0
    hu[AIRWAY_WALL] = -50.0
    hu[AIRWAY_LUMEN] = -960.0
    hu[LUNG] = h["lung"]
    hu[LUNG_VESSEL] = h["blood"]
    hu[CORTEX] = h["cortex"]
    hu[CANCELLOUS] = h["cancellous"]
    hu[CARTILAGE] = h["cartilage"]
    hu[CORD] = 35.0
    hu[DISC] = 80.0
    hu[ABDOMEN] = h["abdomen"]
    grp = np.zeros(256, np.uint8)
    grp[LUNG] = G_LUNG
    grp[CANCELLOUS] = G_CANCELLOUS
    grp[MUSCLE] = G_MUSCLE
    grp[[HEART, GREAT_VESSEL, OESOPHAGUS, ABDOMEN]] = G_SOFT
    lab = np.zeros(256, np.uint8)
    lab[: TUMOUR_LABEL0] = np.arange(TUMOUR_LABEL0)
    tum = np.zeros(256, np.uint8)
    for k, t in enumerate(tumours):
        base = TUMOUR_CODE0 + tm.N_COMPARTMENTS * k
        keys = ("solid", "ground_glass", "necrosis", "cavity", "calcification")
        for j, key in enumerate(keys):
            hu[base + j] = t.hu[key]
            lab[base + j] = TUMOUR_LABEL0 + j
        tum[[base + tm.SOLID, base + tm.NECROSIS]] = 3 * k + 1
        tum[base + tm.GGO] = 3 * k + 2
        tum[[base + tm.CAVITY, base + tm.CALCIFICATION]] = 3 * k + 3
    return hu, grp, lab, tum

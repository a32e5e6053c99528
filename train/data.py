"""Paired training data: case folders -> normalised slices -> random crops.

Reads the DICOM case layout through ``ltdiff_core.dicomio.cases`` (phantom or real paired
acquisitions) and, for small tests and exported data, ``*.npz`` files holding ``source``,
``target`` (Z, Y, X) HU and ``spacing``. Nothing here assumes phantom content.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ltdiff_core.normalize import hu_to_unit

BODY_HU = -500.0


@dataclass
class PairedVolume:
    name: str
    source: np.ndarray   # (Z, Y, X) normalised
    target: np.ndarray
    spacing: tuple[float, float, float]
    guide: np.ndarray | None = None  # first guess G(source), normalised (first_guess diffusion)

    @property
    def pixel_mm(self) -> tuple[float, float]:
        return self.spacing[1], self.spacing[2]


def find_cases(roots: Sequence[str | Path]) -> list[Path]:
    """Case folders (DICOM layout) and ``*.npz`` case files under the given roots, sorted."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"case root {root} does not exist")
        if root.is_file() and root.suffix == ".npz":
            found.append(root)
            continue
        npz = sorted(root.glob("*.npz"))
        if npz:
            found.extend(npz)
            continue
        from ltdiff_core.dicomio.cases import list_cases

        found.extend(Path(p) for p in list_cases(root))
    if not found:
        raise FileNotFoundError(f"no cases found under {list(map(str, roots))}")
    return sorted(found, key=lambda p: (p.parent.as_posix(), p.name))


def load_volume(path: Path, source_kernel: str = "Br40", target_kernel: str = "Bl64") -> PairedVolume:
    if path.suffix == ".npz":
        with np.load(path) as d:
            src, tgt, sp = d["source"], d["target"], tuple(float(s) for s in d["spacing"])
        name = f"{path.parent.name}/{path.stem}"
    else:
        from ltdiff_core.dicomio.cases import load_case

        case = load_case(path, source_kernel=source_kernel, target_kernel=target_kernel)
        src, tgt, sp = case.source, case.target, tuple(float(s) for s in case.spacing)
        name = f"{path.parent.name}/{case.name}"
    if src.shape != tgt.shape:
        raise ValueError(f"{path}: source {src.shape} and target {tgt.shape} differ")
    return PairedVolume(name, hu_to_unit(src), hu_to_unit(tgt), sp)  # type: ignore[arg-type]


def load_split(
    roots: Sequence[str | Path], val_cases: int, source_kernel: str = "Br40", target_kernel: str = "Bl64"
) -> tuple[list[PairedVolume], list[PairedVolume]]:
    """Split by case (never by slice): the last ``val_cases`` cases in sorted order validate."""
    paths = find_cases(roots)
    if val_cases >= len(paths):
        raise ValueError(f"{len(paths)} cases cannot leave {val_cases} for validation")
    vols = [load_volume(p, source_kernel, target_kernel) for p in paths]
    cut = len(vols) - val_cases
    return vols[:cut], vols[cut:]


def describe(vols: Sequence[PairedVolume]) -> dict:
    """Short training-data description for checkpoint metadata."""
    return {
        "cases": [v.name for v in vols],
        "slices": int(sum(v.source.shape[0] for v in vols)),
        "matrix": sorted({tuple(v.source.shape[1:]) for v in vols}),
        "spacing_mm": sorted({tuple(round(s, 3) for s in v.spacing) for v in vols}),
    }


class CropSampler:
    """Random paired crops, biased towards the body (most of a CT slice is air).

    Randomness comes from ``(seed, rank, step)``, so a resumed run and every DDP rank draw
    reproducible, distinct crops without a shared sampler.
    """

    def __init__(self, vols: Sequence[PairedVolume], crop: int, batch: int, seed: int, rank: int = 0,
                 body_fraction: float = 0.8) -> None:
        self.vols = list(vols)
        self.crop, self.batch, self.seed, self.rank = crop, batch, seed, rank
        self.body_fraction = body_fraction
        self.index = [(vi, z) for vi, v in enumerate(self.vols) for z in range(v.source.shape[0])]
        for v in self.vols:
            if min(v.source.shape[1:]) < crop:
                raise ValueError(f"case {v.name} slices {v.source.shape[1:]} are smaller than crop {crop}")
        self._body = {}

    def _body_pixels(self, vi: int, z: int) -> np.ndarray:
        key = (vi, z)
        if key not in self._body:
            m = self.vols[vi].source[z] > BODY_HU / 1000.0
            self._body[key] = np.argwhere(m)[::7]
        return self._body[key]

    def _origin(self, rng: np.random.Generator, vi: int, z: int) -> tuple[int, int]:
        h, w = self.vols[vi].source.shape[1:]
        c = self.crop
        pts = self._body_pixels(vi, z)
        if len(pts) and rng.random() < self.body_fraction:
            cy, cx = pts[rng.integers(len(pts))]
            return int(np.clip(cy - c // 2, 0, h - c)), int(np.clip(cx - c // 2, 0, w - c))
        return int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))

    def paired(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(A, B)`` crops, each (batch, 1, crop, crop) float32 in normalised space."""
        a, _, b = self.triplet(step, with_guide=False)
        return a, b

    def triplet(self, step: int, with_guide: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(A, G, B)`` crops at the same places as :meth:`paired`; G from ``PairedVolume.guide``."""
        rng = np.random.default_rng([self.seed, self.rank, step])
        a = np.empty((self.batch, 1, self.crop, self.crop), np.float32)
        b = np.empty_like(a)
        g = np.empty_like(a) if with_guide else None
        for i in range(self.batch):
            vi, z = self.index[rng.integers(len(self.index))]
            y, x = self._origin(rng, vi, z)
            v = self.vols[vi]
            a[i, 0] = v.source[z, y:y + self.crop, x:x + self.crop]
            b[i, 0] = v.target[z, y:y + self.crop, x:x + self.crop]
            if g is not None:
                if v.guide is None:
                    raise ValueError(f"case {v.name} has no first-guess volume")
                g[i, 0] = v.guide[z, y:y + self.crop, x:x + self.crop]
        if rng.random() < 0.5:  # flips keep the isotropic noise statistics
            a, b = a[..., ::-1].copy(), b[..., ::-1].copy()
            g = g[..., ::-1].copy() if g is not None else None
        return a, g, b

    def mixed(self, step: int) -> np.ndarray:
        """Crops of either kernel (autoencoder training): half source, half target."""
        a, b = self.paired(step)
        take_b = np.random.default_rng([self.seed, self.rank, step, 1]).random(self.batch) < 0.5
        return np.where(take_b[:, None, None, None], b, a)


def fixed_val_batches(vols: Sequence[PairedVolume], crop: int, batch: int, n: int, seed: int = 12345
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed list of paired validation crops (same every evaluation)."""
    s = CropSampler(vols, crop, batch, seed)
    return [s.paired(i) for i in range(n)]


def fixed_val_triplets(vols: Sequence[PairedVolume], crop: int, batch: int, n: int, seed: int = 12345
                       ) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
    """Like :func:`fixed_val_batches` with the first guess: same crops, plus G(A)."""
    s = CropSampler(vols, crop, batch, seed)
    return [s.triplet(i) for i in range(n)]


def attach_first_guess(
    vols: Sequence[PairedVolume], apply_hu: Callable[[np.ndarray, tuple[float, float]], np.ndarray]
) -> None:
    """Set ``guide`` = G(source) per volume; ``apply_hu(hu_slices, pixel_mm)`` works in HU on whole
    slices, exactly as at inference, so crops see no filter edge effects."""
    from ltdiff_core.normalize import unit_to_hu

    for v in vols:
        v.guide = hu_to_unit(apply_hu(unit_to_hu(v.source), v.pixel_mm)).astype(np.float32)


class LatentCache:
    """Scaled latents of whole training slices (A, B and, for first-guess diffusion, G(A)), cropped
    per step.

    Encoding once instead of at every step removes the encoder from the training loop (about
    90 % of a step's cost on CPU with the image term off), and latents of whole slices are what
    inference sees (no crop-border effects in the encoder). Crops are body-biased like
    :class:`CropSampler` and drawn from ``(seed, rank, step)``. No flips: pixel-unshuffled
    channels do not flip with the grid.
    """

    def __init__(self, vols: Sequence[PairedVolume], encode: Callable, factor: int, crop: int, batch: int,
                 seed: int, rank: int = 0, first_guess: bool = False, body_fraction: float = 0.8,
                 noise_condition: bool = False) -> None:
        import torch

        from ltdiff_core import noise_condition as nc
        from ltdiff_core.normalize import unit_to_hu

        if crop % factor:
            raise ValueError(f"crop {crop} is not a multiple of the latent factor {factor}")
        self.lc, self.batch, self.seed, self.rank = crop // factor, batch, seed, rank
        self.body_fraction = body_fraction
        self.z: list[tuple] = []
        self.body: list[np.ndarray] = []
        raw_noise: list[np.ndarray] = []
        self._last_draws: tuple[int, list[tuple[int, int, int]]] | None = None
        with torch.no_grad():
            for v in vols:
                h, w = (s - s % factor for s in v.source.shape[1:])
                if min(h, w) // factor < self.lc:
                    raise ValueError(f"case {v.name} slices are smaller than crop {crop}")
                for z in range(v.source.shape[0]):
                    enc = lambda img: encode(torch.from_numpy(np.ascontiguousarray(img[z, :h, :w]))[None, None])[0]  # noqa: E731
                    if first_guess and v.guide is None:
                        raise ValueError(f"case {v.name} has no first-guess volume")
                    zg = enc(v.guide) if first_guess else None
                    self.z.append((enc(v.source), zg, enc(v.target)))
                    small = v.source[z, :h:factor, :w:factor] > BODY_HU / 1000.0
                    self.body.append(np.argwhere(small))
                    if noise_condition:  # the whole input slice in HU, as the Standardizer measures it
                        raw_noise.append(nc.describe_slice(unit_to_hu(v.source[z])))
        #: Raw per-slice noise descriptors (ltdiff_core.noise_condition), and their training statistics.
        self.noise_raw = np.stack(raw_noise) if noise_condition else None
        self.noise_shift, self.noise_scale = nc.statistics(self.noise_raw) if noise_condition else (None, None)

    def __len__(self) -> int:
        return len(self.z)

    def _draws(self, step: int) -> list[tuple[int, int, int]]:
        """``(slice index, y, x)`` of each crop of ``step``'s batch (kept for the step's second
        caller: :meth:`batch_at` and :meth:`noise_at` ask for the same step)."""
        if self._last_draws is not None and self._last_draws[0] == step:
            return self._last_draws[1]
        rng = np.random.default_rng([self.seed, self.rank, step, 7])
        out = []
        for _ in range(self.batch):
            i = int(rng.integers(len(self.z)))
            hh, ww = self.z[i][0].shape[-2:]
            pts, c = self.body[i], self.lc
            if len(pts) and rng.random() < self.body_fraction:
                cy, cx = pts[rng.integers(len(pts))]
                y, x = int(np.clip(cy - c // 2, 0, hh - c)), int(np.clip(cx - c // 2, 0, ww - c))
            else:
                y, x = int(rng.integers(0, hh - c + 1)), int(rng.integers(0, ww - c + 1))
            out.append((i, y, x))
        self._last_draws = (step, out)
        return out

    def noise_at(self, step: int):
        """Standardised noise descriptors of the slices of ``step``'s crops, (batch, k); None without them."""
        import torch

        if self.noise_raw is None:
            return None
        from ltdiff_core.noise_condition import standardise

        rows = self.noise_raw[[i for i, _, _ in self._draws(step)]]
        return torch.from_numpy(standardise(rows, self.noise_shift, self.noise_scale))

    def batch_at(self, step: int) -> tuple:
        """``(Z_A, Z_G or None, Z_B)`` crops, each (batch, C, crop/f, crop/f)."""
        import torch

        za, zg, zb = [], [], []
        c = self.lc
        for i, y, x in self._draws(step):
            a, g, b = self.z[i]
            za.append(a[:, y:y + c, x:x + c])
            zb.append(b[:, y:y + c, x:x + c])
            if g is not None:
                zg.append(g[:, y:y + c, x:x + c])
        return torch.stack(za), (torch.stack(zg) if zg else None), torch.stack(zb)

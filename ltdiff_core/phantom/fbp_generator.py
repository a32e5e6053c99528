"""Second paired-data generator: projection, Poisson counts, log and filtered back-projection.

Why: a model trained only on the image-domain scanner (``scanner.py``) may learn that scanner's
exact kernels and IR step rather than "smooth kernel -> sharp kernel". This generator shares
only the anatomy; everything between truth and image is its own physics chain:

* parallel-beam, ray-driven projection of ``mu`` (bilinear samples, one per pixel along the
  ray; ``torch.nn.functional.grid_sample`` on the CPU, views in chunks), a Gaussian
  pre-detection blur (focal spot and detector);
* angular tube-current modulation (photons per view ``~ sqrt`` of the view's attenuation) and
  Poisson counts, ``p = -log(counts / N0)``; ``N0`` is solved from the target smooth-kernel
  soft-tissue noise (15-40 HU) with the analytic FBP noise variance;
* FBP with a **smooth** filter (ramp x Shepp-Logan x Hann) and a **sharp** ramp-boost filter,
  neither of them the scanner's Br40/Bl64 windows;
* an IR-like step of its own (noise-adaptive bilateral filter blended by strength 0-5, drawn
  per kernel), then int16 rounding;
* the rescan: a second, independent Poisson draw of the same line integrals at the same dose,
  reconstructed with the sharp filter and the sharp series' IR strength.

The series are written as ``Br40`` (smooth), ``Bl64`` (sharp) and ``RESCAN`` so that all tooling
reads them unchanged. Speed comes from fewer views than the ``pi/2 * n_det`` sampling rule
(``DEFAULT_VIEWS``); this leaves the noise power spectrum near the centre unchanged (the dose
is split over fewer views) and adds faint view aliasing far from the centre (see
``docs/data-layout.md`` for the measured MTF/NPS and seconds per slice).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from .anatomy import FULL_SIZE, LABELS, chest_truth
from .case import PhantomCase
from .fbp import ramlak_ramp
from .scanner import MU_WATER_PER_MM, SOFT_TISSUE_HU

#: Seed-sequence tag: the fbp generator's case ``s`` never shares draws with the scanner's case ``s``.
SEED_TAG = 0xFB9
#: Views over 180 degrees: about a third of ``pi/2 * n_det`` at 512^2 (see module docstring).
DEFAULT_VIEWS = 360
SMOOTH_HANN_CUTOFF = 10.0  # lp/cm: Hann window reaches 0 here (0.5 at 5 lp/cm)
SHARP_BOOST = 0.8  # height of the ramp boost
SHARP_BOOST_F = 4.5  # lp/cm where the boost peaks
SHARP_TAPER = (6.2, 8.0)  # lp/cm: cosine roll-off of the sharp filter
FOCAL_BLUR_MM = 0.3  # Gaussian sigma of focal spot + detector response, on the detector
TCM_POWER = 0.5  # photons per view ~ (view attenuation) ** TCM_POWER
IR_MAX_BLEND = 0.6  # blend weight of the bilateral result at strength 5
IR_RANGE_K = 2.5  # range sigma of the bilateral filter, in local noise sigmas
IR_SPATIAL_MM = 1.0  # spatial sigma of the bilateral filter
_VIEW_CHUNK = 24
KERNEL_LABELS = ("Br40", "Bl64")  # labels written for the smooth and the sharp filter


@dataclass
class FbpAcquisition:
    """Per-case settings: target smooth-kernel noise and the IR strength of each series."""

    noise_br40_hu: float
    ir_strength_a: float
    ir_strength_b: float
    n_views: int = DEFAULT_VIEWS


def sample_fbp_acquisition(rng: np.random.Generator, n_views: int = DEFAULT_VIEWS) -> FbpAcquisition:
    """Smooth-kernel soft-tissue noise uniform in 15-40 HU; IR strength uniform 0-5 per kernel."""
    noise = rng.uniform(15.0, 40.0)
    s_a, s_b = rng.uniform(0.0, 5.0, size=2)
    return FbpAcquisition(float(noise), float(s_a), float(s_b), int(n_views))


# --- filters -----------------------------------------------------------------------------
def smooth_window(f: np.ndarray) -> np.ndarray:
    """Shepp-Logan-type apodisation times a Hann window: a soft-tissue kernel."""
    f = np.abs(np.asarray(f, dtype=np.float64))
    hann = np.where(f < SMOOTH_HANN_CUTOFF, 0.5 * (1.0 + np.cos(np.pi * f / SMOOTH_HANN_CUTOFF)), 0.0)
    return np.sinc(f / (2.0 * SMOOTH_HANN_CUTOFF)) * hann


def sharp_window(f: np.ndarray) -> np.ndarray:
    """Ramp boost peaking at ``SHARP_BOOST_F`` with a cosine taper: a sharp (lung/bone) kernel."""
    f = np.abs(np.asarray(f, dtype=np.float64))
    x = (f / SHARP_BOOST_F) ** 2
    boost = 1.0 + SHARP_BOOST * x * np.exp(1.0 - x)
    lo, hi = SHARP_TAPER
    taper = np.where(f <= lo, 1.0, np.where(f >= hi, 0.0, 0.5 * (1.0 + np.cos(np.pi * (f - lo) / (hi - lo)))))
    return boost * taper


WINDOWS = {"smooth": smooth_window, "sharp": sharp_window}


@lru_cache(maxsize=16)
def _filter(n_det: int, det_mm: float, kind: str) -> tuple[np.ndarray, int]:
    """Frequency response (padded length) of the discrete Ram-Lak ramp times the kernel window."""
    ramp, f, n_pad = ramlak_ramp(n_det, det_mm)
    return (ramp * WINDOWS[kind](f)).astype(np.float64), n_pad


def filter_noise_gain(n_det: int, det_mm: float, kind: str) -> float:
    """Variance of one back-projected view of unit white sinogram noise, before the ``pi/V`` sums.

    ``sum(h^2)`` of the filter (Parseval) times the average variance kept by linear
    interpolation between neighbouring bins, ``2/3 + rho_1/3`` with ``rho_1`` the filtered
    noise's lag-1 autocorrelation (negative for a sharp filter).
    """
    filt, _ = _filter(n_det, det_mm, kind)
    acf = np.real(np.fft.ifft(filt**2))
    return float(acf[0] * (2.0 / 3.0 + acf[1] / acf[0] / 3.0))


# --- geometry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """Parallel-beam geometry for an ``(ny, nx)`` grid: detector bins at ``det_mm``, views over 180 deg."""

    ny: int
    nx: int
    pixel_mm: float
    n_views: int

    @property
    def det_mm(self) -> float:
        return self.pixel_mm

    @property
    def n_det(self) -> int:
        return int(np.ceil(np.hypot(self.ny, self.nx) * self.pixel_mm / self.det_mm)) + 4

    @property
    def angles(self) -> np.ndarray:
        return np.linspace(0.0, np.pi, self.n_views, endpoint=False)


def _torch():
    import torch

    return torch


def project(mu: np.ndarray, geo: Geometry) -> np.ndarray:
    """Line integrals ``(views, n_det)`` of a ``(Y, X)`` attenuation map (1/mm).

    Ray-driven: bilinear samples one pixel apart along each ray, only over the disc that holds
    every non-zero pixel (rays that miss it are 0). Grids are built as outer sums into one
    buffer: ``F.affine_grid`` is several times slower on the CPU.
    """
    torch = _torch()
    F = torch.nn.functional
    n_det = geo.n_det
    s_all = (np.arange(n_det) - (n_det - 1) / 2.0) * geo.det_mm
    yy, xx = np.nonzero(mu > 0)
    out = np.zeros((geo.n_views, n_det), dtype=np.float64)
    if len(yy) == 0:
        return out
    radius = float(np.max(np.hypot((yy - (geo.ny - 1) / 2.0), (xx - (geo.nx - 1) / 2.0)))) * geo.pixel_mm
    radius += 2.0 * geo.pixel_mm
    sel = np.nonzero(np.abs(s_all) <= radius)[0]
    s = torch.from_numpy(s_all[sel].astype(np.float32))
    n_t = 2 * int(np.ceil(radius / geo.pixel_mm)) + 1
    t = torch.from_numpy(((np.arange(n_t) - (n_t - 1) / 2.0) * geo.pixel_mm).astype(np.float32))
    sx, sy = geo.nx * geo.pixel_mm / 2.0, geo.ny * geo.pixel_mm / 2.0
    img = torch.from_numpy(np.ascontiguousarray(mu, dtype=np.float32))[None, None]
    angles = geo.angles
    buf = torch.empty((_VIEW_CHUNK, len(sel), n_t, 2), dtype=torch.float32)
    with torch.inference_mode():
        for i0 in range(0, geo.n_views, _VIEW_CHUNK):
            th = angles[i0 : i0 + _VIEW_CHUNK]
            nv = len(th)
            c = torch.from_numpy(np.cos(th).astype(np.float32))[:, None, None]
            sn = torch.from_numpy(np.sin(th).astype(np.float32))[:, None, None]
            g = buf[:nv]
            # x = s cos - t sin, y = s sin + t cos, normalised to the image half extent
            torch.add(s[None, :, None] * (c / sx), t[None, None, :] * (-sn / sx), out=g[..., 0])
            torch.add(s[None, :, None] * (sn / sy), t[None, None, :] * (c / sy), out=g[..., 1])
            vals = F.grid_sample(img, g.reshape(1, nv * len(sel), n_t, 2), mode="bilinear",
                                 padding_mode="zeros", align_corners=False)
            out[i0 : i0 + nv, sel] = vals.reshape(nv, len(sel), n_t).sum(-1).double().numpy() * geo.pixel_mm
    return out


def back_project(q: np.ndarray, geo: Geometry, out_shape: tuple[int, int] | None = None,
                 out_pixel_mm: float | None = None) -> np.ndarray:
    """``pi / V * sum_v q(v, u(x, v))``, linear interpolation along the detector.

    ``q`` is ``(views, n_det)`` or ``(C, views, n_det)``; the result is ``(Y, X)`` or ``(C, Y, X)``:
    several sinograms share one sampling grid, which is most of the cost. ``out_shape`` and
    ``out_pixel_mm`` give another (centred) output grid than ``geo``'s.
    """
    torch = _torch()
    F = torch.nn.functional
    q3 = q[None] if q.ndim == 2 else q
    n_ch = q3.shape[0]
    ny, nx = out_shape or (geo.ny, geo.nx)
    px = out_pixel_mm or geo.pixel_mm
    half_det = geo.n_det * geo.det_mm / 2.0
    xs = torch.from_numpy(((np.arange(nx) - (nx - 1) / 2.0) * px / half_det).astype(np.float32))
    ys = torch.from_numpy(((np.arange(ny) - (ny - 1) / 2.0) * px / half_det).astype(np.float32))
    sino = torch.from_numpy(np.ascontiguousarray(np.moveaxis(q3, 0, 1), dtype=np.float32))  # (V, C, n_det)
    acc = torch.zeros((n_ch, ny, nx), dtype=torch.float64)
    angles = geo.angles
    buf = torch.zeros((_VIEW_CHUNK, ny, nx, 2), dtype=torch.float32)  # second coordinate stays 0
    with torch.inference_mode():
        for i0 in range(0, len(angles), _VIEW_CHUNK):
            th = angles[i0 : i0 + _VIEW_CHUNK]
            nv = len(th)
            c = torch.from_numpy(np.cos(th).astype(np.float32))[:, None, None]
            sn = torch.from_numpy(np.sin(th).astype(np.float32))[:, None, None]
            g = buf[:nv]
            torch.add(xs[None, None, :] * c, ys[None, :, None] * sn, out=g[..., 0])  # u = x cos + y sin
            rows = sino[i0 : i0 + nv][:, :, None, :]  # (Vc, C, 1, n_det)
            vals = F.grid_sample(rows, g, mode="bilinear", padding_mode="border", align_corners=False)
            acc += vals.sum(dim=0).double()
    out = acc.numpy() * (np.pi / len(angles))
    return out[0] if q.ndim == 2 else out


def filter_sinogram(p: np.ndarray, geo: Geometry, kind: str) -> np.ndarray:
    filt, n_pad = _filter(geo.n_det, geo.det_mm, kind)
    return np.real(np.fft.ifft(np.fft.fft(p, n=n_pad, axis=1) * filt, axis=1))[:, : geo.n_det]


def _blur_detector(p: np.ndarray, det_mm: float) -> np.ndarray:
    n_pad = 1 << int(np.ceil(np.log2(2 * p.shape[1])))
    f = np.fft.rfftfreq(n_pad, d=det_mm)
    g = np.exp(-2.0 * (np.pi * FOCAL_BLUR_MM * f) ** 2)
    return np.fft.irfft(np.fft.rfft(p, n=n_pad, axis=1) * g, n=n_pad, axis=1)[:, : p.shape[1]]


def view_weights(p: np.ndarray) -> np.ndarray:
    """Relative photons per view (mean 1): angular tube-current modulation from the view's attenuation."""
    a = np.exp(TCM_POWER * np.percentile(p, 95, axis=1))
    return a / a.mean()


def noise_variance_map(p: np.ndarray, weights: np.ndarray, geo: Geometry, kind: str, photons: float,
                       coarse: int = 4) -> np.ndarray:
    """Analytic FBP noise variance (HU^2) per pixel for ``photons`` unattenuated counts per bin and view.

    ``var(p) = exp(p) / N0_v`` per bin; filtering and interpolation scale it by
    :func:`filter_noise_gain` and back-projection sums views: ``var(x) = (pi/V)^2 * gain *
    sum_v exp(p) / (w_v N0)``. The sum is smooth, so it is back-projected on a grid ``coarse``
    times coarser from every ``coarse``-th view and interpolated back.
    """
    from scipy import ndimage

    k = max(1, int(coarse))
    while geo.n_views % k:
        k -= 1
    sub = Geometry(geo.ny, geo.nx, geo.pixel_mm, geo.n_views // k)
    g = (np.exp(p) / weights[:, None])[::k]
    shape = (-(-geo.ny // k), -(-geo.nx // k))
    bp = back_project(g, sub, out_shape=shape, out_pixel_mm=geo.pixel_mm * k)  # = pi/V' * sum over V' views
    bp = ndimage.zoom(bp, (geo.ny / shape[0], geo.nx / shape[1]), order=1, mode="nearest")[: geo.ny, : geo.nx]
    gain = filter_noise_gain(geo.n_det, geo.det_mm, kind)
    var_mu = (np.pi / geo.n_views) * gain * np.maximum(bp, 0.0) / photons
    return var_mu * (1000.0 / MU_WATER_PER_MM) ** 2


def photons_for_noise(var_at_one: np.ndarray, truth_hu: np.ndarray, target_hu: float) -> float:
    """``N0`` that gives RMS noise ``target_hu`` over soft tissue, from the variance at ``N0 = 1``."""
    soft = (truth_hu > SOFT_TISSUE_HU[0]) & (truth_hu < SOFT_TISSUE_HU[1])
    ref = var_at_one[soft] if soft.mean() > 0.01 else var_at_one
    return float(np.mean(ref) / target_hu**2)


# --- IR-like step ------------------------------------------------------------------------
def bilateral_ir(img: np.ndarray, strength: float, pixel_mm: float, sigma_hu: np.ndarray) -> np.ndarray:
    """Noise-adaptive bilateral filter blended with the input by ``strength`` (0-5), one ``(Y, X)`` slice.

    The range sigma is ``IR_RANGE_K`` local noise sigmas, so noise is averaged and edges well
    above it are kept; strength 0 returns the input.
    """
    if not 0.0 <= strength <= 5.0:
        raise ValueError(f"strength must be within 0..5, got {strength}")
    x = np.asarray(img, dtype=np.float32)
    if strength == 0.0:
        return x.copy()
    r = max(1, int(round(2.0 * IR_SPATIAL_MM / pixel_mm)))
    pad = np.pad(x, r, mode="reflect")
    inv = (1.0 / (2.0 * (IR_RANGE_K * np.maximum(sigma_hu, 1e-3)) ** 2)).astype(np.float32)
    num = np.zeros_like(x)
    den = np.zeros_like(x)
    ny, nx = x.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ws = np.float32(np.exp(-((dy * dy + dx * dx) * pixel_mm**2) / (2.0 * IR_SPATIAL_MM**2)))
            nb = pad[r + dy : r + dy + ny, r + dx : r + dx + nx]
            w = ws * np.exp(-((nb - x) ** 2) * inv)
            num += w * nb
            den += w
    smooth = num / den
    blend = np.float32(IR_MAX_BLEND * strength / 5.0)
    return x + blend * (smooth - x)


# --- one slice, one case -----------------------------------------------------------------
def scan_slice(
    truth_hu: np.ndarray,
    pixel_mm: float,
    rng: np.random.Generator,
    *,
    noise_br40_hu: float,
    ir_strength: tuple[float, float],
    n_views: int = DEFAULT_VIEWS,
    rescan_rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Scan one ``(Y, X)`` slice; float32 integer-valued HU per label ``Br40``/``Bl64`` (+ ``RESCAN``).

    ``noise_br40_hu`` 0 gives noiseless reconstructions (no IR, no Poisson draw).
    """
    truth = np.asarray(truth_hu, dtype=np.float64)
    geo = Geometry(truth.shape[0], truth.shape[1], float(pixel_mm), int(n_views))
    mu = MU_WATER_PER_MM * np.clip(1.0 + truth / 1000.0, 0.0, None)
    p_clean = _blur_detector(project(mu, geo), geo.det_mm)
    sinos = {"clean": p_clean}
    sigma: dict[str, np.ndarray] = {}
    if noise_br40_hu > 0:
        w = view_weights(p_clean)
        var_smooth = noise_variance_map(p_clean, w, geo, "smooth", 1.0)
        ratio = filter_noise_gain(geo.n_det, geo.det_mm, "sharp") / filter_noise_gain(geo.n_det, geo.det_mm, "smooth")
        var1 = {"smooth": var_smooth, "sharp": var_smooth * ratio}
        n0 = photons_for_noise(var1["smooth"], truth, noise_br40_hu)
        sigma = {k: np.sqrt(v / n0).astype(np.float32) for k, v in var1.items()}
        expected = n0 * w[:, None] * np.exp(-p_clean)

        def draw(g: np.random.Generator) -> np.ndarray:
            counts = g.poisson(expected)
            return -np.log(np.maximum(counts, 0.5) / (n0 * w[:, None]))

        sinos["noisy"] = draw(rng)
        if rescan_rng is not None:
            sinos["rescan"] = draw(rescan_rng)
    src = sinos.get("noisy", p_clean)
    plan = [("Br40", "smooth", src, ir_strength[0]), ("Bl64", "sharp", src, ir_strength[1])]
    if rescan_rng is not None:
        plan.append(("RESCAN", "sharp", sinos.get("rescan", p_clean), ir_strength[1]))
    filtered = np.stack([filter_sinogram(p, geo, kind) for _, kind, p, _ in plan])
    mu_imgs = back_project(filtered, geo)  # one sampling grid for all series
    out = {}
    for (label, kind, _, strength), mu_img in zip(plan, mu_imgs):
        img = (1000.0 * (mu_img / MU_WATER_PER_MM - 1.0)).astype(np.float32)
        if noise_br40_hu > 0 and strength > 0:
            img = bilateral_ir(img, strength, pixel_mm, sigma[kind])
        out[label] = np.clip(np.rint(img), -32768, 32767).astype(np.float32)
    return out


def generate_fbp_case(seed: int, n_slices: int, size: int = FULL_SIZE, thickness_mm: float = 1.5,
                      pixel_mm: float = 0.7, rescan: bool = True, n_views: int = DEFAULT_VIEWS) -> PhantomCase:
    """One case of the fbp generator; the same arguments always give the same arrays.

    Streams (children of ``SeedSequence((SEED_TAG, seed))``): anatomy, acquisition, noise,
    rescan noise; so the rescan never changes Br40/Bl64, and no case shares draws with the
    scanner generator's case of the same seed.
    """
    rng = np.random.default_rng(np.random.SeedSequence((SEED_TAG, int(seed))))
    anatomy_rng, acquisition_rng, noise_rng, rescan_rng = rng.spawn(4)
    truth, labels, vol = chest_truth(anatomy_rng, n_slices, thickness_mm, size=size, pixel_mm=pixel_mm)
    params = sample_fbp_acquisition(acquisition_rng, n_views)
    noise_rngs = noise_rng.spawn(n_slices)  # one stream per slice: slice k does not depend on the others
    rescan_rngs = rescan_rng.spawn(n_slices)
    images: dict[str, list[np.ndarray]] = {}
    for k in range(n_slices):
        res = scan_slice(truth[k], pixel_mm, noise_rngs[k], noise_br40_hu=params.noise_br40_hu,
                         ir_strength=(params.ir_strength_a, params.ir_strength_b), n_views=n_views,
                         rescan_rng=rescan_rngs[k] if rescan else None)
        for name, img in res.items():
            images.setdefault(name, []).append(img)
    stack = {name: np.stack(v) for name, v in images.items()}
    meta = {
        "generator": "fbp",
        "seed": int(seed),
        "size": int(size),
        "n_slices": int(n_slices),
        "thickness_mm": float(thickness_mm),
        "pixel_mm": float(pixel_mm),
        "acquisition": asdict(params),
        "kernels": {"Br40": "fbp smooth (ramp x Shepp-Logan x Hann)", "Bl64": "fbp sharp (ramp boost)"},
        "tumours": vol.tumours,
        "slice_z_mm": [round(float(z), 4) for z in vol.slice_z_mm],
        "crop_origin": list(vol.crop_origin),
        "full_size": FULL_SIZE,
    }
    if rescan:
        meta["rescan"] = {"mode": "independent", "kernel": "Bl64", "stream": 3}
    return PhantomCase(
        br40=stack["Br40"], bl64=stack["Bl64"], rescan=stack.get("RESCAN"), truth=truth, labels=labels,
        label_names=dict(LABELS), tumour_masks=vol.masks, tumour_info=vol.tumours,
        spacing=(float(thickness_mm), float(pixel_mm), float(pixel_mm)), meta=meta,
    )

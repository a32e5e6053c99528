"""Where the tissue is: a body region found from the image itself, and a smooth window inside it.

A real CT slice is about half air around the body, plus a patient table, pixels clipped at the
storage minimum (-1024 HU) and PixelPaddingValue outside the reconstruction circle. Those are
the same in both kernels of a pair, or not linear at all, so a fit over the whole slice learns
"sharpening does nothing" from them. Spectra taken through :func:`tissue_window` see the body's
texture only: the window is the body region, inset by a few of its own smoothing widths so that
its soft edge lies in tissue (a Gaussian edge leaks no low-frequency power into the high bands;
an edge through air or padding would).

No segmentation is needed: the body is the largest connected region above -500 HU (lungs and
airways inside it are filled in), which leaves out air, padding and a table that does not touch
the body over a long stretch (the opening cuts thin contacts).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: Above this HU a pixel is tissue (fat is about -100, lung -850: lungs are holes, filled below).
BODY_HU = -500.0
#: Smoothing width of the window's edge, mm.
WINDOW_SIGMA_MM = 3.0
#: The edge sits this many widths inside the body outline.
WINDOW_INSET_SIGMAS = 3.0


def body_mask(hu: np.ndarray, threshold_hu: float = BODY_HU, opening_mm: float = 2.0,
              pixel_mm: tuple[float, float] = (0.7, 0.7)) -> np.ndarray:
    """Boolean mask of the body in one slice ``(Y, X)`` in HU: the largest connected region above
    ``threshold_hu`` after a small opening (cuts a table's or a cable's thin contact), holes filled.
    An image with no pixel above the threshold gives an empty mask."""
    m = np.asarray(hu) > threshold_hu
    it = max(1, int(round(opening_mm / float(min(pixel_mm)))))
    # an opening in which the image border is not an edge (a crop that is all tissue stays whole)
    opened = ndi.binary_dilation(ndi.binary_erosion(m, iterations=it, border_value=1), iterations=it) & m
    if opened.any():
        m = opened
    lab, n = ndi.label(m)
    if n == 0:
        return m
    sizes = ndi.sum(m, lab, range(1, n + 1))
    return ndi.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))


def tissue_window(hu: np.ndarray, pixel_mm: tuple[float, float], *, sigma_mm: float = WINDOW_SIGMA_MM,
                  inset_sigmas: float = WINDOW_INSET_SIGMAS, mask: np.ndarray | None = None) -> np.ndarray:
    """Smooth weights in [0, 1] over one slice: 1 deep in the body, a Gaussian edge inside the
    body outline, 0 in air, padding and table. The image border is not an outline (a crop that is
    all tissue gets weight 1 everywhere). ``mask`` overrides the body found from ``hu``."""
    m = body_mask(hu, pixel_mm=pixel_mm) if mask is None else np.asarray(mask, bool)
    if not m.any():
        return np.zeros(np.shape(hu), np.float64)
    px = float(min(pixel_mm))
    inset = int(round(inset_sigmas * sigma_mm / px))
    core = ndi.binary_erosion(m, iterations=inset, border_value=1) if inset > 0 else m
    if not core.any():  # a body smaller than the inset: keep its own outline
        core = m
    return np.clip(ndi.gaussian_filter(core.astype(np.float64), sigma_mm / px, mode="nearest"), 0.0, 1.0)


def windowed(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """``(image - its weighted mean) * window``: what a spectrum of the tissue is taken of (the mean
    is removed first so the window's own shape does not carry the image's level)."""
    w = np.asarray(window, np.float64)
    total = w.sum()
    x = np.asarray(image, np.float64)
    mean = float((x * w).sum() / total) if total > 0 else 0.0
    return (x - mean) * w

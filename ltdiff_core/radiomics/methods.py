"""Registry of the methods compared in one evaluation run (all on the same cases and ROIs).

=================  ==========================================================================
name               what produces the candidate image
=================  ==========================================================================
identity           the source (Br40) image as is
linear             fitted linear kernel filter (checkpoint ``linear``, variant ``linear``)
linear+noise       the same filter plus injected residual-NPS noise (variant ``linear+noise``)
histmatch          quantile mapping onto the pooled standard histogram of the *other* cases
autoencoder        autoencoder reconstruction of the source (checkpoint ``ltdiff``)
unetpp             UNet++ trained directly source -> standard (checkpoint ``direct``)
ours               latent diffusion, default number of steps (checkpoint ``ltdiff``)
ours@N             latent diffusion with N sampling steps
ours-bottleneck    ablation: latent diffusion without the multiscale latent (bottleneck only,
                   checkpoint ``ltdiff-bottleneck``), default steps
autoencoder-       ceiling: D(E(standard)), the ``ltdiff`` autoencoder applied to the *standard*
ceiling            image (the most any method decoding through that latent can reach)
rescan             ceiling: the case's third CT series with ConvolutionKernel ``RESCAN`` (an
                   independent target-kernel noise realisation of the same acquisition), paired
                   with the standard by slice position; read from the case, not computed
=================  ==========================================================================

``rescan`` is in the default method list when the cases hold a ``RESCAN`` series
(:func:`method_names` with ``rescan_available``); a case without one is then an error naming it.

A requested method whose checkpoint file does not exist is an error naming the file: a missing
competitor must never silently disappear from a comparison.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ltdiff_core.baselines.histmatch import HistogramMatcher

BASE_METHODS = ("identity", "linear", "linear+noise", "histmatch", "autoencoder", "unetpp", "ours",
                "ours-bottleneck", "autoencoder-ceiling")
RESCAN = "rescan"
RESCAN_KERNEL = "RESCAN"
KNOWN_METHODS = BASE_METHODS + (RESCAN,)
_STEPS = re.compile(r"^ours@(\d+)$")


class MethodError(ValueError):
    """A requested method cannot be run (unknown name, missing checkpoint, too few cases)."""


@dataclass(frozen=True)
class MethodSpec:
    """How to produce one method's image: a kind plus checkpoint/variant/steps for models."""

    name: str
    kind: str  # "identity" | "histmatch" | "model" | "rescan"
    checkpoint: Path | None = None
    variant: str | None = None
    steps: int | None = None
    on_standard: bool = False  # the model is applied to the standard image (a ceiling), not the source


def method_names(methods: list[str] | None, steps_list: list[int], rescan_available: bool = False) -> list[str]:
    """Requested names plus ``ours@N`` for every N of ``steps_list``.

    Default: all base methods, and ``rescan`` when the cases hold a rescan series.
    """
    names = list(methods) if methods else list(BASE_METHODS) + ([RESCAN] if rescan_available else [])
    for n in steps_list:
        if f"ours@{n}" not in names:
            names.append(f"ours@{n}")
    seen: set[str] = set()
    out = []
    for n in names:
        if n not in KNOWN_METHODS and not _STEPS.match(n):
            raise MethodError(f"unknown method {n!r}; known: {', '.join(KNOWN_METHODS)}, ours@N")
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def _checkpoint(given: str | Path | None, default_name: str, method: str) -> Path:
    """The checkpoint file for ``method``: the given path or the shipped default; must exist."""
    if given is not None:
        path = Path(given)
    else:
        from ltdiff_core.weights import default_checkpoint

        path = Path(default_checkpoint(default_name))
    if not path.is_file():
        raise MethodError(f"method {method!r} needs checkpoint file {path}, which does not exist; "
                          f"pass its path or leave the method out with --methods")
    return path


def resolve(names: list[str], *, model: str | Path | None = None, linear: str | Path | None = None,
            direct: str | Path | None = None, ablation: str | Path | None = None) -> list[MethodSpec]:
    """Specs for the named methods, checking every needed checkpoint before any work starts."""
    specs = []
    for n in names:
        if n in ("identity", "histmatch", RESCAN):
            specs.append(MethodSpec(n, n))
        elif n in ("linear", "linear+noise"):
            specs.append(MethodSpec(n, "model", _checkpoint(linear, "linear", n), variant=n))
        elif n == "unetpp":
            specs.append(MethodSpec(n, "model", _checkpoint(direct, "direct", n)))
        elif n == "ours-bottleneck":
            specs.append(MethodSpec(n, "model", _checkpoint(ablation, "ltdiff-bottleneck", n), variant="diffusion"))
        elif n == "autoencoder":
            specs.append(MethodSpec(n, "model", _checkpoint(model, "ltdiff", n), variant="autoencoder"))
        elif n == "autoencoder-ceiling":
            specs.append(MethodSpec(n, "model", _checkpoint(model, "ltdiff", n), variant="autoencoder",
                                    on_standard=True))
        else:
            m = _STEPS.match(n)
            steps = int(m.group(1)) if m else None
            specs.append(MethodSpec(n, "model", _checkpoint(model, "ltdiff", n), variant="diffusion", steps=steps))
    return specs


def leave_one_out_matcher(target_histograms: list[np.ndarray], index: int) -> HistogramMatcher:
    """Histogram matcher for case ``index`` built from every *other* case's standard histogram."""
    others = [h for i, h in enumerate(target_histograms) if i != index]
    if not others:
        raise MethodError("histmatch needs at least 2 cases: its reference histogram comes from the "
                          "other cases' standard images, never the case's own")
    return HistogramMatcher(np.sum(others, axis=0))


class MethodRunner:
    """Runs specs on source volumes, loading each model checkpoint once per (file, variant)."""

    def __init__(self, device: str = "auto"):
        self.device = device
        self._models: dict[tuple[Path, str | None], Any] = {}
        self.info: dict[str, dict[str, Any]] = {}

    def _model(self, spec: MethodSpec) -> Any:
        key = (spec.checkpoint, spec.variant)
        if key not in self._models:
            from ltdiff_core import Standardizer

            kwargs = {"variant": spec.variant} if spec.variant else {}
            self._models[key] = Standardizer.from_checkpoint(spec.checkpoint, device=self.device, **kwargs)
        model = self._models[key]
        self.info[spec.name] = {"checkpoint": str(spec.checkpoint), "variant": spec.variant,
                                "steps": spec.steps, **model.info.as_dict()}
        return model

    def run(self, spec: MethodSpec, source: np.ndarray, spacing: tuple[float, float, float], *,
            matcher: HistogramMatcher | None = None, seed: int = 0, standard: np.ndarray | None = None,
            rescan: np.ndarray | None = None) -> np.ndarray:
        """The method's image for one source volume (same shape, float32 HU).

        ``standard`` is needed by ceilings on the standard image, ``rescan`` by ``rescan``.
        """
        if spec.kind == RESCAN:
            if rescan is None:
                raise MethodError("rescan needs the case's RESCAN series")
            out = np.array(rescan, dtype=np.float32, copy=True)
        elif spec.kind == "identity":
            out = np.array(source, dtype=np.float32, copy=True)
        elif spec.kind == "histmatch":
            if matcher is None:
                raise MethodError("histmatch needs a reference histogram from other cases")
            out = matcher.apply(source)
        else:
            if spec.on_standard and standard is None:
                raise MethodError(f"method {spec.name!r} needs the standard image")
            given = standard if spec.on_standard else source
            out = self._model(spec).standardize(given, spacing, steps=spec.steps, seed=seed)
            out = np.asarray(out, dtype=np.float32)
        if out.shape != np.shape(source):
            raise MethodError(f"method {spec.name!r} returned shape {out.shape} for input {np.shape(source)}")
        return out

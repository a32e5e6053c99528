"""Inference entry point: HU volume in, kernel-standardized HU volume out.

One class per method (latent diffusion with its autoencoder reconstruction, the direct UNet++,
the linear filter), registered by the method name its checkpoints record (:data:`METHODS`), all
implementing :class:`ltdiff_core.kernel_model.KernelModel`, so the service, the offline command
and the evaluation treat models interchangeably; :meth:`Standardizer.from_checkpoint` (or
``Standardizer(checkpoint)``) builds the class of the checkpoint's method. A new method is one
more registered subclass. Randomness is drawn per slice on the CPU from a 63-bit key, so results
do not depend on batching or device: by default the key is ``(seed, slice index)``; callers that
know each slice's identity pass ``slice_keys`` (the node and ``dicom-node standardize`` use
:func:`uid_slice_key` of the SOPInstanceUID), which makes a slice's output independent of the
series' extent, so part of a series processed while it is still arriving equals the same slices
processed with the whole series. With ``slice_keys`` every network call also gets the same number
of slices (the last batch is padded), because CPU kernels round differently for different batch
sizes (~1e-4 HU); a slice's result then depends only on its pixels, its key and the model.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

import numpy as np

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_networks
from .kernel_model import FIXED_BATCH_PIXELS, ModelInfo, Progress
from .linear_filter import LinearKernelFilter
from . import resample
from .normalize import check_normalization, hu_to_unit, unit_to_hu
from .tiling import pad_to_multiple, run_tiled

log = logging.getLogger(__name__)


def _slice_key(seed: int, index: int, y: int = 0, x: int = 0) -> int:
    """Stable 63-bit seed for one slice (and tile) of one call."""
    return (seed * 1_000_003 + index * 7919 + y * 131 + x) % (2**63 - 1)


def uid_slice_key(seed: int, uid: str) -> int:
    """Stable 63-bit seed for one slice named by its SOPInstanceUID: the same slice gets the same
    random stream whichever other slices are processed with it (streamed or whole series)."""
    digest = hashlib.sha256(f"{int(seed)}:{uid.strip()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63 - 1)


NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


def linear_device(device: str) -> str:
    """Where the linear filter's FFTs run: ``"cpu"`` (SciPy) or a torch device (``torch.fft``).

    ``"auto"`` takes CUDA only on a machine with the NVIDIA driver loaded, checked before importing
    torch: the linear filter needs no torch on the CPU, and a CPU-only node should not pay its
    import (2.5 s here, `python -c "import torch"`) to learn that there is no GPU."""
    if device == "cpu" or (device == "auto" and not NVIDIA_DRIVER.exists()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device")
    return device


def _training(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    training = meta.get("training")
    return training if isinstance(training, Mapping) else {}


def training_pixel_mm(meta: Mapping[str, Any]) -> float | None:
    """In-plane pixel spacing of the training data (``training.pixel_mm``), None when not recorded."""
    try:
        value = float(_training(meta).get("pixel_mm") or 0)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def kernel_pairs(meta: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The (source, target) kernels of the training data, when its configuration records them."""
    config = _training(meta).get("config")
    data = config.get("data") if isinstance(config, Mapping) else None
    if not isinstance(data, Mapping):
        return ()
    src, dst = data.get("source_kernel"), data.get("target_kernel")
    return ((str(src), str(dst)),) if src and dst else ()


#: Method name (checkpoint ``method``) -> the class that runs it; filled by :func:`register`.
METHODS: dict[str, type["Standardizer"]] = {}
S = TypeVar("S", bound="type[Standardizer]")


def register(method: str) -> Callable[[S], S]:
    """Class decorator: the class runs checkpoints whose metadata says ``method``."""

    def add(cls: S) -> S:
        if method in METHODS:
            raise ValueError(f"method {method!r} is already registered ({METHODS[method].__name__})")
        cls.method = method
        METHODS[method] = cls
        return cls

    return add


def model_class(method: str) -> type["Standardizer"]:
    """The registered class of a checkpoint method; ``CheckpointError`` for an unknown one."""
    try:
        return METHODS[method]
    except KeyError:
        raise CheckpointError(f"no model class for method {method!r} (registered: {sorted(METHODS)})") from None


class Standardizer:
    """Kernel standardization with a loaded checkpoint (see :meth:`from_checkpoint`).

    The base class holds what every method shares (variants, normalisation, batching with
    per-slice keys, resampling to the training grid, provenance); a registered subclass per
    method loads its parts (:meth:`_load`) and runs one batch of slices (:meth:`_run`).
    ``Standardizer(checkpoint, ...)`` returns the instance of the checkpoint's method class.
    """

    method: ClassVar[str] = ""
    #: What the method can run, the default first.
    variants: ClassVar[tuple[str, ...]] = ()
    #: Network methods see every series at their training pixel spacing (standardize_batch).
    resamples: ClassVar[bool] = True
    #: With slice keys, every call gets the same number of slices (module docstring).
    fixed_batch: ClassVar[bool] = True

    def __new__(cls, ckpt: Checkpoint, *args: Any, **kwargs: Any) -> "Standardizer":
        if cls is Standardizer:
            cls = model_class(ckpt.metadata["method"])
        return super().__new__(cls)

    def __init__(
        self,
        ckpt: Checkpoint,
        device: str = "auto",
        variant: str | None = None,
        max_batch_pixels: int = 4 * 512 * 512,
        tile_size: int = 1024,
        tile_overlap: int = 64,
        strength: float | None = None,
        cuda_bf16: bool = True,
        runtime: str | None = None,
    ) -> None:
        meta = ckpt.metadata
        if meta["method"] != self.method:
            raise CheckpointError(f"{ckpt.path}: method {meta['method']!r} is not run by {type(self).__name__}")
        self.cuda_bf16 = bool(cuda_bf16)  # bf16 autocast on CUDA; False runs fp32 (bench/bench_gpu.py compares)
        self.ckpt = ckpt
        available = self.available_variants(meta)
        self.variant = variant or available[0]
        if self.variant not in available:
            raise ValueError(f"variant {self.variant!r} not available for checkpoint {ckpt.path.name} "
                             f"(method {self.method!r}; choose from {available})")
        try:
            check_normalization(meta["normalization"])
        except ValueError as exc:
            raise CheckpointError(f"{ckpt.path}: {exc}") from exc
        self.norm = meta["normalization"]
        self.sampling = dict(meta.get("sampling", {}))
        if strength is not None:  # override the checkpoint's SDEdit start (fidelity/texture trade-off)
            self.sampling["strength"] = float(strength)
        self.max_batch_pixels = int(max_batch_pixels)
        self.tile_size, self.tile_overlap = int(tile_size), int(tile_overlap)
        self.device = "cpu"
        self.runtime = "torch"
        self._load(device, runtime)

    # --- per method ----------------------------------------------------------------------
    @classmethod
    def available_variants(cls, meta: Mapping[str, Any]) -> tuple[str, ...]:
        """The variants this checkpoint can run (the default first)."""
        return cls.variants

    def _load(self, device: str, runtime: str | None) -> None:
        """Load the method's parts from ``self.ckpt`` and set ``self.device`` (and ``runtime``)."""
        raise NotImplementedError

    def _run(self, hu: np.ndarray, pixel: list[tuple[float, float]], keys: list[int], steps: int | None) -> np.ndarray:
        """One batch of ``(N, Y, X)`` HU slices with their pixel sizes and random-stream keys."""
        raise NotImplementedError

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls, path: str | Path | None = None, device: str = "auto", variant: str | None = None, **kwargs: Any
    ) -> "Standardizer":
        """Load a checkpoint: a path, a shipped name (``"linear"``), or ``None``/``"default"`` for the
        shipped default (``ltdiff_core.weights.DEFAULT``); returns the instance of the class
        registered for its method; raises ``CheckpointError``."""
        from .weights import resolve_model

        return cls(load_checkpoint(resolve_model(path)), device=device, variant=variant, **kwargs)

    # --- what the model is (KernelModel) -------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        m = self.ckpt.metadata
        steps, strength = self.sampling.get("default_steps"), self.sampling.get("strength")
        return ModelInfo(
            name=str(m["name"]), version=str(m["version"]), sha256=self.ckpt.file_sha256,
            weights_sha256=str(m["weights_sha256"]), method=self.method, variant=self.variant,
            device=str(self.device), runtime=self.runtime, path=str(self.ckpt.path),
            default_steps=int(steps) if steps is not None else None,
            strength=float(strength) if strength is not None else None,
            training_pixel_mm=training_pixel_mm(m), kernels=kernel_pairs(m), trained_on=_training(m).get("data"),
        )

    def qa_envelope(self) -> dict[str, Any] | None:
        """The checkpoint's QA training envelope (``training.qa_envelope``), if it has one."""
        from . import qa  # SciPy: imported where the gate measures

        return qa.envelope_of(self.ckpt.metadata)

    def supported_geometry(self) -> dict[str, dict[str, float]]:
        """Pixel spacing and slice thickness this model handles (``ltdiff_core.resample``)."""
        return resample.supported_geometry(self.ckpt.metadata)

    # --- public API ----------------------------------------------------------------------
    def standardize(
        self,
        hu_volume: np.ndarray,
        spacing: Sequence[float],
        steps: int | None = None,
        seed: int = 0,
        progress: Progress | None = None,
        slice_keys: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Standardize a ``(Z, Y, X)`` or ``(Y, X)`` HU array; returns float32 HU, same shape.
        ``slice_keys`` (one per slice) replace the ``(seed, index)`` random streams (module doc)."""
        keys = None if slice_keys is None else [slice_keys]
        return self.standardize_batch([hu_volume], [spacing], steps=steps, seed=seed, progress=progress,
                                      slice_keys=keys)[0]

    def standardize_batch(
        self,
        volumes: Sequence[np.ndarray],
        spacings: Sequence[Sequence[float]],
        steps: int | None = None,
        seed: int = 0,
        progress: Progress | None = None,
        slice_keys: Sequence[Sequence[int]] | None = None,
    ) -> list[np.ndarray]:
        """Several volumes at once (slices of equal size share batches). Results equal per-volume calls.
        ``slice_keys``: per volume, one random-stream key per slice (see the module docstring).

        Network methods see every series at their training pixel spacing: a series whose
        in-plane spacing differs by more than ``resample.RELATIVE_TOLERANCE`` is resampled to it
        and the output back to the input grid (``ltdiff_core.resample``). The linear filter is
        defined in lp/cm and runs on the input grid.
        """
        if len(volumes) != len(spacings) or not self.resamples:
            return self._standardize_batch_on_grid(volumes, spacings, steps, seed, progress, slice_keys)
        target = resample.model_pixel_mm(self.ckpt.metadata)
        grids = [resample.to_model_grid(v, s, target) for v, s in zip(volumes, spacings)]
        outs = self._standardize_batch_on_grid([g[0] for g in grids], [g[1] for g in grids], steps, seed, progress,
                                               slice_keys)
        return [restore(o) for o, (_, _, restore) in zip(outs, grids)]

    def _standardize_batch_on_grid(
        self,
        volumes: Sequence[np.ndarray],
        spacings: Sequence[Sequence[float]],
        steps: int | None = None,
        seed: int = 0,
        progress: Progress | None = None,
        slice_keys: Sequence[Sequence[int]] | None = None,
    ) -> list[np.ndarray]:
        """:meth:`standardize_batch` on the volumes' own grid (no resampling)."""
        if len(volumes) != len(spacings):
            raise ValueError("one spacing per volume is needed")
        vols = [np.asarray(v, dtype=np.float32) for v in volumes]
        for v in vols:
            if v.ndim not in (2, 3) or min(v.shape[-2:]) < 2:
                raise ValueError(f"expected (Z, Y, X) or (Y, X) with Y, X >= 2, got shape {v.shape}")
        pixel = [self._pixel_mm(s) for s in spacings]
        stacks = [v[None] if v.ndim == 2 else v for v in vols]
        if slice_keys is not None:
            if len(slice_keys) != len(stacks) or any(len(k) != s.shape[0] for k, s in zip(slice_keys, stacks)):
                raise ValueError("slice_keys needs one key per slice of every volume")
            key_of = lambda vi, zi: int(slice_keys[vi][zi])  # noqa: E731
        else:
            key_of = lambda vi, zi: _slice_key(seed, zi)  # noqa: E731
        # Fixed batch shape with explicit keys (module docstring); the linear filter is per slice anyway.
        pad = slice_keys is not None and self.fixed_batch
        outs = [np.empty_like(s) for s in stacks]
        jobs = [(vi, zi) for vi, s in enumerate(stacks) for zi in range(s.shape[0])]
        total, done = len(jobs), 0
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for vi, zi in jobs:
            groups.setdefault(stacks[vi].shape[1:], []).append((vi, zi))
        for shape, members in groups.items():
            per = max(1, self.max_batch_pixels // (shape[0] * shape[1]))
            if pad:  # one batch size for every call: what a 512² slice gets (no huge padded batches of small slices)
                per = min(per, max(1, self.max_batch_pixels // FIXED_BATCH_PIXELS))
            for k in range(0, len(members), per):
                chunk = members[k:k + per]
                imgs = np.stack([stacks[vi][zi] for vi, zi in chunk])
                keys = [key_of(vi, zi) for vi, zi in chunk]
                px = [pixel[vi] for vi, _ in chunk]
                if pad and len(chunk) < per:  # filler slices (copies of the last), results dropped
                    extra = per - len(chunk)
                    imgs = np.concatenate([imgs, np.repeat(imgs[-1:], extra, axis=0)])
                    keys, px = keys + [keys[-1]] * extra, px + [px[-1]] * extra
                res = self._run(imgs, px, keys, steps)[:len(chunk)]
                for (vi, zi), r in zip(chunk, res):
                    outs[vi][zi] = r
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        return [o[0] if v.ndim == 2 else o for o, v in zip(outs, vols)]

    def _pixel_mm(self, spacing: Sequence[float]) -> tuple[float, float]:
        sp = [float(s) for s in spacing]
        if len(sp) not in (2, 3) or min(sp[-2:]) <= 0:
            raise ValueError(f"spacing must be (dz, dy, dx) or (dy, dx) in mm, got {spacing}")
        trained = training_pixel_mm(self.ckpt.metadata)
        if trained and not 0.7 <= sp[-1] / trained <= 1.4:
            log.warning("pixel spacing %.2f mm differs from the training spacing %.2f mm; the model is "
                        "applied without resampling", sp[-1], trained)
        return sp[-2], sp[-1]


@register("linear")
class LinearStandardizer(Standardizer):
    """The fitted radial kernel filter (``ltdiff_core.linear_filter``), optionally with noise
    added; defined in lp/cm, so it runs on the input grid, one slice at a time."""

    variants = ("linear", "linear+noise")
    resamples = False
    fixed_batch = False

    def _load(self, device: str, runtime: str | None) -> None:
        self.filter = LinearKernelFilter.from_tensors(self.ckpt.tensors, "linear")
        self.factor = 1
        self.device = linear_device(device)  # no network to export: the runtime stays "torch"

    def _run(self, hu: np.ndarray, pixel: list[tuple[float, float]], keys: list[int], steps: int | None) -> np.ndarray:
        noisy = self.variant == "linear+noise"
        if not noisy and len(set(pixel)) == 1:  # one geometry: the filter's stacked FFT path
            return self.filter.apply(hu, pixel[0], device=None if self.device == "cpu" else self.device)
        return np.stack([self.filter.apply(s, px, noise_seed=k if noisy else None)
                         for s, px, k in zip(hu, pixel, keys)])


class NetworkStandardizer(Standardizer):
    """What the network methods share: torch (or ONNX Runtime) set-up, padding to the network's
    grid factor, tiling, and one forward pass per tile (:meth:`_forward`)."""

    def _load(self, device: str, runtime: str | None) -> None:
        from .onnx_runtime import resolve_runtime

        self.runtime = resolve_runtime(runtime)  # None: LTDIFF_RUNTIME
        import torch

        self.first_guess: LinearKernelFilter | None = None
        self.noise_stats: tuple[np.ndarray, np.ndarray] | None = None  # denoiser's noise-descriptor statistics
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self._nets: dict[str, Any] = load_networks(self.ckpt, self.device)
        from .runtime import configure_threads_from_env, prepare_for_inference

        configure_threads_from_env()
        prepare_for_inference(self._nets, self.device)  # memory layout etc.; see runtime.py
        # what the sampler calls (torch modules or ONNX stand-ins)
        self._exec: dict[str, Any] = self._execution_networks(self.ckpt.metadata["weights_sha256"])
        self._setup()

    def _setup(self) -> None:
        """The method's own parts, after the networks are loaded; sets ``self.factor``."""
        raise NotImplementedError

    def _forward(self, t: Any, keys: list[int], steps: int | None, guide: Any, noise: Any) -> Any:
        """One network pass on a ``(N, 1, H, W)`` tensor (inside inference mode and autocast)."""
        raise NotImplementedError

    def _execution_networks(self, weights_sha256: str) -> dict[str, Any]:
        """What the sampler calls: the torch modules, or their ONNX Runtime stand-ins (CPU only)."""
        if self.runtime == "torch":
            return self._nets
        if self.device != "cpu":
            raise ValueError(f"runtime 'onnx' runs on the CPU only, not on {self.device!r}")
        from .onnx_runtime import onnx_networks

        return onnx_networks(self._nets, weights_sha256)

    def _run(self, hu: np.ndarray, pixel: list[tuple[float, float]], keys: list[int], steps: int | None) -> np.ndarray:
        x = hu_to_unit(hu, self.norm)
        if self.first_guess is not None:
            # G(A) on whole slices in HU, as in training; carried along A as a second channel
            g = np.stack([self.first_guess.apply(s, px) for s, px in zip(hu, pixel)])
            x = np.stack([x, hu_to_unit(g, self.norm)], axis=1)
        extra = 8 if self.factor > 1 else 0
        xp, crop = pad_to_multiple(x, self.factor, extra)
        noise = None
        if self.noise_stats is not None and self.variant == "diffusion":
            # measured on each whole slice (never a tile or a batch), so every tile and chunk agrees
            from .noise_condition import describe, standardise

            noise = standardise(describe(hu), *self.noise_stats)

        def fn(tile: np.ndarray, y: int, x0: int) -> np.ndarray:
            tkeys = [k if (y, x0) == (0, 0) else _slice_key(k, 0, y, x0) for k in keys]
            return self._run_net(tile, tkeys, steps, noise)

        out = run_tiled(xp, fn, self.tile_size, self.tile_overlap)
        if out.ndim == 4:
            out = out[:, 0]
        return unit_to_hu(out[:, crop[0], crop[1]], self.norm)

    def _run_net(self, x: np.ndarray, keys: list[int], steps: int | None, noise: np.ndarray | None = None) -> np.ndarray:
        import torch

        nz = torch.from_numpy(noise).to(self.device) if noise is not None else None

        if x.ndim == 4:  # (N, [A, G(A)], H, W): first-guess diffusion; output repeated to keep the tile shape
            t = torch.from_numpy(np.ascontiguousarray(x[:, :1])).to(self.device)
            g = torch.from_numpy(np.ascontiguousarray(x[:, 1:])).to(self.device)
            cuda = self.device.startswith("cuda")
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and self.cuda_bf16):
                y = self._forward(t, keys, steps, g, nz).float()[:, 0].cpu().numpy()
            return np.repeat(y[:, None], x.shape[1], axis=1)
        t = torch.from_numpy(np.ascontiguousarray(x))[:, None].to(self.device)
        cuda = self.device.startswith("cuda")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and self.cuda_bf16):
            y = self._forward(t, keys, steps, None, nz)
        return y.float()[:, 0].cpu().numpy()


@register("direct")
class DirectStandardizer(NetworkStandardizer):
    """The direct UNet++ A -> B (``ltdiff_core.nets``): one deterministic pass."""

    variants = ("direct",)

    def _setup(self) -> None:
        self.factor = self._nets["direct"].config.factor

    def _forward(self, t: Any, keys: list[int], steps: int | None, guide: Any, noise: Any) -> Any:
        return self._exec["direct"](t)


@register("latent_diffusion")
class LatentDiffusionStandardizer(NetworkStandardizer):
    """Conditional latent diffusion (``ltdiff_core.diffusion``), or its autoencoder's
    reconstruction alone (variant ``autoencoder``, also the only one of a stage-1 checkpoint)."""

    variants = ("diffusion", "autoencoder")

    @classmethod
    def available_variants(cls, meta: Mapping[str, Any]) -> tuple[str, ...]:
        if "denoiser" not in meta["networks"]:
            return ("autoencoder",)  # an autoencoder-only checkpoint (training stage 1)
        return cls.variants

    def _setup(self) -> None:
        import torch

        from .diffusion import ConditionalLatentInferer, ScheduleConfig

        ckpt, meta = self.ckpt, self.ckpt.metadata
        ae = self._exec["autoencoder"]
        if self.variant == "autoencoder" and "denoiser" not in self._nets:
            self.factor = ae.config.factor
            return
        den = self._exec["denoiser"]
        # the denoiser UNet halves the latent grid len(channels) - 1 times
        self.factor = ae.config.factor * 2 ** (len(den.config.channels) - 1)
        if self.variant == "autoencoder":
            self.factor = ae.config.factor
        t = {k: torch.from_numpy(np.array(v)) for k, v in ckpt.tensors.items() if k.startswith("latent.")}
        if "latent.shift" not in t or "latent.scale" not in t:
            raise CheckpointError(f"{ckpt.path}: latent statistics (latent.shift/scale) are missing")
        try:
            schedule = ScheduleConfig(**meta["scheduler"])
            self.inferer = ConditionalLatentInferer(
                ae, den, schedule, t["latent.shift"], t["latent.scale"],
                t.get("latent.residual_shift"), t.get("latent.residual_scale"),
            ).to(self.device)
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{ckpt.path}: bad diffusion settings: {exc}") from exc
        if self.inferer.noise_dim:
            prefix = str(meta.get("noise_condition", {}).get("prefix", "noise_condition"))
            try:
                self.noise_stats = (np.asarray(ckpt.tensors[f"{prefix}.shift"], dtype=np.float64),
                                    np.asarray(ckpt.tensors[f"{prefix}.scale"], dtype=np.float64))
            except KeyError as exc:
                raise CheckpointError(f"{ckpt.path}: the denoiser takes noise descriptors but their "
                                      f"statistics ({prefix}.shift/scale) are missing") from exc
        if self.inferer.first_guess and self.variant == "diffusion":
            prefix = str(meta.get("first_guess", {}).get("prefix", "first_guess"))
            try:
                self.first_guess = LinearKernelFilter.from_tensors(ckpt.tensors, prefix)
            except KeyError as exc:
                raise CheckpointError(f"{ckpt.path}: first_guess parameterization but the embedded "
                                      f"linear filter ({prefix}.*) is missing: {exc}") from exc
        strength = float(self.sampling.get("strength", 0.5))
        if strength > float(meta["scheduler"].get("t_max_fraction", 1.0)) + 1e-9:
            log.warning("sampling strength %.2f exceeds the noise levels the denoiser was trained on "
                        "(t_max_fraction %.2f)", strength, meta["scheduler"]["t_max_fraction"])

    def _forward(self, t: Any, keys: list[int], steps: int | None, guide: Any, noise: Any) -> Any:
        if self.variant == "autoencoder":
            ae = self._exec["autoencoder"]
            return ae.decode(ae.encode(t))
        return self._diffuse(t, keys, steps, guide, noise)

    def _diffuse(self, t: Any, keys: list[int], steps: int | None, guide: Any = None, noise_cond: Any = None) -> Any:
        """Sample with per-slice generators: start noise first, then one draw per stochastic step,
        so each slice's result depends only on its key, never on batching or device."""
        import torch

        inf = self.inferer
        shape = (inf.shift.shape[1], *inf.latent_hw(t))
        gens = [torch.Generator().manual_seed(k) for k in keys]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
        n_steps = int(steps or self.sampling.get("default_steps", 4))
        strength = float(self.sampling.get("strength", 0.5))
        eta = float(self.sampling.get("eta", 0.0))
        gain = float(self.sampling.get("residual_gain", 1.0))

        def step_noise() -> Any:
            return torch.stack([torch.randn(shape, generator=g) for g in gens])

        return inf.standardize(t, noise.to(t.device), n_steps, strength, guide, eta=eta,
                               step_noise=step_noise if eta > 0 else None, gain=gain, noise_cond=noise_cond)

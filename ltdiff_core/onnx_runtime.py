"""Opt-in ONNX Runtime execution of the networks (``LTDIFF_RUNTIME=onnx``), CPU only.

Same weights, same arithmetic (fp32), another kernel library: ONNX Runtime's CPU provider at
graph optimisation level ALL rewrites the convolutions into its blocked NCHWc layout and fuses
the activations into them, which measured about 0.6x torch's CPU time per network call on the
2-core machine (``bench/bench_inference.py``, docs/benchmarks.md).

The graphs are never shipped: on first use each network call the sampler makes (encoder,
decoder, one denoiser step given the condition's first-layer share; the direct UNet++) is
exported from the loaded torch modules with ``torch.onnx.export`` (opset 17, dynamic batch and
slice size) into a cache directory keyed by the checkpoint's ``weights_sha256``, checked against
torch on the export input, and written atomically, so concurrent processes and a crash mid-write
never leave a half graph under the final name. Later processes load the cached graph.

``onnxruntime`` and ``onnx`` are an optional extra (``pip install .[onnx]``); without them the
torch path is the only one and asking for ``onnx`` raises ``RuntimeError``.
"""
from __future__ import annotations

import copy
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

#: Environment switch of the network runtime: ``torch`` (default) or ``onnx``.
RUNTIME_ENV = "LTDIFF_RUNTIME"
#: Directory of the exported graphs (default ``$XDG_CACHE_HOME/ltdiff/onnx`` or ``~/.cache/ltdiff/onnx``).
CACHE_ENV = "LTDIFF_ONNX_CACHE"
RUNTIMES = ("torch", "onnx")
OPSET = 17
#: Bumped whenever the exported wrappers below change, so stale cached graphs are not reused.
GRAPH_VERSION = 1
#: Export self-check: largest ONNX-vs-torch difference allowed, relative to the output's range.
EXPORT_TOLERANCE = 1e-4


def resolve_runtime(runtime: str | None = None) -> str:
    """``runtime`` or, when None, ``LTDIFF_RUNTIME`` (unset: ``torch``); raises ``ValueError``."""
    value = (runtime if runtime is not None else os.environ.get(RUNTIME_ENV, "torch")).strip().lower() or "torch"
    if value not in RUNTIMES:
        src = "runtime" if runtime is not None else RUNTIME_ENV
        raise ValueError(f"{src} must be one of {RUNTIMES}, not {value!r}")
    return value


def available() -> bool:
    """Whether ``onnxruntime`` and ``onnx`` (the exporter's dependency) import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cache_dir(override: str | Path | None = None) -> Path:
    """Root of the graph cache (``override``, else ``LTDIFF_ONNX_CACHE``, else the user cache)."""
    if override is not None:
        return Path(override)
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "ltdiff" / "onnx"


# --- graphs exported -------------------------------------------------------------------------
def _bound_module(owner: Any, method: str) -> Any:
    """A torch module whose ``forward`` is ``owner.<method>``: what ``torch.onnx.export`` traces
    for one graph (encode, decode, one denoiser step with precomputed condition features, ...)."""
    import torch

    class Bound(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.owner = owner

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return getattr(self.owner, method)(*args)

    return Bound()


def _export_inputs(kind: str, graph: str, net: Any) -> dict[str, Any]:
    """Small non-square example inputs (batch 2) for the trace; every axis but channels is dynamic."""
    import torch

    g = torch.Generator().manual_seed(0)
    cfg = net.config
    if kind == "autoencoder":
        f = cfg.factor
        if graph == "encode":
            return {"x": torch.randn(2, 1, 8 * f, 6 * f, generator=g)}
        return {"z": torch.randn(2, cfg.latent_dim, 8, 6, generator=g)}
    if kind == "denoiser":
        f = 2 ** (len(cfg.channels) - 1)
        h, w = 4 * f, 3 * f
        return {"z": torch.randn(2, cfg.latent_dim, h, w, generator=g),
                "t": torch.tensor([10, 700], dtype=torch.long),
                "feats": torch.randn(2, cfg.channels[0], h, w, generator=g)}
    return {"x": torch.randn(2, 1, 4 * cfg.factor, 3 * cfg.factor, generator=g)}


GRAPHS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "autoencoder": {"encode": lambda ae: _bound_module(ae, "encode"), "decode": lambda ae: _bound_module(ae, "decode")},
    "denoiser": {"step": lambda den: _bound_module(den, "forward_with_condition_features")},
    "direct": {"forward": lambda net: _bound_module(net, "forward")},
}


def export_graph(kind: str, graph: str, net: Any) -> bytes:
    """ONNX bytes of one network call, traced on a NCHW fp32 copy of ``net`` (``net`` unchanged)."""
    import torch

    from .runtime import set_fused_attention

    clone = copy.deepcopy(net).to(memory_format=torch.contiguous_format).float().eval()
    set_fused_attention(clone, True)  # exported as its opset-17 decomposition either way
    module = GRAPHS[kind][graph](clone)
    inputs = _export_inputs(kind, graph, net)
    names = list(inputs)
    dyn = {n: ({0: "batch"} if v.ndim == 1 else {0: "batch", 2: "height", 3: "width"}) for n, v in inputs.items()}
    dyn["out"] = {0: "batch", 2: "height", 3: "width"}
    buf = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks that hold for every multiple of factor
        torch.onnx.export(module, tuple(inputs.values()), buf, opset_version=OPSET, dynamo=False,
                          input_names=names, output_names=["out"], dynamic_axes=dyn)
    return buf.getvalue()


def session_options(threads: int) -> Any:
    """ORT options: level ALL (NCHWc convolutions, fusions), ``threads`` intra-op, no spinning.

    Idle pool threads do not spin: the node's network threads share the cores with inference.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class OrtGraph:
    """One ONNX Runtime session; ``run(*arrays)`` returns the single output."""

    def __init__(self, model: bytes | str | Path, threads: int, optimization: str = "ALL") -> None:
        import onnxruntime as ort

        so = session_options(threads)
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{optimization}")
        self.model, self.threads, self.optimization = model, int(threads), optimization  # to reopen (bench)
        src = str(model) if isinstance(model, Path) else model
        self.session = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, *arrays: np.ndarray) -> np.ndarray:
        feed = {n: np.ascontiguousarray(a) for n, a in zip(self.inputs, arrays)}
        return self.session.run(None, feed)[0]


def _check_export(kind: str, graph: str, net: Any, onnx_graph: OrtGraph) -> None:
    """The ONNX graph must give the torch module's output on the export inputs (else ``RuntimeError``)."""
    import torch

    inputs = _export_inputs(kind, graph, net)
    clone = copy.deepcopy(net).float().eval()
    with torch.inference_mode():
        ref = GRAPHS[kind][graph](clone)(*inputs.values()).float().numpy()
    got = onnx_graph.run(*[v.numpy() for v in inputs.values()])
    err = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
    scale = max(1.0, float(np.abs(ref).max()))
    if not err <= EXPORT_TOLERANCE * scale:
        raise RuntimeError(f"ONNX export of {kind}.{graph} differs from torch by {err:.3g} (output range {scale:.3g})")


def load_graph(kind: str, graph: str, net: Any, weights_sha256: str, threads: int,
               root: str | Path | None = None, prefix: str | None = None) -> OrtGraph:
    """Cached graph of ``kind.graph`` for these weights (``prefix``: the network's name in the
    checkpoint, default ``kind``), exported and checked on first use."""
    from .atomic import write_atomic

    path = cache_dir(root) / weights_sha256 / f"{prefix or kind}.{graph}.opset{OPSET}.v{GRAPH_VERSION}.onnx"
    if path.is_file():
        try:
            return OrtGraph(path, threads)
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is rebuilt, never trusted
            log.warning("cached ONNX graph %s is unreadable (%s); exporting it again", path, exc)
    data = export_graph(kind, graph, net)
    g = OrtGraph(data, threads)
    _check_export(kind, graph, net, g)
    write_atomic(path, data)
    log.info("exported %s.%s to %s (%d bytes)", kind, graph, path, len(data))
    return g


# --- drop-in replacements for the torch modules the sampler calls ----------------------------
def _np(t: Any) -> np.ndarray:
    return t.detach().float().contiguous().cpu().numpy()


class OnnxAutoencoder:
    """``encode``/``decode`` through ONNX Runtime; ``config`` of the torch autoencoder."""

    def __init__(self, torch_net: Any, encode: OrtGraph, decode: OrtGraph) -> None:
        self.torch_net, self.config = torch_net, torch_net.config
        self._encode, self._decode = encode, decode

    def encode(self, x: Any) -> Any:
        import torch

        return torch.from_numpy(self._encode.run(_np(x)))

    def decode(self, z: Any) -> Any:
        import torch

        return torch.from_numpy(self._decode.run(_np(z)))


class OnnxDenoiser:
    """``denoiser(z_t, t, cond)`` with the condition's first-layer share from the torch module
    (computed once per condition, as on the torch path) and the rest of the step in ONNX Runtime."""

    def __init__(self, torch_net: Any, step: OrtGraph) -> None:
        self.torch_net, self.config = torch_net, torch_net.config
        self._step = step

    def __call__(self, z_t: Any, t: Any, cond: Any) -> Any:
        import torch

        with torch.inference_mode():
            feats = self.torch_net.condition_features(cond)
        return torch.from_numpy(self._step.run(_np(z_t), t.detach().cpu().long().numpy(), _np(feats)))


class OnnxDirect:
    """The direct UNet++ (final head) through ONNX Runtime."""

    def __init__(self, torch_net: Any, forward: OrtGraph) -> None:
        self.torch_net, self.config = torch_net, torch_net.config
        self._forward = forward

    def __call__(self, x: Any) -> Any:
        import torch

        return torch.from_numpy(self._forward.run(_np(x)))


def onnx_networks(nets: dict[str, Any], weights_sha256: str, threads: int | None = None,
                  root: str | Path | None = None) -> dict[str, Any]:
    """ONNX Runtime stand-ins for the loaded torch networks (same keys: checkpoint prefixes); raises ``RuntimeError``
    when onnxruntime/onnx are not installed. ``threads`` defaults to torch's intra-op count."""
    if not available():
        raise RuntimeError(f"{RUNTIME_ENV}=onnx needs the optional packages onnxruntime and onnx "
                           "(pip install 'dicom-node-ltdiff[onnx]')")
    import torch

    n = int(threads or torch.get_num_threads())
    out: dict[str, Any] = {}
    from .nets import NETWORKS

    for prefix, net in nets.items():
        kind = next(k for k, (cls, _) in NETWORKS.items() if isinstance(net, cls))
        if kind == "denoiser" and getattr(net.config, "noise_dim", 0):
            raise RuntimeError(f"{RUNTIME_ENV}=onnx: a denoiser conditioned on noise descriptors has no exported "
                               "graph yet; use the torch runtime")
        graphs = {g: load_graph(kind, g, net, weights_sha256, n, root, prefix) for g in GRAPHS[kind]}
        if kind == "autoencoder":
            out[prefix] = OnnxAutoencoder(net, graphs["encode"], graphs["decode"])
        elif kind == "denoiser":
            out[prefix] = OnnxDenoiser(net, graphs["step"])
        else:
            out[prefix] = OnnxDirect(net, graphs["forward"])
    return out

"""Checkpoint files: safetensors weights + JSON metadata (header and sidecar ``NAME.json``).

One file may hold several networks under prefixes (``autoencoder.``, ``denoiser.``) plus plain
tensors (latent statistics, linear-filter tables). Every way a file can be wrong -- missing,
truncated, not safetensors, foreign metadata, tampered weights, shapes that do not fit the
stored architecture -- raises :class:`CheckpointError` naming the problem, because a service
must refuse a bad model loudly rather than produce plausible-looking wrong images.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_atomic

FORMAT = "ltdiff-checkpoint"
FORMAT_VERSION = 1
METHODS = ("latent_diffusion", "linear", "direct")
REQUIRED_KEYS = ("format", "format_version", "name", "version", "method", "networks", "normalization",
                 "weights_sha256")
METADATA_KEY = "ltdiff"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, np.ndarray]
    file_sha256: str

    def prefixed(self, prefix: str) -> dict[str, np.ndarray]:
        """Tensors under ``prefix.`` with the prefix removed (a network's state dict)."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}


def weights_sha256(tensors: dict[str, np.ndarray]) -> str:
    """Digest of names, dtypes, shapes and bytes in sorted name order (independent of the header)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{list(arr.shape)}\n".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def state_dict_to_numpy(module_state: dict[str, Any], prefix: str) -> dict[str, np.ndarray]:
    """Torch state dict -> prefixed float32/int numpy tensors for saving."""
    out = {}
    for k, v in module_state.items():
        arr = v.detach().cpu().contiguous().numpy()
        out[f"{prefix}.{k}"] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
    return out


def save_checkpoint(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, Any]) -> dict[str, Any]:
    """Write ``path`` (safetensors) and its sidecar JSON; returns the final metadata."""
    from safetensors.numpy import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata)
    meta.setdefault("format", FORMAT)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta["weights_sha256"] = weights_sha256(tensors)
    _validate_metadata(meta, path)
    write_atomic(path, save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                            metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)}))
    path.chmod(0o644)  # shipped weights must be readable by the service user
    side = dict(meta)
    side["file_sha256"] = file_sha256(path)
    side["file_bytes"] = path.stat().st_size
    write_atomic(sidecar_path(path), (json.dumps(side, indent=2, sort_keys=True) + "\n").encode())
    return meta


def _read_header(path: Path) -> dict[str, Any]:
    """Parse the safetensors header ourselves to give precise errors for truncated files."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file or truncated header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if ends and 8 + n + max(ends) > size:
        raise CheckpointError(f"{path}: truncated: tensor data needs {8 + n + max(ends)} bytes, file has {size}")
    return header


def _validate_metadata(meta: dict[str, Any], path: Path) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks keys {missing}")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{path}: metadata format {meta['format']!r} is not {FORMAT!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta['format_version']} unsupported (expected {FORMAT_VERSION})")
    if meta["method"] not in METHODS:
        raise CheckpointError(f"{path}: unknown method {meta['method']!r} (known: {METHODS})")
    if not isinstance(meta["networks"], dict):
        raise CheckpointError(f"{path}: 'networks' must map prefixes to {{kind, config}}")
    for prefix, spec in meta["networks"].items():
        if not isinstance(spec, dict) or "kind" not in spec or "config" not in spec:
            raise CheckpointError(f"{path}: network {prefix!r} needs 'kind' and 'config'")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint (tensors as numpy; no torch needed)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    header = _read_header(path)
    raw_meta = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw_meta is None:
        raise CheckpointError(f"{path}: safetensors file has no '{METADATA_KEY}' metadata (not an ltdiff checkpoint)")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from exc
    _validate_metadata(meta, path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: safetensors data cannot be read ({exc})") from exc
    digest = weights_sha256(tensors)
    if digest != meta["weights_sha256"]:
        raise CheckpointError(f"{path}: weights sha256 {digest[:12]}... does not match metadata "
                              f"{str(meta['weights_sha256'])[:12]}... (file modified or corrupt)")
    fsha = file_sha256(path)
    side = sidecar_path(path)
    if side.is_file():
        try:
            side_meta = json.loads(side.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{side}: sidecar is not valid JSON ({exc})") from exc
        if side_meta.get("weights_sha256") != meta["weights_sha256"]:
            raise CheckpointError(f"{side}: sidecar describes other weights than {path.name}")
    return Checkpoint(path=path, metadata=meta, tensors=tensors, file_sha256=fsha)


def load_networks(ckpt: Checkpoint, device: str = "cpu") -> dict[str, Any]:
    """Build every network listed in the metadata and load its weights, checking names and shapes."""
    import torch

    from .nets import build_network

    nets = {}
    for prefix, spec in ckpt.metadata["networks"].items():
        try:
            net = build_network(spec["kind"], spec["config"])
        except ValueError as exc:
            raise CheckpointError(f"{ckpt.path}: architecture of {prefix!r} cannot be built: {exc}") from exc
        expected = net.state_dict()
        got = ckpt.prefixed(prefix)
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        if missing or extra:
            raise CheckpointError(f"{ckpt.path}: tensors of {prefix!r} do not match the architecture "
                                  f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                                  f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
        bad = [(k, tuple(got[k].shape), tuple(v.shape)) for k, v in expected.items() if tuple(got[k].shape) != tuple(v.shape)]
        if bad:
            k, have, want = bad[0]
            raise CheckpointError(f"{ckpt.path}: tensor {prefix}.{k} has shape {have}, architecture needs {want}"
                                  f" ({len(bad)} mismatched)")
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in got.items()})
        nets[prefix] = net.to(device).eval()
    return nets

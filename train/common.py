"""Shared training machinery: config files, DDP, seeds, logging, checkpoint/resume.

Every training script is ``parse args -> TrainContext -> loop``; what differs between them
(networks, loss) lives in the script, what must behave the same (distribution, resume,
logs) lives here.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
import tomllib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Strict, StrictBool, StrictInt, StrictStr, ValidationError, create_model
from torch import nn

from ltdiff_core.atomic import open_atomic

CODE_VERSION_FALLBACK = "unknown"


# --- configuration ----------------------------------------------------------------------
class ConfigError(ValueError):
    """A config file has an unknown, missing or mistyped key; the message names it."""


_KINDS: dict[type, tuple[Any, str]] = {  # default's type -> (strict pydantic type, how an error names it)
    bool: (StrictBool, "true/false"),
    int: (StrictInt, "an integer"),
    float: (Annotated[float, Strict()], "a number"),  # an integer is a number too
    str: (StrictStr, "a string"),
    list: (Annotated[list, Strict()], "a list"),
}
_FORBID = ConfigDict(extra="forbid")


def config_model(defaults: dict[str, dict[str, Any]]) -> type[BaseModel]:
    """A pydantic model of a training config: one model per section, each key typed by its default.

    The defaults stay the script's ``DEFAULTS`` dict (one place); a ``None`` default accepts any value."""
    sections: dict[str, Any] = {}
    for section, keys in defaults.items():
        fields = {k: (_KINDS[type(v)][0] if v is not None else Any, v) for k, v in keys.items()}
        model = create_model(f"{section}_section", __config__=_FORBID, **fields)  # type: ignore[call-overload]
        sections[section] = (model, model())
    return create_model("TrainConfig", __config__=_FORBID, **sections)  # type: ignore[call-overload]


def _message(err: Any, path: str | Path, defaults: dict[str, dict[str, Any]]) -> str:
    loc, value = tuple(err["loc"]), err.get("input")
    if err["type"] == "extra_forbidden" and len(loc) == 1:
        return f"unknown config section '[{loc[0]}]' in {path} (known: {sorted(defaults)})"
    if err["type"] == "extra_forbidden":
        return f"unknown config key '{loc[0]}.{loc[1]}' in {path} (known: {sorted(defaults[str(loc[0])])})"
    if len(loc) == 1:
        return f"'{loc[0]}' in {path} must be a table"
    kind = _KINDS[type(defaults[str(loc[0])][str(loc[1])])][1]
    return f"config key '{loc[0]}.{loc[1]}' must be {kind}, got {value!r}"


def load_config(path: str | Path | None, defaults: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Read a TOML config over ``defaults`` (``{section: {key: default}}``), validating keys and types."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    try:
        cfg = config_model(defaults).model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(_message(e, path or "", defaults) for e in exc.errors())) from None
    return {section: dict(getattr(cfg, section)) for section in defaults}


def base_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=default_config, help="TOML config file")
    p.add_argument("--cases", action="append", default=None,
                   help="case root folder (repeatable); overrides data.cases")
    p.add_argument("--out", default=None, help="output checkpoint (.safetensors); overrides output.path")
    p.add_argument("--resume", action="store_true", help="continue from OUT.train.pt if present")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--source-kernel", default=None, metavar="KERNEL",
                   help="ConvolutionKernel of the input series of each case; overrides data.source_kernel")
    p.add_argument("--target-kernel", default=None, metavar="KERNEL",
                   help="ConvolutionKernel of the target series of each case; overrides data.target_kernel")
    return p


def apply_arguments(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Command-line overrides of the data section (kernels) over the validated config."""
    for key in ("source_kernel", "target_kernel"):
        value = getattr(args, key, None)
        if value:
            cfg.setdefault("data", {})[key] = value
    return cfg


# --- distribution -----------------------------------------------------------------------
@dataclass
class DistContext:
    """Rank, world size and device; ``torchrun`` (env://) when ``WORLD_SIZE > 1``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "DistContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
        return cls(rank, world, local, device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP wrapper when distributed (gradients averaged over ranks), else the model itself."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def all_mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def gather_strings(self, s: str) -> list[str]:
        if not self.distributed:
            return [s]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, s)
        return [str(x) for x in out]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Tear the process group down on every rank together.

        Rank 0 still evaluates and saves after training while the other ranks are done; a rank that
        destroyed its gloo group and exited while a peer was still connected aborted at exit
        ("terminate called without an active exception"). The barrier makes every rank wait for rank 0,
        so the groups are destroyed together and no collective is in flight.
        """
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_threads(n: int) -> None:
    """``n`` > 0 limits intra-op threads (shared CPU machines)."""
    if n > 0:
        torch.set_num_threads(n)


def autocast(device: torch.device):
    """bf16 autocast on GPU, full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(unwrap(model).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


# --- logging ----------------------------------------------------------------------------
class LossLog:
    """CSV (one row per logged step) + JSON summary next to the output checkpoint (main rank)."""

    def __init__(self, out: Path, enabled: bool, resume: bool) -> None:
        self.csv_path = out.with_suffix(".log.csv")
        self.json_path = out.with_suffix(".log.json")
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        if enabled and resume and self.json_path.is_file():
            self.rows = json.loads(self.json_path.read_text()).get("rows", [])
        elif enabled and self.csv_path.exists():
            self.csv_path.unlink()
        self.summary: dict[str, Any] = {}

    def add(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        keys: list[str] = []
        for r in self.rows:  # validation columns appear only on some rows
            keys += [k for k in r if k not in keys]
        with open(self.csv_path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        self.flush()

    def flush(self) -> None:
        if self.enabled:
            self.json_path.write_text(json.dumps({"summary": self.summary, "rows": self.rows}, indent=1) + "\n")


# --- train state (resume) ---------------------------------------------------------------
def state_path(out: Path) -> Path:
    return out.with_suffix(".train.pt")


def save_state(out: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int,
               elapsed: float) -> None:
    with open_atomic(state_path(out)) as fh:  # a crash mid-save keeps the previous state
        torch.save({"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "step": step, "elapsed_s": elapsed}, fh)


def load_state(out: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> tuple[int, float]:
    p = state_path(out)
    if not p.is_file():
        return 0, 0.0
    st = torch.load(p, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    return int(st["step"]), float(st.get("elapsed_s", 0.0))


def code_version() -> str:
    """Package version plus the commit when run from a git checkout (read-only query)."""
    try:
        from importlib.metadata import version

        v = version("dicom-node-ltdiff")
    except Exception:
        v = "0.0.0"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{v}+{rev}" if rev else v


def command_line() -> str:
    """The command as a user would type it (``python -m train.fit_x ...``)."""
    argv0 = Path(sys.argv[0])
    prog = f"-m {argv0.parent.name}.{argv0.stem}" if argv0.suffix == ".py" else str(argv0)
    return " ".join(["python", prog] + sys.argv[1:])


# --- the loop ---------------------------------------------------------------------------
@dataclass
class LoopSpec:
    """What a script plugs into :func:`train_loop`."""

    model: nn.Module                      # the trained (possibly DDP-wrapped) module
    params: list[nn.Parameter]
    loss_fn: Callable[[int], dict[str, torch.Tensor]]   # step -> losses incl. "total"
    val_fn: Callable[[], dict[str, float]] | None
    steps: int
    lr: float
    warmup: int
    log_every: int
    val_every: int
    save_every: int
    grad_clip: float = 1.0


def train_loop(ctx: DistContext, spec: LoopSpec, out: Path, resume: bool, log: LossLog) -> dict[str, Any]:
    """Adam + warm-up/cosine schedule, logging, validation, periodic train-state saves."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(spec.params, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, spec.steps, spec.warmup))
    start, elapsed0 = (load_state(out, spec.model, opt, sched) if resume else (0, 0.0))
    t0 = time.time()
    bar = tqdm(range(start, spec.steps), initial=start, total=spec.steps, disable=not ctx.is_main,
               dynamic_ncols=True, mininterval=2.0)
    acc: dict[str, float] = {}
    n_acc = 0
    last_val: dict[str, float] = {}
    for step in bar:
        spec.model.train()
        losses = spec.loss_fn(step)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        if spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(spec.params, spec.grad_clip)
        opt.step()
        sched.step()
        for k, v in losses.items():
            acc[k] = acc.get(k, 0.0) + float(v.detach())
        n_acc += 1
        done = step + 1
        if done % spec.log_every == 0 or done == spec.steps:
            row = {"step": done, "lr": sched.get_last_lr()[0], "elapsed_s": round(elapsed0 + time.time() - t0, 1)}
            row.update({f"train_{k}": ctx.all_mean(v / n_acc) for k, v in acc.items()})
            if spec.val_fn is not None and (done % spec.val_every == 0 or done == spec.steps):
                spec.model.eval()
                with torch.no_grad():
                    last_val = {f"val_{k}": ctx.all_mean(v) for k, v in spec.val_fn().items()}
                row.update(last_val)
            log.add(row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.startswith(("train_total", "val_total"))})
            acc, n_acc = {}, 0
        if ctx.is_main and (done % spec.save_every == 0 or done == spec.steps):
            save_state(out, spec.model, opt, sched, done, elapsed0 + time.time() - t0)
    digests = ctx.gather_strings(weights_digest(spec.model))
    return {"steps": spec.steps, "train_seconds": round(elapsed0 + time.time() - t0, 1),
            "world_size": ctx.world_size, "rank_weight_digests": digests, "final_val": last_val}


@dataclass
class Run:
    """What every training script sets up before its model: config, step count, output, ranks."""

    cfg: dict[str, Any]
    steps: int
    out: Path
    ctx: "DistContext"
    t_start: float


def start_run(args: argparse.Namespace, defaults: dict[str, Any]) -> Run:
    """Validated config, output folder, distributed context, threads and seeds, in that order."""
    cfg = apply_arguments(load_config(args.config, defaults), args)
    tr = cfg["train"]
    out = Path(args.out or cfg["output"]["path"])
    out.parent.mkdir(parents=True, exist_ok=True)
    ctx = DistContext.from_env()
    set_threads(tr["threads"])
    seed_everything(tr["seed"])
    return Run(cfg, args.steps or tr["steps"], out, ctx, time.time())


def mean_losses(batches: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Per-key mean of the loss dicts of several validation batches."""
    acc: dict[str, float] = {}
    n = 0
    for res in batches:
        n += 1
        for k, v in res.items():
            acc[k] = acc.get(k, 0.0) + float(v)
    return {k: v / max(n, 1) for k, v in acc.items()}


#: Fewer series than this give an envelope that flags much of what a site sees (a warning says so).
FEW_SERIES = 5


def data_summary(train_vols: Sequence[Any], val_vols: Sequence[Any], envelope: dict[str, Any]) -> str:
    """One line: what a fit used and the envelope it wrote."""
    vols = list(train_vols) + list(val_vols)
    slices = sum(int(v.source.shape[0]) for v in vols)
    px = sorted({round(float(v.spacing[2]), 2) for v in vols})
    src, tgt = envelope["source"], envelope["target"]
    m = src.get("measures", {})

    def rng(name: str, unit: str) -> str:
        r = m.get(name)
        return f"{name} {r['lo']:.3g}-{r['hi']:.3g}{unit}" if r else f"{name} -"
    from ltdiff_core.qa import kernel_boundary

    kb = kernel_boundary(envelope)
    return (f"{Path(sys.argv[0]).stem}: {len(train_vols)} training + {len(val_vols)} validation series, {slices} slices, "
            f"pixel {', '.join(f'{p:g}' for p in px)} mm, {src['kernel']} -> {tgt['kernel']}; envelope: "
            f"{rng('noise_hu', ' HU')}, {rng('sharpness', '')}"
            + (f", kernel boundary sharpness {kb[0]:.3g}" if kb else ""))


def training_record(cfg: dict[str, Any], t_start: float, train_vols: Sequence[Any], val_vols: Sequence[Any],
                    result: dict[str, Any] | None = None, pixel_mm: float | None = None, **extra: Any) -> dict[str, Any]:
    """The ``training`` block every checkpoint carries: data, spacing, QA envelope, command, config, loop result.

    ``pixel_mm`` defaults to the median in-plane spacing of the training volumes; ``extra``
    entries (e.g. the autoencoder a denoiser was trained on) come before the loop result
    (``train_loop``'s, without ``final_val``, which goes to the metrics).
    """
    from .data import describe
    from .envelope import envelope_from_volumes

    if pixel_mm is None:
        pixel_mm = float(np.median([v.spacing[2] for v in train_vols]))
    data_cfg = cfg.get("data", {}) if isinstance(cfg, dict) else {}
    # QA envelope of the data the model saw (train + validation cases), read by the node's QA gate
    envelope = envelope_from_volumes(list(train_vols) + list(val_vols), str(data_cfg.get("source_kernel", "Br40")),
                                     str(data_cfg.get("target_kernel", "Bl64")))
    print(data_summary(train_vols, val_vols, envelope), flush=True)
    if len(train_vols) + len(val_vols) < FEW_SERIES:
        print(f"warning: the QA envelope comes from {len(train_vols) + len(val_vols)} series (fewer than "
              f"{FEW_SERIES}): inputs outside its noise, NPS and size ranges will be standardized but flagged; "
              "fit on more cases (other doses, patient sizes, fields of view) for a trustworthy envelope",
              file=sys.stderr, flush=True)
    return {"data": {"train": describe(train_vols), "val": describe(val_vols)}, "pixel_mm": pixel_mm,
            "qa_envelope": envelope, "command": command_line(), "config": cfg, **extra,
            **{k: v for k, v in (result or {}).items() if k != "final_val"},
            "wall_seconds": round(time.time() - t_start, 1)}

"""Train the baseline UNet++ directly A -> B (residual, deep supervision).

    python -m ltdiff_train.fit_direct --config conf/train-direct.toml [--cases DIR] [--out PATH] [--resume]

This is the papers' "UNet++" row: the same data and texture loss as the autoencoder, but a
deterministic regression, so it shows what the latent diffusion adds.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ltdiff_core.checkpoint import save_checkpoint, state_dict_to_numpy
from ltdiff_core.nets import DirectConfig, DirectUNetPlusPlus
from ltdiff_core.normalize import NORMALIZATION

from . import common
from .data import CropSampler, fixed_val_batches, load_split
from .fit_autoencoder import deep_supervised

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"cases": ["data/train"], "source_kernel": "Br40", "target_kernel": "Bl64", "val_cases": 1,
             "crop": 96, "batch": 8},
    "model": {"features": [16, 16, 32, 64, 128, 16], "ds_weights": [0.1, 0.2, 0.3, 1.0]},
    "loss": {"l1": 1.0, "fft": 0.5, "grad": 0.5},
    "train": {"steps": 600, "lr": 2e-3, "warmup": 50, "seed": 0, "threads": 0, "log_every": 25,
              "val_every": 200, "save_every": 200, "val_batches": 4},
    "output": {"path": "runs/direct.safetensors", "name": "direct-unetpp", "version": "0.1.0"},
}


def main(argv: list[str] | None = None) -> None:
    args = common.base_parser(__doc__.splitlines()[0], "conf/train-direct.toml").parse_args(argv)
    run = common.start_run(args, DEFAULTS)
    cfg, steps, out, ctx = run.cfg, run.steps, run.out, run.ctx
    d, tr, out_cfg = cfg["data"], cfg["train"], cfg["output"]
    train_vols, val_vols = load_split(args.cases or d["cases"], d["val_cases"], d["source_kernel"], d["target_kernel"])
    model_cfg = DirectConfig(**cfg["model"])
    net = DirectUNetPlusPlus(model_cfg).to(ctx.device)
    model = ctx.wrap(net)
    sampler = CropSampler(train_vols, d["crop"], d["batch"], tr["seed"], ctx.rank)
    val = fixed_val_batches(val_vols, d["crop"], d["batch"], tr["val_batches"])
    w = cfg["loss"]
    if d["crop"] % model_cfg.factor:
        raise common.ConfigError(f"data.crop must be a multiple of {model_cfg.factor} for the direct UNet++")

    def step_losses(a: np.ndarray, b: np.ndarray, fwd) -> dict[str, torch.Tensor]:
        ta, tb = torch.from_numpy(a).to(ctx.device), torch.from_numpy(b).to(ctx.device)
        with common.autocast(ctx.device):
            outs = fwd(ta)
        return deep_supervised([o.float() for o in outs], tb, model_cfg.ds_weights, w)

    def loss_fn(step: int) -> dict[str, torch.Tensor]:
        # through the (DDP) wrapper so gradients are synchronised
        return step_losses(*sampler.paired(step), lambda x: model(x, all_heads=True))

    def val_fn() -> dict[str, float]:
        return common.mean_losses(step_losses(a, b, net.forward_all) for a, b in val)

    log = common.LossLog(out, ctx.is_main, args.resume)
    spec = common.LoopSpec(model, list(net.parameters()), loss_fn, val_fn, steps, tr["lr"], tr["warmup"],
                           tr["log_every"], tr["val_every"], tr["save_every"])
    result = common.train_loop(ctx, spec, out, args.resume, log)
    if ctx.is_main:
        meta = {
            "name": out_cfg["name"], "version": out_cfg["version"], "method": "direct",
            "networks": {"direct": {"kind": "direct", "config": model_cfg.to_dict()}},
            "normalization": NORMALIZATION,
            "training": common.training_record(cfg, run.t_start, train_vols, val_vols, result),
            "metrics": {"direct": result["final_val"]},
            "code_version": common.code_version(),
        }
        save_checkpoint(out, state_dict_to_numpy(net.state_dict(), "direct"), meta)
        log.summary = {"result": result}
        log.flush()
        print(f"saved {out}")
    ctx.close()


if __name__ == "__main__":
    main()

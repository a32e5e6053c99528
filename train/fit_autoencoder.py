"""Train the multiscale-latent UNet++ autoencoder on crops of both kernels.

    python -m ltdiff_train.fit_autoencoder --config conf/train-autoencoder.toml [--cases DIR] [--out PATH] [--resume]
    torchrun --nproc_per_node N -m ltdiff_train.fit_autoencoder ...   (DDP)

Loss: L1 in normalised space plus an FFT-magnitude and an image-gradient L1 term on every
deep-supervision head; plain L1 alone averages noise away, and the autoencoder must keep the
sharp kernel's noise texture or no latent method can produce it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ltdiff_core.checkpoint import save_checkpoint, state_dict_to_numpy
from ltdiff_core.nets import AutoencoderConfig, MultiscaleLatentAutoencoder
from ltdiff_core.normalize import NORMALIZATION, unit_to_hu

from . import common
from .data import CropSampler, fixed_val_batches, load_split

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"cases": ["data/train"], "source_kernel": "Br40", "target_kernel": "Bl64", "val_cases": 1,
             "crop": 96, "batch": 8},
    "model": {"features": [16, 32, 64], "latent_channels": [2, 4, 8], "latent_levels": "multiscale",
              "ds_weights": [0.25, 1.0]},
    "loss": {"l1": 1.0, "fft": 0.5, "grad": 0.5},
    "train": {"steps": 1500, "lr": 2e-3, "warmup": 50, "seed": 0, "threads": 0, "log_every": 25,
              "val_every": 250, "save_every": 250, "val_batches": 4},
    "output": {"path": "runs/autoencoder.safetensors", "name": "ltdiff-autoencoder", "version": "0.1.0"},
}


def texture_loss(pred: torch.Tensor, target: torch.Tensor, w: dict[str, float]) -> dict[str, torch.Tensor]:
    """L1 + L1 of FFT magnitudes (noise power per frequency) + L1 of finite differences (edges, fine noise)."""
    l1 = F.l1_loss(pred, target)
    fp = torch.fft.rfft2(pred.float(), norm="ortho").abs()
    ft = torch.fft.rfft2(target.float(), norm="ortho").abs()
    fft = F.l1_loss(fp, ft)
    gx = lambda x: x[..., :, 1:] - x[..., :, :-1]  # noqa: E731
    gy = lambda x: x[..., 1:, :] - x[..., :-1, :]  # noqa: E731
    grad = F.l1_loss(gx(pred), gx(target)) + F.l1_loss(gy(pred), gy(target))
    return {"l1": l1, "fft": fft, "grad": grad, "total": w["l1"] * l1 + w["fft"] * fft + w["grad"] * grad}


def deep_supervised(outs: list[torch.Tensor], target: torch.Tensor, head_w: tuple[float, ...],
                    w: dict[str, float]) -> dict[str, torch.Tensor]:
    """Weighted sum of :func:`texture_loss` over heads; components reported for the last head."""
    total = 0.0
    last: dict[str, torch.Tensor] = {}
    for o, hw in zip(outs, head_w):
        last = texture_loss(o, target, w)
        total = total + hw * last["total"]
    return {**{k: v for k, v in last.items() if k != "total"}, "total": total / sum(head_w)}


def ae_metrics(ae: MultiscaleLatentAutoencoder, vols, device: torch.device, max_slices: int = 4) -> dict[str, float]:
    """Reconstruction of whole validation slices: RMSE (HU) and noise-std ratio in soft tissue."""
    from scipy import ndimage

    rm_b, rm_a, ratios = [], [], []
    done = 0
    for v in vols:
        for z in np.linspace(0, v.source.shape[0] - 1, min(2, v.source.shape[0])).astype(int):
            for kernel, store in (("target", rm_b), ("source", rm_a)):
                img = getattr(v, kernel)[z]
                h, w = (s - s % ae.config.factor for s in img.shape)
                x = torch.from_numpy(np.ascontiguousarray(img[:h, :w]))[None, None].to(device)
                with torch.no_grad():
                    y = ae.decode(ae.encode(x))[0, 0].float().cpu().numpy()
                ref, rec = unit_to_hu(img[:h, :w]), unit_to_hu(y)
                store.append(float(np.sqrt(np.mean((rec - ref) ** 2))))
                if kernel == "target":
                    mask = ndimage.binary_erosion((ref > -150) & (ref < 250), iterations=4)
                    if mask.sum() > 100:
                        hp = lambda a: a - ndimage.gaussian_filter(a, 3)  # noqa: E731
                        ratios.append(float(hp(rec)[mask].std() / hp(ref)[mask].std()))
            done += 1
            if done >= max_slices:
                break
    return {"rmse_hu_target": float(np.mean(rm_b)), "rmse_hu_source": float(np.mean(rm_a)),
            "noise_std_ratio_target": float(np.mean(ratios)) if ratios else float("nan")}


def main(argv: list[str] | None = None) -> None:
    args = common.base_parser(__doc__.splitlines()[0], "conf/train-autoencoder.toml").parse_args(argv)
    run = common.start_run(args, DEFAULTS)
    cfg, steps, out, ctx = run.cfg, run.steps, run.out, run.ctx
    d, tr, out_cfg = cfg["data"], cfg["train"], cfg["output"]
    train_vols, val_vols = load_split(args.cases or d["cases"], d["val_cases"], d["source_kernel"], d["target_kernel"])
    model_cfg = AutoencoderConfig(**cfg["model"])
    ae = MultiscaleLatentAutoencoder(model_cfg).to(ctx.device)
    model = ctx.wrap(ae)
    sampler = CropSampler(train_vols, d["crop"], d["batch"], tr["seed"], ctx.rank)
    val = fixed_val_batches(val_vols, d["crop"], d["batch"], tr["val_batches"])
    w = cfg["loss"]

    def loss_fn(step: int) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(sampler.mixed(step)).to(ctx.device)
        with common.autocast(ctx.device):
            outs = model(x)
        return deep_supervised([o.float() for o in outs], x, ae.head_weights(), w)

    def val_fn() -> dict[str, float]:
        def batch(a: np.ndarray, b: np.ndarray) -> dict[str, torch.Tensor]:
            x = torch.from_numpy(np.concatenate([a, b])).to(ctx.device)
            return deep_supervised([o.float() for o in ae(x)], x, ae.head_weights(), w)
        return common.mean_losses(batch(a, b) for a, b in val)

    log = common.LossLog(out, ctx.is_main, args.resume)
    spec = common.LoopSpec(model, list(ae.parameters()), loss_fn, val_fn, steps, tr["lr"], tr["warmup"],
                           tr["log_every"], tr["val_every"], tr["save_every"])
    result = common.train_loop(ctx, spec, out, args.resume, log)
    if ctx.is_main:
        ae.eval()
        metrics = ae_metrics(ae, val_vols, ctx.device)
        meta = {
            "name": out_cfg["name"], "version": out_cfg["version"], "method": "latent_diffusion",
            "stage": "autoencoder",
            "networks": {"autoencoder": {"kind": "autoencoder", "config": model_cfg.to_dict()}},
            "normalization": NORMALIZATION,
            "training": common.training_record(cfg, run.t_start, train_vols, val_vols, result),
            "metrics": {"autoencoder": {**result["final_val"], **metrics}},
            "code_version": common.code_version(),
        }
        save_checkpoint(out, state_dict_to_numpy(ae.state_dict(), "autoencoder"), meta)
        log.summary = {"result": result, "metrics": metrics}
        log.flush()
        print(f"saved {out}: {metrics}")
    ctx.close()


if __name__ == "__main__":
    main()

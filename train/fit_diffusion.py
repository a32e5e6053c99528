"""Train the conditional latent denoiser p(Z_B | Z_A) on a frozen autoencoder.

    python -m ltdiff_train.fit_diffusion --config conf/train-diffusion.toml [--autoencoder PATH] [--linear PATH]
        [--cases DIR] [--out PATH] [--resume] [--init LTDIFF_CHECKPOINT]

Writes the combined "ltdiff" checkpoint (autoencoder + denoiser + latent statistics +
schedule + sampling defaults). Loss: v- (or epsilon-) prediction MSE plus reference terms on
the denoised estimate, ``|Z0_hat - Z_B|^2`` and ``lambda |D(Z0_hat) - B|^2`` with the decoder
frozen but differentiated through: the image term is what keeps outputs faithful.

With ``parameterization = "first_guess"`` the fitted linear kernel filter (``model.linear``)
gives the first guess G(A); its tables are embedded in the output checkpoint
(``first_guess.*``), so inference needs no second file. ``decoding = "delta"`` makes the image
G(A) + D(Z0_hat) - D(Z_G) in training and inference alike.

Validation logs the teacher-forced losses, ``sampled_image`` (the image MSE of sampling as
inference does, at the default steps, strength and eta: the number that tracks fidelity) and
``sampled_residual_power`` (power of the sampled correction over the first guess, relative to the
true one: the number that tracks whether texture is drawn at the right level).

``--init`` fine-tunes an existing ltdiff checkpoint instead of starting from random weights: its
denoiser (architecture and weights) and its latent statistics are reused, so a model trained on
one data set can be continued on another (e.g. a mix of generators) without re-normalising the
latent it was trained in. The checkpoint must carry the same autoencoder and parameterization.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ltdiff_core import noise_condition
from ltdiff_core.normalize import unit_to_hu
from ltdiff_core.checkpoint import load_checkpoint, load_networks, save_checkpoint, state_dict_to_numpy
from ltdiff_core.diffusion import ConditionalLatentInferer, LossWeights, ScheduleConfig
from ltdiff_core.linear_filter import LinearKernelFilter
from ltdiff_core.nets import ConditionalDenoiser, DenoiserConfig

from . import common
from .data import CropSampler, LatentCache, attach_first_guess, fixed_val_batches, fixed_val_triplets, load_split

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"cases": ["data/train"], "source_kernel": "Br40", "target_kernel": "Bl64", "val_cases": 1,
             "crop": 96, "batch": 8, "stat_slices": 24},
    "model": {"autoencoder": "runs/autoencoder.safetensors", "linear": "runs/linear.safetensors", "channels": [32, 64, 64],
              "attention_levels": [False, False, False], "num_res_blocks": 1, "norm_num_groups": 16,
              "num_head_channels": 16, "noise_condition": False},
    "schedule": {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.00085,
                 "beta_end": 0.012, "prediction_type": "v_prediction", "t_max_fraction": 1.0,
                 "parameterization": "residual", "decoding": "full"},
    "sampling": {"default_steps": 4, "strength": 0.5, "eta": 0.0},
    "loss": {"diffusion": 1.0, "latent": 0.1, "image": 20.0},
    "train": {"steps": 1000, "lr": 1e-3, "warmup": 50, "seed": 0, "threads": 0, "log_every": 25,
              "val_every": 200, "save_every": 200, "val_batches": 4, "latent_cache": False},
    "output": {"path": "runs/ltdiff.safetensors", "name": "ltdiff", "version": "0.1.0"},
}


FIRST_GUESS_PREFIX = "first_guess"
NOISE_PREFIX = "noise_condition"


@torch.no_grad()
def latent_statistics(ae: torch.nn.Module, vols, n_slices: int, device: torch.device,
                      first_guess: bool = False) -> dict[str, torch.Tensor]:
    """Per-channel statistics over whole paired slices.

    ``shift``/``scale``: mean and std of raw latents of both kernels (-> unit variance).
    ``residual_shift``/``residual_scale``: mean and std of the scaled difference Z_B - Z_ref,
    with Z_ref = Z_A, or Z_G = E(G(A)) when ``first_guess`` (``vols`` then carry ``guide``).
    """
    idx = [(v, z) for v in vols for z in range(v.source.shape[0])]
    pick = np.linspace(0, len(idx) - 1, min(n_slices, len(idx))).astype(int)
    pairs = []
    for i in pick:
        v, z = idx[i]
        h, w = (s - s % ae.config.factor for s in v.source.shape[1:])
        enc = lambda img: ae.encode(torch.from_numpy(np.ascontiguousarray(img[:h, :w]))[None, None].to(device)).double()  # noqa: E731
        ref = enc(v.guide[z]) if first_guess else None
        pairs.append((enc(v.source[z]), enc(v.target[z]), ref))

    def moments(ts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        flat = torch.cat([t.permute(1, 0, 2, 3).reshape(t.shape[1], -1) for t in ts], dim=1)
        return flat.mean(1), flat.std(1).clamp_min(1e-6)

    mean, std = moments([z for za, zb, _ in pairs for z in (za, zb)])
    scaled = [((zb - (zg if zg is not None else za)) / std.view(1, -1, 1, 1)) for za, zb, zg in pairs]
    r_mean, r_std = moments(scaled)
    r_std = r_std.clamp_min(1e-2)  # channels where the kernels never differ: do not blow up
    return {k: v.float().cpu() for k, v in
            {"shift": mean, "scale": std, "residual_shift": r_mean, "residual_scale": r_std}.items()}


def initial_denoiser(path: str, ae_ckpt: Any, schedule: ScheduleConfig, device: torch.device) -> dict[str, Any]:
    """Denoiser and latent statistics of the ltdiff checkpoint at ``path``, to fine-tune.

    Refuses a checkpoint whose autoencoder differs from ``ae_ckpt``'s (its latent would mean
    something else) or whose parameterization differs from ``schedule``'s (the denoiser's
    conditioning input would not fit).
    """
    ck = load_checkpoint(path)
    if ck.metadata.get("method") != "latent_diffusion" or "denoiser" not in ck.metadata.get("networks", {}):
        raise SystemExit(f"{ck.path}: --init needs a latent diffusion checkpoint with a denoiser")
    if ck.prefixed("autoencoder").keys() != ae_ckpt.prefixed("autoencoder").keys() or any(
            not np.array_equal(v, ae_ckpt.tensors[f"autoencoder.{k}"]) for k, v in ck.prefixed("autoencoder").items()):
        raise SystemExit(f"{ck.path}: --init checkpoint was trained on another autoencoder than {ae_ckpt.path}")
    have = ck.metadata.get("scheduler", {}).get("parameterization", "residual")
    if have != schedule.parameterization:
        raise SystemExit(f"{ck.path}: --init checkpoint has parameterization {have!r}, the config "
                         f"{schedule.parameterization!r}")
    den = load_networks(ck, str(device))["denoiser"]
    den.train()
    stats = {k: torch.from_numpy(np.array(ck.tensors[f"latent.{k}"], dtype=np.float32))
             for k in ("shift", "scale", "residual_shift", "residual_scale")}
    noise_stats = {k: np.array(ck.tensors[f"{NOISE_PREFIX}.{k}"], dtype=np.float32)
                   for k in ("shift", "scale") if f"{NOISE_PREFIX}.{k}" in ck.tensors}
    record = {"path": ck.path.name, "weights_sha256": ck.metadata["weights_sha256"],
              "steps": ck.metadata.get("training", {}).get("steps")}
    return {"denoiser": den, "stats": stats, "record": record, "noise_stats": noise_stats or None}


def with_noise_condition(den: ConditionalDenoiser, noise_dim: int) -> ConditionalDenoiser:
    """``den`` given a (zero-initialised) noise-descriptor embedding: the same function at the start,
    so a denoiser trained without the condition can be continued with it."""
    if den.config.noise_dim == noise_dim:
        return den
    if den.config.noise_dim:
        raise SystemExit(f"--init denoiser takes {den.config.noise_dim} noise descriptors, the config {noise_dim}")
    cfg = DenoiserConfig(**{**den.config.to_dict(), "noise_dim": noise_dim})
    new = ConditionalDenoiser(cfg).to(next(den.parameters()).device)
    missing, unexpected = new.load_state_dict(den.state_dict(), strict=False)
    if unexpected or any(not k.startswith("noise_embed.") for k in missing):
        raise SystemExit(f"cannot extend the --init denoiser: missing {missing}, unexpected {unexpected}")
    new.train()
    return new


def main(argv: list[str] | None = None) -> None:
    p = common.base_parser(__doc__.splitlines()[0], "conf/train-diffusion.toml")
    p.add_argument("--autoencoder", default=None, help="autoencoder checkpoint; overrides model.autoencoder")
    p.add_argument("--linear", default=None, help="linear-filter checkpoint (first guess); overrides model.linear")
    p.add_argument("--init", default=None,
                   help="ltdiff checkpoint to fine-tune: its denoiser and latent statistics replace [model] and the "
                        "statistics pass (same autoencoder and parameterization required)")
    args = p.parse_args(argv)
    run = common.start_run(args, DEFAULTS)
    cfg, steps, out, ctx = run.cfg, run.steps, run.out, run.ctx
    d, m, tr, out_cfg = cfg["data"], cfg["model"], cfg["train"], cfg["output"]

    ae_ckpt = load_checkpoint(args.autoencoder or m["autoencoder"])
    ae = load_networks(ae_ckpt, str(ctx.device))["autoencoder"]
    for prm in ae.parameters():
        prm.requires_grad_(False)
    train_vols, val_vols = load_split(args.cases or d["cases"], d["val_cases"], d["source_kernel"], d["target_kernel"])
    schedule = ScheduleConfig(**cfg["schedule"])
    first_guess = schedule.parameterization == "first_guess"
    lin_ckpt, filt = None, None
    if first_guess:
        lin_ckpt = load_checkpoint(args.linear or m["linear"])
        if lin_ckpt.metadata["method"] != "linear":
            raise SystemExit(f"{lin_ckpt.path}: method {lin_ckpt.metadata['method']!r} is not a linear filter")
        filt = LinearKernelFilter.from_tensors(lin_ckpt.tensors, "linear")
        attach_first_guess(train_vols + val_vols, filt.apply)
    latent_dim = ae.config.latent_dim
    noise_dim = len(noise_condition.NAMES) if m.get("noise_condition") else 0
    if noise_dim and not tr["latent_cache"]:
        raise SystemExit("model.noise_condition needs train.latent_cache = true (descriptors of whole slices)")
    init = None
    if args.init:
        init = initial_denoiser(args.init, ae_ckpt, schedule, ctx.device)
        stats, den = init["stats"], with_noise_condition(init["denoiser"], noise_dim)
        den_cfg = den.config
    else:
        stats = latent_statistics(ae, train_vols, d["stat_slices"], ctx.device, first_guess)
        den_cfg = DenoiserConfig(latent_dim=latent_dim, cond_dim=2 * latent_dim if first_guess else 0,
                                 channels=m["channels"],
                                 attention_levels=m["attention_levels"], num_res_blocks=m["num_res_blocks"],
                                 norm_num_groups=m["norm_num_groups"], num_head_channels=m["num_head_channels"],
                                 noise_dim=noise_dim)
        den = ConditionalDenoiser(den_cfg).to(ctx.device)
    model = ctx.wrap(den)
    inferer = ConditionalLatentInferer(ae, model, schedule, stats["shift"], stats["scale"],
                                       stats["residual_shift"], stats["residual_scale"]).to(ctx.device)
    weights = LossWeights(**cfg["loss"])
    sampler = CropSampler(train_vols, d["crop"], d["batch"], tr["seed"], ctx.rank)
    val = fixed_val_triplets(val_vols, d["crop"], d["batch"], tr["val_batches"]) if first_guess else [
        (a, None, b) for a, b in fixed_val_batches(val_vols, d["crop"], d["batch"], tr["val_batches"])]

    def losses(a: np.ndarray, g: np.ndarray | None, b: np.ndarray, gen: torch.Generator) -> dict[str, torch.Tensor]:
        ta, tb = torch.from_numpy(a).to(ctx.device), torch.from_numpy(b).to(ctx.device)
        tg = torch.from_numpy(g).to(ctx.device) if g is not None else None
        with common.autocast(ctx.device):
            return inferer.training_losses(ta, tb, weights, gen, guide=tg, noise_cond=crop_noise(a))

    cache = None
    if tr["latent_cache"]:
        if weights.image > 0:
            raise SystemExit("train.latent_cache needs loss.image = 0 (the image term decodes image crops)")
        cache = LatentCache(train_vols, lambda x: inferer.encode(x.to(ctx.device)).float().cpu(), ae.config.factor,
                            d["crop"], d["batch"], tr["seed"], ctx.rank, first_guess, noise_condition=bool(noise_dim))
        if noise_dim and init is not None and init["noise_stats"] is not None:  # keep the scale it learned in
            cache.noise_shift, cache.noise_scale = init["noise_stats"]["shift"], init["noise_stats"]["scale"]

    def crop_noise(a: np.ndarray):
        """Standardised descriptors of validation crops (the crop stands in for its slice)."""
        if not noise_dim or cache is None:
            return None
        raw = noise_condition.describe(unit_to_hu(a[:, 0]))
        return torch.from_numpy(noise_condition.standardise(raw, cache.noise_shift, cache.noise_scale)).to(ctx.device)

    def loss_fn(step: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(tr["seed"] * 1_000_003 + ctx.rank * 7919 + step)
        if cache is not None:
            za, zg, zb = (z.to(ctx.device) if z is not None else None for z in cache.batch_at(step))
            nz = cache.noise_at(step)
            with common.autocast(ctx.device):
                return inferer.latent_losses(za, zb, weights, gen, z_g=zg,
                                             noise_cond=nz.to(ctx.device) if nz is not None else None)
        return losses(*sampler.triplet(step, with_guide=first_guess), gen)

    samp_steps, samp_strength = int(cfg["sampling"]["default_steps"]), float(cfg["sampling"]["strength"])
    samp_eta = float(cfg["sampling"].get("eta", 0.0))

    def val_fn() -> dict[str, float]:
        """Teacher-forced losses, plus ``sampled_image``: the image MSE of real sampling at the
        checkpoint's default steps and strength (the teacher-forced image term can look good while
        sampled outputs are not)."""
        def one(i: int, a: np.ndarray, g: np.ndarray | None, b: np.ndarray) -> dict[str, Any]:
            res = losses(a, g, b, torch.Generator().manual_seed(777 + i))
            ta, tb = torch.from_numpy(a).to(ctx.device), torch.from_numpy(b).to(ctx.device)
            tg = torch.from_numpy(g).to(ctx.device) if g is not None else None
            with common.autocast(ctx.device):
                sampled = inferer.sampled_image_mse(ta, tb, samp_steps, samp_strength,
                                                    torch.Generator().manual_seed(999 + i), tg, eta=samp_eta,
                                                    noise_cond=crop_noise(a))
            res["sampled_image"], res["sampled_residual_power"] = sampled["image"], sampled["residual_power"]
            return res
        return common.mean_losses(one(i, a, g, b) for i, (a, g, b) in enumerate(val))

    log = common.LossLog(out, ctx.is_main, args.resume)
    spec = common.LoopSpec(model, list(den.parameters()), loss_fn, val_fn, steps, tr["lr"], tr["warmup"],
                           tr["log_every"], tr["val_every"], tr["save_every"])
    result = common.train_loop(ctx, spec, out, args.resume, log)
    if ctx.is_main:
        ae_meta = ae_ckpt.metadata
        meta = {
            "name": out_cfg["name"], "version": out_cfg["version"], "method": "latent_diffusion",
            "networks": {"autoencoder": ae_meta["networks"]["autoencoder"],
                         "denoiser": {"kind": "denoiser", "config": den_cfg.to_dict()}},
            "normalization": ae_meta["normalization"],
            "latent": {k: v.tolist() for k, v in stats.items()},
            "scheduler": schedule.to_dict(),
            "sampling": cfg["sampling"],
            "training": common.training_record(
                cfg, run.t_start, train_vols, val_vols, result, pixel_mm=ae_meta.get("training", {}).get("pixel_mm"),
                autoencoder={"weights_sha256": ae_meta["weights_sha256"],
                             "training": {k: v for k, v in ae_meta.get("training", {}).items()
                                          if k in ("command", "train_seconds", "wall_seconds", "steps")}},
                **({"init": init["record"]} if init is not None else {})),
            "metrics": {**ae_meta.get("metrics", {}), "diffusion": result["final_val"]},
            "code_version": common.code_version(),
        }
        tensors = {**state_dict_to_numpy(ae.state_dict(), "autoencoder"),
                   **state_dict_to_numpy(den.state_dict(), "denoiser"),
                   **{f"latent.{k}": v.numpy() for k, v in stats.items()}}
        if noise_dim and cache is not None:
            tensors[f"{NOISE_PREFIX}.shift"] = np.asarray(cache.noise_shift, dtype=np.float32)
            tensors[f"{NOISE_PREFIX}.scale"] = np.asarray(cache.noise_scale, dtype=np.float32)
            meta["noise_condition"] = {"prefix": NOISE_PREFIX, "descriptors": list(noise_condition.NAMES)}
        if filt is not None and lin_ckpt is not None:
            tensors.update(filt.to_tensors(FIRST_GUESS_PREFIX))
            meta["first_guess"] = {"method": "linear", "prefix": FIRST_GUESS_PREFIX, "name": lin_ckpt.metadata["name"],
                                   "weights_sha256": lin_ckpt.metadata["weights_sha256"],
                                   "training": {k: v for k, v in lin_ckpt.metadata.get("training", {}).items()
                                                if k in ("command", "data")}}
        save_checkpoint(out, tensors, meta)
        log.summary = {"result": result}
        log.flush()
        print(f"saved {out}")
    ctx.close()


if __name__ == "__main__":
    main()

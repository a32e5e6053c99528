"""CPU inference of the default model: time per stage, then each optimisation against the previous.

    python -m bench.bench_inference [--model PATH] [--new-default PATH|derive] [--threads 2]
                                    [--repeats 5] [--size 512] [--skip-profile] [--modules] [--onnx] [--onnx-profile]

Part 1 times every stage of one 512^2 slice (first guess G, padding, encoder A, encoder G, each
denoiser step, each decoder pass, rest = tiling and pre/post) by wrapping the calls.
Part 2 builds one ``Standardizer`` per rung of the optimisation ladder (each rung adds one
change to the one before; rung 0 is the previous code path) and times them *interleaved*
(rung 0, 1, 2, ... then again), because the machine is shared: read the medians' ratios.
Each rung's output is compared with rung 0's (HU RMS and max, same seed); ``/r4`` is the ratio to
rung 4, the torch path that is the default now.
Part 3 (``--modules``) times each network call against its previous path.
``--onnx`` adds ONNX Runtime rungs (``ltdiff_core.onnx_runtime``: the same networks exported and run
by ORT's CPU provider at graph level ALL, at level EXTENDED to isolate ORT's blocked NCHWc
convolutions, and with one thread) to parts 2 and 3, plus two concat-free decoder graphs to part 3;
``--onnx-profile`` prints each graph's time per ONNX operator type. Graphs go to ``LTDIFF_ONNX_CACHE``.

``--new-default derive`` writes a copy of the current checkpoint whose metadata is the new
default's sampling (delta decoding, strength 1, eta 1, 10 steps): same networks, so the same
cost as the trained model.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.bench_standardize import synthetic_volume

SPACING = (1.5, 0.7, 0.7)


def derive_new_default(src: str | None, out_dir: Path) -> Path:
    """Current checkpoint with the new default's sampling metadata (delta decoding, eta 1, 10 steps)."""
    from ltdiff_core.checkpoint import load_checkpoint, save_checkpoint
    from ltdiff_core.weights import default_checkpoint

    ck = load_checkpoint(src or default_checkpoint("ltdiff"))
    meta = json.loads(json.dumps(ck.metadata))
    meta["scheduler"]["decoding"] = "delta"
    meta["scheduler"]["t_max_fraction"] = 1.0
    meta["sampling"] = {"default_steps": 10, "strength": 1.0, "eta": 1.0}
    meta["name"] = meta["name"] + "-delta-eta1"
    path = out_dir / "new-default.safetensors"
    save_checkpoint(path, ck.tensors, meta)
    return path


# --- part 1: stages -------------------------------------------------------------------------
def profile_stages(model: str | None, size: int) -> list[tuple[str, float]]:
    """Seconds per stage of one slice (second call; the first warms allocations up)."""
    import ltdiff_core.standardizer as stdz
    from ltdiff_core import Standardizer

    s = Standardizer.from_checkpoint(model, device="cpu")
    inf = s.inferer
    rec: list[tuple[str, float]] = []

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            r = fn(*a, **k)
            rec.append((name, time.perf_counter() - t0))
            return r
        return wrapper

    inf.encode = timed("encoder", inf.encode)  # type: ignore[method-assign]
    inf.decode = timed("decoder", inf.decode)  # type: ignore[method-assign]
    den_forward = inf.denoiser.forward
    inf.denoiser.forward = timed("denoiser step", den_forward)  # type: ignore[method-assign]
    if s.first_guess is not None:
        s.first_guess.apply = timed("first guess G (linear filter)", s.first_guess.apply)  # type: ignore[method-assign]
    orig_pad = stdz.pad_to_multiple
    stdz.pad_to_multiple = timed("pad to multiple", orig_pad)
    vol = synthetic_volume(1, size)
    for _ in range(2):
        rec.clear()
        t0 = time.perf_counter()
        s.standardize(vol, SPACING)
        total = time.perf_counter() - t0
    stdz.pad_to_multiple = orig_pad
    out: list[tuple[str, float]] = []
    counts: dict[str, int] = {}
    for name, sec in rec:
        counts[name] = counts.get(name, 0) + 1
        label = {"encoder": ["encoder A", "encoder G"]}.get(name, [name])
        idx = counts[name] - 1
        out.append((label[idx] if idx < len(label) else f"{name} {counts[name]}", sec))
    out.append(("rest (tiling, HU<->unit, numpy<->torch, sampler arithmetic)", total - sum(x for _, x in rec)))
    out.append(("total", total))
    return out


# --- part 2: optimisation ladder ------------------------------------------------------------
def _reference_decoder(ae: Any) -> None:
    """Previous decoder path: every deep-supervision head, MONAI UpCat with its pad."""
    ae.decode = lambda z: type(ae).decode_all(ae, z)[-1]


def _reference_denoiser(den: Any) -> None:
    """Previous denoiser path: concatenate [z_t, condition] and run the whole UNet every step."""
    import torch

    den.forward = lambda z, t, c: den.unet(torch.cat([z, c], dim=1), timesteps=t)


def _reopen_onnx(s: Any, optimization: str) -> None:
    """Reopen every ONNX Runtime session of ``s`` at another graph optimisation level."""
    from ltdiff_core.onnx_runtime import OrtGraph

    for net in s._exec.values():
        for attr, value in list(vars(net).items()):
            if isinstance(value, OrtGraph):
                setattr(net, attr, OrtGraph(value.model, value.threads, optimization))


def _decode_concat_free(ae: Any, z: Any, deconv_as_conv: bool = False) -> Any:
    """Decoder with each UpCat's ``conv(cat[skips, up(x)])`` as a sum of per-input convolutions
    (the first conv is linear in its input channels), optionally with the 2x2 stride-2 transposed
    convolution as a 1x1 convolution + pixel shuffle. Same values up to rounding; an ONNX Runtime
    graph without Concat nodes (and the layout reorders ORT puts around them)."""
    import torch.nn.functional as F

    def up(block: Any, x: Any) -> Any:
        if not deconv_as_conv:
            return block.upsample(x)
        d = block.upsample.deconv  # weight (Cin, Cout, 2, 2)
        cin, cout = d.weight.shape[:2]
        w = d.weight.permute(1, 2, 3, 0).reshape(cout * 4, cin, 1, 1)
        return F.pixel_shuffle(F.conv2d(x, w, d.bias.repeat_interleave(4)), 2)

    def upcat(block: Any, x: Any, skips: list[Any]) -> Any:
        conv0, out, start = block.convs.conv_0, None, 0
        for part in skips + [up(block, x)]:
            n = part.shape[1]
            y = F.conv2d(part, conv0.conv.weight[:, start:start + n], conv0.conv.bias if start == 0 else None,
                         padding=conv0.conv.padding)
            out, start = (y if out is None else out + y), start + n
        return block.convs.conv_1(conv0.adn(out))

    L = ae.config.depth
    zs = ae.unpack(z)
    grid = {(i, 0): ae.lift[str(i)](zi) for i, zi in enumerate(zs)}
    for j in range(1, L + 1):
        for i in range(0, L - j + 1):
            grid[(i, j)] = upcat(ae.up[f"{i}_{j}"], grid[(i + 1, j - 1)], [grid[(i, k)] for k in range(j)])
    return ae.heads[-1](grid[(0, L)])


def _onnx_decoder_variant(ae: Any, deconv_as_conv: bool, threads: int) -> Any:
    """ORT session (level ALL) of :func:`_decode_concat_free` for a multiscale autoencoder."""
    import copy
    import io
    import warnings

    import torch

    from ltdiff_core.onnx_runtime import OPSET, OrtGraph

    clone = copy.deepcopy(ae).to(memory_format=torch.contiguous_format)

    class Decode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ae = clone

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return _decode_concat_free(self.ae, z, deconv_as_conv)

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Decode(), (torch.randn(2, ae.config.latent_dim, 8, 6),), buf, opset_version=OPSET,
                          dynamo=False, input_names=["z"], output_names=["out"],
                          dynamic_axes={"z": {0: "b", 2: "h", 3: "w"}, "out": {0: "b", 2: "h", 3: "w"}})
    return OrtGraph(buf.getvalue(), threads)


def onnx_profile(model: str | None, size: int) -> list[tuple[str, str, float, int]]:
    """Share of each ONNX operator type in one call of each graph (ORT's profiler, level ALL)."""
    import collections
    import os

    import onnxruntime as ort
    import torch

    from ltdiff_core import Standardizer
    from ltdiff_core.onnx_runtime import session_options

    s = Standardizer.from_checkpoint(model, device="cpu", runtime="onnx")
    ae, den = s._nets["autoencoder"], s._nets["denoiser"]
    lat = (size + 16) // ae.config.factor  # the padded 528^2 tile of a 512^2 slice
    rng = np.random.default_rng(0)
    ld = ae.config.latent_dim
    feeds = {"autoencoder.encode": [rng.standard_normal((1, 1, lat * ae.config.factor, lat * ae.config.factor),
                                                        np.float32)],
             "autoencoder.decode": [rng.standard_normal((1, ld, lat, lat), np.float32)],
             "denoiser.step": [rng.standard_normal((1, ld, lat, lat), np.float32), np.array([100]),
                               rng.standard_normal((1, den.config.channels[0], lat, lat), np.float32)]}
    graphs = {"autoencoder.encode": s._exec["autoencoder"]._encode,
              "autoencoder.decode": s._exec["autoencoder"]._decode,
              "denoiser.step": s._exec["denoiser"]._step}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, g in graphs.items():
            so = session_options(torch.get_num_threads())
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, name)
            src = str(g.model) if isinstance(g.model, Path) else g.model
            sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
            feed = dict(zip([i.name for i in sess.get_inputs()], feeds[name]))
            for _ in range(3):
                sess.run(None, feed)
            events = json.loads(Path(sess.end_profiling()).read_text())
            dur: collections.Counter[str] = collections.Counter()
            count: collections.Counter[str] = collections.Counter()
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    dur[e["args"]["op_name"]] += e["dur"]
                    count[e["args"]["op_name"]] += 1
            total = sum(dur.values())
            rows += [(name, op, d / total, count[op] // 3) for op, d in dur.most_common(8)]
    return rows


RUNGS: list[tuple[str, dict[str, Any]]] = [
    ("0 previous path (inference_mode, torch default threads)", {"dec": False, "den": False, "cl": False, "att": False}),
    ("1 decoder: final head only, no no-op pad", {"dec": True, "den": False, "cl": False, "att": False}),
    ("2 denoiser: condition's first-conv share once per slice", {"dec": True, "den": True, "cl": False, "att": False}),
    ("3 autoencoder channels_last", {"dec": True, "den": True, "cl": True, "att": False}),
    ("4 fused attention in the denoiser (default now)", {"dec": True, "den": True, "cl": True, "att": True}),
    ("5 + intra-op threads 1 (not default: for loaded cores)", {"dec": True, "den": True, "cl": True, "att": True,
                                                                "threads": 1}),
]
#: ONNX Runtime rungs (``--onnx``): the default path's networks exported, run by ORT's CPU provider.
ONNX_RUNGS: list[tuple[str, dict[str, Any]]] = [
    ("6 ONNX Runtime, level ALL (LTDIFF_RUNTIME=onnx)", {"dec": True, "den": True, "cl": True, "att": True,
                                                         "runtime": "onnx", "ort_level": "ALL"}),
    ("7 ONNX Runtime, level EXTENDED (no NCHWc convs)", {"dec": True, "den": True, "cl": True, "att": True,
                                                         "runtime": "onnx", "ort_level": "EXTENDED"}),
    ("8 ONNX Runtime, level ALL, intra-op threads 1", {"dec": True, "den": True, "cl": True, "att": True,
                                                       "runtime": "onnx", "ort_level": "ALL", "threads": 1}),
]


def build_rung(model: str | None, opts: dict[str, Any]) -> Any:
    import torch

    from ltdiff_core import Standardizer
    from ltdiff_core.runtime import prepare_for_inference

    if opts.get("runtime") == "onnx":  # ORT sessions take their thread count when they are built
        default_threads = torch.get_num_threads()
        torch.set_num_threads(int(opts.get("threads", default_threads)))
        try:
            s = Standardizer.from_checkpoint(model, device="cpu", runtime="onnx")
        finally:
            torch.set_num_threads(default_threads)
        if opts.get("ort_level", "ALL") != "ALL":
            _reopen_onnx(s, opts["ort_level"])
        return s
    s = Standardizer.from_checkpoint(model, device="cpu", runtime="torch")
    prepare_for_inference(s._nets, "cpu", channels_last=opts["cl"], fused_attention=opts["att"])
    if not opts["att"]:
        from ltdiff_core.runtime import set_fused_attention

        for net in s._nets.values():
            set_fused_attention(net, False)
    if not opts["cl"]:  # undo the default layout for the reference rungs
        import torch

        s._nets["autoencoder"].to(memory_format=torch.contiguous_format)
    if not opts["dec"]:
        _reference_decoder(s._nets["autoencoder"])
    if not opts["den"] and "denoiser" in s._nets:
        _reference_denoiser(s._nets["denoiser"])
    return s


def ladder(model: str | None, size: int, repeats: int, onnx: bool = False) -> list[dict[str, Any]]:
    """Rungs interleaved; each runs with its own intra-op thread count (default: the command's)."""
    import torch

    default_threads = torch.get_num_threads()
    all_rungs = RUNGS + (ONNX_RUNGS if onnx else [])
    threads = {name: int(opts.get("threads", default_threads)) for name, opts in all_rungs}
    rungs = [(name, build_rung(model, opts)) for name, opts in all_rungs]
    vol = synthetic_volume(1, size)
    outs: dict[str, np.ndarray] = {}
    times: dict[str, list[float]] = {name: [] for name, _ in rungs}
    cpu: dict[str, list[float]] = {name: [] for name, _ in rungs}
    for name, s in rungs:  # warm-up + output
        torch.set_num_threads(threads[name])
        outs[name] = s.standardize(vol, SPACING, seed=3)
    for r in range(repeats):  # alternate the order so drift in the machine's load hits every rung alike
        for name, s in (rungs if r % 2 == 0 else rungs[::-1]):
            torch.set_num_threads(threads[name])
            t0, c0 = time.perf_counter(), time.process_time()
            s.standardize(vol, SPACING, seed=3)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    torch.set_num_threads(default_threads)
    base_name, torch_now = rungs[0][0], rungs[4][0]
    res, prev = [], None
    for name, _ in rungs:
        med = statistics.median(times[name])
        d = outs[name].astype(np.float64) - outs[base_name]
        res.append({"rung": name, "median_s": round(med, 3), "runs_s": [round(t, 3) for t in times[name]],
                    "vs_previous": round(med / prev, 3) if prev else None,
                    "vs_baseline": round(med / statistics.median(times[base_name]), 3),
                    "vs_rung4": round(med / statistics.median(times[torch_now]), 3),
                    "cpu_vs_rung4": round(statistics.median(cpu[name]) / statistics.median(cpu[torch_now]), 3),
                    "cpu_s_median": round(statistics.median(cpu[name]), 3),
                    "cpu_vs_baseline": round(statistics.median(cpu[name]) / statistics.median(cpu[base_name]), 3),
                    "hu_rms_vs_baseline": float(np.sqrt(np.mean(d * d))), "hu_max_vs_baseline": float(np.abs(d).max())})
        prev = med
    return res


# --- part 3: per-network A/B -----------------------------------------------------------------
def module_ab(model: str | None, size: int, repeats: int, onnx: bool = False) -> list[dict[str, Any]]:
    """Each network call, previous vs current path, interleaved; wall and process CPU seconds.

    Under a loaded shared machine whole-slice wall times swing by 2x between runs; one network
    call timed back to back with its reference, with CPU time beside wall time, gives steadier ratios.
    """
    import copy

    import torch

    from ltdiff_core import Standardizer
    from ltdiff_core.runtime import prepare_for_inference, set_fused_attention

    s = Standardizer.from_checkpoint(model, device="cpu")
    inf = s.inferer
    ae_new, den_new = inf.autoencoder, inf.denoiser
    ae_ref, den_ref = copy.deepcopy(ae_new), copy.deepcopy(den_new)
    ae_ref.to(memory_format=torch.contiguous_format)
    _reference_decoder(ae_ref)
    _reference_denoiser(den_ref)
    set_fused_attention(den_ref, False)
    den_cond = copy.deepcopy(den_new)
    set_fused_attention(den_cond, False)
    den_cl = copy.deepcopy(den_new).to(memory_format=torch.channels_last)
    ae_nchw = copy.deepcopy(ae_new).to(memory_format=torch.contiguous_format)
    prepare_for_inference({"autoencoder": ae_new}, "cpu", channels_last=True)
    g = torch.Generator().manual_seed(0)
    lat = size // ae_new.config.factor
    x = torch.randn(1, 1, size, size, generator=g)
    z = torch.randn(1, ae_new.config.latent_dim, lat, lat, generator=g)
    cond = torch.randn(1, den_new.config.cond_dim or den_new.config.latent_dim, lat, lat, generator=g)
    t = torch.tensor([500])
    ort_levels: dict[str, Any] = {}
    if onnx:  # the default path's networks through ONNX Runtime at two graph optimisation levels
        from ltdiff_core.onnx_runtime import OnnxAutoencoder, OnnxDenoiser, OrtGraph, onnx_networks

        base = onnx_networks({"autoencoder": ae_new, "denoiser": den_new}, s.ckpt.metadata["weights_sha256"])
        for level in ("EXTENDED", "ALL"):
            ae_o, den_o = base["autoencoder"], base["denoiser"]
            ort_levels[level] = (
                OnnxAutoencoder(ae_new, OrtGraph(ae_o._encode.model, ae_o._encode.threads, level),
                                OrtGraph(ae_o._decode.model, ae_o._decode.threads, level)),
                OnnxDenoiser(den_new, OrtGraph(den_o._step.model, den_o._step.threads, level)))
    cases = {
        "encoder": [("previous (NCHW)", lambda: ae_ref.encode(x)), ("channels_last", lambda: ae_new.encode(x))],
        "decoder": [("previous (all heads, NCHW)", lambda: ae_ref.decode(z)),
                    ("final head only (NCHW)", lambda: ae_nchw.decode(z)),
                    ("final head only, channels_last", lambda: ae_new.decode(z))],
        "denoiser step": [("previous (concatenated input)", lambda: den_ref(z, t, cond)),
                          ("condition share cached", lambda: den_cond(z, t, cond)),
                          ("+ fused attention (default now)", lambda: den_new(z, t, cond)),
                          ("+ channels_last (not default)", lambda: den_cl(z, t, cond))],
    }
    for level, (ae_o, den_o) in ort_levels.items():
        cases["encoder"].append((f"ONNX Runtime {level}", lambda ae_o=ae_o: ae_o.encode(x)))
        cases["decoder"].append((f"ONNX Runtime {level}", lambda ae_o=ae_o: ae_o.decode(z)))
        cases["denoiser step"].append((f"ONNX Runtime {level}", lambda den_o=den_o: den_o(z, t, cond)))
    if onnx and ae_new.multiscale:
        threads = torch.get_num_threads()
        for label, deconv in (("ORT ALL, concat-free", False), ("ORT ALL, concat-free, deconv 1x1", True)):
            g_ = _onnx_decoder_variant(ae_new, deconv, threads)
            cases["decoder"].append((label, lambda g_=g_: torch.from_numpy(g_.run(z.numpy()))))
    rows = []
    with torch.inference_mode():
        for d in (den_new, den_cond, den_cl):
            d(z, t, cond)  # fills the condition cache as the first sampling step does
        for stage, variants in cases.items():
            ref_out = variants[0][1]()
            wall: dict[str, list[float]] = {n: [] for n, _ in variants}
            cpu: dict[str, list[float]] = {n: [] for n, _ in variants}
            outs = {n: f() for n, f in variants}
            for r in range(repeats):
                for n, f in (variants if r % 2 == 0 else variants[::-1]):
                    t0, c0 = time.perf_counter(), time.process_time()
                    f()
                    wall[n].append(time.perf_counter() - t0)
                    cpu[n].append(time.process_time() - c0)
            w0, c0_ = statistics.median(wall[variants[0][0]]), statistics.median(cpu[variants[0][0]])
            for n, _ in variants:
                rows.append({"stage": stage, "variant": n, "wall_s": round(statistics.median(wall[n]), 3),
                             "cpu_s": round(statistics.median(cpu[n]), 3),
                             "wall_vs_previous": round(statistics.median(wall[n]) / w0, 3),
                             "cpu_vs_previous": round(statistics.median(cpu[n]) / c0_, 3),
                             "max_abs_diff": float((outs[n].float() - ref_out.float()).abs().max())})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: shipped ltdiff)")
    p.add_argument("--new-default", default=None,
                   help="second model to report: a checkpoint path, or 'derive' (see module docstring)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (issue target: 2 cores)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--skip-profile", action="store_true")
    p.add_argument("--skip-ladder", action="store_true")
    p.add_argument("--modules", action="store_true", help="also the per-network A/B (part 3)")
    p.add_argument("--onnx", action="store_true",
                   help="add the ONNX Runtime rungs and per-network variants (needs the [onnx] extra)")
    p.add_argument("--onnx-profile", action="store_true",
                   help="share of each ONNX operator type per graph (ORT profiler; needs the [onnx] extra)")
    args = p.parse_args()

    import torch

    from ltdiff_core.runtime import configure_threads

    configure_threads(args.threads)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "intra_op_threads": torch.get_num_threads(),
                      "inter_op_threads": torch.get_num_interop_threads(), "size": args.size}))
    models: list[tuple[str, str | None]] = [("current default", args.model)]
    tmp = tempfile.TemporaryDirectory()
    if args.new_default:
        path = derive_new_default(args.model, Path(tmp.name)) if args.new_default == "derive" else args.new_default
        models.append(("new default", str(path)))
    for label, model in models:
        if not args.skip_profile:
            print(f"\n== {label}: stages of one {args.size}^2 slice (s) ==")
            for name, sec in profile_stages(model, args.size):
                print(f"  {name:<62s} {sec:7.3f}")
        if args.onnx_profile and label == "current default":
            print(f"\n== ONNX Runtime operator shares per graph at {args.size}^2 (level ALL, 3 runs) ==")
            for graph, op, share, n in onnx_profile(model, args.size):
                print(f"  {graph:<20s} {op:<24s} {100 * share:5.1f} %  x{n}")
        if args.modules and label == "current default":  # same networks in both models
            print(f"\n== per-network A/B at {args.size}^2, {args.repeats} interleaved repeats ==")
            print(f"  {'stage':<14s} {'variant':<34s} {'wall s':>7s} {'/ref':>6s} {'cpu s':>7s} {'/ref':>6s} {'max diff':>9s}")
            for r in module_ab(model, args.size, args.repeats, args.onnx):
                print(f"  {r['stage']:<14s} {r['variant']:<34s} {r['wall_s']:7.3f} {r['wall_vs_previous']:6.3f} "
                      f"{r['cpu_s']:7.3f} {r['cpu_vs_previous']:6.3f} {r['max_abs_diff']:9.2e}")
        if args.skip_ladder:
            continue
        print(f"\n== {label}: optimisation ladder, {args.repeats} interleaved repeats ==")
        print(f"  {'rung':<58s} {'median s':>8s} {'/prev':>6s} {'/base':>6s} {'/r4':>6s} {'HU RMS':>8s} {'HU max':>8s} "
              f"{'cpu/base':>8s} {'cpu/r4':>6s}")
        for r in ladder(model, args.size, args.repeats, args.onnx):
            print(f"  {r['rung']:<58s} {r['median_s']:8.3f} {r['vs_previous'] or 1:6.3f} {r['vs_baseline']:6.3f} "
                  f"{r['vs_rung4']:6.3f} {r['hu_rms_vs_baseline']:8.4f} {r['hu_max_vs_baseline']:8.4f} "
                  f"{r['cpu_vs_baseline']:8.3f} {r['cpu_vs_rung4']:6.3f}")
            print("   ", json.dumps(r))
    tmp.cleanup()


if __name__ == "__main__":
    main()

"""GPU benchmarks of the CuPy backend against PyTorch on the same GPU, same run (issue 6).

    python3 benchmarks/gpu.py attention [--seqs 1024 2048 4096 8192] [--dims 64 128] [--check] [--kernels]
                                        [--no-compare] [--out FILE]
    python3 benchmarks/gpu.py step [--batch 8] [--seq 1024] [--steps 10] [--profile] [--trace] [--host-profile]
                                   [--out FILE]
    python3 benchmarks/gpu.py nvme [--gib 4] [--chunk-mib 64] [--path DIR] [--out FILE]
    python3 benchmarks/gpu.py offload [--variants none opt params+opt twin nvme] ...   (see gpu_offload.py)

attention: forward and forward+backward of causal attention in bf16, refimpl's FlashAttention-2 RawKernels
(`backend.attention(..., block_size=64)` and `attention_backward`) against
`torch.nn.functional.scaled_dot_product_attention` (flash / cuDNN, whatever torch picks), at FlashAttention-2's
benchmark shapes: batch = 16k tokens / seq, heads = 2048 / head_dim. TFLOP/s by FlashAttention's convention:
forward 4*B*H*T*T*D, halved for causal; backward 2.5x the forward. --check first compares every compiled tile
shape of the tensor-core kernels with the fp32 path (fp16 and bf16, masks, odd lengths; exits on failure);
--kernels first times each kernel (and each tile shape of _source.TC_VARIANTS) alone with CUDA events.

step: one training step of a GPT-2-small-sized model (12 layers, d_model 768, 12 heads, vocab 50257, tied
embeddings: 124M parameters) in bf16 mixed precision: refimpl (`refimpl train`'s engine, stage 0, backend cupy,
bf16 parameters and gradients, fp32 master and AdamW) against the same architecture in PyTorch eager
(`torch.autocast` bf16, fp32 parameters, fused AdamW), tokens/s, and model FLOP utilisation: 6 N + 12 L T d FLOPs
per token (PaLM's count) against the H200's dense bf16 peak, 989 TFLOP/s. --trace lists every GPU kernel of one
step of each (CUPTI, through torch.profiler) and compares the host's time to issue refimpl's forward+backward
with the GPU's time to run it (which of the two bounds the step); --host-profile runs cProfile over refimpl's
step; --profile times each backend op with CUDA events.

nvme: NVMe -> GPU parameter streaming, the path stage 3 with offload_param=nvme takes (ParamSwapper: swap_in_async
reads `buffer_count` chunks ahead into aligned host buffers, to_device waits for the read, verifies its crc32 and
copies it to the GPU), over --gib of bf16 chunks of --chunk-mib each, against `dd iflag=direct bs=1M` reading a
file of the same size on the same filesystem. The page cache is dropped before each read where the machine allows.

offload: ZeRO-3 with the optimizer, parameters and optimizer, or both on NVMe offloaded, against DeepSpeed 0.19.8
on the same model and weights, the CPU's triad and the disk (benchmarks/gpu_offload.py, issue 15).

Timing: CUDA events around each call, median of the timed repetitions after warm-up; variants interleaved.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _report import emit  # noqa: E402  (benchmarks/ is the script's folder)
import gpu_offload  # noqa: E402
from refimpl.backend import get_backend, use_backend  # noqa: E402

PEAK_BF16 = 989e12   # H100/H200 SXM dense bf16 tensor-core peak (NVIDIA's datasheet)


def cuda_time(fn, reps, warmup, sync):
    """Median milliseconds of fn() over reps, timed by wall clock around a device synchronisation."""
    import time
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(out))


def _lowp(a, dtype):
    import ml_dtypes
    return a.astype(ml_dtypes.bfloat16 if dtype == "bf16" else np.float16)


def check_attention(be):
    """The tensor-core kernels (every compiled tile shape) against the plain path in fp32 on the same rounded
    inputs, with the spec tests' bf16/fp16 tolerance (rtol of the dtype, atol 1.5e-5 of the result's scale):
    prints the worst |error| / tolerance per output (<= 1 passes). A bug detector, not the spec suite."""
    from refimpl_cupy import _runtime as rt
    from refimpl_cupy import _source
    from refimpl_cupy import attention as A
    cases = [  # B, H, Tq, Tk, D, Dv, causal, padding mask
        (2, 3, 300, 300, 64, 64, True, True), (2, 3, 257, 300, 128, 128, True, False),
        (2, 3, 300, 257, 128, 128, True, False), (1, 2, 1000, 1000, 64, 64, False, False),
        (1, 2, 1000, 1000, 128, 128, True, False), (2, 2, 130, 130, 40, 40, True, True),
        (2, 2, 200, 200, 128, 96, False, True), (1, 1, 64, 64, 64, 64, False, False),
        (1, 1, 3, 70, 16, 16, True, False), (1, 2, 700, 700, 64, 64, True, False)]
    worst, lines = 0.0, []
    for ci, (B, H, Tq, Tk, D, Dv, causal, masked) in enumerate(cases):
        rng = np.random.default_rng(ci)
        maxd = 64 if max(D, Dv) <= 64 else 128
        host = [rng.standard_normal(s, dtype=np.float32) for s in ((B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, Dv),
                                                                  (B, H, Tq, Dv))]
        mask = be.asarray(rng.random((B, Tk)) < 0.2) if masked else None
        kw = dict(causal=causal, key_padding_mask=mask)
        runs = [("fp16", None)] + [("bf16", None)] + [
            ("bf16", {k: v}) for k, vs in _source.TC_VARIANTS[maxd].items() for v in vs]
        for dtype, tiles in runs:
            low = [_lowp(h, dtype) for h in host]
            q, k, v, do = (be.asarray(a) for a in low)
            q32, k32, v32, do32 = (be.asarray(a.astype(np.float32)) for a in low)
            rtol = 1.6e-2 if dtype == "bf16" else 2.0e-3
            out_r, lse_r = A.attention(q32, k32, v32, **kw)
            out_t, lse_t = A.attention(q, k, v, block_size=64, tiles=tiles, **kw)
            o_low = rt.cast(out_r, q.dtype)
            g_r = A.attention_backward(do32, q32, k32, v32, rt.up(o_low), lse_r, **kw)
            g_t = A.attention_backward(do, q, k, v, o_low, lse_r, block_size=64, tiles=tiles, **kw)
            ratios = {}
            for name, got, exp, sc in [("out", out_t, out_r, 1.0)] + [
                    (n, a, b, 4.0) for n, a, b in zip(("dq", "dk", "dv"), g_t, g_r)]:
                e = be.to_numpy(exp).astype(np.float64)
                a = be.to_numpy(got).astype(np.float64)
                scale = sc * max(float(np.abs(e).max()), 1e-30)
                ratios[name] = float((np.abs(a - e) / (rtol * np.abs(e) + 1.5e-5 * scale)).max())
            le, lt = be.to_numpy(lse_r).astype(np.float64), be.to_numpy(lse_t).astype(np.float64)
            fin = np.isfinite(le)
            same_inf = bool(np.array_equal(np.isfinite(lt), fin))
            ratios["lse"] = float(np.abs(lt[fin] - le[fin]).max() / (1.5e-5 * 10)) if fin.any() else 0.0
            if not same_inf:
                ratios["lse"] = float("inf")
            bad = max(ratios.values())
            worst = max(worst, bad if np.isfinite(bad) else 1e9)
            lines.append(f"check {(B, H, Tq, Tk, D, Dv)} causal={causal} mask={masked} {dtype} tiles={tiles}: "
                         + " ".join(f"{n}={r:.2f}" for n, r in ratios.items()) + ("" if bad <= 1 else "  FAIL"))
            print(lines[-1], flush=True)
    print(f"check: worst error / tolerance {worst:.3f} ({'pass' if worst <= 1 else 'FAIL'})", flush=True)
    return worst


def kernel_ms(fn, reps):
    """Median milliseconds of each kernel fn launches through launch_shared (CUDA events around each)."""
    import cupy as cp
    from refimpl_cupy import _runtime as rt
    orig, rec = rt.launch_shared, []

    def timed(name, grid, block, args, shared_bytes):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        orig(name, grid, block, args, shared_bytes)
        b.record()
        rec.append((name.split("<")[0], a, b))
    rt.launch_shared = timed
    try:
        fn()
        cp.cuda.Device().synchronize()
        rec.clear()
        for _ in range(reps):
            fn()
        cp.cuda.Device().synchronize()
    finally:
        rt.launch_shared = orig
    per = {}
    for name, a, b in rec:
        per.setdefault(name, []).append(cp.cuda.get_elapsed_time(a, b))
    return {n: float(np.median(v)) for n, v in per.items()}


def kernels_attention(be, args):
    """Per-kernel ms of every compiled tile shape, bf16 causal, at the benchmark's shapes, and TFLOP/s of the
    products each kernel does (causal halves; hi + lo operands counted once): forward 2 (S, PV), dK/dV 4
    (S, dP, dV, dK), dQ 3 (S, dP, dQ) products of B H T^2 D multiply-adds. The fwd+bwd line is by
    FlashAttention's convention (3.5x the forward), as the comparison table."""
    import ml_dtypes
    from refimpl_cupy import _source
    from refimpl_cupy import attention as A
    lines = ["| D | T | kernel | tiles (m-tiles/warp, tile) | ms | TFLOP/s of its products |",
             "|---|---|---|---|---|---|"]

    def add(line):
        lines.append(line)
        print(line, flush=True)
    for D in args.dims:
        for T in args.seqs:
            B, H = max(1, 16384 // T), 2048 // D
            rng = np.random.default_rng(0)
            q, k, v, do = (be.asarray(rng.standard_normal((B, H, T, D), dtype=np.float32)
                                      .astype(ml_dtypes.bfloat16)) for _ in range(4))
            fwd = 4 * B * H * T * T * D / 2
            state = {}

            def f(tiles=None):
                state["o"], state["l"] = A.attention(q, k, v, causal=True, block_size=64, tiles=tiles)

            def bwd(tiles=None):
                A.attention_backward(do, q, k, v, state["o"], state["l"], causal=True, block_size=64, tiles=tiles)
            f()
            main = _source.TC_TILES[D]
            ms = {**kernel_ms(f, args.reps), **kernel_ms(bwd, args.reps)}
            flops = {"flash_fwd_tc": fwd, "flash_bwd_dkdv_tc": 2.0 * fwd, "flash_bwd_dq_tc": 1.5 * fwd}
            for name, m in ms.items():
                tf = f"{flops[name] / m / 1e9:.0f}" if name in flops else "-"
                add(f"| {D} | {T} | {name} | {main.get(name, '-')} | {m:.3f} | {tf} |")
            tot = sum(ms.values())
            add(f"| {D} | {T} | fwd+bwd kernels | main | {tot:.3f} | {3.5 * fwd / tot / 1e9:.0f} |")
            for name, variants in _source.TC_VARIANTS[D].items():
                for tiles in variants:
                    fn = f if name == "flash_fwd_tc" else bwd
                    m = kernel_ms(lambda: fn({name: tiles}), args.reps)[name]  # noqa: B023 (called here)
                    add(f"| {D} | {T} | {name} | {tiles} | {m:.3f} | {flops[name] / m / 1e9:.0f} |")
    return lines


def bench_attention(args):
    import ml_dtypes
    import torch
    F = torch.nn.functional
    be = get_backend("cupy")
    cp = be.xp
    if args.check and check_attention(be) > 1:
        sys.exit("attention check failed")
    if args.kernels:
        emit(kernels_attention(be, args), f"{torch.cuda.get_device_name()}; bf16, causal; per kernel, CUDA events, "
             f"median of {args.reps}", __file__, None)
    if args.no_compare:
        return
    lines = ["| head dim | seq | batch x heads | torch fwd TFLOP/s | refimpl fwd TFLOP/s | torch fwd+bwd TFLOP/s "
             "| refimpl fwd+bwd TFLOP/s | refimpl / torch (fwd+bwd) |", "|---|---|---|---|---|---|---|---|"]
    for D in args.dims:
        for T in args.seqs:
            B, H = max(1, 16384 // T), 2048 // D
            rng = np.random.default_rng(0)
            host = [rng.standard_normal((B, H, T, D), dtype=np.float32) for _ in range(4)]
            tq, tk, tv, tdo = (torch.from_numpy(h).to("cuda", torch.bfloat16) for h in host)
            for t in (tq, tk, tv):
                t.requires_grad_(True)
            rq, rk, rv, rdo = (be.asarray(h.astype(ml_dtypes.bfloat16)) for h in host)
            fwd_flops = 4 * B * H * T * T * D / 2
            sync_t, sync_c = torch.cuda.synchronize, cp.cuda.Device().synchronize

            def t_fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

            def t_fb():
                o = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
                o.backward(tdo)

            state = {}

            def r_fwd():
                state["out"], state["lse"] = be.attention(rq, rk, rv, causal=True, block_size=64)

            def r_fb():
                out, lse = be.attention(rq, rk, rv, causal=True, block_size=64)
                be.attention_backward(rdo, rq, rk, rv, out, lse, causal=True, block_size=64)

            ms = {}
            for name, fn, sync in (("t_fwd", t_fwd, sync_t), ("r_fwd", r_fwd, sync_c),
                                   ("t_fb", t_fb, sync_t), ("r_fb", r_fb, sync_c)):
                ms[name] = cuda_time(fn, args.reps, 2, sync)
            # the same numbers? (bf16 outputs of both, relative to the output's scale)
            ref = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True).detach().float().cpu().numpy()
            got = be.to_numpy(state["out"]).astype(np.float32)
            err = float(np.abs(ref - got).max() / np.abs(ref).max())
            tf = lambda flops, m: flops / (m / 1e3) / 1e12  # noqa: E731
            lines.append(f"| {D} | {T} | {B} x {H} | {tf(fwd_flops, ms['t_fwd']):.0f} | {tf(fwd_flops, ms['r_fwd']):.0f} "
                         f"| {tf(3.5 * fwd_flops, ms['t_fb']):.0f} | {tf(3.5 * fwd_flops, ms['r_fb']):.0f} "
                         f"| {ms['t_fb'] / ms['r_fb']:.2f}x (max rel. diff of out {err:.1e}) |")
            print(lines[-1], flush=True)
            torch.cuda.empty_cache()
            cp.get_default_memory_pool().free_all_blocks()
    emit(lines, f"{torch.cuda.get_device_name()}; bf16, causal; torch {torch.__version__} SDPA; "
                f"refimpl cupy FlashAttention-2 RawKernels; median of {args.reps}", __file__, args.out)


def bench_step(args):
    import torch
    from refimpl.config import load_config
    from refimpl.engine import Engine
    from refimpl.train import build
    from refimpl.interop.torch import TorchTransformer
    sets = ["backend=cupy", "world_size=1", "zero_optimization.stage=0", "zero_optimization.offload_param=null",
            "zero_optimization.offload_optimizer=null", "memory.device_bytes=null", "bf16.enabled=true",
            "model.vocab_size=50257", "model.n_layers=12", "model.d_model=768", "model.n_heads=12",
            f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}", "model.attention=tiled",
            "model.tie_embeddings=true", f"train_micro_batch_size_per_gpu={args.batch}", "scheduler=null",
            "gradient_clipping=1.0"]
    config = load_config(None, sets)
    be, dataset, model = build(config)
    with use_backend(be):
        engine = Engine(model, config, be)
    cfg = model.cfg
    tm = TorchTransformer(cfg).cuda()                         # tied head, as refimpl's tie_embeddings
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, fused=True)
    batches = [dataset.get_batch("train", s, args.batch, args.seq) for s in range(args.steps + 2)]

    def refimpl_step(b):
        with use_backend(be):
            loss, _ = model.loss(b)
            engine.backward(loss)
            engine.step()
        return loss

    def torch_step(b):
        ids = torch.from_numpy(b.ids).cuda()
        tgt = torch.from_numpy(b.targets).cuda()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = tm(ids)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        opt.step()
        return loss

    import time
    ms = {"refimpl (cupy)": [], "torch eager": []}
    for s, b in enumerate(batches):
        for name, fn, sync in (("refimpl (cupy)", refimpl_step, be.synchronize),
                               ("torch eager", torch_step, torch.cuda.synchronize))[::1 if s % 2 else -1]:
            sync()
            t0 = time.perf_counter()
            fn(b)
            sync()
            if s >= 2:
                ms[name].append((time.perf_counter() - t0) * 1e3)
    n = model.num_parameters()
    tokens = args.batch * args.seq
    flops = tokens * (6 * n + 12 * cfg.n_layers * args.seq * cfg.d_model)
    lines = ["| implementation | ms per step (median) | tokens/s | MFU (989 TFLOP/s bf16) | vs torch eager |",
             "|---|---|---|---|---|"]
    t_ms = float(np.median(ms["torch eager"]))
    for name, v in ms.items():
        m = float(np.median(v))
        lines.append(f"| {name} | {m:.1f} | {tokens / (m / 1e3):,.0f} | {flops / (m / 1e3) / PEAK_BF16:.1%} "
                     f"| {t_ms / m:.2f}x |")
    emit(lines, f"{torch.cuda.get_device_name()}; {n / 1e6:.0f}M parameters (12 x 768, vocab 50257, tied), "
                f"{args.batch} x {args.seq} tokens, bf16 mixed precision; {args.steps} timed steps after 2, "
                f"interleaved; torch {torch.__version__}", __file__, args.out)
    if args.trace:
        for name, fn, sync in (("refimpl (cupy)", refimpl_step, be.synchronize),
                               ("torch eager", torch_step, torch.cuda.synchronize)):
            emit(trace_step(sync, lambda: fn(batches[0])), f"{name} step, every GPU kernel (CUPTI via "  # noqa: B023
                 "torch.profiler), per step over 2 steps; kernel times sum over streams", __file__, None)
        emit(issue_time(be, model, engine, batches[0]), "refimpl (cupy): host time to issue forward+backward (no "
             "synchronisation inside) against the time until the GPU has run it; median of 5", __file__, None)
    if args.host_profile:
        host_profile(be, lambda: refimpl_step(batches[0]))
    if args.profile:
        emit(profile_step(be, lambda: refimpl_step(batches[0]), 3), "refimpl (cupy) step by backend op: CUDA "
             "events around each call, summed per step (median of 3 steps); 'other' = the rest of the step's time "
             "(array code outside the backend's kernels, host waits)", __file__, None)


def host_profile(be, step, reps=3, top=45):
    """Where the host's time goes in refimpl's step (cProfile over reps steps): by own time and by cumulative time."""
    import cProfile
    import pstats
    step()
    be.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        step()
    be.synchronize()
    prof.disable()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof).strip_dirs().sort_stats(key).print_stats(top)


def issue_time(be, model, engine, batch, reps=5):
    """Is the step bound by the host? Host ms to issue forward+backward (Python, autodiff, launches; nothing
    inside waits for the GPU) against ms until the GPU has run it all, per repetition."""
    import time
    issue, done = [], []
    for _ in range(reps + 1):
        be.synchronize()
        with use_backend(be):
            t0 = time.perf_counter()
            loss, _ = model.loss(batch)
            engine.backward(loss)
            t1 = time.perf_counter()
            be.synchronize()
            t2 = time.perf_counter()
            engine.zero.zero_grads()
            engine.micro_steps -= 1        # not a step: the next one is a boundary again
        issue.append((t1 - t0) * 1e3)
        done.append((t2 - t0) * 1e3)
    return ["| forward+backward | ms |", "|---|---|", f"| host issues it | {np.median(issue[1:]):.2f} |",
            f"| GPU has run it | {np.median(done[1:]):.2f} |"]


def trace_step(sync, step, reps=2):
    """Every GPU kernel a step launches (for refimpl: CuPy's elementwise and reduction kernels, cuBLAS, our
    RawKernels), from CUPTI's activity trace through torch.profiler: calls and device ms per step, by kernel name,
    and the sum of kernel time against the step's wall time (the rest: the GPU idle while Python issues work)."""
    import time

    from torch.profiler import ProfilerActivity, profile
    step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        sync()
        wall = (time.perf_counter() - t0) * 1e3 / reps
    per = {}
    for e in prof.events():
        us = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
        if str(getattr(e, "device_type", "")).endswith("CUDA") and us:
            c, t = per.get(e.name, (0, 0.0))
            per[e.name] = (c + 1, t + us / 1e3)
    busy = sum(t for _, t in per.values()) / reps
    lines = ["| kernel | calls per step | ms per step | share of the step |", "|---|---|---|---|"]
    for name, (c, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:30]:
        lines.append(f"| {name[:90]} | {c / reps:g} | {t / reps:.2f} | {t / reps / wall:.0%} |")
    lines.append(f"| all kernels ({sum(c for c, _ in per.values()) / reps:g} launches) | - | {busy:.2f} | "
                 f"{busy / wall:.0%} |")
    lines.append(f"| step (wall) | - | {wall:.2f} | 100% |")
    return lines


#: the backend's kernel entry points (refimpl/backend.py) that profile_step times
_OPS = ("matmul", "softmax", "softmax_backward", "layernorm", "layernorm_backward", "gelu", "gelu_backward",
        "embedding", "embedding_backward", "cross_entropy", "cross_entropy_backward", "attention",
        "attention_backward", "adam_step", "sum_squares", "has_inf_or_nan", "cast")


def profile_step(be, step, reps):
    """ms per step in each backend op (CUDA events around every call of be's methods) and in the rest."""
    import time

    import cupy as cp
    rec, saved = [], {}

    def timed(name, fn):
        def call(*a, **kw):
            s, e = cp.cuda.Event(), cp.cuda.Event()
            s.record()
            out = fn(*a, **kw)
            e.record()
            rec.append((name, s, e))
            if name == "matmul":  # and by shape: (a, b, transpose_a, transpose_b)
                rec.append(((tuple(a[0].shape), tuple(a[1].shape), bool(kw.get("transpose_a", a[2:3] and a[2])),
                             bool(kw.get("transpose_b", a[3:4] and a[3]))), s, e))
            return out
        return call
    for name in _OPS:
        saved[name] = getattr(be, name)
        setattr(be, name, timed(name, saved[name]))
    per_step = []
    try:
        for _ in range(reps):
            rec.clear()
            be.synchronize()
            t0 = time.perf_counter()
            step()
            be.synchronize()
            wall = (time.perf_counter() - t0) * 1e3
            ops = {}
            for name, s, e in rec:
                c, m = ops.get(name, (0, 0.0))
                ops[name] = (c + 1, m + cp.cuda.get_elapsed_time(s, e))
            per_step.append((wall, ops))
    finally:
        for name, fn in saved.items():
            setattr(be, name, fn)
    wall = float(np.median([w for w, _ in per_step]))
    names = sorted(per_step[0][1], key=lambda n: -per_step[0][1][n][1])
    lines = ["| op | calls per step | ms per step | share |", "|---|---|---|---|"]
    total = 0.0
    for n in [n for n in names if isinstance(n, str)]:
        m = float(np.median([ops.get(n, (0, 0.0))[1] for _, ops in per_step]))
        total += m
        lines.append(f"| {n} | {per_step[0][1][n][0]} | {m:.2f} | {m / wall:.0%} |")
    lines.append(f"| other | - | {wall - total:.2f} | {(wall - total) / wall:.0%} |")
    lines.append(f"| step (wall) | - | {wall:.2f} | 100% |")
    shapes = [n for n in names if not isinstance(n, str)][:8]
    if shapes:
        import torch
        lines += ["", "| matmul (a, b, transpose_a, transpose_b) | calls | ms per step | TFLOP/s | torch.matmul "
                  "TFLOP/s, same shapes |", "|---|---|---|---|---|"]
        for n in shapes:
            (sa, sb, ta, tb), (c, m) = n, per_step[0][1][n]
            M, K = (sa[-1], sa[-2]) if ta else (sa[-2], sa[-1])
            N = sb[-2] if tb else sb[-1]
            flops = 2 * int(np.prod(sa[:-2], dtype=np.int64)) * M * N * K * c
            ta_, tb_ = (torch.randn(x, device="cuda", dtype=torch.bfloat16) for x in (sa, sb))
            x, y = ta_.mT if ta else ta_, tb_.mT if tb else tb_
            torch.matmul(x, y)
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(20):  # back to back: the GEMMs' time, not the launch gaps
                torch.matmul(x, y)
            t1.record()
            torch.cuda.synchronize()
            tm = t0.elapsed_time(t1) / 20 * c
            lines.append(f"| {sa} {sb} {ta} {tb} | {c} | {m:.2f} | {flops / m / 1e9:.0f} | {flops / tm / 1e9:.0f} |")
    return lines


def bench_nvme(args):
    import shutil
    import subprocess
    import tempfile
    import time

    import ml_dtypes
    from nvme_bandwidth import drop_caches
    from refimpl.memory.ledger import Ledger
    from refimpl.memory.aio_store import AioStore
    from refimpl.memory.param_offload import ParamSwapper
    from refimpl.zero.partition import PartitionLayout
    be = get_backend(args.backend)
    folder = tempfile.mkdtemp(prefix="nvme-gpu-", dir=args.path)
    try:
        chunk = args.chunk_mib * (1 << 20) // 2                         # bf16 elements per chunk
        n = max(1, int(args.gib * (1 << 30)) // (2 * chunk))
        layout = PartitionLayout([(f"p{i}", (chunk,)) for i in range(n)], 1)
        swapper = ParamSwapper(layout, 0, ml_dtypes.bfloat16, backend=be, ledger=Ledger(),
                               store=AioStore(os.path.join(folder, "swap")), buffer_count=args.buffer_count,
                               buffer_size=chunk)
        rng = np.random.default_rng(0)
        for s in layout.slots:
            swapper.write_chunk(s, rng.standard_normal(chunk, dtype=np.float32).astype(ml_dtypes.bfloat16))
        swapper.finish_writes()
        total = n * chunk * 2
        dd_file = os.path.join(folder, "dd.bin")
        subprocess.run(["dd", "if=/dev/urandom", f"of={dd_file}", "bs=1M", f"count={total >> 20}", "oflag=direct",
                        "status=none"], check=True)
        rows = []
        for rep in range(args.reps):
            dropped = drop_caches()
            t0 = time.perf_counter()
            subprocess.run(["dd", f"if={dd_file}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none"], check=True)
            dd_s = time.perf_counter() - t0
            dropped &= drop_caches()
            t0 = time.perf_counter()
            slots = layout.slots
            for i, s in enumerate(slots):
                for ahead in slots[i:i + args.buffer_count]:              # the prefetcher's read-ahead
                    if not swapper.swap_in_async(ahead):
                        break
                dev = swapper.to_device(s)
            be.synchronize()
            gpu_s = time.perf_counter() - t0
            del dev
            rows.append((total / dd_s / 1e9, total / gpu_s / 1e9, dropped))
        dd_gbs = float(np.median([r[0] for r in rows]))
        gpu_gbs = float(np.median([r[1] for r in rows]))
        lines = ["| path | GB/s (median of %d) | / dd |" % args.reps, "|---|---|---|",
                 f"| dd iflag=direct bs=1M -> /dev/null | {dd_gbs:.2f} | 1.00 |",
                 f"| AioStore -> host -> device ({be.name}; ParamSwapper, {args.buffer_count} reads ahead) | {gpu_gbs:.2f} "
                 f"| {gpu_gbs / dd_gbs:.2f} |"]
        emit(lines, f"{n} chunks of {args.chunk_mib} MiB ({total / 2**30:.1f} GiB), bf16; page cache dropped: "
                    f"{all(r[2] for r in rows)}; crc32 verified on every chunk", __file__, args.out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("attention")
    a.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    a.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    a.add_argument("--reps", type=int, default=10)
    a.add_argument("--check", action="store_true", help="first check every tile shape against the fp32 path")
    a.add_argument("--kernels", action="store_true", help="first time each kernel and tile shape alone")
    a.add_argument("--no-compare", action="store_true", help="skip the comparison with torch SDPA")
    a.add_argument("--out")
    s = sub.add_parser("step")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seq", type=int, default=1024)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--profile", action="store_true", help="then time refimpl's step by backend op")
    s.add_argument("--trace", action="store_true", help="then list every GPU kernel of both steps (CUPTI, "
                                                        "through torch.profiler)")
    s.add_argument("--host-profile", action="store_true", help="then profile refimpl's step on the host (cProfile)")
    s.add_argument("--out")
    v = sub.add_parser("nvme")
    v.add_argument("--gib", type=float, default=4.0)
    v.add_argument("--chunk-mib", type=int, default=64)
    v.add_argument("--buffer-count", type=int, default=5)
    v.add_argument("--reps", type=int, default=3)
    v.add_argument("--path", default=None, help="folder on the disk to measure (default: the temp folder)")
    v.add_argument("--backend", default="cupy", help="numpy: the same path ending in host memory (a dry run)")
    v.add_argument("--out")
    gpu_offload.add_parser(sub)
    args = ap.parse_args()
    {"attention": bench_attention, "step": bench_step, "nvme": bench_nvme, "offload": gpu_offload.run}[args.what](args)


if __name__ == "__main__":
    main()

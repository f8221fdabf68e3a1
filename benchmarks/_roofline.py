"""A roofline per kernel for benchmarks/train_step_cpu.py: each kernel's work against the machine's two measured rates.

A kernel's time is bounded below by its arithmetic at the machine's GEMM rate and by its memory traffic at the
in-place triad's bandwidth, whichever is longer (Williams, Waterman and Patterson 2009, "Roofline"). Both rates
are measured in the same process, right before the table:
- GEMM: the backend's own `matmul` on 1024 x 1024 x 1024 fp32 (what refimpl can drive BLAS to, on all threads);
- bandwidth: the in-place triad a = a + s*c on 3 x 50M fp32, numba prange (benchmarks/adam_bandwidth.py), 12
  bytes per element.

Work is counted from the arguments: 2 M N K for a matmul; FlashAttention's convention for attention (4 B H Tq
Tk D forward, 2.5x that backward, halved when causal); bytes are every array argument read plus every array
result written, once (a lower bound: tiles that spill from cache are read again).
"""
import time

import numpy as np


def kernel_work(name, args, kw, result):
    """(flops, bytes) of one kernel call."""
    arrays = [a for a in args if isinstance(a, np.ndarray)]
    arrays += [a for a in kw.values() if isinstance(a, np.ndarray)]
    outs = result if isinstance(result, tuple) else (result,)
    nbytes = sum(a.nbytes for a in arrays) + sum(o.nbytes for o in outs if isinstance(o, np.ndarray))
    flops = 0.0
    if name == "matmul":
        a, ta = args[0], kw.get("transpose_a", args[2] if len(args) > 2 else False)
        flops = 2.0 * result.size * (a.shape[-2] if ta else a.shape[-1])
    elif name in ("attention", "attention_backward"):
        q, k = (args[0], args[1]) if name == "attention" else (args[1], args[2])
        B, H, Tq, D = q.shape
        flops = 4.0 * B * H * Tq * k.shape[2] * D * (0.5 if kw.get("causal") else 1.0)
        flops *= 2.5 if name == "attention_backward" else 1.0
    return flops, nbytes


def gemm_rate(backend, n=1024, reps=5):
    """GFLOP/s of backend.matmul on (n, n) @ (n, n) fp32, best of `reps`."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    backend.matmul(a, b)
    best = min(_seconds(lambda: backend.matmul(a, b)) for _ in range(reps))
    return 2.0 * n ** 3 / best / 1e9


def triad_rate(n=50_000_000, reps=5):
    """GB/s of the in-place triad a = a + s*c (12 bytes per element), numba prange, best of `reps`."""
    import numba
    from adam_bandwidth import Triad, make_triad_inplace_numba
    triad = Triad(make_triad_inplace_numba(numba), n)
    best = min(_seconds(triad.step) for _ in range(reps))
    del triad
    return 12.0 * n / best / 1e9


def _seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def table(seconds, work, gemm_gflops, triad_gbs):
    """Markdown rows: kernel | ms | GFLOP | MB | GFLOP/s (of GEMM) | GB/s (of triad) | roofline ms | x roofline."""
    lines = [f"| kernel (per step) | ms | GFLOP | MB moved | GFLOP/s (of {gemm_gflops:.0f}) "
             f"| GB/s (of {triad_gbs:.0f}) | roofline ms | measured / roofline |", "|---|---|---|---|---|---|---|---|"]
    for name in sorted(seconds, key=lambda k: -seconds[k]):
        s, (flops, nbytes) = seconds[name], work[name]
        bound = max(flops / (gemm_gflops * 1e9), nbytes / (triad_gbs * 1e9))
        lines.append(f"| {name} | {s * 1e3:.1f} | {flops / 1e9:.2f} | {nbytes / 1e6:.0f} "
                     f"| {flops / s / 1e9:.0f} ({flops / s / 1e9 / gemm_gflops:.0%}) "
                     f"| {nbytes / s / 1e9:.1f} ({nbytes / s / 1e9 / triad_gbs:.0%}) | {bound * 1e3:.2f} "
                     f"| {s / bound:.1f}x |")
    return lines

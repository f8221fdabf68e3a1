"""Attention forward+backward on the CPU: the backends' ``attention`` kernels against torch's SDPA, same run.

The backend interface has one attention kernel pair, ``attention`` -> (out, lse) and ``attention_backward`` ->
(dq, dk, dv) on (B, H, T, D) arrays, in two forms: plain (``block_size=None``: the materialised (T, T) scores) and
tiled (``block_size=64``: FlashAttention's online softmax, working memory bounded by the tile). This times both
forms on the NumPy reference (refimpl/kernels/attention.py) and on the numba backend
(backends/refimpl_numba/attention.py) against ``torch.nn.functional.scaled_dot_product_attention`` on the CPU,
forward and backward through autograd, fp32, with each mask of --masks: causal, key padding (batch row b pads its
last T*b/(2B) keys; torch gets the same mask as a boolean attn_mask), both, or none. Variants are run interleaved
(A B C, C B A, ...) on the same inputs, so that other tenants of the machine hit all alike; every threaded library
gets all cores, except NumPy's OpenBLAS: selecting the numba backend sets it to one thread for the process
(refimpl/blas_threads.py), so the numpy rows run on one BLAS thread too (the details line says).

FLOP convention (FlashAttention's): a forward pass is 4*B*H*T*T*D (the two matmuls QK^T and PV), forward+backward
2.5x that (the backward's five matmuls against the forward's two), halved for causal attention, whose upper
triangle carries no work. GFLOP/s = those FLOPs / median time, whatever an implementation actually computes (the
plain form computes the masked half too). The speed column is torch's median time over the variant's (> 1:
faster than torch); the last column is the largest deviation of the variant's output and gradients from torch's.

    python3 benchmarks/attention_cpu.py [--sizes 16,8,128,16 4,8,256,64 4,8,1024,64] [--reps 5] [--warmup 1]
        [--block-size 64] [--masks causal padded] [--out table.md]

The first default size is the default model's (refimpl train: micro batch 16, 8 heads of 16, 128 tokens).
"""
import argparse
import itertools
import os
import sys
import time

import _openmp  # noqa: E402  (benchmarks/_openmp.py: the OpenMP wait policy, before numpy and torch load)

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _report import blas_threads, emit, median_range  # noqa: E402  (benchmarks/ is the script's folder)
from refimpl.backend import get_backend  # noqa: E402


MASKS = {"causal": (True, False), "padded": (False, True), "causal+padded": (True, True), "none": (False, False)}


def parse_size(text):
    try:
        B, H, T, D = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is B,H,T,D (four ints, e.g. 4,8,256,64), got {text!r}") from None
    if min(B, H, T, D) < 1:
        raise argparse.ArgumentTypeError(f"B, H, T, D must all be >= 1, got {text!r}")
    return B, H, T, D


def key_padding(B, T):
    """(B, T) bool, True = padding: batch row b pads its last T*b/(2B) keys (row 0 none, the last almost half)."""
    pad = np.zeros((B, T), bool)
    for b in range(B):
        pad[b, T - (T * b) // (2 * B):] = True      # row b keeps the first T - T*b/(2B) keys
    return pad


def refimpl_variant(backend, block_size, q, k, v, dout, causal, pad):
    def run():
        out, lse = backend.attention(q, k, v, causal=causal, key_padding_mask=pad, block_size=block_size)
        t1 = time.perf_counter()
        grads = backend.attention_backward(dout, q, k, v, out, lse, causal=causal, key_padding_mask=pad,
                                           block_size=block_size)
        return t1, (out, *grads)
    return run


def torch_variant(torch, q, k, v, dout, causal, pad):
    qt, kt, vt = (torch.from_numpy(a.copy()).requires_grad_() for a in (q, k, v))
    dt = torch.from_numpy(dout)
    mask = None                                      # SDPA's boolean attn_mask: True = may attend
    if pad is not None:
        T = q.shape[2]
        allowed = ~pad[:, None, None, :]
        if causal:
            allowed = allowed & np.tril(np.ones((T, T), bool))
        mask = torch.from_numpy(np.ascontiguousarray(allowed))

    def run():
        for t in (qt, kt, vt):
            t.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                                               is_causal=causal and mask is None)
        t1 = time.perf_counter()
        out.backward(dt)
        return t1, tuple(t.detach().numpy() for t in (out, qt.grad, kt.grad, vt.grad))
    return run



def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=parse_size,
                    default=[(16, 8, 128, 16), (4, 8, 256, 64), (4, 8, 1024, 64)],
                    help="B,H,T,D per size (default 16,8,128,16 (the default model's) 4,8,256,64 4,8,1024,64)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1; numba compiles)")
    ap.add_argument("--block-size", type=int, default=64, help="tile of the tiled form (default 64)")
    ap.add_argument("--masks", nargs="+", default=["causal", "padded"], choices=list(MASKS),
                    help="causal, key padding (see key_padding), both, or none (default: causal padded)")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    if args.reps < 1 or args.warmup < 0 or args.block_size < 1:
        ap.error(f"--reps and --block-size must be >= 1 and --warmup >= 0, got {args.reps}, {args.block_size}, "
                 f"{args.warmup}")
    cores = len(os.sched_getaffinity(0))

    import torch
    torch.set_num_threads(cores)
    backends, notes = {"numpy": get_backend("numpy")}, []
    try:
        import numba
        numba.set_num_threads(cores)
        backends["numba"] = get_backend("numba")
        notes.append(f"numba {numba.__version__}, {numba.get_num_threads()} threads")
    except Exception as exc:
        notes.append(f"numba not available: {exc}")

    lines = ["| B, H, T, D | mask | implementation | ms fwd+bwd, median (min-max) | ms fwd | ms bwd | GFLOP/s "
             "| speed vs torch | max abs diff vs torch |", "|---|---|---|---|---|---|---|---|---|"]
    for (B, H, T, D), mask in itertools.product(args.sizes, args.masks):
        causal, padded = MASKS[mask]
        rng = np.random.default_rng(0)
        q, k, v, dout = (rng.standard_normal((B, H, T, D), dtype=np.float32) for _ in range(4))
        pad = key_padding(B, T) if padded else None
        variants = {"torch SDPA (autograd)": torch_variant(torch, q, k, v, dout, causal, pad)}
        for name, be in backends.items():
            variants[f"{name} plain"] = refimpl_variant(be, None, q, k, v, dout, causal, pad)
            variants[f"{name} tiled ({args.block_size})"] = refimpl_variant(be, args.block_size, q, k, v, dout,
                                                                            causal, pad)
        names = list(variants)
        fwd, bwd, results = {n: [] for n in names}, {n: [] for n in names}, {}
        with tqdm(total=(args.warmup + args.reps) * len(names), desc=f"T={T} {mask}", unit="run",
                  file=sys.stderr) as bar:
            for rnd in range(args.warmup + args.reps):
                for name in (names if rnd % 2 == 0 else names[::-1]):
                    t0 = time.perf_counter()
                    t1, results[name] = variants[name]()
                    t2 = time.perf_counter()
                    if rnd >= args.warmup:
                        fwd[name].append((t1 - t0) * 1e3)
                        bwd[name].append((t2 - t1) * 1e3)
                    bar.update(1)
        flops = 4 * B * H * T * T * D * 2.5 * (0.5 if causal else 1.0)
        total = {n: [f + b for f, b in zip(fwd[n], bwd[n])] for n in names}
        torch_ms = np.median(total[names[0]])
        ref = results[names[0]]
        for name in names:
            med = np.median(total[name])
            diff = max(float(np.max(np.abs(a - b))) for a, b in zip(results[name], ref))
            lines.append(f"| {B}, {H}, {T}, {D} | {mask} | {name} | {median_range(total[name])} "
                         f"| {np.median(fwd[name]):.1f} "
                         f"| {np.median(bwd[name]):.1f} | {flops / (med / 1e3) / 1e9:.1f} | {torch_ms / med:.2f}x "
                         f"| {diff:.1e} |")
    details = (f"fp32, {args.reps} timed runs after {args.warmup} warm-up, interleaved; padded: batch row b pads "
               f"its last T*b/(2B) keys; FLOPs = 4*B*H*T*T*D x 2.5 (fwd+bwd), / 2 when causal, padding not "
               f"subtracted; "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads; {'; '.join(notes)}; "
               f"{_openmp.setting()}, "
               f"OPENBLAS_NUM_THREADS {os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, {blas_threads()} at the end")
    emit(lines, details, __file__, args.out)


if __name__ == "__main__":
    main()

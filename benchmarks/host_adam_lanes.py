"""The host AdamW's bandwidth against the in-place triad, in one process: the parallel kernel and the lanes.

ZeRO-Offload's CPU optimizer is memory-bound: one AdamW step over a partition moves 28 B per parameter (fp32 param
and both moments read and written, a bf16 gradient read, a bf16 copy written). This script runs that step over
--numel elements in several ways and holds each against an in-place numba triad (a = a + s*c, 12 B/element) over
as many float32, measured just before it (the machine's bandwidth drifts, and a shared host's more so):

    parallel     adam_step: one parallel numba call (a parallel region over all threads)
    lanes=N      backends/refimpl_numba/adam_lanes.py: N threads, one nogil call each, claiming blocks of each of
                 --pieces pieces in order (what refimpl/memory/overlapped_update.py runs beside the forward)

each (a) alone, with the main thread waiting, and (b) beside a main thread that runs Python the whole time (a
stand-in for the forward's hooks), at the GIL switch interval refimpl sets while an update is in flight. With --pinned (cupy installed) the gradient and the copy are in pinned memory,
as in the offload path. Reps are interleaved across the ways; medians.

    python3 benchmarks/host_adam_lanes.py [--numel 1.63e8] [--pieces 32] [--lanes 16 15 12 8] [--reps 5] [--pinned]
"""
import argparse
import os
import sys
import threading
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import emit  # noqa: E402
from refimpl.backend import get_backend  # noqa: E402
from refimpl.memory.overlapped_update import SWITCH_INTERVAL  # noqa: E402

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1, grad_scale=1.0)
SCRIPT = "benchmarks/host_adam_lanes.py"


def busy_python(stop):
    """Python the whole time until stop is set: small objects and dict lookups, like the forward's hooks."""
    n = 0
    while not stop.is_set():
        n += 1
        d = {"i": n}
        d["j"] = [x for x in range(20)]


def timed(fn, beside):
    """Seconds fn() takes on a worker thread, the main thread waiting (beside=False) or running Python."""
    out, stop = [], threading.Event()

    def work():
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
        stop.set()
    w = threading.Thread(target=work)
    w.start()
    if beside:
        busy_python(stop)
    w.join()
    return out[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=float, default=1.63e8)
    ap.add_argument("--pieces", type=int, default=32)
    ap.add_argument("--lanes", type=int, nargs="+", default=[os.cpu_count(), os.cpu_count() - 1])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pinned", action="store_true", help="gradient and copy in cupy pinned memory")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import numba
    be = get_backend("numba")
    n = int(args.numel)
    p, m, v = (np.full(n, 0.5, np.float32) for _ in range(3))
    if args.pinned:
        import cupy
        def pinned(dtype):
            mem = cupy.cuda.alloc_pinned_memory(n * 2)
            return np.frombuffer(mem, np.uint16, n).view(dtype)
        g, out = pinned(ml_dtypes.bfloat16), pinned(ml_dtypes.bfloat16)
    else:
        g, out = np.empty(n, ml_dtypes.bfloat16), np.empty(n, ml_dtypes.bfloat16)
    g[...] = 0.25
    out[...] = 0
    a, c, s = np.ones(n, np.float32), np.ones(n, np.float32), np.float32(1e-3)

    @numba.njit(parallel=True, fastmath=False)
    def triad(a, c, s):
        for i in numba.prange(a.size):
            a[i] = a[i] + s * c[i]

    bounds = np.linspace(0, n, args.pieces + 1).astype(np.int64)

    def lanes_fn(count):
        def fn():
            run = be.adam_lanes(p, g, m, v, bounds=bounds, first=0, work=be.new_work(args.pieces), out_lowp=out,
                                **HYPER)
            ts = [threading.Thread(target=run) for _ in range(count)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        return fn
    ways = {"parallel": lambda: be.adam_step(p, g, m, v, **HYPER, out_lowp=out),
            **{f"lanes={k}": lanes_fn(k) for k in args.lanes}}
    for fn in ways.values():                         # compile, touch every page
        fn()
    triad(a, c, s)
    sys.setswitchinterval(SWITCH_INTERVAL)          # as while refimpl's overlapped update is in flight
    rows = {(w, b): [] for w in ways for b in (False, True)}
    for rep in range(args.reps):
        for (w, beside), got in rows.items():
            t = time.perf_counter()
            triad(a, c, s)
            triad_gbs = 12 * n / (time.perf_counter() - t) / 1e9
            secs = timed(ways[w], beside)
            got.append((28 * n / secs / 1e9, triad_gbs))
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
    lines = ["| way | main thread | AdamW GB/s | triad GB/s just before | / triad |", "|---|---|---|---|---|"]
    for (w, beside), got in rows.items():
        adam, tri = np.median([x for x, _ in got]), np.median([y for _, y in got])
        ratio = np.median([x / y for x, y in got])
        lines.append(f"| {w} | {'running Python' if beside else 'waiting'} | {adam:.1f} | {tri:.1f} | "
                     f"**{ratio:.2f}** |")
    details = (f"{n / 1e6:.1f}M elements, {args.pieces} pieces for the lanes, {args.reps} interleaved reps (medians); "
               f"28 B per element; GIL switch interval {SWITCH_INTERVAL * 1e3:g} ms; gradient and copy in {'pinned' if args.pinned else 'pageable'} memory; numba "
               f"{numba.__version__}, {numba.get_num_threads()} threads, layer {numba.config.THREADING_LAYER}")
    emit(lines, details, SCRIPT, args.out)


if __name__ == "__main__":
    main()

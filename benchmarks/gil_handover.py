"""The overlapped host update and the GIL: AdamW in pieces on a worker thread, beside a main thread running Python.

refimpl/memory/overlapped_update.py runs the host AdamW of step n on a worker thread while the main thread runs the
next forward (stage 3's hooks: Python). The numba kernel releases the GIL, but between two pieces the worker needs
it back, and Python hands the GIL over only every switch interval (`sys.getswitchinterval()`, 5 ms by default).
This script measures what that costs: the same AdamW over --numel float32 elements, cut into pieces, run on a
worker thread (1) alone and (2) beside a main thread that runs Python the whole time, at the default switch
interval and at refimpl's (overlapped_update.SWITCH_INTERVAL).

A second table asks whether the pieces could run in one GIL-free call instead: a parallel triad (a = a + s*c) per
piece, launched from Python or from one `nogil` numba function, alone and beside the same main thread. (Measured
with numba 0.68: each parallel region launched waits for the GIL even from nogil code, so one call does not help.)

    python3 benchmarks/gil_handover.py [--numel 4e7] [--pieces 1 10 100] [--threads N] [--reps 3]
        [--switch 5e-3 1e-4 ...] [--no-triad]

The worker's kernels get --threads numba threads (default: all but one, so the main thread has a core of its own
and the slowdown measured is the GIL's, not a shared core's). Peer: the same pieces alone, in the same run.
"""
import argparse
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import emit  # noqa: E402
from refimpl.backend import get_backend  # noqa: E402
from refimpl.memory.overlapped_update import SWITCH_INTERVAL  # noqa: E402

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1, grad_scale=1.0)


def run_pieces(be, states, pieces, threads, out):
    """AdamW over the states in `pieces` equal cuts, on this thread; appends the seconds to `out`."""
    import numba
    numba.set_num_threads(threads)
    p, g, m, v = states
    cut = np.linspace(0, p.size, pieces + 1).astype(np.int64)
    t = time.perf_counter()
    for a, b in zip(cut, cut[1:]):
        be.adam_step(p[a:b], g[a:b], m[a:b], v[a:b], **HYPER)
    out.append(time.perf_counter() - t)


def beside_python(be, states, pieces, threads):
    """(worker seconds, main-thread Python iterations per second) with the main thread busy in Python."""
    out = []
    worker = threading.Thread(target=run_pieces, args=(be, states, pieces, threads, out))
    t, n = time.perf_counter(), 0
    worker.start()
    while worker.is_alive():                   # a stand-in for the forward's hooks: small objects, dict lookups
        n += 1
        d = {"i": n}
        d["j"] = [x for x in range(20)]
    return out[0], n / (time.perf_counter() - t)


def triad_tables(n, pieces_list, reps, threads):
    """Rows: pieces, triad per piece from Python alone / beside Python, from one nogil call alone / beside."""
    import numba

    @numba.njit(parallel=True, cache=False)
    def triad(a, c, s):
        for i in numba.prange(a.size):
            a[i] = a[i] + s * c[i]

    @numba.njit(nogil=True, cache=False)
    def all_pieces(a, c, s, piece):      # one GIL-free call that launches a parallel region per piece
        for lo in range(0, a.size, piece):
            triad(a[lo:lo + piece], c[lo:lo + piece], s)

    a, c, s = np.ones(4 * n, np.float32), np.ones(4 * n, np.float32), np.float32(1e-3)   # (as long as AdamW)
    n = a.size
    triad(a, c, s)
    all_pieces(a, c, s, n)

    def from_python(piece, out):
        numba.set_num_threads(threads)
        t = time.perf_counter()
        for lo in range(0, n, piece):
            triad(a[lo:lo + piece], c[lo:lo + piece], s)
        out.append(time.perf_counter() - t)

    def one_call(piece, out):
        numba.set_num_threads(threads)
        t = time.perf_counter()
        all_pieces(a, c, s, piece)
        out.append(time.perf_counter() - t)

    rows = []
    for pieces in pieces_list:
        piece = -(-n // pieces)
        cells = []
        for fn in (from_python, one_call):
            alone = []
            for _ in range(reps):
                fn(piece, alone)
            beside = []
            for _ in range(reps):
                worker = threading.Thread(target=fn, args=(piece, beside))
                worker.start()
                while worker.is_alive():
                    d = {"i": 0}
                    d["j"] = [x for x in range(20)]
            cells += [f"{min(alone):.3f}", f"{min(beside):.3f} (**{min(beside) / min(alone):.2f}**)"]
        rows.append(f"| {pieces} | " + " | ".join(cells) + " |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=float, default=4e7)
    ap.add_argument("--pieces", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--switch", type=float, nargs="+", default=None,
                    help="switch intervals in seconds (default: Python's default and refimpl's)")
    ap.add_argument("--no-triad", action="store_true", help="the AdamW table only")
    ap.add_argument("--out")
    args = ap.parse_args()
    import numba
    be = get_backend("numba")
    threads = args.threads or max(1, numba.config.NUMBA_NUM_THREADS - 1)
    n = int(args.numel)
    states = (np.ones(n, np.float32), np.full(n, 1e-3, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32))
    run_pieces(be, states, 1, threads, [])    # compile, touch every page
    default = sys.getswitchinterval()
    intervals = args.switch or [default, SWITCH_INTERVAL]
    lines = ["| pieces | alone s | " + " | ".join(f"beside Python, {i * 1e3:g} ms switch: s (/ alone)" for i in intervals)
             + " | main thread kiter/s (" + " / ".join(f"{i * 1e3:g} ms" for i in intervals) + ") |",
             "|---|---|" + "---|" * len(intervals) + "---|"]
    for pieces in args.pieces:
        alone = []
        for _ in range(args.reps):
            run_pieces(be, states, pieces, threads, alone)
        a, cells, kiter = min(alone), [], []
        for interval in intervals:
            sys.setswitchinterval(interval)
            runs = [beside_python(be, states, pieces, threads) for _ in range(args.reps)]
            sys.setswitchinterval(default)
            best = min(r[0] for r in runs)
            cells.append(f"{best:.3f} (**{best / a:.2f}**)")
            kiter.append(f"{np.median([r[1] for r in runs]) / 1e3:.0f}")
        lines.append(f"| {pieces} | {a:.3f} | " + " | ".join(cells) + " | " + " / ".join(kiter) + " |")
    if args.no_triad:
        emit(lines, f"numba {numba.__version__}, {numba.threading_layer()} threading layer; AdamW over "
                    f"{n / 1e6:.0f}M float32 (numba, {threads} threads on the worker), best of {args.reps}", __file__,
             args.out)
        return
    lines += ["", "| pieces | triad per piece from Python: alone s | beside Python s | one nogil call: alone s | "
              "beside Python s |", "|---|---|---|---|---|", *triad_tables(n, args.pieces, args.reps, threads)]
    emit(lines, f"numba {numba.__version__}, {numba.threading_layer()} threading layer; AdamW over {n / 1e6:.0f}M float32 (numba, {threads} threads on the worker), best of {args.reps}; "
                f"default switch interval {default * 1e3:g} ms", __file__, args.out)


if __name__ == "__main__":
    main()

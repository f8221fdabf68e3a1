"""Fused AdamW on flat fp32 parameters: the backend's ``adam_step`` against torch and DeepSpeed, and against memory.

ZeRO-Infinity runs the optimizer step on the CPU over each rank's flat fp32 partition (§5, DeepSpeed's CPU Adam),
so its speed is bounded by memory bandwidth, not arithmetic: one AdamW step reads param, grad, m, v (16 bytes per
parameter) and writes param, m, v (12 bytes), 28 bytes per parameter in all. The bound is those 28 bytes at the
bandwidth a STREAM-style triad (``a = b + s*c``, counted as 12 bytes per element, STREAM's convention) measures in
this same run, interleaved with the Adam steps, with NumPy and, where numba is installed, with a one-pass numba
``prange`` loop; as in STREAM, the best repetition of the best implementation counts.
The triad's write to ``a`` also reads ``a`` into cache first (write-allocate), which STREAM does not count; Adam
writes only arrays it has just read, so the run also times an in-place triad ``a = a + s*c`` (12 bytes, no
write-allocate), and the bound takes the best of all triad rows: the most this machine showed it can move.

The issue's target: numba's ``adam_step`` at least as fast as ``torch.optim.AdamW(fused=True)`` and at least 80% of
the bound. The variants, each with its own param/m/v (the gradient is shared, read-only), stepped interleaved
(A B C D, D C B A, ...) so that other tenants of the machine hit all alike, with the same hyperparameters
(lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01, AdamW mode):

    numpy     refimpl's reference kernel (refimpl/kernels/optim.py; several NumPy passes and temporaries)
    numba     the numba backend's fused single-pass kernel (backends/refimpl_numba/optim.py)
    torch     torch.optim.AdamW(fused=True) on CPU (foreach=True where this torch has no CPU fused kernel)
    deepspeed DeepSpeed's DeepSpeedCPUAdam (its C++/OpenMP SIMD op, built on first use)

Every threaded implementation gets all cores (torch.set_num_threads, numba.set_num_threads, OMP_NUM_THREADS for
DeepSpeed's OpenMP op); NumPy's elementwise ufuncs are single-threaded, as the reference is. The table gives the
median step time (min-max) over the repetitions, the effective GB/s (28 B/param / time), the fraction of the triad
bandwidth, and the ratio of medians to torch (> 1: faster than torch). After the run, every variant has taken
the same steps on the same gradient; the last column is its largest deviation from the NumPy reference's params.

    python3 benchmarks/adam_bandwidth.py [--params 50e6] [--reps 10] [--warmup 2] [--out table.md]
"""
import argparse
import contextlib
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))  # before any OpenMP runtime loads

import _openmp  # noqa: E402  (benchmarks/_openmp.py: the OpenMP wait policy, before numpy and torch load)

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _report import emit, median_range  # noqa: E402  (benchmarks/ is the script's folder)
from refimpl.backend import get_backend  # noqa: E402

HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
BYTES_PER_PARAM = 28   # read param, grad, m, v (16); write param, m, v (12)
TRIAD_BYTES = 12       # STREAM: read b, c; write a


def try_numba():
    try:
        import numba
        return numba
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------------ triad
def triad_numpy(a, b, c, s):
    np.multiply(c, s, out=a)     # two passes (NumPy has no fused multiply-add ufunc), no temporary
    np.add(a, b, out=a)


def make_triad_numba(numba):
    @numba.njit(parallel=True, fastmath=False, cache=False)
    def triad(a, b, c, s):
        for i in numba.prange(a.size):
            a[i] = b[i] + s * c[i]
    return triad


def make_triad_inplace_numba(numba):
    @numba.njit(parallel=True, fastmath=False, cache=False)
    def triad_inplace(a, b, c, s):   # a = a + s*c: reads a before writing it, as Adam does (b unused)
        for i in numba.prange(a.size):
            a[i] = a[i] + s * c[i]
    return triad_inplace


class Triad:
    """One triad implementation on its own three arrays of n float32, stepped among the Adam variants."""

    def __init__(self, kernel, n):
        rng = np.random.default_rng(1)
        self.kernel, self.s = kernel, np.float32(3.0)
        self.a, self.b, self.c = np.empty(n, np.float32), rng.random(n, np.float32), rng.random(n, np.float32)
        self.step()        # compile (numba) and touch every page outside the timing

    def step(self):
        self.kernel(self.a, self.b, self.c, self.s)


# --------------------------------------------------------------------------------------------- variants
class Refimpl:
    """A backend's adam_step on its own flat param/m/v."""

    def __init__(self, backend, p0, grad):
        self.be, self.grad, self.step_no = backend, grad, 0
        self.param, self.m, self.v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)

    def step(self):
        self.step_no += 1
        self.be.adam_step(self.param, self.grad, self.m, self.v, step=self.step_no, **HP)

    def params(self):
        return self.param


class TorchAdamW:
    """torch.optim.AdamW(fused=True) on one flat CPU tensor; foreach=True if this torch refuses fused on CPU."""

    def __init__(self, torch, p0, grad):
        self.p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
        self.p.grad = torch.from_numpy(grad)
        kw = dict(lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"], weight_decay=HP["weight_decay"])
        try:
            self.opt, self.mode = torch.optim.AdamW([self.p], fused=True, **kw), "fused=True"
            self.step()      # a CPU without a fused kernel raises on the first step, not in the constructor
        except (RuntimeError, ValueError) as exc:
            self.p.data.copy_(torch.from_numpy(p0))
            self.opt = torch.optim.AdamW([self.p], foreach=True, **kw)
            self.mode = f"foreach=True (fused=True failed: {str(exc).splitlines()[0]})"
            self.step()
        self.warm_started = True

    def step(self):
        self.opt.step()

    def params(self):
        return self.p.detach().numpy()


class DeepSpeedAdam:
    """DeepSpeed's DeepSpeedCPUAdam (its C++ op, AdamW mode, fp32 states) on one flat CPU tensor."""

    def __init__(self, torch, p0, grad):
        with contextlib.redirect_stdout(sys.stderr):    # DeepSpeed logs to stdout; the table owns stdout
            from deepspeed.ops.adam import DeepSpeedCPUAdam
        self.p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
        self.p.grad = torch.from_numpy(grad)
        self.opt = DeepSpeedCPUAdam([self.p], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                                    weight_decay=HP["weight_decay"], adamw_mode=True, bias_correction=True)
        self.step()          # builds (or loads) the op
        self.warm_started = True

    def step(self):
        self.opt.step()

    def params(self):
        return self.p.detach().numpy()



def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=50e6, help="parameters per flat array (default 50e6)")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per variant (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    n = int(args.params)
    if n < 1 or args.reps < 1 or args.warmup < 0:
        ap.error(f"--params and --reps must be >= 1 and --warmup >= 0, got {n}, {args.reps}, {args.warmup}")
    cores = len(os.sched_getaffinity(0))
    numba = try_numba()
    if numba is not None:
        numba.set_num_threads(cores)

    import torch
    torch.set_num_threads(cores)

    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n, dtype=np.float32)
    grad = rng.standard_normal(n, dtype=np.float32)

    variants, unavailable, notes = {}, {}, []
    variants["numpy"] = Refimpl(get_backend("numpy"), p0, grad)
    try:
        variants["numba"] = Refimpl(get_backend("numba"), p0, grad)
        variants["numba"].step()   # compile (or load the cache) outside the timing
        variants["numba"].warm_started = True
    except Exception as exc:
        unavailable["numba"] = f"{type(exc).__name__}: {exc}"
    t = TorchAdamW(torch, p0, grad)
    variants["torch"] = t
    notes.append(f"torch AdamW {t.mode}")
    try:
        variants["deepspeed"] = DeepSpeedAdam(torch, p0, grad)
    except Exception as exc:
        unavailable["deepspeed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    triads = {"triad numpy, a = b + s*c (two passes)": Triad(triad_numpy, n)}
    if numba is not None:
        triads["triad numba prange, a = b + s*c"] = Triad(make_triad_numba(numba), n)
        triads["triad numba prange, in place: a = a + s*c"] = Triad(make_triad_inplace_numba(numba), n)
    # The reference has not stepped yet; bring it level with the warm-started ones so all end on the same step.
    for v in variants.values():
        if not getattr(v, "warm_started", False):
            v.step()
    del p0

    names = list(variants) + list(triads)
    steppers = {**variants, **triads}
    times = {name: [] for name in names}
    with tqdm(total=(args.warmup + args.reps) * len(names), desc="adam", unit="step", file=sys.stderr) as bar:
        for rnd in range(args.warmup + args.reps):
            for name in (names if rnd % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                steppers[name].step()
                dt = time.perf_counter() - t0
                if rnd >= args.warmup:
                    times[name].append(dt * 1e3)
                bar.update(1)
    ref_params = variants["numpy"].params()
    deviation = {name: float(np.max(np.abs(v.params() - ref_params))) for name, v in variants.items()}

    triad = {name[len("triad "):]: TRIAD_BYTES * n / (min(times[name]) / 1e3) / 1e9 for name in triads}
    bw = max(triad.values())
    bound_ms = BYTES_PER_PARAM * n / (bw * 1e9) * 1e3
    torch_ms = np.median(times["torch"])

    lines = ["| implementation | ms per step, median (min-max) | GB/s effective | fraction of triad bound "
             "| speed vs torch | max abs diff vs numpy |",
             "|---|---|---|---|---|---|"]
    labels = {"numpy": "numpy (refimpl reference)", "numba": "numba (refimpl backend)",
              "torch": f"torch AdamW {t.mode.split(' ')[0]}", "deepspeed": "DeepSpeedCPUAdam"}
    for name in ["numpy", "numba", "torch", "deepspeed"]:
        if name in unavailable:
            lines.append(f"| {labels[name]} | not available: {unavailable[name]} | | | | |")
            continue
        med = np.median(times[name])
        gbs = BYTES_PER_PARAM * n / (med / 1e3) / 1e9
        lines.append(f"| {labels[name]} | {median_range(times[name])} | {gbs:.1f} | {gbs / bw:.0%} "
                     f"| {torch_ms / med:.2f}x | {deviation[name]:.1e} |")
    lines.append(f"| bound: 28 B/param at the triad's {bw:.1f} GB/s | {bound_ms:.1f} | {bw:.1f} | 100% "
                 f"| {torch_ms / bound_ms:.2f}x | |")
    lines += ["", f"| triad, {n / 1e6:g}M float32 each | GB/s (12 B/element), best of {args.reps} "
                  f"| ms, median (min-max) |", "|---|---|---|"]
    lines += [f"| {name} | {gbs:.1f} | {median_range(times['triad ' + name])} |" for name, gbs in triad.items()]

    threads = [f"torch.get_num_threads() {torch.get_num_threads()}"]
    if numba is not None:
        threads.append(f"numba {numba.get_num_threads()} threads ({numba.threading_layer()} layer)")
    threads.append(f"OMP_NUM_THREADS {os.environ['OMP_NUM_THREADS']}, {_openmp.setting()}")
    details = (f"{n / 1e6:g}M fp32 params, {args.reps} timed steps after {args.warmup} warm-up, interleaved; "
               f"{'; '.join(notes)}; {', '.join(threads)}; torch {torch.__version__}, numpy {np.__version__}"
               + (f", numba {numba.__version__}" if numba is not None else ""))
    emit(lines, details, __file__, args.out)


if __name__ == "__main__":
    main()

"""One training step of the default model on the CPU: refimpl on numba and on NumPy against PyTorch eager, same run.

A whole step is what a user waits for: forward, backward (refimpl's tape autodiff and the backend's kernels), the
gradient's overflow check and norm, clipping folded into the fused AdamW step, exactly as ``refimpl train`` runs
it (refimpl/train.py ``_loop``: ``model.loss``, ``engine.backward``, ``engine.step``). The peer is the same model
written with torch.nn (refimpl/interop/torch.py, the independent spec of refimpl/model.py), loaded with refimpl's initial weights by name, fp32, eager, stepped with the same recipe:
``clip_grad_norm_`` to the config's gradient_clipping, then ``torch.optim.AdamW`` (torch's default implementation
for CPU tensors) with the config's hyperparameters and the same LR schedule. The issue's target: numba's step no
slower than PyTorch eager.

The variants see the same batches (the batch of step s is a pure function of the seed and s) and are stepped
interleaved (A B C, C B A, ...), so that other tenants of the machine hit all alike; all get every core. The table
gives the median step time (min-max) after the warm-up steps, tokens/s (micro batch x sequence length / median),
the speed relative to torch (torch's median over the variant's: > 1 is faster) and the loss of the first and last
step, which should agree across the three (the same model on the same data).

With ``--profile`` (default on), a second table splits refimpl's step by backend kernel, from a few more steps
(after the warm-up, before the timed ones) in which every kernel of the backend is timed (benchmarks only: the
wrapper is an attribute of the backend instance); every variant, torch included, steps these batches too, so the
models stay on the same data. "other" is the rest of the step: the Python autodiff tape and the NumPy array code
between kernels. A third
table puts each numba kernel on a roofline: its FLOPs against the GEMM rate and its bytes against the triad,
both measured in the same run (benchmarks/_roofline.py).

NumPy's BLAS (OpenBLAS) uses every core unless told otherwise, and its threads spin after each product: they took
the cores from whatever ran next, torch's step included (torch eager measured 72 ms per step beside them and 54 ms
without, 2026-12-04). Selecting the numba backend sets OpenBLAS to one thread for the process
(refimpl/blas_threads.py); with --backends numba alone, nothing in the process starts OpenBLAS's
threads. With the numpy variant too, it runs on one BLAS thread after numba is selected. The details line records
the count.

    python3 benchmarks/train_step_cpu.py [--steps 10] [--warmup 2] [--set KEY=VALUE ...] [--no-profile]
        [--backends numba numpy] [--out table.md]
"""
import argparse
import os
import sys
import time
from collections import defaultdict

import _openmp  # noqa: E402  (benchmarks/_openmp.py: the OpenMP wait policy, before numpy and torch load)

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _report import blas_threads, emit, median_range  # noqa: E402  (benchmarks/ is the script's folder)
from _roofline import gemm_rate, kernel_work, triad_rate  # noqa: E402
from _roofline import table as roofline_table  # noqa: E402
from refimpl.backend import KERNELS, use_backend  # noqa: E402
from refimpl.config import load_config  # noqa: E402
from refimpl.engine import Engine  # noqa: E402
from refimpl.lr_schedules import lr_at  # noqa: E402
from refimpl.train import build  # noqa: E402


# ------------------------------------------------------------------------------------------- variants
class RefimplStep:
    """refimpl on one backend: build(config) and Engine, stepped as refimpl/train.py _loop steps."""

    def __init__(self, config):
        self.config = config
        self.be, self.dataset, self.model = build(config)
        with use_backend(self.be):
            self.engine = Engine(self.model, config, self.be)

    def step(self, batch):
        with use_backend(self.be):
            loss, _ = self.model.loss(batch)
            self.engine.backward(loss)
            self.engine.step()
            self.engine.ledger.next_step()
        return loss.item()


class TorchStep:
    """The same model in torch eager, refimpl's initial weights, the same optimizer recipe and schedule."""

    def __init__(self, torch, config, refimpl_model):
        from refimpl.interop.torch import to_torch
        self.torch, self.config = torch, config
        self.model = to_torch(refimpl_model)   # refimpl's initial weights; every name must match: the same model
        opt = config["optimizer"]["params"]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"],
                                     weight_decay=opt["weight_decay"])
        self.steps = 0

    def step(self, batch):
        from refimpl.interop.torch import torch_loss
        torch, cfg = self.torch, self.config
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.steps, cfg["scheduler"], cfg["optimizer"]["params"]["lr"])
        self.opt.zero_grad(set_to_none=True)
        loss = torch_loss(self.model, batch)
        loss.backward()
        if cfg["gradient_clipping"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["gradient_clipping"])
        self.opt.step()
        self.steps += 1
        return loss.item()


# ------------------------------------------------------------------------------------------- profiling
class KernelTimer:
    """Times every interface kernel of one backend instance (wrappers set as instance attributes)."""

    def __init__(self, backend):
        self.be, self.seconds, self.calls = backend, defaultdict(float), defaultdict(int)
        self.work = defaultdict(lambda: [0.0, 0.0])          # name -> [flops, bytes] (_roofline.kernel_work)

    def __enter__(self):
        for name in KERNELS:
            self._wrap(name, getattr(self.be, name))
        return self

    def _wrap(self, name, fn):
        def timed(*args, **kw):
            t0 = time.perf_counter()
            result = fn(*args, **kw)
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1
            flops, nbytes = kernel_work(name, args, kw, result)
            self.work[name][0] += flops
            self.work[name][1] += nbytes
            return result
        setattr(self.be, name, timed)

    def __exit__(self, *exc):
        for name in KERNELS:
            self.be.__dict__.pop(name, None)
        return False


def profile(variants, batches, peer):
    """name -> (per-kernel seconds per step, calls per step, step seconds, per-kernel (flops, bytes) per step) over
    `batches`, the refimpl variants stepped interleaved as in the timed run, and the peer too (untimed), so that all
    models stay on the same batches. It runs right after the warm-up: run after the timed steps, numba's matmuls
    measured up to 1.9x slower than in them (28 -> 51-56 ms per step), which is not understood yet (2026-12-04)."""
    names, timers, total = list(variants), {}, defaultdict(float)
    for name in names:
        timers[name] = KernelTimer(variants[name].be).__enter__()
    try:
        for i, batch in enumerate(batches):
            for name in (names if i % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                variants[name].step(batch)
                total[name] += time.perf_counter() - t0
            peer.step(batch)
    finally:
        for timer in timers.values():
            timer.__exit__(None, None, None)
    n = len(batches)
    return {name: ({k: s / n for k, s in timers[name].seconds.items()},
                   {k: c / n for k, c in timers[name].calls.items()}, total[name] / n,
                   {k: (f / n, b / n) for k, (f, b) in timers[name].work.items()}) for name in names}



def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2; numba loads kernels)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every variant (default: the default config)")
    ap.add_argument("--backends", nargs="+", default=["numba", "numpy"], choices=["numba", "numpy"],
                    help="refimpl's variants (default both)")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-kernel table")
    ap.add_argument("--profile-steps", type=int, default=6, help="profiled steps per backend (default 6)")
    ap.add_argument("--out", help="also write the tables to this file")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        ap.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    cores = len(os.sched_getaffinity(0))

    import torch
    torch.set_num_threads(cores)
    notes = []
    variants = {}
    for backend in args.backends:
        config = load_config(None, [*args.set, f"backend={backend}"])
        if config["world_size"] != 1 or config["gradient_accumulation_steps"] != 1:
            ap.error("this benchmark steps one rank without gradient accumulation; got world_size="
                     f"{config['world_size']}, gradient_accumulation_steps={config['gradient_accumulation_steps']}")
        if backend == "numba":
            try:
                import numba
                numba.set_num_threads(cores)
                variants["refimpl numba"] = RefimplStep(config)
                notes.append(f"numba {numba.__version__}, {numba.get_num_threads()} threads")
            except Exception as exc:
                notes.append(f"numba not available: {type(exc).__name__}: {exc}")
                continue
        else:
            variants["refimpl numpy"] = RefimplStep(config)
    first = next(iter(variants.values()))
    config, dataset = first.config, first.dataset
    if np.dtype(np.float32) != first.engine.dtype:
        ap.error(f"the torch peer is fp32; got parameters in {first.engine.dtype} (leave fp16/bf16 disabled)")
    variants["torch eager"] = TorchStep(torch, config, first.model)
    micro, T = config["train_micro_batch_size_per_gpu"], config["data"]["seq_len"]

    def batch(step):
        return dataset.get_batch("train", step, micro, T)

    names = list(variants)
    times, losses = {n: [] for n in names}, {n: [] for n in names}
    with tqdm(total=(args.warmup + args.steps) * len(names), desc="steps", unit="step", file=sys.stderr) as bar:
        for s in range(args.warmup + args.steps):
            if s == args.warmup and args.profile:
                prof = profile({name: v for name, v in variants.items() if name.startswith("refimpl")},
                               [batch(args.warmup + args.steps + i) for i in range(args.profile_steps)],
                               variants["torch eager"])
            b = batch(s)
            for name in (names if s % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                losses[name].append(variants[name].step(b))
                dt = time.perf_counter() - t0
                if s >= args.warmup:
                    times[name].append(dt * 1e3)
                bar.update(1)

    torch_ms = np.median(times["torch eager"])
    lines = ["| implementation | ms per step, median (min-max) | tokens/s | speed vs torch eager "
             "| loss, first step | loss, last step |", "|---|---|---|---|---|---|"]
    for name in names:
        med = np.median(times[name])
        lines.append(f"| {name} | {median_range(times[name])} | {micro * T / (med / 1e3):,.0f} "
                     f"| {torch_ms / med:.2f}x | {losses[name][0]:.4f} | {losses[name][-1]:.4f} |")

    if args.profile:
        used = sorted({k for sec, *_ in prof.values() for k in sec},
                      key=lambda k: -max(p[0].get(k, 0.0) for p in prof.values()))
        pnames = list(prof)
        lines += ["", "| kernel (ms per step, calls) | " + " | ".join(pnames) + " |",
                  "|---|" + "---|" * len(pnames)]
        for k in used:
            lines.append(f"| {k} | " + " | ".join(
                f"{prof[n][0].get(k, 0.0) * 1e3:.1f} ({prof[n][1].get(k, 0):.0f})" for n in pnames) + " |")
        lines.append("| other (autodiff tape, NumPy glue) | " + " | ".join(
            f"{(prof[n][2] - sum(prof[n][0].values())) * 1e3:.1f}" for n in pnames) + " |")
        lines.append("| whole step (profiled) | " + " | ".join(f"{prof[n][2] * 1e3:.1f}" for n in pnames) + " |")
        if "refimpl numba" in prof:                      # what bounds each numba kernel (benchmarks/_roofline.py)
            sec, _, _, work = prof["refimpl numba"]
            gemm, triad = gemm_rate(variants["refimpl numba"].be), triad_rate()
            lines += ["", *roofline_table(sec, work, gemm, triad)]

    m = config["model"]
    details = (f"default model (n_layers {m['n_layers']}, d_model {m['d_model']}, n_heads {m['n_heads']}, "
               f"{first.model.num_parameters() / 1e6:.2f}M params, {m['attention']} attention), micro batch {micro} "
               f"x {T} tokens, fp32; {args.steps} timed steps after {args.warmup} warm-up, interleaved"
               f"{', overrides ' + ' '.join(args.set) if args.set else ''}; torch {torch.__version__} "
               f"({torch.get_num_threads()} threads); {'; '.join(notes)}; "
               f"{_openmp.setting()}, "
               f"OPENBLAS_NUM_THREADS {os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, {blas_threads()} at the end")
    emit(lines, details, __file__, args.out)


if __name__ == "__main__":
    main()

"""Weak scaling of ZeRO stage 3 over N GPUs: tokens/s per GPU at a fixed micro batch per rank (issue 17, run 2).

ZeRO-Infinity §6.1 (bandwidth-centric partitioning): each rank moves only its own partition of the parameters up
from the host (or NVMe) and the all-gather assembles them, so the aggregate offload bandwidth grows with the
number of ranks. This script runs the same training at N = 1, 2, 4 ranks (micro batch per rank fixed: the global
batch grows with N) and reports, per variant and N:

    tokens/s per GPU    the median over the steps after --warmup of metrics.jsonl's tokens_per_s / N
    efficiency          tokens/s per GPU at N over the same at N = 1 (the issue's target: >= 90% without offload)
    host->device GB/s   per rank, from its ledger.jsonl: bytes over the seconds some host->device copy was in
                        flight, after --warmup (Ledger.summary's definition), min-max over the ranks

Variants (all ZeRO stage 3, every parameter partitioned, bf16 unless --set says otherwise):

    none     nothing offloaded
    cpu      offload_param cpu + offload_optimizer cpu (parameters gathered from pinned host memory)

Each (variant, N) is one `refimpl train` run in a fresh process. On a GPU backend (cupy) it runs under
`mpirun -n N` (one process per GPU, NCCL between them), and an N above the GPUs present is skipped with a note;
on a CPU backend (a dry run of the same path) the N ranks are simulated (world_size=N, threads of one process).

    python3 benchmarks/weak_scaling.py [--ranks 1 2 4] [--variants none cpu] [--steps 6] [--warmup 3]
        [--backend cupy] [--batch 8] [--set KEY=VALUE ...] [--out table.md]

The model is GPT-2 medium's shape (24 layers, d_model 1024, 16 heads, 1024 tokens; refimpl's byte vocabulary of
256, so 302M parameters instead of 355M) unless --set changes it.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _report import emit  # noqa: E402  (benchmarks/ is the script's folder)

from refimpl.memory.ledger import Ledger  # noqa: E402

MODEL = ["model.n_layers=24", "model.d_model=1024", "model.n_heads=16", "model.max_seq_len=1024",
         "data.seq_len=1024"]
BASE = ["zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0",
        "memory.device_bytes=null", "bf16.enabled=true", "run.eval_interval=100000", "run.eval_batches=1",
        "run.log_interval=1"]
VARIANTS = {
    "none": ["zero_optimization.offload_param=null", "zero_optimization.offload_optimizer=null"],
    "cpu": ['zero_optimization.offload_param={"device": "cpu"}',
            'zero_optimization.offload_optimizer={"device": "cpu"}'],
}


def gpus() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:   # no CUDA here: a CPU backend's dry run needs none
        return 0


def command(args, variant, n, out) -> list:
    sets = [*MODEL, *BASE, *VARIANTS[variant], f"train_micro_batch_size_per_gpu={args.batch}",
            f"run.steps={args.warmup + args.steps}", *args.set, f"world_size={n}"]   # without a config file
    # `refimpl train` runs the default run (4 ranks): the world size is always set (under mpirun, to the same N)
    cmd = [sys.executable, "-m", "refimpl.cli", "train", "--backend", args.backend, "--out", out, "--no-progress"]
    cmd += [a for s in sets for a in ("--set", s)]
    if args.mpi and n > 1:
        cmd = [args.mpirun, "--allow-run-as-root", "-n", str(n), "-x", "NCCL_NVLS_ENABLE=0", *cmd]
    return cmd


def measure(out, n, warmup) -> dict:
    """tokens/s per GPU and each rank's host->device GB/s after the warm-up steps, from the run directory."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"tokens_per_s"' in line]
    timed = [s["tokens_per_s"] / n for s in steps if s["step"] > warmup]
    if not timed:
        raise RuntimeError(f"{out}: no step after the {warmup} warm-up steps in metrics.jsonl")
    by_rank = defaultdict(list)
    with open(os.path.join(out, "ledger.jsonl")) as f:
        for line in f:
            e = json.loads(line)
            if e["step"] >= warmup:              # the ledger counts steps from 0
                by_rank[e["rank"]].append(e)
    rates = []
    for rank, events in sorted(by_rank.items()):
        ledger = Ledger(rank)
        ledger.events = events
        pair = ledger.summary()["pairs"].get("host->device")
        if pair and pair["GB_per_s"]:
            rates.append(pair["GB_per_s"])
    return {"tokens_per_s_per_gpu": float(np.median(timed)), "h2d_GB_per_s": rates, "steps": len(timed)}


def run(args) -> dict:
    results, notes = {}, []
    have = gpus() if args.mpi else None
    for variant in args.variants:
        for n in args.ranks:
            if have is not None and n > have:
                notes.append(f"{variant} at {n} ranks skipped: {have} GPU(s) here")
                continue
            out = tempfile.mkdtemp(prefix=f"weak-{variant}-{n}-")
            try:
                cmd = command(args, variant, n, out)
                done = subprocess.run(cmd, capture_output=True, text=True,
                                      env=dict(os.environ, NCCL_NVLS_ENABLE="0"))
                if done.returncode:
                    raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
                results[(variant, n)] = measure(out, n, args.warmup)
                print(f"{variant} x{n}: {results[(variant, n)]['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU",
                      flush=True)
            finally:
                shutil.rmtree(out, ignore_errors=True)
    return {"results": results, "notes": notes}


def table(results) -> list:
    rows = ["| variant | ranks | tokens/s per GPU | efficiency vs 1 rank | host->device GB/s per rank (min-max) |",
            "|---|---|---|---|---|"]
    for (variant, n), r in sorted(results.items()):
        one = results.get((variant, 1))
        eff = f"{r['tokens_per_s_per_gpu'] / one['tokens_per_s_per_gpu']:.0%}" if one else "no 1-rank run"
        h2d = r["h2d_GB_per_s"]
        bw = f"{min(h2d):.2f}-{max(h2d):.2f}" if h2d else "none"
        rows.append(f"| {variant} | {n} | {r['tokens_per_s_per_gpu']:,.0f} | {eff} | {bw} |")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--variants", nargs="+", default=["none", "cpu"], choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=6, help="timed steps per run (default 6)")
    ap.add_argument("--warmup", type=int, default=3, help="steps first, not timed (default 3)")
    ap.add_argument("--batch", type=int, default=8, help="micro batch per rank (default 8)")
    ap.add_argument("--backend", default="cupy", help="cupy (mpirun, NCCL) or a CPU backend (simulated ranks)")
    ap.add_argument("--mpirun", default="mpirun", help="the MPI launcher for GPU runs (default mpirun)")
    ap.add_argument("--set", action="append", default=[], help="config override for every run (KEY=VALUE)")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args(argv)
    if min(args.ranks) < 1 or args.steps < 1 or args.warmup < 0 or args.batch < 1:
        ap.error(f"--ranks must be >= 1, --steps >= 1, --warmup >= 0, --batch >= 1; got {args.ranks}, "
                 f"{args.steps}, {args.warmup}, {args.batch}")
    from refimpl.backend import get_backend
    args.mpi = get_backend(args.backend).is_gpu
    got = run(args)
    lines = table(got["results"])
    details = (f"ZeRO stage 3, bf16 unless set, micro batch {args.batch} per rank, {args.steps} timed steps after "
               f"{args.warmup}; {'mpirun, one process per GPU, NCCL' if args.mpi else 'simulated ranks'}; backend "
               f"{args.backend}; overrides {args.set or 'none'}" + "".join(f"; {n}" for n in got["notes"]))
    emit(lines, details, __file__, args.out)
    return got


if __name__ == "__main__":
    main()

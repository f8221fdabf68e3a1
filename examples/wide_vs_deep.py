"""Wide Attention (Brown et al. 2022): with the total number of attention heads fixed, one wide layer against deeper
stacks, on accuracy, size and CPU inference latency.

The paper's protocol (§3-4): the total heads H are fixed; the layers L run over the divisors of H with H/L heads
per layer; every other hyper-parameter is equal (d_model, the head width d_head, the MLP width, the optimizer and
schedule). Its claims: single-layer models match or beat deeper ones (+0.3% on average over 4 tasks), are about
half the size, and run inference on a CPU much faster (3.1x on byte-level IMDb for an equally accurate model).

Here, two classification tasks trained through refimpl's engine (ZeRO stage 0 on one rank unless --set says
otherwise, the backend of REFIMPL_BACKEND or --set backend=...):

    listops          ListOps (Long Range Arena's generator, refimpl/data.py): 10 classes, up to 64 tokens
    stdlib_packages  which of 8 standard-library packages 63 bytes of source come from (refimpl/data_snippets.py):
                     byte-level text classification, the role IMDb plays in the paper, with no download

Measured per shape: eval accuracy (mean and std over --seeds), parameters, and the forward pass's CPU latency at
batch 1 and batch 32 on numpy and numba (no autodiff tape; median of --reps runs in this process, the shapes
interleaved within each rep). Writes results.json, results.md (the table) and wide_vs_deep.png (accuracy against
latency, one point per shape) under --out.

    python examples/wide_vs_deep.py [--quick] [--tasks listops stdlib_packages] [--total-heads 8] [--seeds 3]
        [--backends numpy numba] [--reps 20] [--out runs/wide_vs_deep] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PLAIN = ["world_size=1", "zero_optimization.stage=0", "zero_optimization.offload_param=null",
         "zero_optimization.offload_optimizer=null", "memory.device_bytes=null", "model.task=classify",
         "model.d_model=128", "optimizer.params.lr=1e-3", "scheduler.params.warmup_num_steps=50"]
TASKS = {   # config, steps (full, --quick), eval batches (every val example exactly once)
    "listops": (["data.dataset=listops", "data.seq_len=80", "model.max_seq_len=80", "data.n_train=10000",
                 "data.n_val=400"], 600, 5, 400 // 16),
    "stdlib_packages": (["data.dataset=stdlib_packages", "data.max_length=63", "data.seq_len=64",
                         "model.max_seq_len=64", "data.n_val=384", "train_micro_batch_size_per_gpu=32"], 600, 5,
                        384 // 32),
}


def shapes(total_heads):
    """(layers, heads per layer) with layers * heads = total_heads, deepest first."""
    return [(L, total_heads // L) for L in range(total_heads, 0, -1) if total_heads % L == 0]


def task_config(task, layers, heads, seed, steps, args, backend=None):
    from refimpl.config import load_config
    sets, _, _, val_batches = TASKS[task]
    val_batches = 1 if args.quick else val_batches
    extra = [f"model.n_layers={layers}", f"model.n_heads={heads}", f"model.d_head={args.d_head}",
             f"run.seed={seed}", f"run.steps={steps}", f"run.eval_interval={max(steps, 1)}",
             f"run.eval_batches={val_batches}", f"run.log_interval={max(steps, 1)}"]
    if backend:
        extra.append(f"backend={backend}")
    return load_config(None, [*PLAIN, *sets, *extra, *args.set])


def train_all(args, out):
    """Train every (task, shape, seed); returns {(task, L, h): {"accuracy": [...], "parameters": n, ...}}."""
    from tqdm import tqdm
    from refimpl.train import train
    runs = [(t, L, h, s) for t in args.tasks for L, h in shapes(args.total_heads) for s in range(args.seeds)]
    results = {}
    for task, L, h, seed in tqdm(runs, desc="training", unit="run"):
        steps = TASKS[task][2] if args.quick else TASKS[task][1]
        summary = train(task_config(task, L, h, seed, steps, args), out / task / f"L{L}xH{h}" / f"seed{seed}",
                        progress=False)
        r = results.setdefault((task, L, h), {"accuracy": [], "parameters": summary["parameters"],
                                              "majority": summary.get("majority_class_accuracy")})
        r["accuracy"].append(summary["eval_accuracy"])
    return results


def forward_latency(args, backends):
    """{(task, L, h, backend, batch): median seconds of one forward pass}: models drawn fresh (latency does not
    depend on the weights), the shapes interleaved in every rep."""
    from refimpl.autodiff import no_grad
    from refimpl.backend import use_backend
    from refimpl.train import build
    models = {}
    for task in args.tasks:
        for L, h in shapes(args.total_heads):
            for be_name in backends:
                be, dataset, model = build(task_config(task, L, h, 0, 1, args, backend=be_name))
                cfg = task_config(task, L, h, 0, 1, args)
                for batch in (1, 32):
                    b = dataset.get_batch("val", 0, batch, cfg["data"]["seq_len"])
                    models[(task, L, h, be_name, batch)] = (be, model, be.asarray(b.ids),
                                                            be.asarray(b.key_padding_mask))
    times = {k: [] for k in models}

    def run(key):
        be, model, ids, mask = models[key]
        with use_backend(be), no_grad():
            t = time.perf_counter()
            model(ids, mask)
            return time.perf_counter() - t
    for key in models:                    # warm-up (numba compiles on first use)
        run(key)
    for _ in range(args.reps):
        for key in models:
            times[key].append(run(key))
    return {k: float(np.median(v)) for k, v in times.items()}


def table(args, results, latency, backends):
    head = ["task", "layers x heads", "parameters", f"eval accuracy (mean ± std, {args.seeds} seeds)"]
    head += [f"{b} ms, batch {n}" for b in backends for n in (1, 32)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (task, L, h), r in results.items():
        acc = np.array(r["accuracy"], dtype=float)
        row = [task, f"{L} x {h}", f"{r['parameters']:,}", f"{acc.mean():.3f} ± {acc.std():.3f}"]
        row += [f"{1e3 * latency[(task, L, h, b, n)]:.2f}" for b in backends for n in (1, 32)]
        lines.append("| " + " | ".join(row) + " |")
    base = {t: r["majority"] for (t, _, _), r in results.items()}
    lines += ["", "majority-class accuracy: " + ", ".join(f"{t} {v:.3f}" for t, v in base.items() if v is not None)]
    return "\n".join(lines)


def plot(args, results, latency, backend, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(args.tasks), figsize=(4.6 * len(args.tasks), 3.8), dpi=110, squeeze=False)
    for ax, task in zip(axes[0], args.tasks):
        for (t, L, h), r in results.items():
            if t != task:
                continue
            acc = np.array(r["accuracy"], dtype=float)
            ms = 1e3 * latency[(t, L, h, backend, 1)]
            ax.errorbar(ms, acc.mean(), yerr=acc.std(), fmt="o", capsize=3)
            ax.annotate(f"{L} x {h}", (ms, acc.mean()), textcoords="offset points", xytext=(5, 5))
        ax.set_title(task)
        ax.set_xlabel(f"forward ms, batch 1 ({backend})")
        ax.set_ylabel("eval accuracy")
    fig.suptitle(f"{args.total_heads} heads in total (layers x heads per layer), d_head={args.d_head}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--total-heads", type=int, default=8)
    ap.add_argument("--d-head", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=None, help="for the latency (default: numpy and numba, if "
                                                                 "installed; numpy alone with --quick)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="a few steps and reps: checks that it all runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    ap.add_argument("--out", default="runs/wide_vs_deep")
    args = ap.parse_args(argv)
    if min(args.seeds, args.total_heads, args.d_head, args.reps) < 1:
        ap.error("--seeds, --total-heads, --d-head and --reps must be at least 1")
    if args.quick:
        args.reps = min(args.reps, 3)
    backends = args.backends or (["numpy"] if args.quick else ["numpy", *available("numba")])
    out = Path(args.out)
    results = train_all(args, out)
    latency = forward_latency(args, backends)
    text = table(args, results, latency, backends)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(
        [{"task": t, "layers": L, "heads": h, **r, "latency_s": {f"{b}/{n}": latency[(t, L, h, b, n)]
                                                                  for b in backends for n in (1, 32)}}
         for (t, L, h), r in results.items()], indent=2))
    plot(args, results, latency, backends[-1], out / "wide_vs_deep.png")
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'wide_vs_deep.png'}")
    return results, latency


def available(name):
    from refimpl.backend import BackendError, get_backend
    try:
        get_backend(name)
        return [name]
    except BackendError:
        return []


if __name__ == "__main__":
    main()

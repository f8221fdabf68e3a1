"""The Wide Attention study as a config change: fixed total heads, layers x heads-per-layer varied.

Brown et al. 2022 ("Wide Attention Is The Way Forward For Transformers?") keep the total number of attention
heads fixed and trade depth for width. Here every run has n_layers * n_heads = TOTAL_HEADS, the same d_model
and d_head, and trains the byte-level LM for the same number of steps; the plot shows eval loss and wall time
per step for each shape.

    python examples/wide_vs_deep.py [--steps 150] [--total-heads 8] [--out runs/wide_vs_deep]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from refimpl.config import load_config
from refimpl.train import train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--total-heads", type=int, default=8)
    ap.add_argument("--d-head", type=int, default=16)
    ap.add_argument("--out", default="runs/wide_vs_deep")
    args = ap.parse_args(argv)
    out = Path(args.out)
    shapes = [(L, args.total_heads // L) for L in range(1, args.total_heads + 1) if args.total_heads % L == 0]
    results = []
    for n_layers, n_heads in shapes:
        config = load_config(None, [f"run.steps={args.steps}", f"model.n_layers={n_layers}",
                                    f"model.n_heads={n_heads}", f"model.d_head={args.d_head}"])
        summary = train(config, out / f"L{n_layers}xH{n_heads}", progress=True)
        results.append({"n_layers": n_layers, "n_heads": n_heads, "eval_loss": summary["eval_loss"],
                        "seconds_per_step": summary["seconds"] / max(summary["steps"], 1),
                        "parameters": summary["parameters"]})
        print(json.dumps(results[-1]))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "wide_vs_deep.png", args)
    print(f"wrote {out / 'wide_vs_deep.png'}")


def plot(results, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['n_layers']} x {r['n_heads']}" for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    a.bar(labels, [r["eval_loss"] for r in results], color="tab:blue")
    a.set_title(f"eval loss after {args.steps} steps")
    a.set_xlabel("layers x heads per layer")
    a.set_ylabel("nats per byte")
    b.bar(labels, [r["seconds_per_step"] for r in results], color="tab:orange")
    b.set_title("seconds per step (this machine)")
    b.set_xlabel("layers x heads per layer")
    fig.suptitle(f"{args.total_heads} heads in total, d_head={args.d_head}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()

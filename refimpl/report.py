"""What a run shows a person: the summary table printed at the end, and loss.png."""
from __future__ import annotations

import numpy as np


def summarize(config, out, model, dataset, history, evals, engine, seconds) -> dict:
    last_eval = evals[-1] if evals else {}
    summary = {
        "out": str(out),
        "backend": config["backend"],
        "task": config["model"]["task"],
        "dataset": config["data"]["dataset"],
        "parameters": engine.zero.layout.numel,  # (stage 3 params are partitioned: count the layout)
        "param_dtype": str(engine.dtype),
        "zero_stage": engine.zero.stage,
        "world_size": engine.world_size,
        "steps": engine.global_steps,
        "skipped_steps": engine.skipped_steps,
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "eval_loss": last_eval.get("eval_loss"),
        "eval_accuracy": last_eval.get("eval_accuracy"),
        "tokens_per_s": float(np.median([h["tokens_per_s"] for h in history])) if history else None,
        "seconds": seconds,
    }
    summary.update(memory_and_traffic(engine))
    if config["model"]["task"] == "classify":
        summary["majority_class_accuracy"] = dataset.majority_class_fraction("val")
    else:
        summary["uniform_loss"] = float(np.log(256))
    return summary


def memory_and_traffic(engine) -> dict:
    """What ZeRO buys and what it costs, per rank: model-state bytes next to the stage-0 (data parallel) figure,
    and the bytes each kind of collective moved (ring-algorithm volumes, ZeRO §7)."""
    mine = engine.zero.model_state_bytes()
    n, item = engine.zero.layout.numel, engine.dtype.itemsize
    m = engine.zero.master_dtype.itemsize
    optimizer0 = (2 * m if engine.dtype == engine.zero.master_dtype else 3 * m) * n   # fp32: params are the master
    out = {"model_state_bytes_per_rank": sum(mine.values()),
           "stage0_model_state_bytes_per_rank": 2 * n * item + optimizer0}
    out.update({f"bytes_{kind}_per_rank": b for kind, b in mine.items()})
    tiers = engine.ledger.summary()
    for pair, t in sorted(tiers["pairs"].items()):
        out[f"{pair} bytes"] = t["bytes"]
        if t["GB_per_s"] is not None:
            out[f"{pair} GB/s"] = t["GB_per_s"]
        out[f"{pair} hidden / exposed s"] = f"{t['hidden_s']:.3f} / {t['exposed_s']:.3f}"
    for tier, peak in sorted(tiers["peak_bytes"].items()):
        out[f"peak {tier} bytes"] = peak
    for op, st in sorted(engine.comm.stats.items()):
        if st["ring_bytes_sent"]:
            out[f"{op}_bytes_sent_per_rank"] = st["ring_bytes_sent"]
    return out


def format_summary(summary: dict) -> str:
    rows = []
    for key, value in summary.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:,.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
        elif isinstance(value, int):
            value = f"{value:,}"
        rows.append((key.replace("_", " ") if "->" not in key else key, str(value)))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}}   {v}" for k, v in rows), line])


def plot_losses(history, evals, path, title="", uniform_loss=None) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, alpha=0.8, label="train loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
    if uniform_loss is not None:
        ax.axhline(uniform_loss, color="gray", ls="--", lw=1, label="uniform guess")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

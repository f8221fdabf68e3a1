"""What a run shows a person: the summary table printed at the end, loss.png, and timeline.png (the ledger's
transfers and compute as lanes over time, refimpl/memory/ledger.py)."""
from __future__ import annotations

from collections import defaultdict

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
    parts = engine.ledger.breakdown()
    if parts:   # rank 0's span: computing (of which on a core), its waits at collectives and transfers, the rest
        cpu = parts["compute_cpu_s"]
        out["compute (on a core) / collective waits / transfer waits / other s"] = (
            f"{parts['compute_s']:.1f}{'' if cpu is None else f' ({cpu:.1f})'} / {parts['collective_wait_s']:.1f} / "
            f"{parts['transfer_wait_s']:.1f} / {parts['other_s']:.1f}")
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


def plot_timeline(events, path, title="") -> None:
    """Tiers as lanes over time, one lane per transfer direction, one for compute and one for the waits at
    collectives, per rank: the whole run on top, and below it one step (the second-to-last: warm, and complete)
    where the overlap can be seen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [e for e in events if e["kind"] in ("compute", "transfer", "collective")]
    lanes = sorted({(e["rank"], _lane(e)) for e in drawn})
    steps = sorted({e["step"] for e in drawn})
    zoom = steps[-2] if len(steps) > 1 else (steps[0] if steps else None)
    fig, axes = plt.subplots(2, 1, figsize=(10, 2 * (0.4 * len(lanes) + 1.2)), dpi=110)
    for ax, chosen, what in ((axes[0], drawn, "whole run"),
                             (axes[1], [e for e in drawn if e["step"] == zoom], f"step {zoom}")):
        _draw_lanes(ax, chosen, lanes)
        ax.set_title(f"{title or 'tier traffic and compute'}: {what}")
    axes[1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _lane(e) -> str:
    return {"compute": "compute", "collective": "collective wait"}.get(e["kind"]) or f"{e['src']}->{e['dst']}"


_COLORS = {"compute": "tab:green", "collective wait": "tab:red", "nvme->host": "tab:purple", "host->nvme": "tab:pink",
           "host->device": "tab:blue", "device->host": "tab:orange"}


def _draw_lanes(ax, events, lanes) -> None:
    index = {lane: i for i, lane in enumerate(lanes)}
    bars = defaultdict(list)   # one broken_barh call per lane: thousands of events draw in one go
    for e in events:
        bars[(e["rank"], _lane(e))].append((e["start"], max(e["end"] - e["start"], 1e-6)))
    for (rank, name), spans in bars.items():
        ax.broken_barh(spans, (index[(rank, name)] - 0.4, 0.8), color=_COLORS.get(name, "tab:gray"))
    ax.set_yticks(range(len(lanes)), [f"rank {r}: {n}" for r, n in lanes])
    ax.grid(axis="x", alpha=0.3)

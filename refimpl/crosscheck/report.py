"""What `refimpl crosscheck` shows: report.json (build_report), a terminal table and crosscheck.png."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from . import diagnose
from .compare import (BUDGETS, LR_BUDGET, SCALAR_ORDER, _num, excluded, first_divergence, precision, rel,
                      scalar_differences, snapshot_differences, worst_by_quantity)
from .trace import QUANTITIES


def build_report(config, against, steps, snaps, weights, ours, theirs, reference=None):
    """(report, the per-step loss distances from fp64 for the plot, every Difference) of one cross-check."""
    prec = precision(config)
    skip = excluded(weights)
    budget = BUDGETS[prec]
    diffs = scalar_differences(ours, theirs, budget) + snapshot_differences(ours, theirs, budget, skip)
    first = first_divergence(diffs)
    zero = config["zero_optimization"]
    report = {"peer": against, "precision": prec, "steps": steps,
              "compared_steps": min(len(ours.steps), len(theirs.steps)),
              "world_size": config["world_size"], "zero_stage": zero["stage"],
              "offload_param": (zero["offload_param"] or {}).get("device", "none"),
              "offload_optimizer": (zero["offload_optimizer"] or {}).get("device", "none"),
              "snapshot_steps": list(snaps), "budget": {**budget, "lr": LR_BUDGET}, "excluded": sorted(skip),
              "first_divergence": None if first is None else first.as_dict(),
              "cause": None if first is None else diagnose.explain(first, ours, theirs, config, weights, skip),
              "worst": {q: d.as_dict() for q, d in worst_by_quantity(diffs).items()}, "config": copy.deepcopy(config)}
    series = None
    if reference is not None:
        report["arbiter"] = diagnose.arbitrate(first, ours, theirs, reference, skip)
        series = {name: [(a["step"], rel(a["loss"], c["loss"])) for a, c in zip(trace.steps, reference.steps)]
                  for name, trace in (("refimpl", ours), (against, theirs))}
    # over budget is a divergence, unless the arbiter finds both sides as far from fp64 there (rounding)
    report["divergence"] = first is not None and report.get("arbiter", {}).get("blame") != "rounding"
    report["per_step"] = [{"step": a["step"], "refimpl": _record(a), against: _record(b)}
                          for a, b in zip(ours.steps, theirs.steps)]
    return report, series, diffs


def _record(rec: dict) -> dict:
    return {k: _num(v) for k, v in rec.items() if k != "step"}


def _fmt(x) -> str:
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.2e}"


def table(report: dict) -> str:
    peer, arb = report["peer"], report.get("arbiter")
    head = (f"refimpl crosscheck --against {peer}: {report['steps']} steps, {report['precision']}, ZeRO stage "
            f"{report['zero_stage']}, {report['world_size']} rank(s), offload param {report['offload_param']} / "
            f"optimizer {report['offload_optimizer']}")
    cols = ["quantity", "worst error", "at", "budget"] + (["refimpl vs fp64", f"{peer} vs fp64"] if arb else [])
    rows = []
    for q in SCALAR_ORDER + QUANTITIES:
        w = report["worst"].get(q)
        if w is None:
            continue
        at = "equal at every step" if w["error"] == 0 else (
            f"step {w['step']}" + (f", {w['parameter']}" if w["parameter"] else ""))
        row = [q, _fmt(w["error"]), at, _fmt(w["budget"])]
        if arb:
            row += [_fmt(arb.get(q, {}).get("refimpl")), _fmt(arb.get(q, {}).get("peer"))]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in rows + [cols]) for i in range(len(cols))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()   # noqa: E731
    out = [head, line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    first = report["first_divergence"]
    if first is None:
        out.append(f"verdict: within budget ({report['compared_steps']} steps; snapshots at steps "
                   f"{report['snapshot_steps']})")
    else:
        where = f"{first['quantity']}" + (f" of {first['parameter']}" if first["parameter"] else "")
        what = "DIVERGENCE" if report["divergence"] else "over budget (rounding, by the fp64 arbiter)"
        values = f" (refimpl {_fmt(first['refimpl'])}, {peer} {_fmt(first['peer'])})" if first["parameter"] is None else ""
        out.append(f"verdict: {what} at step {first['step']}: {where}, error {_fmt(first['error'])} > budget "
                   f"{_fmt(first['budget'])}{values}")
        if report.get("cause"):
            out.append(f"likely cause: {report['cause']}")
    if arb and arb.get("verdict"):
        out.append(f"fp64 arbiter: {arb['verdict']}")
    if report["excluded"]:
        out.append(f"not judged: {', '.join(report['excluded'])} (true gradient zero: rounding noise)")
    return "\n".join(out)


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")


def _json_safe(x):
    """inf/nan (a skipped fp16 step's gradient norm, an error against it) as the strings "inf"/"nan"."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def plot(diffs, report: dict, path: Path, arbiter_series=None) -> None:
    """Per-step relative differences on a log scale (scalars left, per-parameter worst at snapshots right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    tiny = 1e-17        # equal values are drawn on this line
    for q, style in (("loss", "-o"), ("grad_norm", "-s"), ("lr", ":")):
        pts = [(d.step, max(d.error, tiny)) for d in diffs if d.quantity == q and math.isfinite(d.error)]
        if pts:
            left.semilogy(*zip(*pts), style, ms=3, label=f"{q}: refimpl vs {report['peer']}")
    for name, series in (arbiter_series or {}).items():
        if series:
            left.semilogy(*zip(*[(k, max(e, tiny)) for k, e in series]), "--", lw=1, label=f"loss: {name} vs fp64")
    left.axhline(report["budget"]["loss"], color="k", lw=0.8, ls="--", label="loss budget")
    left.set(xlabel="step", ylabel="relative difference (1e-17: equal)", title="per step")
    left.legend(fontsize=7)
    for q, marker in zip(QUANTITIES, "osD^"):
        pts = [(d.step, max(d.error, tiny)) for d in diffs if d.quantity == q and math.isfinite(d.error)]
        if pts:
            line, = right.semilogy(*zip(*pts), marker + "-", ms=4, label=q)
            right.axhline(report["budget"][q], color=line.get_color(), lw=0.8, ls="--")
    right.set(xlabel="step", ylabel="worst relative difference over parameters (1e-17: equal)",
              title="per parameter, at snapshot steps (dashed: budgets)")
    right.legend(fontsize=7)
    fig.suptitle(f"refimpl vs {report['peer']}: {report['precision']}, ZeRO stage {report['zero_stage']}, "
                 f"{report['world_size']} rank(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Comparing two traces: the error budget, the first divergence, and what a divergence is likely to mean.

Errors (all relative, so one budget serves every model):
- loss, grad_norm: |a - b| / |b|; lr: the same, with a budget of 1e-12 (both sides evaluate one formula);
  loss_scale and the skipped steps must be equal.
- per parameter at a snapshot step, for weight, grad, exp_avg, exp_avg_sq:
  max|a - b| / max(max|b|, 1e-2 * the largest |b| of that quantity in the model) -- relative to the tensor,
  but a tensor that is nearly zero is judged on a hundredth of the model's scale rather than on its own noise.

The budget depends on the precision the run computes in (its rounding unit and how much of the arithmetic
stays in it). It was calibrated on refimpl against PyTorch and DeepSpeed (docs/crosscheck.md): it holds rounding
for 100 steps in fp32 and for the first 25 in fp16/bf16, after which two correct 16-bit runs decorrelate and
only the fp64 arbiter can tell rounding from a bug. Parameters whose true gradient is zero are
excluded: an attention key bias (``*.attn.k_proj.bias``) only shifts every score of a query by the same amount,
which softmax ignores, so its gradient is rounding noise on every side and Adam turns noise into lr-sized steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .trace import QUANTITIES, Trace

# precision -> quantity -> relative error allowed (see the module docstring and docs/crosscheck.md)
BUDGETS = {
    "fp64": {"loss": 1e-10, "grad_norm": 1e-9, "weight": 1e-9, "grad": 1e-8, "exp_avg": 1e-8, "exp_avg_sq": 1e-8},
    "fp32": {"loss": 1e-5, "grad_norm": 1e-4, "weight": 1e-3, "grad": 1e-3, "exp_avg": 1e-3, "exp_avg_sq": 1e-3},
    "fp16": {"loss": 1e-3, "grad_norm": 1e-2, "weight": 0.1, "grad": 0.2, "exp_avg": 0.2, "exp_avg_sq": 0.2},
    "bf16": {"loss": 1e-2, "grad_norm": 0.1, "weight": 0.25, "grad": 1.0, "exp_avg": 1.0, "exp_avg_sq": 1.0},
}
LR_BUDGET = 1e-12
FLOOR = 1e-2           # a nearly-zero tensor is judged on this fraction of the model's scale
SCALAR_ORDER = ("lr", "loss_scale", "skipped", "loss", "grad_norm")


def precision(config: dict) -> str:
    if config["fp16"]["enabled"]:
        return "fp16"
    if config["bf16"]["enabled"]:
        return "bf16"
    return "fp64" if config["model"]["dtype"] == "float64" else "fp32"


def excluded(names) -> dict:
    """name -> why it is not judged."""
    return {n: "true gradient is zero (softmax ignores a per-query shift of the scores): rounding noise, "
               "amplified by Adam" for n in names if n.endswith("attn.k_proj.bias")}


@dataclass
class Difference:
    step: int
    quantity: str
    parameter: str | None
    error: float
    budget: float
    ours: object = None
    theirs: object = None

    @property
    def over(self) -> bool:
        return not self.error <= self.budget     # nan is over

    def as_dict(self) -> dict:
        return {"step": self.step, "quantity": self.quantity, "parameter": self.parameter,
                "error": _num(self.error), "budget": self.budget, "refimpl": _num(self.ours), "peer": _num(self.theirs)}


def rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(b), 1e-300)


def scalar_differences(ours: Trace, theirs: Trace, budget: dict) -> list[Difference]:
    """One Difference per step and scalar (skipped grad norms, infinite on both sides, count as equal)."""
    out = []
    for a, b in zip(ours.steps, theirs.steps):
        k = a["step"]
        out.append(Difference(k, "lr", None, rel(a["lr"], b["lr"]), LR_BUDGET, a["lr"], b["lr"]))
        out.append(Difference(k, "loss_scale", None, 0.0 if a["loss_scale"] == b["loss_scale"] else math.inf, 0.0,
                              a["loss_scale"], b["loss_scale"]))
        out.append(Difference(k, "skipped", None, 0.0 if a["skipped"] == b["skipped"] else math.inf, 0.0,
                              a["skipped"], b["skipped"]))
        out.append(Difference(k, "loss", None, rel(a["loss"], b["loss"]), budget["loss"], a["loss"], b["loss"]))
        both_skipped = a["skipped"] and b["skipped"]
        out.append(Difference(k, "grad_norm", None, 0.0 if both_skipped else rel(a["grad_norm"], b["grad_norm"]),
                              budget["grad_norm"], a["grad_norm"], b["grad_norm"]))
    return out


def tensor_errors(ours: dict, theirs: dict, skip=()) -> dict:
    """name -> relative error of one quantity (the module docstring's measure); b is the reference."""
    scale = max((float(np.max(np.abs(b))) for n, b in theirs.items() if n not in skip and np.size(b)), default=0.0)
    out = {}
    for n, b in theirs.items():
        if n in skip:
            continue
        a, b = np.asarray(ours[n], np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            out[n] = math.inf
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        if diff == 0.0:
            out[n] = 0.0
            continue
        denom = max(float(np.max(np.abs(b))), FLOOR * scale, 1e-300)
        out[n] = diff / denom if math.isfinite(diff) else math.inf
    return out


def skipped_on_both(ours: Trace, theirs: Trace) -> set:
    return set(ours.skipped_steps()) & set(theirs.skipped_steps())


def snapshot_differences(ours: Trace, theirs: Trace, budget: dict, skip=()) -> list[Difference]:
    """The worst parameter of every quantity at every snapshot step both traces hold. The gradient of a step both
    sides skipped (it holds inf/nan: that is why they skipped it) is not compared."""
    out, both_skipped = [], skipped_on_both(ours, theirs)
    for k in sorted(set(ours.snapshots) & set(theirs.snapshots)):
        for q in QUANTITIES:
            if q not in ours.snapshots[k] or q not in theirs.snapshots[k] or (q == "grad" and k in both_skipped):
                continue
            errs = tensor_errors(ours.snapshots[k][q], theirs.snapshots[k][q], skip)
            if not errs:
                continue
            worst = max(errs, key=lambda n: (not errs[n] <= math.inf, errs[n]))   # nan first, then the largest
            order = [n for n in ours.snapshots[k][q] if n in errs]
            first_over = next((n for n in order if not errs[n] <= budget[q]), None)
            name = first_over or worst     # the first parameter (model order) over budget, else the worst one
            out.append(Difference(k, q, name, errs[name], budget[q]))
    return out


def first_divergence(diffs: list[Difference]) -> Difference | None:
    """The earliest difference over budget; at one step, the schedule and loss-scale scalars come before the
    loss, the loss before per-parameter quantities (which are only recorded at snapshot steps)."""
    rank = {q: i for i, q in enumerate(SCALAR_ORDER + QUANTITIES)}
    over = [d for d in diffs if d.over]
    return min(over, key=lambda d: (d.step, rank[d.quantity])) if over else None


def worst_by_quantity(diffs: list[Difference]) -> dict:
    out = {}
    for d in diffs:
        cur = out.get(d.quantity)
        if cur is None or (d.error > cur.error) or (math.isnan(d.error) and not math.isnan(cur.error)):
            out[d.quantity] = d
    return out


def _num(v):
    if isinstance(v, (bool, str)) or v is None:
        return v
    v = float(v)
    return v if math.isfinite(v) else str(v)

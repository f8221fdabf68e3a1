"""What a divergence is likely to mean: the known semantic knobs, and the fp64 arbiter.

A difference over budget is first held against the knobs where two correct implementations can still differ:
the learning-rate schedule, the fp16 loss-scale sequence, how gradients are averaged (accumulation steps, ranks,
the loss scale they are divided by), clipping, and Adam's variant (decoupled or L2 weight decay, bias
correction). The Adam variant is found by replaying the peer's own update: from its state before the step and
its gradient, each candidate variant predicts its weights after the step, and the one that predicts them best is
named. The fp64 arbiter then says which side is further from the rounding-free run.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from ..optim import adam_w_mode
from .compare import Difference, rel, tensor_errors
from .trace import Trace


def explain(d: Difference, ours: Trace, theirs: Trace, config: dict, initial: dict, skip=()) -> str | None:
    """A sentence naming the likely cause of difference ``d``, or None when no known knob explains it."""
    if d.quantity == "lr":
        sched = config["scheduler"]["type"] if config["scheduler"] else "no scheduler (constant lr)"
        return (f"the learning-rate schedule differs from step {d.step} (refimpl {d.ours:.6g}, peer {d.theirs:.6g}; "
                f"{sched}): check scheduler.params, and whether a skipped step advanced one side's schedule")
    if d.quantity in ("loss_scale", "skipped"):
        lo = max(0, d.step - 4)
        seq = lambda t: [f"{r['loss_scale']:g}{'*' if r['skipped'] else ''}" for r in t.steps[lo:d.step + 2]]  # noqa: E731
        return (f"the fp16 loss-scale sequence differs from step {d.step} (steps {lo + 1}.., * = skipped: refimpl "
                f"{seq(ours)}, peer {seq(theirs)}): fp16.loss_scale_window, hysteresis, consecutive_hysteresis, "
                f"min_loss_scale, initial_scale_power")
    if d.quantity == "grad_norm":
        return _explain_norm(d, theirs, config)
    if d.quantity == "grad" and d.step in ours.snapshots and d.step in theirs.snapshots:
        return _explain_gradient_factor(d, ours, theirs, config)
    if d.quantity in ("weight", "exp_avg", "exp_avg_sq"):
        return _explain_update(d, theirs, config, initial, skip)
    if d.quantity == "loss" and d.step == 1:
        return ("the forward pass differs at the first step, before any update: the model, the data or the "
                "weights differ (no training knob explains it)")
    return None


def _factor_names(factor: float, config: dict) -> list[str]:
    gas, ws = config["gradient_accumulation_steps"], config["world_size"]
    names = {gas: "gradient_accumulation_steps", 1 / gas: "1 / gradient_accumulation_steps",
             ws: "world_size", 1 / ws: "1 / world_size"}
    return [v for k, v in names.items() if k != 1 and abs(factor / k - 1) < 1e-3]


def _explain_norm(d: Difference, theirs: Trace, config: dict) -> str | None:
    if not (d.ours and d.theirs and math.isfinite(d.ours) and math.isfinite(d.theirs)):
        return None
    r = d.theirs / d.ours
    nxt = next((t for t in theirs.steps if t["step"] == d.step + 1), None)
    this = next(t for t in theirs.steps if t["step"] == d.step)
    if nxt is not None and nxt["loss_scale"] != this["loss_scale"] and abs(r * nxt["loss_scale"] / this["loss_scale"]
                                                                            - 1) < 1e-3:
        return (f"the peer's gradient norm is {r:g}x refimpl's at step {d.step}, after which its loss scale went "
                f"from {this['loss_scale']:g} to {nxt['loss_scale']:g}: it divided the gradients by the updated "
                f"loss scale (DeepSpeed's ZeRO unscales after update_scale); without clipping its update then "
                f"uses a gradient {r:g}x the true one")
    names = _factor_names(r, config)
    if names:
        return f"the peer's gradient norm is {r:g}x refimpl's = {names[0]}: gradients are averaged differently"
    if config["gradient_clipping"] > 0 and min(d.ours, d.theirs) <= config["gradient_clipping"] < max(d.ours,
                                                                                                      d.theirs):
        return "the gradient norms straddle gradient_clipping: one side clips this step and the other does not"
    return None


def _explain_gradient_factor(d: Difference, ours: Trace, theirs: Trace, config: dict) -> str | None:
    a = ours.snapshots[d.step]["grad"][d.parameter].astype(np.float64).ravel()
    b = theirs.snapshots[d.step]["grad"][d.parameter].astype(np.float64).ravel()
    keep = np.abs(a) > 1e-3 * np.abs(a).max() if a.size and np.abs(a).max() > 0 else np.zeros(0, bool)
    if keep.sum() < 4:
        return None
    ratios = b[keep] / a[keep]
    factor = float(np.median(ratios))
    if abs(factor - 1) < 1e-2 or np.std(ratios) > 1e-2 * abs(factor):
        return None
    names = _factor_names(factor, config)
    return (f"the peer's gradient of {d.parameter} is {factor:.4g}x refimpl's at step {d.step}"
            + (f" = {names[0]}: gradient averaging (loss / gradient_accumulation_steps, mean over ranks)" if names
               else ": a scaling of the gradient (loss scale, accumulation or rank averaging)"))


def _adam_candidates(config: dict):
    """(description, configured?, decoupled, weight_decay, bias_correction, clip) of every Adam variant tried."""
    p = config["optimizer"]["params"]
    decays = sorted({p["weight_decay"], 0.0, 0.01})
    for decoupled, wd, bc, clip in itertools.product((True, False), decays, (True, False), (True, False)):
        configured = (decoupled == adam_w_mode(config["optimizer"]) and wd == p["weight_decay"]
                      and bc == p["bias_correction"] and clip == (config["gradient_clipping"] > 0))
        desc = (f"{'decoupled (AdamW)' if decoupled else 'L2 (Adam)'} weight decay {wd:g}, bias correction "
                f"{'on' if bc else 'off'}, {'with' if clip else 'without'} clipping")
        yield desc, configured, decoupled, wd, bc, clip


def _explain_update(d: Difference, theirs: Trace, config: dict, initial: dict, skip) -> str | None:
    """Replay the peer's update of step d.step under each Adam variant; name the one that predicts its weights."""
    k = d.step
    rec = next(t for t in theirs.steps if t["step"] == k)
    snap = theirs.snapshots.get(k, {})
    if rec["skipped"] or "grad" not in snap or "weight" not in snap:
        return None
    if k == 1 or all(t["skipped"] for t in theirs.steps if t["step"] < k):
        before = {"weight": initial, "exp_avg": None, "exp_avg_sq": None}
    elif k - 1 in theirs.snapshots:
        before = theirs.snapshots[k - 1]
    else:
        return None
    t = sum(1 for r in theirs.steps if r["step"] <= k and not r["skipped"])      # Adam's step count
    p = config["optimizer"]["params"]
    b1, b2 = p["betas"]
    clip_max = config["gradient_clipping"]
    scored = []
    for desc, configured, decoupled, wd, bc, clip in _adam_candidates(config):
        coef = min(1.0, clip_max / (rec["grad_norm"] + 1e-6)) if clip and clip_max > 0 else 1.0
        predicted = {}
        for n, g in snap["grad"].items():
            if n in skip:
                continue
            w = np.asarray(before["weight"][n], np.float64)
            m = np.zeros_like(w) if before["exp_avg"] is None else np.asarray(before["exp_avg"][n], np.float64)
            v = np.zeros_like(w) if before["exp_avg_sq"] is None else np.asarray(before["exp_avg_sq"][n], np.float64)
            g = np.asarray(g, np.float64) * coef
            if decoupled:
                w = w * (1 - rec["lr"] * wd)
            else:
                g = g + wd * w
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if bc else (1.0, 1.0)
            predicted[n] = w - rec["lr"] / c1 * m / (np.sqrt(v) / math.sqrt(c2) + p["eps"])
        errs = tensor_errors(predicted, {n: snap["weight"][n] for n in predicted})
        scored.append((max(errs.values(), default=0.0), configured, desc))
    best = min(scored)
    mine = next(s for s in scored if s[1])
    if best[1] or not best[0] < 0.1 * mine[0]:
        return (f"the peer's weights after step {k} are not explained by any Adam variant replayed from its own "
                f"gradient (configured: {mine[2]}, error {mine[0]:.2g}): look at the peer's optimizer or its "
                f"state (offloaded optimizer states, partitioning)" if mine[0] > d.budget else None)
    return (f"the peer's update at step {k} matches Adam with {best[2]} (error {best[0]:.2g}), not the configured "
            f"{mine[2]} (error {mine[0]:.2g})")


def arbitrate(d: Difference | None, ours: Trace, theirs: Trace, fp64: Trace, skip=()) -> dict:
    """Each side's distance from the fp64 run: worst over steps for the loss, worst over parameters and snapshot
    steps per quantity, and at the first divergence; with a verdict on which side is off."""
    out = {"loss": {"refimpl": max((rel(a["loss"], c["loss"]) for a, c in zip(ours.steps, fp64.steps)), default=0),
                    "peer": max((rel(b["loss"], c["loss"]) for b, c in zip(theirs.steps, fp64.steps)), default=0)}}
    skipped = set(ours.skipped_steps()) | set(theirs.skipped_steps())   # fp64 replays refimpl's skips
    for q in ("weight", "grad", "exp_avg", "exp_avg_sq"):
        for side, trace in (("refimpl", ours), ("peer", theirs)):
            worst = 0.0
            for k, snap in trace.snapshots.items():
                if q == "grad" and k in skipped:
                    continue          # an overflowed gradient (inf/nan) against fp64's finite one says nothing
                if q in snap and k in fp64.snapshots and q in fp64.snapshots[k]:
                    worst = max([worst, *tensor_errors(snap[q], fp64.snapshots[k][q], skip).values()])
            out.setdefault(q, {})[side] = worst
    if d is not None:
        e_ours, e_theirs = _distance_at(d, ours, fp64, skip), _distance_at(d, theirs, fp64, skip)
        out["at_divergence"] = {"refimpl": e_ours, "peer": e_theirs}
        if e_ours is not None and e_theirs is not None:
            if e_ours < 0.1 * e_theirs:
                out["blame"] = "peer"
                out["verdict"] = f"refimpl is {e_theirs / max(e_ours, 1e-300):.3g}x closer to fp64 there: the peer is off"
            elif e_theirs < 0.1 * e_ours:
                out["blame"] = "refimpl"
                out["verdict"] = f"the peer is {e_ours / max(e_theirs, 1e-300):.3g}x closer to fp64 there: refimpl is off"
            else:
                out["blame"] = "rounding"
                out["verdict"] = "both sides are about as far from fp64 there: rounding, not a bug of either side"
    return out


def _distance_at(d: Difference, trace: Trace, fp64: Trace, skip):
    if d.parameter is None:
        if d.quantity not in ("loss", "grad_norm", "lr"):
            return None
        a = next(r for r in trace.steps if r["step"] == d.step)[d.quantity]
        c = next(r for r in fp64.steps if r["step"] == d.step)[d.quantity]
        return rel(a, c)
    snap, ref = trace.snapshots.get(d.step, {}), fp64.snapshots.get(d.step, {})
    if d.quantity not in snap or d.quantity not in ref:
        return None
    return tensor_errors(snap[d.quantity], ref[d.quantity], skip).get(d.parameter)

"""refimpl's side of a cross-check: the training loop of `refimpl train`, recording a Trace.

Each rank runs refimpl.train.train_step exactly as `refimpl train` does (N simulated ranks as threads). At a
snapshot step every rank takes part in gathering the whole gradient (Engine.gradient_hooks, before the update)
and the whole fp32 master weights and Adam moments (the ZeRO stage's full_state, after it); rank 0 keeps them.

The fp64 reference run is the same loop with ``model.dtype=float64`` and fp16/bf16 off (``fp64_config``). It
starts from the very weights the low-precision run starts from (``initial``: in an fp16/bf16 run, the draw rounded
to 16 bits, which is what its fp32 master holds too) and replays that run's skipped steps (``force_skip``), so both
take their optimizer steps at the same steps and the comparison is step for step.
"""
from __future__ import annotations

import copy

import numpy as np

from ..backend import use_backend
from ..comm.local import LocalWorld, run_ranks
from ..engine import Engine
from ..train import build, train_step
from .trace import Trace


def fp64_config(config: dict) -> dict:
    """The rounding-free reference of ``config``: float64 parameters, activations, reductions and optimizer
    states, no fp16/bf16 (so no loss scale), on the CPU (the NumPy reference when ``config`` runs on a GPU
    backend), everything else the same."""
    from ..backend import get_backend
    cfg = copy.deepcopy(config)
    cfg["model"]["dtype"] = "float64"
    cfg["fp16"]["enabled"] = cfg["bf16"]["enabled"] = False
    if get_backend(cfg["backend"]).is_gpu:
        cfg["backend"] = "numpy"
    return cfg


def initial_weights(config: dict) -> dict:
    """name -> the step-0 weights (as fp32) refimpl starts from: what every peer is loaded with. In an fp16/bf16
    run they are the draw rounded to 16 bits (the fp32 master starts from the rounded parameters)."""
    cfg = copy.deepcopy(config)
    cfg["zero_optimization"] = {**cfg["zero_optimization"], "stage": 0, "offload_param": None,
                                "offload_optimizer": None}   # whole parameters, drawn as every stage draws them
    be, _, model = build(cfg)
    with use_backend(be):
        return {n: np.asarray(a, dtype=np.float32) for n, a in model.state_dict().items()}


def run_refimpl(config: dict, steps: int, snapshot_steps, name: str = "refimpl", force_skips=(), initial=None,
                progress=None) -> Trace:
    """Train ``steps`` optimizer steps as ``config`` says and return rank 0's Trace. ``initial``: name -> weights
    to start from instead of refimpl's own draw."""
    ws, timeout = config["world_size"], config["run"]["comm_timeout"]
    args = (config, steps, set(snapshot_steps), name, set(force_skips), initial, progress)
    if ws == 1:
        return _rank(LocalWorld(1, timeout).comm(0), *args)
    return run_ranks(ws, _rank, *args, timeout=timeout)[0]


def _rank(comm, config, steps, snapshot_steps, name, force_skips, initial, progress) -> Trace:
    be, dataset, model = build(config)
    trace = Trace(name)
    with use_backend(be):
        engine = Engine(model, config, be, comm)
        if initial is not None:   # as a checkpoint loads: master (and the model's copy), fresh moments
            dt = engine.zero.master_dtype
            zeros = {n: np.zeros(np.shape(a), dt) for n, a in initial.items()}
            engine.zero.load_full_state({"master": {n: np.asarray(a, dt) for n, a in initial.items()},
                                                           "exp_avg": zeros, "exp_avg_sq": zeros})
        pending = {}

        def keep_gradient(grad, loss_scale):   # a snapshot step's gradient, whole, unscaled
            if pending.get("want"):
                whole = engine.zero.unpartition(grad)
                pending["grad"] = {n: np.asarray(be.to_numpy(a), dtype=engine.zero.master_dtype) / loss_scale
                                   for n, a in whole.items()}
        engine.gradient_hooks.append(keep_gradient)
        try:
            _steps(engine, trace, config, dataset, model, steps, snapshot_steps, force_skips, pending, progress, name)
        finally:
            engine.close()
    return trace


def _steps(engine, trace, config, dataset, model, steps, snapshot_steps, force_skips, pending, progress, name):
    lead = engine.comm.rank == 0
    for step in range(steps):
        k = step + 1
        pending["want"] = k in snapshot_steps
        loss = train_step(config, dataset, model, engine, step, force_skip=k in force_skips)
        last = engine.last
        if lead:
            trace.record(k, loss=loss, grad_norm=last["grad_norm"], lr=last["lr"],
                         loss_scale=last["loss_scale"], skipped=last["overflow"])
        if k in snapshot_steps:
            full = engine.zero.full_state()       # collective: every rank calls it
            if lead:
                trace.snapshot(k, "grad", pending.pop("grad"))
                for key, quantity in (("master", "weight"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
                    trace.snapshot(k, quantity, {n: np.asarray(a) for n, a in full[key].items()})
        if progress is not None and lead:
            progress(name)

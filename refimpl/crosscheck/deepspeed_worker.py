"""One rank of the DeepSpeed peer: run under torchrun by deepspeed_side.py, never by hand.

    torchrun --standalone --nproc_per_node N -m refimpl.crosscheck.deepspeed_worker SPEC.json

SPEC.json (written by deepspeed_side.py) holds refimpl's resolved config, the DeepSpeed config made from it, the
step-0 weights file, the steps and snapshot steps, the output folder and the process-group backend. The rank
builds refimpl's torch twin from the step-0 weights, hands it to ``deepspeed.initialize`` with that config, and
trains on its slice of refimpl's global batches (refimpl.train.rank_slice), as refimpl's ranks do. Per step it
records the loss (mean over ranks and micro-batches), the learning rate and loss scale the step used, the
global gradient norm and whether DeepSpeed skipped it; at snapshot steps DeepSpeed's own gather APIs
(deepspeed.utils.safe_get_full_grad / _fp32_param / _optimizer_state) give the whole gradient before the
update and the fp32 master weights and Adam moments after it. Rank 0 writes the Trace.
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np


def main(spec_path: str) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state
    from safetensors.numpy import load_file

    from ..data import make_dataset
    from ..interop.torch import TorchTransformer, load_weights, torch_loss
    from ..train import rank_slice
    from .torch_side import model_config
    from .trace import Trace

    spec = json.loads(open(spec_path).read())
    config, steps, snaps = spec["config"], spec["steps"], set(spec["snapshot_steps"])
    deepspeed.init_distributed(dist_backend=spec["dist_backend"])
    rank, N = dist.get_rank(), dist.get_world_size()
    if N != config["world_size"]:
        raise SystemExit(f"torchrun started {N} ranks, the config has world_size {config['world_size']}")
    dataset = make_dataset({k: v for k, v in config["data"].items() if k != "seq_len"})
    twin = load_weights(TorchTransformer(model_config(config, dataset)), load_file(spec["weights"]))
    engine, _, _, _ = deepspeed.initialize(model=twin, model_parameters=twin.parameters(), config=spec["ds_config"])
    named = list(twin.named_parameters())
    micro, gas, T = (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
                     config["data"]["seq_len"])
    trace = Trace("deepspeed")

    def gather(fn, *args):   # every rank takes part in DeepSpeed's gathers; rank 0 keeps the result
        return {n: fn(p, *args).detach().float().cpu().numpy().copy() for n, p in named}

    def moments(key):        # Adam's state exists once a step was applied (the first fp16 steps may skip)
        try:
            return gather(safe_get_full_optimizer_state, key)
        except KeyError:
            return {n: np.zeros(tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape), np.float32)
                    for n, p in named}

    for step in range(steps):
        k = step + 1
        lr, scale, skipped_before = engine.get_lr()[0], _loss_scale(engine), engine.skipped_steps
        loss_sum = 0.0
        for m in range(gas):
            batch = rank_slice(dataset.get_batch("train", step * gas + m, micro * N, T), rank, N)
            loss = torch_loss(twin, batch, device=engine.device, forward=engine)
            engine.backward(loss)
            loss_sum += loss.item()
            if m < gas - 1:
                engine.step()                 # not a boundary: DeepSpeed only counts the micro-step
        if k in snaps:
            grads = gather(safe_get_full_grad)
        engine.step()
        total = torch.tensor([loss_sum], dtype=torch.float64, device=engine.device)   # NCCL: on the GPU
        dist.all_reduce(total)
        total = total.cpu()
        skipped = engine.skipped_steps > skipped_before
        norm = engine.get_global_grad_norm()
        norm = math.inf if skipped or norm is None else float(norm)
        if rank == 0:
            trace.record(k, loss=float(total[0]) / (gas * N), grad_norm=norm, lr=lr, loss_scale=scale,
                         skipped=skipped)
        if k in snaps:
            weights = gather(safe_get_full_fp32_param)
            states = {key: moments(key) for key in ("exp_avg", "exp_avg_sq")}
            if rank == 0:
                trace.snapshot(k, "grad", {n: g / scale for n, g in grads.items()})   # still loss-scaled there
                trace.snapshot(k, "weight", weights)
                for key, arrays in states.items():
                    trace.snapshot(k, key, arrays)
        if rank == 0:
            print(f"deepspeed step {k}/{steps}", file=sys.stderr, flush=True)
    if rank == 0:
        trace.write(spec["out"])
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _loss_scale(engine) -> float:
    """The loss scale the next step uses (1.0 without fp16)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return float(getattr(scaler, "cur_scale", 1.0)) if scaler is not None else 1.0


if __name__ == "__main__":
    code = main(sys.argv[1])
    # Leave without the interpreter's teardown: once in CI (2026-12-04) a rank that had finished every step and
    # written its part aborted there ("terminate called without an active exception", a C++ thread of the
    # DeepSpeed/gloo stack destroyed while joinable), and the run counted as failed. The trace is on disk by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""The PyTorch peer of a cross-check: refimpl's model as torch.nn, trained by torch.optim in one process.

The twin (refimpl/interop/torch.py) starts from refimpl's step-0 weights and sees the same global batches. The
recipe is DeepSpeed's mixed precision written with plain torch, so that what is compared is arithmetic, not
bookkeeping:

    per micro-batch:  loss = cross_entropy(twin(global micro-batch));  (loss * loss_scale / gas).backward()
    at the step:      fp32 master gradients (the twin's fp16/bf16 gradients upcast); any inf/nan -> skip the
                      step and let the loss scale drop; else divide by the loss scale,
                      clip_grad_norm_(gradient_clipping), torch.optim.AdamW / Adam on the fp32 masters, round
                      them into the twin

One process holds the whole global batch, so its mean loss and gradient are what N data-parallel ranks average.
The learning rate and the loss scale follow DeepSpeed's formulas (refimpl.lr_schedules.lr_at,
refimpl.loss_scaler): the DeepSpeed peer checks those, this peer checks the model, autodiff and Adam.
"""
from __future__ import annotations

import math

import numpy as np

from ..data import make_dataset
from ..engine import param_dtype
from ..loss_scaler import make_loss_scaler
from ..lr_schedules import lr_at
from ..model import ModelConfig
from ..optim import adam_w_mode
from .trace import Trace


class PeerError(RuntimeError):
    """A peer cannot run this config, or failed while running it."""


def model_config(config: dict, dataset) -> ModelConfig:
    m = dict(config["model"])
    m["vocab_size"] = m["vocab_size"] or dataset.vocab_size
    if m["task"] == "classify":
        m["n_classes"] = m["n_classes"] or dataset.n_classes
    return ModelConfig.from_dict(m)


def run_torch(config: dict, steps: int, snapshot_steps, weights: dict, progress=None) -> Trace:
    import torch
    from ..interop.torch import TorchTransformer, load_weights, torch_loss
    opt_cfg = config["optimizer"]
    if not opt_cfg["params"]["bias_correction"]:
        raise PeerError("optimizer.params.bias_correction=false: torch.optim.Adam(W) always corrects its bias; "
                        "cross-check this config --against deepspeed")
    dataset = make_dataset({k: v for k, v in config["data"].items() if k != "seq_len"})
    lowp = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
            np.dtype(np.float64): torch.float64}.get(param_dtype(config), torch.bfloat16)
    twin = load_weights(TorchTransformer(model_config(config, dataset)).to(lowp), weights)
    params = dict(twin.named_parameters())
    if lowp in (torch.float32, torch.float64):
        masters = params                                  # the parameters are the master weights
    else:
        masters = {n: torch.tensor(np.asarray(weights[n], np.float32)).requires_grad_() for n in params}  # a copy
    p = opt_cfg["params"]
    adam = torch.optim.AdamW if adam_w_mode(opt_cfg) else torch.optim.Adam
    opt = adam(list(masters.values()), lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
               weight_decay=p["weight_decay"], foreach=False)
    scaler = make_loss_scaler(config)
    micro, gas, N, T = (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
                        config["world_size"], config["data"]["seq_len"])
    trace, applied = Trace("torch"), 0
    for step in range(steps):
        k, scale = step + 1, scaler.loss_scale
        lr = lr_at(applied, config["scheduler"], p["lr"])
        losses = []
        for m in range(gas):
            loss = torch_loss(twin, dataset.get_batch("train", step * gas + m, micro * N, T))
            (loss * (scale / gas)).backward()
            losses.append(loss.item())
        if masters is not params:
            for n, q in params.items():
                masters[n].grad = q.grad.float()
        grads = list(masters.values())
        overflow = not all(bool(torch.isfinite(g.grad).all()) for g in grads)
        if k in snapshot_steps:
            trace.snapshot(k, "grad", {n: (q.grad / scale).detach().numpy() for n, q in masters.items()})
        if overflow:
            grad_norm = math.inf
        else:
            for q in grads:
                q.grad.div_(scale)
            clip = config["gradient_clipping"]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, clip if clip > 0 else math.inf))
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            applied += 1
            if masters is not params:
                with torch.no_grad():
                    for n, q in params.items():
                        q.copy_(masters[n])             # round to the twin's dtype (nearest even)
        scaler.update_scale(overflow)
        for q in list(params.values()) + grads:
            q.grad = None
        trace.record(k, loss=float(np.mean(losses)), grad_norm=grad_norm, lr=lr, loss_scale=scale, skipped=overflow)
        if k in snapshot_steps:
            trace.snapshot(k, "weight", {n: q.detach().numpy().copy() for n, q in masters.items()})
            for key in ("exp_avg", "exp_avg_sq"):
                trace.snapshot(k, key, {n: opt.state[q][key].numpy().copy() if q in opt.state
                                        else np.zeros(tuple(q.shape), np.float32) for n, q in masters.items()})
        if progress is not None:
            progress("torch")
    return trace

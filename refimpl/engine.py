"""The training engine: one optimizer step of mixed-precision data-parallel training (DeepSpeedEngine).

    for each micro-batch:  loss = model(batch);  backward(loss * loss_scale / gradient_accumulation_steps)
                           grads of the low-precision params are added into a flat fp32 accumulator
    at the boundary:       overflow?  -> skip the step, lower the loss scale (fp16)
                           clip coefficient from the global gradient norm
                           AdamW on the flat fp32 master weights, writing the low-precision params back

This is ZeRO stage 0, the baseline every stage is measured against (ZeRO paper §5: "the baseline data
parallel"): every rank holds all model states. Stages 1-3 partition exactly these flat buffers.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from .optim import AdamW, clip_coefficient, lr_at, make_loss_scaler
from .zero.flat import FlatParams


def param_dtype(config: dict):
    """The dtype parameters and gradients are stored in: fp16, bf16 or fp32 (DeepSpeed's sections)."""
    if config["fp16"]["enabled"]:
        return np.dtype(np.float16)
    if config["bf16"]["enabled"]:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float32)


class Engine:
    def __init__(self, model, config: dict, backend):
        self.model, self.config, self.backend = model, config, backend
        self.gas = config["gradient_accumulation_steps"]
        self.flat = FlatParams(model.named_parameters(), backend, dtype=param_dtype(config))
        self.low_precision = self.flat.dtype != np.float32
        # fp32 master weights: a copy for fp16/bf16 params; the param buffer itself in fp32.
        self.master = backend.cast(self.flat.buffer, np.float32) if self.low_precision else self.flat.buffer
        opt = config["optimizer"]
        self.optimizer = AdamW(self.master, backend=backend, lr=opt["params"]["lr"],
                               betas=tuple(opt["params"]["betas"]), eps=opt["params"]["eps"],
                               weight_decay=opt["params"]["weight_decay"], adamw_mode=opt["type"] == "AdamW")
        self.loss_scaler = make_loss_scaler(config)
        self.grad_acc = backend.zeros((self.flat.padded_numel,), np.float32)  # flat fp32 gradient
        self.micro_steps = 0
        self.global_steps = 0      # optimizer steps attempted (DeepSpeed's global_steps)
        self.skipped_steps = 0     # of which skipped for fp16 overflow
        self.last = {}             # facts about the last boundary step, for logging

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.loss_scale

    def current_lr(self) -> float:
        """The LR of the next applied step. The schedule advances only on applied steps: DeepSpeed skips
        scheduler.step() when fp16 overflow skips the optimizer step."""
        return lr_at(self.global_steps - self.skipped_steps, self.config["scheduler"],
                     self.config["optimizer"]["params"]["lr"])

    def backward(self, loss) -> None:
        """Backward of one micro-batch loss; its gradients join the flat fp32 accumulator."""
        scaled = loss * (self.loss_scale / self.gas)
        with np.errstate(over="ignore", invalid="ignore"):  # fp16 overflow is expected; step() detects it
            scaled.backward()
        self.grad_acc += self.flat.flat_grads(np.float32)
        self.model.zero_grad()
        self.micro_steps += 1

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.micro_steps % self.gas == 0

    def step(self) -> bool:
        """Apply the accumulated gradient if at a boundary. Returns False when the step was skipped."""
        if not self.is_gradient_accumulation_boundary():
            return True
        be, scale, lr = self.backend, self.loss_scale, self.current_lr()
        overflow = be.has_inf_or_nan(self.grad_acc)
        self.global_steps += 1
        if overflow:
            self.skipped_steps += 1
            self.last = {"overflow": True, "grad_norm": math.inf, "lr": lr, "loss_scale": scale}
        else:
            grad_norm = math.sqrt(be.sum_squares(self.grad_acc)) / scale
            clip = clip_coefficient(grad_norm, self.config["gradient_clipping"])
            # one divisor folds loss-scale unscaling and clipping, as DeepSpeed's fused Adam does
            self.optimizer.step(self.grad_acc, lr=lr, grad_scale=scale / clip,
                                out_lowp=self.flat.buffer if self.low_precision else None)
            self.last = {"overflow": False, "grad_norm": grad_norm, "lr": lr, "loss_scale": scale}
        self.loss_scaler.update_scale(bool(overflow))
        self.grad_acc[...] = 0
        return not overflow

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything a checkpoint needs beyond the config: host arrays and plain numbers."""
        be = self.backend
        opt = self.optimizer.state_dict()
        return {
            "params": {n: be.to_numpy(a).copy() for n, a in self.flat.unflatten(self.flat.buffer).items()},
            "optimizer": {"master": be.to_numpy(self.master).copy(), "exp_avg": opt["exp_avg"],
                          "exp_avg_sq": opt["exp_avg_sq"]},
            "counters": {"global_steps": self.global_steps, "skipped_steps": self.skipped_steps,
                         "micro_steps": self.micro_steps, "optimizer_step": opt["step"]},
            "loss_scaler": self.loss_scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        be = self.backend
        views = self.flat.unflatten(self.flat.buffer)
        for name, arr in state["params"].items():
            views[name][...] = be.asarray(arr)
        master = state["optimizer"]["master"]
        if master.shape != self.master.shape:
            raise ValueError(f"optimizer master has {master.shape[0]} elements, model needs {self.master.shape[0]}")
        self.master[...] = be.asarray(master)
        c = state["counters"]
        self.optimizer.load_state_dict({"exp_avg": state["optimizer"]["exp_avg"],
                                        "exp_avg_sq": state["optimizer"]["exp_avg_sq"], "step": c["optimizer_step"]})
        self.global_steps, self.skipped_steps, self.micro_steps = c["global_steps"], c["skipped_steps"], c["micro_steps"]
        self.loss_scaler.load_state_dict(state["loss_scaler"])

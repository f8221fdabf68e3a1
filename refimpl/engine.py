"""The training engine: one optimizer step of mixed-precision data-parallel training (DeepSpeedEngine).

    for each micro-batch:  loss = model(this rank's slice of the batch)
                           backward(loss * loss_scale / gradient_accumulation_steps)
                           the ZeRO stage handles the gradients (keep them, or reduce-scatter them now)
    at the boundary:       reduce: this rank's gradient partition, averaged over ranks
                           overflow on any rank?  -> every rank skips the step, the loss scale drops (fp16)
                           clip coefficient from the global gradient norm (shards' squares summed over ranks)
                           stage.apply_update: AdamW on this rank's fp32 partition, writing the low-precision
                           copy, and the new parameters published (all-gather, or nothing)

The stage (refimpl/zero/stage{0,1,2,3}.py, through the protocol of zero/base.py) decides what each rank stores,
where the optimizer runs and which collectives run; this file is the same for all of them, as in DeepSpeed
where the engine wraps a ZeRO optimizer.
"""
from __future__ import annotations

import math
import ml_dtypes
import numpy as np

from .comm.local import LocalWorld
from .memory.ledger import Ledger
from .memory.transfer import OffloadedCheckpoints
from .loss_scaler import MinLossScaleError, make_loss_scaler
from .lr_schedules import lr_at
from .optim import AdamConfig, clip_coefficient
from .zero import ZERO_STAGES, ZeroConfig


def param_dtype(config: dict):
    """The dtype parameters and gradients are stored in: fp16 or bf16 (DeepSpeed's sections), else
    model.dtype (float32, or float64 for the rounding-free reference run)."""
    if config["fp16"]["enabled"]:
        return np.dtype(np.float16)
    if config["bf16"]["enabled"]:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(config["model"].get("dtype", "float32"))


class Engine:
    def __init__(self, model, config: dict, backend, comm=None, *, progress: bool = False):
        self.model, self.config, self.backend = model, config, backend
        self.comm = comm if comm is not None else LocalWorld(1).comm(0)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.gas = config["gradient_accumulation_steps"]
        self.dtype = param_dtype(config)
        self.ledger = Ledger(self.rank, limits={"device": config["memory"]["device_bytes"],
                                                "host": config["memory"]["host_bytes"]})
        self.comm.ledger = self.ledger   # the rank's waits at collectives go into its ledger too
        # the ZeRO stage holds this rank's model states and runs the optimizer on its partition (zero/base.py);
        # progress: a bar while a large model is drawn, partitioned and handed to the optimizer
        zero = ZeroConfig.from_config(config)
        self.zero = ZERO_STAGES[zero.stage](model, zero, AdamConfig.from_section(config["optimizer"]), backend,
                                            self.comm, self.dtype, ledger=self.ledger, progress=progress)
        self.optimizer = self.zero.optimizer   # AdamW on the device, or OffloadedAdamW (ZeRO-Offload)
        if config["activation_checkpointing"]["cpu_checkpointing"]:   # the blocks' inputs wait in the host tier
            model.checkpoint_host = OffloadedCheckpoints(self.zero.copies)
        self.loss_scaler = make_loss_scaler(config)
        self.micro_steps = 0
        self.global_steps = 0      # optimizer steps attempted (DeepSpeed's global_steps)
        self.skipped_steps = 0     # of which skipped for fp16 overflow
        self.last = {}             # facts about the last boundary step, for logging
        # callables (grad_partition, loss_scale) run at each boundary on the reduced, still loss-scaled gradient
        # partition, before the overflow check: how `refimpl crosscheck` records gradients
        self.gradient_hooks = []

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.loss_scale

    def current_lr(self) -> float:
        """The LR of the next applied step. The schedule advances only on applied steps: DeepSpeed skips
        scheduler.step() when fp16 overflow skips the optimizer step."""
        return lr_at(self.global_steps - self.skipped_steps, self.config["scheduler"],
                     self.config["optimizer"]["params"]["lr"])

    def backward(self, loss) -> None:
        """Backward of one micro-batch loss; the ZeRO stage takes the gradients from there."""
        scaled = loss * (self.loss_scale / self.gas)
        with np.errstate(over="ignore", invalid="ignore"):  # fp16 overflow is expected; step() detects it
            scaled.backward()
            self.zero.after_backward()
        self.micro_steps += 1

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.micro_steps % self.gas == 0

    def _all_ranks(self, value: float, op: str) -> float:
        return float(self.comm.all_reduce(np.array([value], dtype=np.float64), op=op)[0])

    def step(self, force_skip: bool = False) -> bool:
        """Apply the accumulated gradient if at a boundary. Returns False when the step was skipped.

        ``force_skip``: skip this step as an fp16 overflow would (the fp64 reference run of a cross-check
        replays the skipped steps of the run it arbitrates)."""
        if not self.is_gradient_accumulation_boundary():
            return True
        scale, lr = self.loss_scale, self.current_lr()
        with np.errstate(over="ignore", invalid="ignore"):
            grad = self.zero.reduce_gradients()             # (S,) mean over ranks, still loss-scaled
            for hook in self.gradient_hooks:
                hook(grad, scale)
            be = self.zero.grad_kernels   # the kernels of the gradient's tier: the device's, or the host's
            # One pass for both: squares of 16/32-bit floats summed in float64 cannot overflow, so the sum is
            # finite exactly when every element is (float64 gradients, the fp64 run, are checked on their own).
            sq = be.sum_squares(grad) if np.dtype(grad.dtype).itemsize <= 4 else None
            bad = be.has_inf_or_nan(grad) if sq is None else not math.isfinite(sq)
            overflow = self._all_ranks(float(bad), "max") > 0 or force_skip  # any rank: all
        self.global_steps += 1
        if overflow:
            self.skipped_steps += 1
            self.last = {"overflow": True, "grad_norm": math.inf, "lr": lr, "loss_scale": scale}
        else:
            sq = be.sum_squares(grad) if sq is None else sq
            if self.zero.partitioned:
                sq = self._all_ranks(sq, "sum")
            grad_norm = math.sqrt(sq) / scale
            clip = clip_coefficient(grad_norm, self.config["gradient_clipping"])
            # unscaling and clipping folded into one divisor (one pass over the gradient)
            self.zero.apply_update(grad, lr=lr, grad_scale=scale / clip)
            self.last = {"overflow": False, "grad_norm": grad_norm, "lr": lr, "loss_scale": scale}
        try:
            self.loss_scaler.update_scale(bool(overflow))
        except MinLossScaleError as exc:   # DeepSpeed ends the run here too
            raise MinLossScaleError(f"optimizer step {self.global_steps}: {exc}") from None
        self.zero.zero_grads()
        return not overflow

    def close(self) -> None:
        """Stop the NVMe tiers' I/O threads and release their swap folders (the run is over)."""
        self.zero.close()

    # ------------------------------------------------------------------------------------ state
    def counters(self) -> dict:
        return {"global_steps": self.global_steps, "skipped_steps": self.skipped_steps,
                "micro_steps": self.micro_steps, "optimizer_step": self.optimizer.step_count}

    def load_counters(self, c: dict, loss_scaler: dict) -> None:
        self.global_steps, self.skipped_steps, self.micro_steps = c["global_steps"], c["skipped_steps"], c["micro_steps"]
        self.optimizer.step_count = c["optimizer_step"]
        self.loss_scaler.load_state_dict(loss_scaler)

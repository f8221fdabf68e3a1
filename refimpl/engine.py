"""The training engine: one optimizer step of mixed-precision data-parallel training (DeepSpeedEngine).

    for each micro-batch:  loss = model(this rank's slice of the batch)
                           backward(loss * loss_scale / gradient_accumulation_steps)
                           the ZeRO stage handles the gradients (keep them, or reduce-scatter them now)
    at the boundary:       this rank's fp32 gradient partition, averaged over ranks
                           overflow on any rank?  -> every rank skips the step, the loss scale drops (fp16)
                           clip coefficient from the global gradient norm (shards' squares summed over ranks)
                           AdamW on this rank's fp32 partition, writing the low-precision copy
                           the ZeRO stage publishes the new parameters (all-gather, or nothing)

The stage (refimpl/zero/stage{0,1,2,3}.py) decides what each rank stores and which collectives run; this file
is the same for all of them, as in DeepSpeed where the engine wraps a ZeRO optimizer.
"""
from __future__ import annotations

import math
from pathlib import Path

import ml_dtypes
import numpy as np

from .backend import host_backend
from .comm.local import LocalWorld
from .kernels import array_module
from .memory.ledger import Ledger
from .memory.optimizer_offload import OffloadedAdamW, sub_groups
from .memory.store import make_store
from .memory.transfer import OffloadedCheckpoints
from .loss_scaler import MinLossScaleError, make_loss_scaler
from .lr_schedules import lr_at
from .optim import AdamW, adam_w_mode, clip_coefficient
from .zero import ZERO_STAGES


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
        self.progress = progress   # a bar while zero.Init draws and partitions the parameters (large models)
        self.comm = comm if comm is not None else LocalWorld(1).comm(0)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.gas = config["gradient_accumulation_steps"]
        self.dtype = param_dtype(config)
        self.ledger = Ledger(self.rank, limits={"device": config["memory"]["device_bytes"],
                                                "host": config["memory"]["host_bytes"]})
        self.zero = ZERO_STAGES[config["zero_optimization"]["stage"]](model, config, backend, self.comm, self.dtype,
                                                                     ledger=self.ledger, progress=progress)
        self.optimizer = None
        try:
            self.optimizer = self._make_optimizer()
        except BaseException:
            self.close()       # a swap folder taken by the stage is given back at once
            raise
        if config["activation_checkpointing"]["cpu_checkpointing"]:   # the blocks' inputs wait in the host tier
            model.checkpoint_host = OffloadedCheckpoints(self.zero.copies)
        self.ledger.budget.alloc("device", self._device_model_state_bytes(), "the model states kept on the device")
        if self._grads_on_host():
            self.ledger.budget.alloc("host", self.zero.model_state_bytes()["grads"], "the gradient partition")
        self.loss_scaler = make_loss_scaler(config)
        self.micro_steps = 0
        self.global_steps = 0      # optimizer steps attempted (DeepSpeed's global_steps)
        self.skipped_steps = 0     # of which skipped for fp16 overflow
        self.last = {}             # facts about the last boundary step, for logging
        # callables (grad_partition, loss_scale) run at each boundary on the reduced, still loss-scaled gradient
        # partition, before the overflow check: how `refimpl crosscheck` records gradients
        self.gradient_hooks = []

    def _make_optimizer(self):
        """AdamW on the device, or on the host with its states in host memory or NVMe files (ZeRO-Offload).
        Stage 3 hands over the fp32 master in pieces, read back from its parameter tier (master_pieces)."""
        opt, zcfg = self.config["optimizer"], self.config["zero_optimization"]
        p = opt["params"]
        kw = dict(backend=self.backend, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                  weight_decay=p["weight_decay"], adamw_mode=adam_w_mode(opt), bias_correction=p["bias_correction"])
        layout = self.zero.layout
        off = zcfg["offload_optimizer"]
        if off is None or off["device"] == "none":
            if self.zero.master is None:       # stage 3: assemble the device partition piece by piece
                self.zero.master, lo = self.backend.empty((layout.partition_numel,), self.zero.master_dtype), 0
                for piece in self._master_pieces():
                    self.zero.master[lo:lo + piece.size] = piece
                    lo += piece.size
            return AdamW(self.zero.master, **kw)
        path = Path(off["nvme_path"]) / f"zero_stage_{zcfg['stage']}" / "optimizer" / f"rank{self.rank}" \
            if off["device"] == "nvme" else None
        store = make_store(off["device"], path, self.config["aio"])   # DeepSpeed's aio section, by its own names
        groups = sub_groups([s.chunk for s in layout.slots], zcfg["sub_group_size"])
        try:
            optimizer = OffloadedAdamW(self._master_pieces(), numel=layout.partition_numel, groups=groups,
                                       store=store, ledger=self.ledger, buffer_count=off["buffer_count"],
                                       dtype=self.zero.master_dtype, **kw)
        except BaseException:
            store.close()
            raise
        self.zero.master = None  # the fp32 master now lives in the host or NVMe tier only
        return optimizer

    def _master_pieces(self):
        pieces = self.zero.master_pieces()
        if not self.progress:
            return pieces
        from tqdm import tqdm
        return tqdm(pieces, total=len(self.zero.params), unit="param", desc=f"rank {self.rank}: fp32 master",
                    disable=self.rank != 0)

    def _device_model_state_bytes(self) -> int:
        """Model-state bytes this rank keeps on the device: what model_state_bytes counts, less what is offloaded."""
        b = self.zero.model_state_bytes()
        params = b["params"]
        if getattr(self.zero, "swapper", None) is not None:   # stage 3, offload_param: only persistent params stay
            params -= self.zero.layout.partition_numel * self.dtype.itemsize
        optimizer = 0 if self.zero.master is None else b["optimizer"]
        grads = 0 if self._grads_on_host() else b["grads"]
        return params + grads + optimizer

    def _grads_on_host(self) -> bool:
        """Stages 2-3 with the optimizer offloaded keep the gradient partition on the host (ZeRO-Offload)."""
        return self.zero.grads_on_host and self.zero.stage >= 2

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
            # the optimizer offloaded: the gradient is in host memory, checked there by the host backend's kernels
            be = host_backend(self.backend) if array_module(grad) is np else self.backend
            overflow = self._all_ranks(float(be.has_inf_or_nan(grad)), "max") > 0 or force_skip  # any rank: all
        self.global_steps += 1
        if overflow:
            self.skipped_steps += 1
            self.last = {"overflow": True, "grad_norm": math.inf, "lr": lr, "loss_scale": scale}
        else:
            sq = be.sum_squares(grad)
            if self.zero.partitioned:
                sq = self._all_ranks(sq, "sum")
            grad_norm = math.sqrt(sq) / scale
            clip = clip_coefficient(grad_norm, self.config["gradient_clipping"])
            # unscaling and clipping folded into one divisor (one pass over the gradient)
            on_device = isinstance(self.optimizer, AdamW)
            out_lowp = self.zero.lowp_output(streaming=not on_device)  # offloaded: written sub-group by sub-group
            if on_device:   # (the offloaded optimizer records its own sub-groups)
                with self.ledger.compute("optimizer step", on_device=True):
                    self.optimizer.step(grad, lr=lr, grad_scale=scale / clip, out_lowp=out_lowp)
            else:
                self.optimizer.step(grad, lr=lr, grad_scale=scale / clip, out_lowp=out_lowp)
            self.zero.publish_params(out_lowp)
            self.last = {"overflow": False, "grad_norm": grad_norm, "lr": lr, "loss_scale": scale}
        try:
            self.loss_scaler.update_scale(bool(overflow))
        except MinLossScaleError as exc:   # DeepSpeed ends the run here too
            raise MinLossScaleError(f"optimizer step {self.global_steps}: {exc}") from None
        self.zero.zero_grads()
        return not overflow

    def close(self) -> None:
        """Stop the NVMe tiers' I/O threads and release their swap folders (the run is over)."""
        for store in (getattr(self.optimizer, "store", None), getattr(getattr(self.zero, "swapper", None), "store",
                                                                           None)):
            if store is not None:
                store.close()

    # ------------------------------------------------------------------------------------ state
    def counters(self) -> dict:
        return {"global_steps": self.global_steps, "skipped_steps": self.skipped_steps,
                "micro_steps": self.micro_steps, "optimizer_step": self.optimizer.step_count}

    def load_counters(self, c: dict, loss_scaler: dict) -> None:
        self.global_steps, self.skipped_steps, self.micro_steps = c["global_steps"], c["skipped_steps"], c["micro_steps"]
        self.optimizer.step_count = c["optimizer_step"]
        self.loss_scaler.load_state_dict(loss_scaler)

"""The ZeRO stage protocol: what the engine asks of a stage (ZeRO §5; DeepSpeed's ZeRO optimizers).

DeepSpeed wraps the optimizer in a ZeRO optimizer (runtime/zero/stage_1_and_2.py, stage3.py) that decides what
each rank stores and which collectives run; the engine drives every stage the same way. Here the engine
(refimpl/engine.py) calls, per optimizer step:

    after_backward()                        once per micro-batch, after loss.backward()
    reduce_gradients()                      at the accumulation boundary: this rank's gradient partition, the
                                            mean over ranks, still loss-scaled (``grad_kernels`` read it)
    apply_update(grad, lr=, grad_scale=)    AdamW on this rank's partition, then the new low-precision
                                            parameters made visible to the model
    zero_grads()

and reads ``partitioned`` (norms sum over ranks), ``grad_kernels`` (the kernels of the gradient's tier),
``optimizer`` (its step count and partitions, for checkpoints) and ``copies`` (the rank's copy stream, which
activation offload shares). For checkpoints and reports: ``full_state``, ``load_full_state``, ``full_params``,
``unpartition``, ``model_state_bytes``, ``layout``, ``master_dtype``, and ``close`` at the end.

The stages (stage0.py .. stage3.py) are siblings, each readable alone. They share this base (the rank's
identity, the optimizer on or off the device, the byte budgets, checkpoints), zero/buckets.py (stages 2-3
reduce-scatter gradients in buckets during backward) and zero/grad_offload.py (where reduced gradients go when
the optimizer runs on the host).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..memory.ledger import Ledger
from ..memory.optimizer_offload import KEYS, OffloadedAdamW, sub_groups
from ..memory.tiers import make_store
from ..memory.transfer import CopyStream
from ..optim import AdamConfig, AdamW
from .config import ZeroConfig
from .grad_offload import GradientTier
from .partition import PartitionLayout


class ZeroStage(ABC):
    stage: int
    partitioned: bool   # does each rank own only a slice of the optimizer state (so norms sum over ranks)?

    def __init__(self, model, cfg: ZeroConfig, adam: AdamConfig, backend, comm, dtype, *, ledger=None,
                 progress: bool = False):
        self.model, self.cfg, self.backend, self.comm = model, cfg, backend, comm
        self.rank, self.world_size = comm.rank, comm.world_size
        self.ledger = ledger if ledger is not None else Ledger(comm.rank)   # tier traffic is recorded here
        self.copies = CopyStream(backend, self.ledger)   # host <-> device copies beside compute (GPU backends)
        self.dtype = np.dtype(dtype)
        # the fp32 master, gradient reductions and Adam moments; all float64 in the fp64 reference run
        self.master_dtype = np.dtype(np.float64 if self.dtype == np.float64 else np.float32)
        self.progress = progress   # a bar while a large model is drawn, partitioned and handed to the optimizer
        named = list(model.named_parameters())
        self.params = dict(named)
        self.layout = PartitionLayout([(n, p.shape) for n, p in named], self.world_size if self.partitioned else 1)
        # ZeRO-Offload: with the optimizer on the host, reduced gradients go there as they are produced
        self.grads = GradientTier(cfg.offload_optimizer is not None, backend, self.copies)
        self.grad_kernels = self.grads.kernels
        self.master = None         # this rank's fp32 master partition on the device (None once offloaded)
        self.swapper = None        # stage 3's parameter offload tier
        self.optimizer = None
        try:
            self._init_states()
            self.optimizer = self._build_optimizer(adam)
        except BaseException:
            self.close()           # a swap folder taken already is given back at once
            raise
        self._charge_budgets()

    # ------------------------------------------------------------------------------------ the protocol
    @abstractmethod
    def _init_states(self) -> None:
        """Hold this rank's parameters, its gradient space and its fp32 master (or what master_pieces reads)."""

    @abstractmethod
    def after_backward(self) -> None:
        """Once per micro-batch, after loss.backward(): the gradients of this micro-batch are complete."""

    @abstractmethod
    def reduce_gradients(self):
        """At the accumulation boundary: this rank's gradient partition, the mean over ranks, still loss-scaled."""

    @abstractmethod
    def apply_update(self, grad, *, lr: float, grad_scale: float) -> None:
        """AdamW on this rank's partition (the gradient divided by ``grad_scale``: loss scale and clipping in one
        divisor), writing the new low-precision parameters; then make them visible to the model."""

    @abstractmethod
    def zero_grads(self) -> None:
        """Forget this step's gradients."""

    @abstractmethod
    def full_params(self) -> dict:
        """name -> the whole low-precision parameter (for model.safetensors; a collective when partitioned)."""

    @abstractmethod
    def _load_lowp(self, lowp) -> None:
        """Install this rank's low-precision partition (the rounded master of a loaded checkpoint) and publish it."""

    @abstractmethod
    def _param_bytes(self) -> int: ...

    @abstractmethod
    def _grad_bytes(self) -> int: ...

    # --------------------------------------------------------------------------------------- the optimizer
    def master_pieces(self):
        """This rank's fp32 master partition, in pieces in partition order (stage 3: one per parameter)."""
        yield self.master

    def _build_optimizer(self, adam: AdamConfig):
        """AdamW on the device, or on the host with its states in a host or NVMe store (ZeRO-Offload; the
        infinity offload engine), filled from master_pieces so the partition need never be whole in memory."""
        off = self.cfg.offload_optimizer
        if off is None:
            if self.master is None:       # stage 3: assemble the device partition piece by piece
                self.master, lo = self.backend.empty((self.layout.partition_numel,), self.master_dtype), 0
                for piece in self._master_pieces_shown():
                    self.master[lo:lo + piece.size] = self.backend.asarray(piece)   # (a host piece goes up)
                    lo += piece.size
            return AdamW(self.master, backend=self.backend, **adam.kwargs())
        store = make_store(off.device, off.swap_folder(self.stage, "optimizer", self.rank), self.cfg.aio)
        groups = sub_groups([s.chunk for s in self.layout.slots], self.cfg.sub_group_size)
        # Twin-Flow (offload_optimizer.ratio): DeepSpeed keeps the first sub-groups on the device in stage 3 only
        on_device = off.device_groups(len(groups)) if self.stage == 3 else 0
        try:
            optimizer = OffloadedAdamW(self._master_pieces_shown(), numel=self.layout.partition_numel,
                                       groups=groups, backend=self.backend, store=store, ledger=self.ledger,
                                       buffer_count=off.buffer_count, dtype=self.master_dtype,
                                       device_groups=on_device, copies=self.copies, **adam.kwargs())
        except BaseException:
            store.close()
            raise
        self.master = None   # the fp32 master now lives in the optimizer's tier only
        return optimizer

    def _master_pieces_shown(self):
        pieces = self.master_pieces()
        if not self.progress:
            return pieces
        from tqdm import tqdm
        return tqdm(pieces, total=len(self.params), unit="param", desc=f"rank {self.rank}: fp32 master",
                    disable=self.rank != 0)

    def _step(self, grad, lr, grad_scale, out_lowp, overlap=False) -> None:
        """One AdamW step writing ``out_lowp``; on the device it is timed on the device's clock (the offloaded
        optimizer records its own sub-groups, and may run them beside what comes next: ``overlap``)."""
        if self.cfg.offload_optimizer is None:
            with self.ledger.compute("optimizer step", on_device=True):
                self.optimizer.step(grad, lr=lr, grad_scale=grad_scale, out_lowp=out_lowp)
        else:
            self.optimizer.step(grad, lr=lr, grad_scale=grad_scale, out_lowp=out_lowp, overlap=overlap)

    def close(self) -> None:
        """Stop the offload tiers' I/O threads and release their swap folders (the run is over)."""
        for store in (getattr(self.optimizer, "store", None), getattr(self.swapper, "store", None)):
            if store is not None:
                store.close()

    # ------------------------------------------------------------------------------------- accounting
    def model_state_bytes(self) -> dict:
        """Bytes of model states this rank holds, by kind (ZeRO §3.1's Ψ arithmetic, from what is allocated)."""
        return {"params": self._param_bytes(), "grads": self._grad_bytes(), "optimizer": self._optimizer_bytes()}

    def _optimizer_bytes(self) -> int:
        return 3 * self.master_dtype.itemsize * self.layout.partition_numel   # master, exp_avg, exp_avg_sq

    def _charge_budgets(self) -> None:
        """The model states held on the device, and a gradient partition kept on the host, against the budgets
        (the offload tiers charge what they hold themselves)."""
        b = self.model_state_bytes()
        params = b["params"] - (0 if self.swapper is None else self.layout.partition_numel * self.dtype.itemsize)
        grads = 0 if self._grad_partition_on_host() else b["grads"]
        optimizer = b["optimizer"] if self.cfg.offload_optimizer is None else 0
        self.ledger.budget.alloc("device", params + grads + optimizer, "the model states kept on the device")
        if self._grad_partition_on_host():
            self.ledger.budget.alloc("host", b["grads"], "the gradient partition")

    def _grad_partition_on_host(self) -> bool:
        """Stages 2-3 keep a gradient partition, on the host when the optimizer is offloaded (stages 0-1 keep
        whole gradients on the device and move only the reduced partition, at the boundary)."""
        return False

    # ------------------------------------------------------------------------------------- checkpoints
    def full_state(self) -> dict:
        """name -> full fp32 arrays of master, exp_avg, exp_avg_sq (what a checkpoint stores per parameter)."""
        return {key: self.unpartition(arr) for key, arr in self.optimizer.partitions().items()}

    def unpartition(self, partition) -> dict:
        """name -> the whole parameter-shaped array, from this rank's partition of a flat array laid out like the
        master (an all-gather when partitioned: every rank must call it)."""
        return self.layout.unpartition(self.comm.all_gather(partition) if self.partitioned else partition)

    def load_full_state(self, full: dict) -> None:
        """Inverse of full_state: cut this rank's partition out of full per-parameter arrays; the low-precision
        parameters are always the rounded master."""
        parts = {key: self.layout.partition(full[key], self.rank) for key in KEYS}
        self.optimizer.load_partitions(parts)
        self._load_lowp(self.backend.cast(self.backend.asarray(parts["master"]), self.dtype))

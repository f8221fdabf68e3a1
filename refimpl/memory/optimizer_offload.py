"""Optimizer-state offload: AdamW whose fp32 partitions live in host memory or in NVMe files.

ZeRO-Offload (Ren et al. 2021) and ZeRO-Infinity §5 (infinity offload engine): the fp32 master weights and
Adam moments — 12 of the 16 bytes per parameter — leave the device. The step runs on the host, sub-group by
sub-group (`sub_group_size` elements, DeepSpeed's name), so only a few sub-groups' states are in host memory at
once. With NVMe the sub-groups are pipelined (DeepSpeed's PipelinedOptimizerSwapper):

    read  sub-group i+1  (nvme -> host, async)
    step  sub-group i    (host compute)
    write sub-group i    (host -> nvme, async; waited for before its buffer is reused)

Offload moves bytes and must not change them: the same elementwise kernel runs on the same numbers as the
on-device AdamW, so results are bitwise equal (tests/test_offload.py).
"""
from __future__ import annotations

import numpy as np

from ..kernels import optim as reference_kernels
from .nvme import aligned_empty

KEYS = ("master", "exp_avg", "exp_avg_sq")


class OffloadedAdamW:
    """Same interface as refimpl.optim.AdamW (step, step_count, partitions, load_partitions)."""

    def __init__(self, master_init, *, backend, device: str, sub_group_size: int, ledger, store=None,
                 buffer_count: int = 4, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, adamw_mode=True,
                 name: str = "optim"):
        if device not in ("cpu", "nvme"):
            raise ValueError(f"offload_optimizer.device must be 'cpu' or 'nvme' here, got {device!r}")
        if device == "nvme" and store is None:
            raise ValueError("offload_optimizer.device 'nvme' needs an NVMe store (offload_optimizer.nvme_path)")
        self.backend, self.device, self.ledger, self.store, self.name = backend, device, ledger, store, name
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.weight_decay, self.adamw_mode = float(weight_decay), bool(adamw_mode)
        self.step_count = 0
        # the host kernel: a CPU backend's own adam_step; the NumPy reference behind a GPU backend
        self.host_adam_step = reference_kernels.adam_step if backend.is_gpu else backend.adam_step
        self.numel = int(master_init.size)
        size = max(1, int(sub_group_size))
        self.groups = [(lo, min(lo + size, self.numel)) for lo in range(0, self.numel, size)] or [(0, 0)]
        host_master = backend.to_numpy(master_init).astype(np.float32, copy=True)
        if device == "cpu":
            self.host = {"master": host_master, "exp_avg": np.zeros_like(host_master),
                         "exp_avg_sq": np.zeros_like(host_master)}
            ledger.alloc("host", 3 * host_master.nbytes, "the offloaded optimizer states (offload_optimizer=cpu)")
        else:
            self.buffer_count = max(3, int(buffer_count))  # sub-group buffer sets: read-ahead, compute, writes
            for i, (lo, hi) in enumerate(self.groups):
                for key in KEYS:
                    self.store.allocate(self._key(key, i), (hi - lo) * 4)
                init = {"master": host_master[lo:hi], "exp_avg": np.zeros(hi - lo, np.float32),
                        "exp_avg_sq": np.zeros(hi - lo, np.float32)}
                for key in KEYS:
                    self.store.write(self._key(key, i), init[key]).wait()
            ledger.alloc("nvme", 3 * host_master.nbytes, "the offloaded optimizer states")

    def _key(self, key: str, group: int) -> str:
        return f"{self.name}.{key}.sg{group}"

    # -------------------------------------------------------------------------------------------- step
    def step(self, grad, *, lr=None, grad_scale=1.0, out_lowp=None) -> None:
        """One AdamW step of this rank's partition, on the host; `out_lowp` (device) gets the new low-precision
        parameters. grad is this rank's fp32 gradient partition (device)."""
        self.step_count += 1
        lr = self.lr if lr is None else float(lr)
        # host working memory of the step, charged to the host budget: the gradient and the new low-precision copy
        working = self.numel * 4 + (0 if out_lowp is None else self.numel * out_lowp.dtype.itemsize)
        self.ledger.alloc("host", working, "the optimizer step's host copies of the gradient and parameters")
        try:
            self._step(grad, lr, grad_scale, out_lowp)
        finally:
            self.ledger.free("host", working)

    def _step(self, grad, lr, grad_scale, out_lowp) -> None:
        with self.ledger.transfer("device", "host", grad.nbytes, "grad partition"):
            grad_host = np.asarray(self.backend.to_numpy(grad), dtype=np.float32)
        lowp_host = None if out_lowp is None else np.empty(self.numel, dtype=out_lowp.dtype)
        kw = dict(lr=lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay,
                  step=self.step_count, grad_scale=grad_scale, adamw_mode=self.adamw_mode)
        if self.device == "cpu":
            for lo, hi in self.groups:
                with self.ledger.compute(f"adam sub-group {lo}:{hi}"):
                    self.host_adam_step(self.host["master"][lo:hi], grad_host[lo:hi], self.host["exp_avg"][lo:hi],
                                        self.host["exp_avg_sq"][lo:hi], **kw,
                                        out_lowp=None if lowp_host is None else lowp_host[lo:hi])
        else:
            self._pipelined_nvme_step(grad_host, lowp_host, kw)
        if out_lowp is not None:
            with self.ledger.transfer("host", "device", lowp_host.nbytes, "low-precision partition"):
                self.backend.copy_async(out_lowp, self.backend.asarray(lowp_host))
                self.backend.synchronize()

    def _read_group(self, i: int) -> tuple[dict, list, float]:
        lo, hi = self.groups[i]
        self.ledger.alloc("host", 3 * (hi - lo) * 4, f"the buffers of optimizer sub-group {i} (sub_group_size)")
        # 4096-aligned host buffers: O_DIRECT reads land in them without a bounce copy
        bufs = {key: aligned_empty((hi - lo) * 4).view(np.float32) for key in KEYS}
        handles = [self.store.read(self._key(key, i), bufs[key]) for key in KEYS]
        return bufs, handles

    def _pipelined_nvme_step(self, grad_host, lowp_host, kw) -> None:
        n = len(self.groups)
        reads = {0: self._read_group(0)}          # group -> (buffers, pending read handles, issue time)
        writes: list = []                          # pending write handles, oldest first
        for i, (lo, hi) in enumerate(self.groups):
            if i + 1 < n:
                reads[i + 1] = self._read_group(i + 1)          # read ahead while this group computes
            bufs, handles = reads.pop(i)
            nbytes = 3 * (hi - lo) * 4
            with self.ledger.wait("nvme", "host", f"optimizer sub-group {i}"):
                for h in handles:
                    h.wait()
            for key in KEYS:                      # a swap file changed behind our back is an error, not data
                self.store.verify(self._key(key, i), bufs[key])
            self._record("nvme", "host", handles, nbytes, i)
            with self.ledger.compute(f"adam sub-group {i}"):
                self.host_adam_step(bufs["master"], grad_host[lo:hi], bufs["exp_avg"], bufs["exp_avg_sq"], **kw,
                                    out_lowp=None if lowp_host is None else lowp_host[lo:hi])
            writes.append((nbytes, i, [self.store.write(self._key(key, i), bufs[key]) for key in KEYS]))
            while len(writes) > self.buffer_count - 2:     # bound the buffers held by in-flight writes
                self._finish_write(*writes.pop(0))
        while writes:
            self._finish_write(*writes.pop(0))

    def _record(self, src, dst, handles, nbytes, i) -> None:
        """The transfer as the disk saw it: from the first request's issue to the last one's completion."""
        t0 = self.ledger.t0
        self.ledger.add("transfer", min(h.start for h in handles) - t0, max(h.end for h in handles) - t0,
                        src=src, dst=dst, nbytes=nbytes, label=f"optimizer sub-group {i}")

    def _finish_write(self, nbytes, i, handles) -> None:
        with self.ledger.wait("host", "nvme", f"optimizer sub-group {i}"):
            for h in handles:
                h.wait()
        self.ledger.free("host", nbytes)   # the sub-group's buffers can go
        self._record("host", "nvme", handles, nbytes, i)

    # -------------------------------------------------------------------------------------- checkpoints
    def partitions(self) -> dict:
        if self.device == "cpu":
            return {key: self.host[key].copy() for key in KEYS}
        out = {key: np.empty(self.numel, np.float32) for key in KEYS}
        for i, (lo, hi) in enumerate(self.groups):
            for key in KEYS:
                self.store.read_sync(self._key(key, i), out[key][lo:hi])   # verified
        return out

    def load_partitions(self, parts: dict) -> None:
        for key in KEYS:
            if parts[key].shape != (self.numel,):
                raise ValueError(f"load_partitions: {key!r} has shape {parts[key].shape}, the partition has "
                                 f"({self.numel},)")
        if self.device == "cpu":
            for key in KEYS:
                self.host[key][...] = parts[key]
            return
        for i, (lo, hi) in enumerate(self.groups):
            for key in KEYS:
                self.store.write(self._key(key, i), np.ascontiguousarray(parts[key][lo:hi], np.float32)).wait()

"""Optimizer-state offload: AdamW whose fp32 partitions live in host memory or in NVMe files.

ZeRO-Offload (Ren et al. 2021) and ZeRO-Infinity §5 (infinity offload engine): the fp32 master weights and
Adam moments — 12 of the 16 bytes per parameter — leave the device. The step runs on the host, sub-group by
sub-group (runs of whole parameters holding at least `sub_group_size` elements, as DeepSpeed's stage 3 forms
them), so only a few sub-groups' states are in host memory at once. The gradient partition is on the host already
(the ZeRO stage moved it there as it was reduced) and is upcast to fp32 one sub-group at a time. With NVMe the
sub-groups are pipelined (DeepSpeed's PipelinedOptimizerSwapper):

    read  sub-group i+1  (nvme -> host, async)
    step  sub-group i    (host compute)
    write sub-group i    (host -> nvme, async; waited for before its buffer is reused), and its new
                         low-precision parameters (to the device, or to the parameter offload tier)

Offload moves bytes and must not change them: the same elementwise kernel runs on the same numbers as the
on-device AdamW, so results are bitwise equal (tests/test_offload.py).
"""
from __future__ import annotations

import numpy as np

from ..backend import host_backend
from .nvme import aligned_empty
from .param_offload import PartitionUpdate

KEYS = ("master", "exp_avg", "exp_avg_sq")


def sub_groups(chunk_sizes, sub_group_size: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of the partition, each a run of whole parameter chunks, closed once it holds at least
    `sub_group_size` elements (DeepSpeed stage 3's `_create_fp16_sub_groups`): a parameter is never split, so a
    sub-group's new low-precision values are whole parameter chunks, ready to write back."""
    groups, lo, pos = [], 0, 0
    for n in chunk_sizes:
        pos += int(n)
        if pos - lo >= sub_group_size:
            groups.append((lo, pos))
            lo = pos
    if pos > lo or not groups:
        groups.append((lo, pos))
    return groups


class OffloadedAdamW:
    """Same interface as refimpl.optim.AdamW (step, step_count, partitions, load_partitions).

    `master_pieces`: this rank's fp32 master partition as arrays in partition order (one per parameter under
    zero.Init, or one whole array); they go straight to the host or NVMe tier, so the partition never has to
    be in memory at once. `groups`: the sub-groups, [lo, hi) ranges covering [0, numel)."""

    def __init__(self, master_pieces, *, numel: int, groups, backend, device: str, ledger, store=None,
                 buffer_count: int = 4, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, adamw_mode=True,
                 bias_correction=True, name: str = "optim", dtype=np.float32):
        if device not in ("cpu", "nvme"):
            raise ValueError(f"offload_optimizer.device must be 'cpu' or 'nvme' here, got {device!r}")
        if device == "nvme" and store is None:
            raise ValueError("offload_optimizer.device 'nvme' needs an NVMe store (offload_optimizer.nvme_path)")
        self.backend, self.device, self.ledger, self.store, self.name = backend, device, ledger, store, name
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.weight_decay, self.adamw_mode = float(weight_decay), bool(adamw_mode)
        self.bias_correction = bool(bias_correction)
        self.dtype = np.dtype(dtype)          # fp32; float64 in the fp64 reference run
        item = self.dtype.itemsize
        self.step_count = 0
        # the host kernel: a CPU backend's own adam_step; behind a GPU backend numba's, else the NumPy reference
        self.host_adam_step = host_backend(backend).adam_step
        self.numel, self.groups = int(numel), [(int(lo), int(hi)) for lo, hi in groups]
        if self.groups[0][0] != 0 or self.groups[-1][1] != self.numel or any(
                a[1] != b[0] for a, b in zip(self.groups, self.groups[1:])):
            raise ValueError(f"sub-groups {self.groups[:3]}... do not tile the partition [0, {self.numel})")
        self.buffer_count = max(3, int(buffer_count))  # sub-group buffer sets: read-ahead, compute, writes
        if device == "cpu":
            self.host = {key: np.zeros(self.numel, self.dtype) for key in KEYS}
            ledger.alloc("host", 3 * item * self.numel, "the offloaded optimizer states (offload_optimizer=cpu)")
        else:
            for i, (lo, hi) in enumerate(self.groups):
                for key in KEYS:
                    self.store.allocate(self._key(key, i), (hi - lo) * item)
            ledger.alloc("nvme", 3 * item * self.numel, "the offloaded optimizer states")
        self._write_initial_states(master_pieces)

    def _aligned(self, n: int) -> np.ndarray:
        """n elements in a 4096-aligned host buffer: O_DIRECT reads land in it without a bounce copy."""
        return aligned_empty(n * self.dtype.itemsize).view(self.dtype)

    def _key(self, key: str, group: int) -> str:
        return f"{self.name}.{key}.sg{group}"

    def _write_initial_states(self, pieces) -> None:
        """Master from the pieces, moments zero; NVMe: sub-group by sub-group as the pieces arrive."""
        group, filled, buf, pending = 0, 0, None, []
        for piece in pieces:
            piece = np.asarray(self.backend.to_numpy(piece), dtype=self.dtype).reshape(-1)
            if self.device == "cpu":
                self.host["master"][filled:filled + piece.size] = piece
                filled += piece.size
                continue
            pos = 0
            while pos < piece.size:
                lo, hi = self.groups[group]
                if buf is None:
                    buf = self._aligned(hi - lo)
                n = min(hi - lo - filled, piece.size - pos)
                buf[filled:filled + n] = piece[pos:pos + n]
                filled, pos = filled + n, pos + n
                if filled == hi - lo:    # the sub-group is complete: write it while the next one fills
                    for h in pending:
                        h.wait()
                    zeros = self._aligned(hi - lo)
                    zeros[...] = 0
                    pending = [self.store.write(self._key("master", group), buf),
                               self.store.write(self._key("exp_avg", group), zeros),
                               self.store.write(self._key("exp_avg_sq", group), zeros)]
                    group, filled, buf = group + 1, 0, None
        if self.device == "nvme" and self.numel == 0:    # an empty partition still has its (empty) sub-group
            pending = [self.store.write(self._key(key, 0), np.zeros(0, self.dtype)) for key in KEYS]
        for h in pending:
            h.wait()
        written = filled if self.device == "cpu" else (self.groups[group - 1][1] if group else 0)
        if written != self.numel and self.numel:
            raise ValueError(f"the master pieces hold {written} elements, the partition has {self.numel}")

    # -------------------------------------------------------------------------------------------- step
    def step(self, grad, *, lr=None, grad_scale=1.0, out_lowp=None) -> None:
        """One AdamW step of this rank's partition, on the host, sub-group by sub-group. grad: this rank's
        gradient partition (host; fp32, or fp16/bf16 upcast by the kernel). out_lowp receives the new
        low-precision parameters: a device array, or a PartitionUpdate of the parameter offload tier."""
        self.step_count += 1
        lr = self.lr if lr is None else float(lr)
        kw = dict(lr=lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay,
                  step=self.step_count, grad_scale=grad_scale, adamw_mode=self.adamw_mode,
                  bias_correction=self.bias_correction)
        sink = None if out_lowp is None else _LowpSink.of(out_lowp, self.backend, self.ledger)
        if self.device == "cpu":
            for i, (lo, hi) in enumerate(self.groups):
                self._update_group(i, {key: self.host[key][lo:hi] for key in KEYS}, grad, sink, kw)
        else:
            self._pipelined_nvme_step(grad, sink, kw)
        if sink is not None:
            sink.finish()

    def _update_group(self, i, states, grad, sink, kw) -> None:
        """Adam on sub-group i (its gradient is on the host already: the stage moved it there as it was reduced);
        its new low-precision values go out through the sink."""
        lo, hi = self.groups[i]
        g = np.asarray(grad[lo:hi])
        out = None if sink is None else sink.buffer(lo, hi)
        with self.ledger.compute(f"adam sub-group {i}"):
            self.host_adam_step(states["master"], g, states["exp_avg"], states["exp_avg_sq"], **kw, out_lowp=out)
        if sink is not None:
            sink.done(lo, hi, out)

    def _read_group(self, i: int) -> tuple[dict, list]:
        lo, hi = self.groups[i]
        self.ledger.alloc("host", 3 * (hi - lo) * self.dtype.itemsize,
                          f"the buffers of optimizer sub-group {i} (sub_group_size)")
        bufs = {key: self._aligned(hi - lo) for key in KEYS}
        handles = [self.store.read(self._key(key, i), bufs[key]) for key in KEYS]
        return bufs, handles

    def _pipelined_nvme_step(self, grad, sink, kw) -> None:
        n = len(self.groups)
        reads = {0: self._read_group(0)}          # group -> (buffers, pending read handles)
        writes: list = []                          # pending write handles, oldest first
        for i, (lo, hi) in enumerate(self.groups):
            if i + 1 < n:
                reads[i + 1] = self._read_group(i + 1)          # read ahead while this group computes
            bufs, handles = reads.pop(i)
            nbytes = 3 * (hi - lo) * self.dtype.itemsize
            with self.ledger.wait("nvme", "host", f"optimizer sub-group {i}"):
                for h in handles:
                    h.wait()                      # verified: a swap file changed behind our back is an error
            self._record("nvme", "host", handles, nbytes, i)
            self._update_group(i, bufs, grad, sink, kw)
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
        out = {key: np.empty(self.numel, self.dtype) for key in KEYS}
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
                self.store.write(self._key(key, i), np.ascontiguousarray(parts[key][lo:hi], self.dtype)).wait()


class _LowpSink:
    """Where an offloaded step puts sub-group [lo, hi)'s new low-precision parameters: a device array (copied up
    per sub-group), or the parameter offload tier's PartitionUpdate (refimpl/memory/param_offload.py), which has
    the same buffer/done/finish methods."""

    @staticmethod
    def of(out, backend, ledger):
        return out if isinstance(out, PartitionUpdate) else _LowpSink(out, backend, ledger)

    def __init__(self, out, backend, ledger):
        self.out, self.backend, self.ledger = out, backend, ledger

    def buffer(self, lo, hi):
        return np.empty(hi - lo, dtype=self.out.dtype)

    def done(self, lo, hi, buf) -> None:
        with self.ledger.transfer("host", "device", buf.nbytes, f"parameters [{lo}, {hi})"):
            self.backend.copy_async(self.out[lo:hi], self.backend.asarray(buf))

    def finish(self) -> None:
        self.backend.synchronize()

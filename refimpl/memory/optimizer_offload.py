"""Optimizer-state offload: AdamW whose fp32 partitions live in a host or NVMe store.

ZeRO-Offload (Ren et al. 2021) and ZeRO-Infinity §5 (infinity offload engine): the fp32 master weights and
Adam moments — 12 of the 16 bytes per parameter — leave the device. The step runs on the host, sub-group by
sub-group (runs of whole parameters holding at least `sub_group_size` elements, as DeepSpeed's stage 3 forms
them), so only a few sub-groups' states are in host memory at once (a host store's own arrays are stepped in
place, refimpl/memory/store.py). The gradient partition is on the host already (the ZeRO stage moved it there
as it was reduced) and is upcast to fp32 one sub-group at a time. The sub-groups are pipelined (DeepSpeed's
PipelinedOptimizerSwapper; with a host store the reads and writes move nothing):

    read  sub-group i+1  (nvme -> host, async)
    step  sub-group i    (host compute)
    write sub-group i    (host -> nvme, async; waited for before its buffer is reused), and its new
                         low-precision parameters (to the device, or to the parameter offload tier)

Twin-Flow (ZeRO-Offload++, DeepSpeed's ``offload_optimizer.ratio``): as DeepSpeed's stage 3 decides it,
sub-group i of n stays on the device when i < int((1 - ratio) * n), updated there by the device's AdamW (its
gradient slice copied up) beside the host's: the tiers act as one capacity pool.

Offload moves bytes and must not change them: the same elementwise kernel runs on the same numbers as the
on-device AdamW, so results are bitwise equal (tests/test_offload.py).
"""
from __future__ import annotations

import numpy as np

from ..backend import host_backend
from .store import aligned_empty
from .param_offload import PartitionUpdate
from .overlapped_update import LanedUpdate, OverlappedUpdate

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
    zero.Init, or one whole array); they go straight to the store, so the partition never has to be in memory at
    once. `groups`: the sub-groups, [lo, hi) ranges covering [0, numel). `store`: the tier (refimpl/memory/store.py)
    holding each sub-group's master, exp_avg and exp_avg_sq under its own key. `device_groups`: how many of the
    first sub-groups stay on the device (Twin-Flow; 0: all offloaded). `copies`: the rank's copy stream."""

    OVERLAP_PIECE = 1 << 22   # elements: an overlapped update is published, and waited for, piece by piece
    OVERLAP_PIECES = 32       # but in about this many at most: each costs the worker ~0.3 ms beside the forward

    def __init__(self, master_pieces, *, numel: int, groups, backend, store, ledger, copies, buffer_count: int = 4,
                 lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, adamw_mode=True, bias_correction=True,
                 name: str = "optim", dtype=np.float32, device_groups: int = 0):
        self.backend, self.store, self.ledger, self.name = backend, store, ledger, name
        self.copies = copies   # the rank's copy stream (memory/transfer.py): new parameters go up on it
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.weight_decay, self.adamw_mode = float(weight_decay), bool(adamw_mode)
        self.bias_correction = bool(bias_correction)
        self.dtype = np.dtype(dtype)          # fp32; float64 in the fp64 reference run
        item = self.dtype.itemsize
        self.step_count = 0
        # the host kernel: a CPU backend's own adam_step; behind a GPU backend numba's, else the NumPy reference
        host = host_backend(backend)
        self.host_adam_step = host.adam_step
        self.host_lanes = getattr(host, "adam_lanes", None) and host   # numba's, for an overlapped update
        self.numel, self.groups = int(numel), [(int(lo), int(hi)) for lo, hi in groups]
        if self.groups[0][0] != 0 or self.groups[-1][1] != self.numel or any(
                a[1] != b[0] for a, b in zip(self.groups, self.groups[1:])):
            raise ValueError(f"sub-groups {self.groups[:3]}... do not tile the partition [0, {self.numel})")
        self.buffer_count = max(3, int(buffer_count))  # sub-group buffer sets: read-ahead, compute, writes
        if not 0 <= device_groups <= len(self.groups):
            raise ValueError(f"device_groups must be in [0, {len(self.groups)}] (the sub-groups), got {device_groups}")
        self.device_groups = int(device_groups)
        self._pending = None     # an OverlappedUpdate in flight (step(overlap=True))
        self.overlap_piece = self.OVERLAP_PIECE   # (0: whole sub-groups, for measuring what pieces buy)
        self.overlap_pieces = self.OVERLAP_PIECES  # (0: no bound)
        self.overlap_lanes = None                  # lanes of an overlapped update: None = numba's threads, 0 = none
        split = self.groups[self.device_groups - 1][1] if self.device_groups else 0   # [0, split) on the device
        ledger.budget.alloc("device", 3 * item * split, "the optimizer states kept on the device (ratio)")
        ledger.budget.alloc(store.tier, 3 * item * (self.numel - split), "the offloaded optimizer states")
        self.on_device = {i: {key: backend.empty((hi - lo,), self.dtype) for key in KEYS}
                          for i, (lo, hi) in enumerate(self.groups[:self.device_groups])}
        for i, (lo, hi) in enumerate(self.groups[self.device_groups:], self.device_groups):
            for key in KEYS:
                self.store.allocate(self._key(key, i), (hi - lo) * item)
        self._write_initial_states(master_pieces)

    def _key(self, key: str, group: int) -> str:
        return f"{self.name}.{key}.sg{group}"

    def _host_states(self, i: int) -> tuple[dict, int]:
        """Host arrays for sub-group i's three states, and the host bytes they add: a host tier's own arrays
        (stepped in place), or 4096-aligned buffers a disk tier is read into (O_DIRECT lands there directly)."""
        lo, hi = self.groups[i]
        if i in self.on_device:        # (only while the initial states are written: then copied up)
            return {key: np.empty(hi - lo, self.dtype) for key in KEYS}, 0
        if self.store.resident:
            return {key: self.store.view(self._key(key, i)).view(self.dtype) for key in KEYS}, 0
        nbytes = 3 * (hi - lo) * self.dtype.itemsize
        self.ledger.budget.alloc("host", nbytes, f"the buffers of optimizer sub-group {i} (sub_group_size)")
        return {key: aligned_empty((hi - lo) * self.dtype.itemsize).view(self.dtype) for key in KEYS}, nbytes

    def _write_initial_states(self, pieces) -> None:
        """Master from the pieces, moments zero, sub-group by sub-group as the pieces arrive."""
        group, filled, bufs, cost, pending = 0, 0, None, 0, []
        for piece in pieces:
            piece = np.asarray(self.backend.to_numpy(piece), dtype=self.dtype).reshape(-1)
            pos = 0
            while pos < piece.size:
                lo, hi = self.groups[group]
                if bufs is None:
                    bufs, cost = self._host_states(group)
                n = min(hi - lo - filled, piece.size - pos)
                bufs["master"][filled:filled + n] = piece[pos:pos + n]
                filled, pos = filled + n, pos + n
                if filled == hi - lo:    # the sub-group is complete: write it while the next one fills
                    pending = self._write_group(group, bufs, cost, pending)
                    group, filled, bufs = group + 1, 0, None
        if self.numel == 0:              # an empty partition still has its (empty) sub-group
            pending = self._write_group(0, *self._host_states(0), pending)
        self._finish_writes(pending)
        written = self.groups[group - 1][1] if group else 0
        if written != self.numel and self.numel:
            raise ValueError(f"the master pieces hold {written} elements, the partition has {self.numel}")

    def _write_group(self, i, bufs, cost, pending) -> list:
        """Zero sub-group i's moments and start writing its states; the previous sub-group's writes finish first."""
        self._finish_writes(pending)
        bufs["exp_avg"][...] = 0
        bufs["exp_avg_sq"][...] = 0
        if i in self.on_device:
            for key in KEYS:
                self.on_device[i][key][...] = self.backend.asarray(bufs[key])
            return []
        return [(cost, i, [self.store.write(self._key(key, i), bufs[key]) for key in KEYS])]

    # -------------------------------------------------------------------------------------------- step
    def step(self, grad, *, lr=None, grad_scale=1.0, out_lowp=None, overlap=False) -> None:
        """One AdamW step of this rank's partition, on the host, sub-group by sub-group. grad: this rank's
        gradient partition (host; fp32, or fp16/bf16 upcast by the kernel). out_lowp receives the new
        low-precision parameters: a device array, or a PartitionUpdate of the parameter offload tier.

        ``overlap`` (a host store only): return once the update has started; the host sub-groups are updated on
        a worker thread, and ``settle(hi)`` waits for the partition below ``hi`` (overlapped_update.py)."""
        self.settle()
        self.step_count += 1
        lr = self.lr if lr is None else float(lr)
        kw = dict(lr=lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay,
                  step=self.step_count, grad_scale=grad_scale, adamw_mode=self.adamw_mode,
                  bias_correction=self.bias_correction)
        sink = None if out_lowp is None else _LowpSink.of(out_lowp, self.copies)
        device_outs = [self._update_on_device(i, grad, sink, kw) for i in self.on_device]   # queued on the device
        if overlap and self.store.resident:
            self._publish_device_groups(sink, device_outs)
            self._start_overlapped(grad, sink, kw)
            return
        self._pipelined_step(grad, sink, kw)                                                 # meanwhile, the host
        self._publish_device_groups(sink, device_outs)
        if sink is not None:
            sink.finish()

    def _publish_device_groups(self, sink, device_outs) -> None:
        for i, out in zip(self.on_device, device_outs):
            if out is not None:      # a device sub-group's new parameters, bound for the parameter tier
                lo, hi = self.groups[i]
                pieces = sink.pieces(lo, hi)
                for a, b, buf in pieces:
                    buf[...] = self.backend.to_numpy(out[a - lo:b - lo])
                sink.done(lo, hi, pieces)

    def _start_overlapped(self, grad, sink, kw) -> None:
        """The host sub-groups in lanes (numba) or on a worker thread, in pieces of at most overlap_piece elements
        (elementwise: any cut gives the same bits), each published (sink.done) when the main thread settles it: the
        next forward waits for the pieces it needs, whatever sub_group_size. Between two pieces a worker runs Python
        against the forward's for the GIL (overlapped_update.py), so a large partition gets larger pieces, not
        more."""
        host = self.numel - (self.groups[self.device_groups - 1][1] if self.device_groups else 0)
        n = self.overlap_piece or self.numel or 1
        if self.overlap_piece and self.overlap_pieces:
            n = max(n, -(-host // self.overlap_pieces))
        units = [(i, a, min(a + n, hi)) for i in range(self.device_groups, len(self.groups))
                 for lo, hi in [self.groups[i]] for a in range(lo, hi, n)]
        finish = sink.finish if sink is not None else (lambda: None)
        self._pending = self._start_lanes(units, grad, sink, kw, finish)
        if self._pending is not None:
            return
        pieces = {}

        def update(k):
            i, a, b = units[k]
            lo = self.groups[i][0]
            states = {key: arr[a - lo:b - lo] for key, arr in self._host_states(i)[0].items()}
            pieces[k] = self._update_group(i, states, grad, sink, kw, publish=False, span=(a, b))

        def publish(k):
            if sink is not None:
                sink.done(*units[k][1:], pieces.pop(k))
        self._pending = OverlappedUpdate(range(len(units)), [a for _, a, _ in units], update, publish, finish)

    def _start_lanes(self, units, grad, sink, kw, finish):
        """The same update in lanes (overlapped_update.LanedUpdate), when the host backend has them and the arrays
        suit them; else None. Each sub-group's new values go to one sink buffer, published by piece as views."""
        host = self.host_lanes
        lanes = (host.lane_count() if self.overlap_lanes is None else self.overlap_lanes) if host else 0
        if not lanes:
            return None
        work = host.new_work(len(units))
        runs, outs = [], {}
        for i in range(self.device_groups, len(self.groups)):
            lo, hi = self.groups[i]
            mine = [(k, a) for k, (j, a, _) in enumerate(units) if j == i]
            if sink is not None:
                pieces = sink.pieces(lo, hi)
                if len(pieces) != 1:
                    return None
                outs[i] = pieces[0][2]
            states = self._host_states(i)[0]
            run = host.adam_lanes(states["master"], np.asarray(grad[lo:hi]), states["exp_avg"], states["exp_avg_sq"],
                                  bounds=[a - lo for _, a in mine] + [hi - lo], first=mine[0][0], work=work,
                                  out_lowp=outs.get(i), **kw)
            if run is None:
                return None
            runs.append((i, run))

        def publish(k):
            i, a, b = units[k]
            if sink is not None:
                lo = self.groups[i][0]
                sink.done(a, b, [(a, b, outs[i][a - lo:b - lo])])
        return LanedUpdate(runs, lanes, [a for _, a, _ in units], work, host.pieces_done, publish, finish,
                           self.ledger)

    def settle(self, hi=None) -> None:
        """Wait for an overlapped update in flight: for partition elements below ``hi``, or all of it."""
        if self._pending is not None:
            self._pending.settle(hi)
            if self._pending.done:
                self._pending = None

    def updated(self, hi) -> bool:
        """Are partition elements below ``hi`` final (no update in flight for them)? Never waits."""
        return self._pending is None or self._pending.ready(hi)

    def _update_on_device(self, i, grad, sink, kw):
        """Twin-Flow: AdamW on device sub-group i, with the device's kernel, its gradient slice copied up. The new
        low-precision values are written into the device's partition, or returned (the parameter tier's)."""
        lo, hi = self.groups[i]
        states = self.on_device[i]
        g = self.backend.asarray(np.asarray(grad[lo:hi]))
        direct = isinstance(sink, _LowpSink)
        out = None if sink is None else (sink.out[lo:hi] if direct else self.backend.empty((hi - lo,), sink.dtype))
        with self.ledger.compute(f"adam sub-group {i} (device)", on_device=True):
            self.backend.adam_step(states["master"], g, states["exp_avg"], states["exp_avg_sq"], **kw, out_lowp=out)
        return None if direct else out

    def _update_group(self, i, states, grad, sink, kw, publish=True, span=None):
        """Adam on sub-group i, or on its elements [lo, hi) = ``span`` (``states`` then that span's); the gradient
        is on the host already (the stage moved it there as it was reduced). The new low-precision values go out
        through the sink (now, or by the caller: returns the pieces)."""
        lo, hi = self.groups[i] if span is None else span
        g = np.asarray(grad[lo:hi])
        pieces = [(lo, hi, None)] if sink is None else sink.pieces(lo, hi)   # where the new values go
        with self.ledger.compute(f"adam sub-group {i}"):
            for a, b, out in pieces:     # elementwise: any cut gives the same bits
                at = slice(a - lo, b - lo)
                self.host_adam_step(states["master"][at], g[at], states["exp_avg"][at], states["exp_avg_sq"][at],
                                    **kw, out_lowp=out)
        if sink is not None and publish:
            sink.done(lo, hi, pieces)
        return pieces

    def _read_group(self, i: int) -> tuple:
        """Start moving sub-group i's states into host memory: (arrays, host bytes, read handles)."""
        bufs, cost = self._host_states(i)
        return bufs, cost, [self.store.read(self._key(key, i), bufs[key]) for key in KEYS]

    def _pipelined_step(self, grad, sink, kw) -> None:
        first, n = self.device_groups, len(self.groups)
        if first == n:
            return
        reads = {first: self._read_group(first)}  # group -> (arrays, host bytes, pending read handles)
        writes: list = []                          # (host bytes, group, pending write handles), oldest first
        for i in range(first, n):
            if i + 1 < n:
                reads[i + 1] = self._read_group(i + 1)          # read ahead while this group computes
            bufs, cost, handles = reads.pop(i)
            # verified reads: a swap file changed behind our back is an error
            self.ledger.record_io(handles, self.store.tier, "host", f"optimizer sub-group {i}")
            self._update_group(i, bufs, grad, sink, kw)
            writes.append((cost, i, [self.store.write(self._key(key, i), bufs[key]) for key in KEYS]))
            while len(writes) > self.buffer_count - 2:     # bound the buffers held by in-flight writes
                self._finish_writes([writes.pop(0)])
        self._finish_writes(writes)

    def _finish_writes(self, writes) -> None:
        for cost, i, handles in writes:
            self.ledger.record_io(handles, "host", self.store.tier, f"optimizer sub-group {i}")
            self.ledger.budget.free("host", cost)   # the sub-group's buffers can go

    # -------------------------------------------------------------------------------------- checkpoints
    def partitions(self) -> dict:
        self.settle()
        out = {key: np.empty(self.numel, self.dtype) for key in KEYS}
        for i, (lo, hi) in enumerate(self.groups):
            if i in self.on_device:
                for key in KEYS:
                    out[key][lo:hi] = self.backend.to_numpy(self.on_device[i][key])
                continue
            for h in [self.store.read(self._key(key, i), out[key][lo:hi]) for key in KEYS]:
                h.wait()                                          # verified
        return out

    def load_partitions(self, parts: dict) -> None:
        self.settle()
        for key in KEYS:
            if parts[key].shape != (self.numel,):
                raise ValueError(f"load_partitions: {key!r} has shape {parts[key].shape}, the partition has "
                                 f"({self.numel},)")
        for i, (lo, hi) in enumerate(self.groups):
            for key in KEYS:
                part = np.ascontiguousarray(parts[key][lo:hi], self.dtype)
                if i in self.on_device:
                    self.on_device[i][key][...] = self.backend.asarray(part)
                else:
                    self.store.write(self._key(key, i), part).wait()


class _LowpSink:
    """Where an offloaded step puts sub-group [lo, hi)'s new low-precision parameters: a device array (copied up
    per sub-group from pinned memory on the copy stream, the next kernels wait for it), or the parameter offload
    tier's PartitionUpdate (refimpl/memory/param_offload.py), which has the same pieces/done/finish methods."""

    @staticmethod
    def of(out, copies):
        return out if isinstance(out, PartitionUpdate) else _LowpSink(out, copies)

    def __init__(self, out, copies):
        self.out, self.copies, self.dtype = out, copies, out.dtype

    def pieces(self, lo, hi):
        """[(start, stop, host array)] covering partition elements [lo, hi): one pinned buffer."""
        return [(lo, hi, self.copies.host_empty((hi - lo) * self.dtype.itemsize).view(self.dtype))]

    def done(self, lo, hi, pieces) -> None:
        for a, b, buf in pieces:
            self.copies.to_device(buf, f"parameters [{a}, {b})", out=self.out[a:b])   # keeps buf until copied

    def finish(self) -> None:
        pass

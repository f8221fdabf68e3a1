"""The stage-3 parameter coordinator: trace the order modules run in, then gather ahead of it.

ZeRO-Infinity §6.2 (overlap-centric design) and DeepSpeed's `PartitionedParameterCoordinator`: the first
pass (forward + backward of one micro-batch) records the sequence of modules whose parameters were fetched.
Later passes replay it: when module i is fetched, the all-gathers of the parameters of modules i+1, i+2, ...
are issued asynchronously, up to `stage3_prefetch_bucket_size` elements ahead, so that they overlap the
compute of module i. Two more knobs, with DeepSpeed's meanings:
- `stage3_max_live_parameters`: never hold more gathered elements than this (prefetch stops short);
- `stage3_max_reuse_distance`: after a module, keep a parameter whole if the trace says it is needed again
  within this many elements of other fetches (e.g. the last layer, whose backward follows its forward).
If a pass deviates from the trace (different control flow), the trace is dropped with one warning, that pass
fetches on demand, and the next pass records a new trace.
"""
from __future__ import annotations

import enum
import warnings

from ..autodiff import is_grad_enabled
from .partition import ZeroParamStatus


class TraceMode(enum.Enum):
    """What the coordinator does with the module order of a training pass."""
    RECORD = "record"     # the first pass: write the trace
    REPLAY = "replay"     # later passes: follow it, prefetching ahead
    INVALID = "invalid"   # this pass left the trace: fetch on demand, record again on the next pass


class PartitionedParameterCoordinator:
    def __init__(self, zero, *, prefetch_bucket_size: int, max_live_parameters: int, max_reuse_distance: int):
        self.zero = zero   # the stage-3 ParameterPartitioning whose parameters this coordinator gathers
        self.prefetch_bucket_size = prefetch_bucket_size
        self.max_live_parameters = max_live_parameters
        self.max_reuse_distance = max_reuse_distance
        self.in_use: dict[int, int] = {}   # id(param) -> modules running that use it (never evicted)
        self.trace: list = []          # modules in fetch order during one pass
        self.mode = TraceMode.RECORD
        self.step_id = 0               # position in the trace during replay
        self.warned = False
        self.stats = {"fetches": 0, "prefetched": 0, "waited_on_demand": 0, "trace_invalidations": 0}
        self._module_params: dict[int, list] = {}   # id(module) -> its partitioned parameters (they never change)
        self._reuse = None     # the trace's next-use table, built once per trace (_reuse_table)

    def _params(self, module):
        """The module's own partitioned parameters (persistent ones are always whole: nothing to gather)."""
        params = self._module_params.get(id(module))
        if params is None:
            params = [p for p in module._parameters.values() if p is not None and not p.ds_persist]
            self._module_params[id(module)] = params
        return params

    # --------------------------------------------------------------------------------------- fetch
    def fetch_sub_module(self, module, forward: bool) -> None:
        self.stats["fetches"] += 1
        if not is_grad_enabled():      # evaluation: forward only, not the pass the trace describes
            for p in self._params(module):
                self.in_use[id(p)] = self.in_use.get(id(p), 0) + 1
            self.zero.fetch(self._params(module))
            return
        if self.mode is TraceMode.RECORD:
            self.trace.append(module)
        elif self.mode is TraceMode.REPLAY:
            if self.step_id >= len(self.trace) or self.trace[self.step_id] is not module:
                self._invalidate(module)
            else:
                self.step_id += 1
        params = self._params(module)
        self.stats["waited_on_demand"] += sum(p.ds_status is ZeroParamStatus.NOT_AVAILABLE for p in params)
        for p in params:
            self.in_use[id(p)] = self.in_use.get(id(p), 0) + 1
        self.zero.fetch(params)   # this module first; then what comes after it
        if self.mode is TraceMode.REPLAY:
            self._prefetch_after(self.step_id - 1)

    def _prefetch_after(self, i: int) -> None:
        """Two fronts move ahead of compute (ZeRO-Infinity §6.2): NVMe reads of the next modules' chunks, as far
        as the swap buffers allow; and behind them, all-gathers of chunks already in host memory, within
        stage3_prefetch_bucket_size, stage3_max_live_parameters and the device budget. An all-gather never
        waits for a read here: that would put the disk on the compute thread."""
        if self.zero.reads_ahead:      # only a disk tier has reads to start (a host tier's chunks are there)
            for module in self.trace[i + 1:]:
                if not self.zero.swap_in_ahead(self._params(module)):
                    break
        budget, live = self.prefetch_bucket_size, self.zero.gathered_numel()
        for module in self.trace[i + 1:]:
            for p in self._params(module):
                if p.ds_status is not ZeroParamStatus.NOT_AVAILABLE:
                    continue
                if p.ds_numel > budget or live + p.ds_numel > self.max_live_parameters:
                    return
                if not self.zero.ledger.budget.fits("device", self.zero.gathered_bytes(p)):
                    return   # the device budget has no room to gather ahead
                if not self.zero.chunk_ready(p):
                    return   # its read has not landed yet
                self.zero.all_gather_async(p)
                self.stats["prefetched"] += 1
                budget -= p.ds_numel
                live += p.ds_numel

    def _invalidate(self, module) -> None:
        self.stats["trace_invalidations"] += 1
        if not self.warned:
            where = f"position {self.step_id} of {len(self.trace)}"
            warnings.warn(f"ZeRO-3 prefetch trace invalidated at {where}: module {type(module).__name__} ran out of "
                          f"the recorded order; fetching on demand and re-recording the trace on the next pass",
                          RuntimeWarning, stacklevel=3)
            self.warned = True
        self.mode, self.trace, self.step_id = TraceMode.INVALID, [], 0

    # ------------------------------------------------------------------------------------- release
    def release_sub_module(self, module, forward: bool) -> None:
        keep = self._reused_soon(module) if self.mode is TraceMode.REPLAY and is_grad_enabled() else set()
        for p in self._params(module):
            self.in_use[id(p)] = max(0, self.in_use.get(id(p), 0) - 1)
            if id(p) not in keep:
                self.zero.release(p)

    def evict(self, need: int) -> None:
        """Make room on the device: release whole parameters that no running module uses (kept for reuse or
        prefetched), until `need` more bytes fit or nothing else can go."""
        for p in self.zero.params.values():
            if self.zero.ledger.budget.fits("device", need):
                return
            if p.ds_persist or self.in_use.get(id(p), 0) or p.ds_status is ZeroParamStatus.NOT_AVAILABLE:
                continue
            if p.ds_status is ZeroParamStatus.INFLIGHT:
                self.zero.wait_for(p)   # a prefetched gather: complete it, then drop it
            self.zero.release(p)

    def _reused_soon(self, module) -> set:
        """ids of `module`'s parameters that the trace fetches again within max_reuse_distance elements: those
        whose next fetch, at position j, comes after fewer than max_reuse_distance elements of the modules
        fetched in between."""
        i = self.step_id - 1   # the position fetch_sub_module consumed for this module
        next_use, before = self._reuse_table()
        return {pid for pid, j in next_use[i].items() if before[j] - before[i + 1] < self.max_reuse_distance}

    def _reuse_table(self):
        """For each trace position i: {id(p): the next position fetching p} over module i's parameters; and
        before[j]: the elements of the modules at positions < j. One backward sweep, once per trace (the
        per-release scan ahead it replaces grew with the square of the model's depth)."""
        if self._reuse is None or self._reuse[0] != (id(self.trace), len(self.trace)):
            n = len(self.trace)
            before = [0] * (n + 1)
            for j, m in enumerate(self.trace):
                before[j + 1] = before[j] + sum(p.ds_numel for p in self._params(m))
            next_use, seen = [None] * n, {}
            for j in range(n - 1, -1, -1):
                params = self._params(self.trace[j])
                next_use[j] = {id(p): seen[id(p)] for p in params if id(p) in seen}
                for p in params:
                    seen[id(p)] = j
            self._reuse = ((id(self.trace), len(self.trace)), next_use, before)
        return self._reuse[1], self._reuse[2]

    def end_of_pass(self) -> None:
        """After backward: release everything, and switch to replaying the trace just recorded."""
        self.in_use.clear()
        self.zero.release_all()
        # RECORD -> REPLAY (the trace just recorded); INVALID -> RECORD (the next pass records anew)
        self.mode = TraceMode.REPLAY if self.mode is TraceMode.RECORD else (
            TraceMode.RECORD if self.mode is TraceMode.INVALID else TraceMode.REPLAY)
        self.step_id = 0

"""The ledger: every transfer between tiers and every compute interval, with bytes, rank and time.

ZeRO-Infinity's claim (§6, overlap-centric design) is that moving model states between NVMe, host and device
costs little because the transfers hide under compute. The ledger makes that checkable: each rank records
    transfer  src tier -> dst tier, bytes, start, end, label     (from issue to completion)
    wait      src tier -> dst tier, start, end                   (the compute thread blocked on a transfer)
    compute   start, end, label, cpu                             (forward+backward, optimizer sub-groups;
                                                                  cpu: the thread's seconds on a core in it)
    collective start, end, label                                 (the rank blocked on a collective: comm/base.py)
A transfer's *exposed* time is the time the compute thread spent waiting for it; the rest of its duration was
*hidden* (it ran while something else did). A synchronous copy is all exposed. `summary()` reports, per step:
bytes and achieved GB/s per tier pair, hidden vs exposed seconds, and the peak bytes held in each tier (from the
byte budgets, budget.py); `breakdown()` splits the rank's time between computing and its waits. `write_jsonl`
puts it on disk; refimpl/report.py draws it (timeline.png).
"""
from __future__ import annotations

import contextlib
import json
import threading
import time

from .budget import TierBudget

TIERS = ("device", "host", "nvme")


class Ledger:
    def __init__(self, rank: int = 0, clock=time.perf_counter, limits: dict | None = None):
        self.rank, self.clock = rank, clock
        self.budget = TierBudget(rank, limits)   # bytes held per tier, against memory.*_bytes (budget.py)
        self.t0 = clock()
        self.events: list[dict] = []
        self.step = 0
        self._lock = threading.Lock()    # I/O threads record too
        self._flushers = []              # device copies whose times are known once their events complete
        self.device_timer = None         # a GPU's CopyStream: records intervals on the device's timeline

    def now(self) -> float:
        """Seconds since the ledger started: the time axis of every record."""
        return self.clock() - self.t0

    # ----------------------------------------------------------------------------------------- record
    def add(self, kind: str, start: float, end: float, **fields) -> None:
        with self._lock:
            self.events.append({"kind": kind, "rank": self.rank, "step": self.step, "start": start, "end": end,
                                **fields})

    @contextlib.contextmanager
    def transfer(self, src: str, dst: str, nbytes: int, label: str = ""):
        """A synchronous transfer: the caller waits for all of it."""
        start = self.now()
        yield
        end = self.now()
        self.add("transfer", start, end, src=src, dst=dst, nbytes=int(nbytes), label=label)
        self.add("wait", start, end, src=src, dst=dst, label=label)

    def record_io(self, handles, src: str, dst: str, label: str = "") -> None:
        """Block on the I/O handles of one transfer (refimpl/memory/store.py), recording the wait, and the transfer
        as the store saw it: from the first request's issue to the last one's completion. A copy within one tier,
        or handles that moved nothing (a host tier's own memory), are no transfer between tiers."""
        nbytes = sum(h.nbytes for h in handles)
        if src == dst or not nbytes:
            for h in handles:
                h.wait()
            return
        with self.wait(src, dst, label):
            for h in handles:
                h.wait()
        self.add("transfer", min(h.start for h in handles) - self.t0, max(h.end for h in handles) - self.t0,
                 src=src, dst=dst, nbytes=nbytes, label=label)

    @contextlib.contextmanager
    def wait(self, src: str, dst: str, label: str = ""):
        """The compute thread blocks on an asynchronous transfer (recorded separately with `add`)."""
        start = self.now()
        yield
        self.add("wait", start, self.now(), src=src, dst=dst, label=label)

    @contextlib.contextmanager
    def compute(self, label: str, on_device: bool = False):
        """Compute between entering and leaving. on_device: kernels queued on a GPU, recorded when the device ran
        them (events on the compute stream, refimpl/memory/transfer.py), not when Python queued them."""
        if on_device and self.device_timer is not None:
            with self.device_timer.interval("compute", label=label):
                yield
            return
        start, cpu = self.now(), time.thread_time()
        yield
        # cpu: this thread's time on a core inside the interval; the rest it waited (for a core, for the GIL,
        # for a collective or a transfer inside the interval)
        self.add("compute", start, self.now(), label=label, cpu=time.thread_time() - cpu)

    def on_flush(self, fn) -> None:
        """fn() adds records that were waiting on the device (refimpl/memory/transfer.py); run before reading."""
        self._flushers.append(fn)

    def flush(self) -> None:
        for fn in self._flushers:
            fn()

    def next_step(self) -> None:
        self.flush()
        self.step += 1

    # ---------------------------------------------------------------------------------------- summary
    def summary(self, step: int | None = None) -> dict:
        """Per tier pair: bytes, seconds, GB/s; hidden vs exposed transfer seconds; peak bytes per tier."""
        self.flush()
        events = [e for e in self.events if step is None or e["step"] == step]
        computes = _union([(e["start"], e["end"]) for e in events if e["kind"] == "compute"])
        pairs: dict[str, dict] = {}
        for e in events:
            if e["kind"] not in ("transfer", "wait"):
                continue
            p = pairs.setdefault(f"{e['src']}->{e['dst']}", {"bytes": 0, "busy": [], "waits": []})
            if e["kind"] == "transfer":
                p["bytes"] += e["nbytes"]
                p["busy"].append((e["start"], e["end"]))
            else:
                p["waits"].append((e["start"], e["end"]))
        for p in pairs.values():
            busy, waits = _union(p.pop("busy")), _union(p.pop("waits"))
            p["seconds"] = sum(b - a for a, b in busy)           # wall time with this pair's I/O in flight
            p["exposed_s"] = min(p["seconds"], sum(b - a for a, b in waits))
            p["hidden_s"] = p["seconds"] - p["exposed_s"]
            p["GB_per_s"] = p["bytes"] / p["seconds"] / 1e9 if p["seconds"] > 0 else None
        return {"rank": self.rank, "pairs": pairs, "compute_s": sum(b - a for a, b in computes),
                "peak_bytes": dict(self.budget.peak)}

    def breakdown(self) -> dict:
        """Where this rank's time went, from its first record to its last: each moment counted once, in the
        first of these that covers it: waiting at a collective (for the other ranks: on shared cores, for the
        ones still computing), waiting for a transfer, computing (recorded compute intervals less those waits;
        includes time the thread waited for a core), and anything else (Python between the intervals,
        evaluation, logging). Seconds per part, the span, and compute_cpu_s: the compute intervals' time on a
        core (the thread's own; work it handed to other threads is not in it; None when some were timed on a
        GPU, whose kernels run off the core)."""
        self.flush()
        with self._lock:
            events = list(self.events)
        if not events:
            return {}
        computes = [e for e in events if e["kind"] == "compute"]
        kinds = ("collective", "wait", "compute")        # the order of precedence
        spans = {k: _union([(e["start"], e["end"]) for e in events if e["kind"] == k]) for k in kinds}
        covered, parts = [], {}
        for kind in kinds:
            parts[kind] = _length(_subtract(spans[kind], covered))
            covered = _union(covered + spans[kind])
        span = max(e["end"] for e in events) - min(e["start"] for e in events)
        return {"span_s": span, "collective_wait_s": parts["collective"], "transfer_wait_s": parts["wait"],
                "compute_s": parts["compute"], "other_s": span - _length(covered),
                "compute_cpu_s": None if any("cpu" not in e for e in computes) else sum(e["cpu"] for e in computes)}

    def write_jsonl(self, path) -> None:
        self.flush()
        with open(path, "a") as f:
            for e in self.events:
                f.write(json.dumps(e) + "\n")


def _union(intervals):
    """Merge overlapping intervals: the time during which some compute ran."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _subtract(intervals, covered):
    """The parts of `intervals` (merged, sorted) outside `covered` (merged, sorted)."""
    out, j = [], 0
    for a, b in intervals:
        while j < len(covered) and covered[j][1] <= a:
            j += 1
        k = j
        while a < b and k < len(covered) and covered[k][0] < b:
            if covered[k][0] > a:
                out.append([a, covered[k][0]])
            a = max(a, covered[k][1])
            k += 1
        if a < b:
            out.append([a, b])
    return out

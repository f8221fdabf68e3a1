"""The ledger: every transfer between tiers and every compute interval, with bytes, rank and time.

ZeRO-Infinity's claim (§6, overlap-centric design) is that moving model states between NVMe, host and device
costs little because the transfers hide under compute. The ledger makes that checkable: each rank records
    transfer  src tier -> dst tier, bytes, start, end, label     (from issue to completion)
    wait      src tier -> dst tier, start, end                   (the compute thread blocked on a transfer)
    compute   start, end, label                                  (forward+backward, optimizer sub-groups)
    alloc     tier, +/- bytes                                    (current and peak bytes per tier)
A transfer's *exposed* time is the time the compute thread spent waiting for it; the rest of its duration was
*hidden* (it ran while something else did). A synchronous copy is all exposed. `summary()` reports, per step:
bytes and achieved GB/s per tier pair, hidden vs exposed seconds, and the peak bytes held in each tier.
`write_jsonl` and `plot_timeline` put it on disk.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import defaultdict

TIERS = ("device", "host", "nvme")


class TierBudgetError(MemoryError):
    """A tier's byte budget cannot hold what must be in it at once; names the budget and the bytes needed."""


class Ledger:
    def __init__(self, rank: int = 0, clock=time.perf_counter, limits: dict | None = None):
        self.rank, self.clock = rank, clock
        self.limits = {k: v for k, v in (limits or {}).items() if v is not None}  # tier -> byte budget
        self.t0 = clock()
        self.events: list[dict] = []
        self.step = 0
        self.used = defaultdict(int)     # tier -> bytes held now
        self.peak = defaultdict(int)     # tier -> most bytes held at once (since the last reset)
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
        start = self.now()
        yield
        self.add("compute", start, self.now(), label=label)

    def fits(self, tier: str, nbytes: int) -> bool:
        return tier not in self.limits or self.used[tier] + nbytes <= self.limits[tier]

    def alloc(self, tier: str, nbytes: int, what: str = "") -> None:
        """Count nbytes into `tier`; over its budget -> TierBudgetError naming budget, need and holder."""
        with self._lock:
            if not self.fits(tier, nbytes):
                raise TierBudgetError(
                    f"memory.{tier}_bytes={self.limits[tier]:,} is too small on rank {self.rank}: {what or 'an allocation'} "
                    f"needs {int(nbytes):,} bytes with {self.used[tier]:,} already held "
                    f"(at least {self.used[tier] + int(nbytes):,} bytes needed)")
            self.used[tier] += int(nbytes)
            self.peak[tier] = max(self.peak[tier], self.used[tier])

    def free(self, tier: str, nbytes: int) -> None:
        with self._lock:
            self.used[tier] -= int(nbytes)

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
                "peak_bytes": dict(self.peak)}

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


def plot_timeline(events, path, title="") -> None:
    """Tiers as lanes over time, one lane per transfer direction and one for compute, per rank: the whole run
    on top, and below it one step (the second-to-last: warm, and complete) where the overlap can be seen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [e for e in events if e["kind"] in ("compute", "transfer")]
    lanes = sorted({(e["rank"], _lane(e)) for e in drawn})
    steps = sorted({e["step"] for e in drawn})
    zoom = steps[-2] if len(steps) > 1 else (steps[0] if steps else None)
    fig, axes = plt.subplots(2, 1, figsize=(10, 2 * (0.4 * len(lanes) + 1.2)), dpi=110)
    for ax, chosen, what in ((axes[0], drawn, "whole run"),
                             (axes[1], [e for e in drawn if e["step"] == zoom], f"step {zoom}")):
        _draw_lanes(ax, chosen, lanes)
        ax.set_title(f"{title or 'tier traffic and compute'}: {what}")
    axes[1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _lane(e) -> str:
    return "compute" if e["kind"] == "compute" else f"{e['src']}->{e['dst']}"


_COLORS = {"compute": "tab:green", "nvme->host": "tab:purple", "host->nvme": "tab:pink",
           "host->device": "tab:blue", "device->host": "tab:orange"}


def _draw_lanes(ax, events, lanes) -> None:
    index = {lane: i for i, lane in enumerate(lanes)}
    bars = defaultdict(list)   # one broken_barh call per lane: thousands of events draw in one go
    for e in events:
        bars[(e["rank"], _lane(e))].append((e["start"], max(e["end"] - e["start"], 1e-6)))
    for (rank, name), spans in bars.items():
        ax.broken_barh(spans, (index[(rank, name)] - 0.4, 0.8), color=_COLORS.get(name, "tab:gray"))
    ax.set_yticks(range(len(lanes)), [f"rank {r}: {n}" for r, n in lanes])
    ax.grid(axis="x", alpha=0.3)

"""The host optimizer step of step n, run beside the forward of step n+1 (ZeRO-Offload §4.2 and ZeRO-Infinity
§6.2: hide the CPU's work under the GPU's).

With the optimizer offloaded, AdamW runs on the host after backward, and the GPU would sit idle meanwhile. But the
next forward needs the parameters in partition order, one module at a time, and the host updates the partition in
that same order (refimpl/memory/optimizer_offload.py cuts it into pieces of a few million elements; AdamW is
elementwise, so any cut gives the same bits). So the engine's step returns as soon as the update has started; a
worker thread updates the pieces in order while the main thread goes on, and stage 3 waits, before it gathers a
parameter, for just the pieces holding that parameter:

    worker:  update piece 0 | update 1 | update 2 | ...
    main:    (step returns) | forward: module 0 waits for 0, gathers | module 1 waits for 0..1 | ...

Nothing is approximated: every parameter is read after its own update, as without overlap (unlike ZeRO-Offload's
delayed parameter update, which changes the numbers). The new values reach the device through `publish`, called on
the main thread, because host -> device copies must be queued by the thread that queues the kernels reading them.

The GIL: the kernels release it, but the worker needs it for a moment between two pieces, while the main thread
holds it to run the forward's Python. Python hands it over only every switch interval (5 ms by default), so each
piece would wait up to 5 ms (benchmarks/gil_handover.py: 10 pieces of 4M elements beside a main thread running
Python took 2.1x their time alone; at 0.1 ms, 1.05x). While an update is in flight the interval is 0.1 ms
(`sys.setswitchinterval`), then restored. Shorter intervals buy little more: the worker's own Python between two
pieces still runs against the forward's (about 0.3 ms a piece on the H200), so the update is cut into about
OffloadedAdamW.OVERLAP_PIECES pieces at most. Running all pieces inside one nogil call of a parallel kernel does not
avoid it either: numba takes the GIL to launch each parallel region.

So a host backend that has lanes (numba: backends/refimpl_numba/adam_lanes.py) gets `LanedUpdate` instead: one
thread per core, each making one nogil call that goes through the pieces in order, claiming blocks of each with an
atomic counter and counting the blocks it finishes in another. No Python runs between pieces; the main thread reads
the counts (`pieces_done`).
"""
from __future__ import annotations

import bisect
import sys
import threading
import time

SWITCH_INTERVAL = 1e-4     # seconds: the GIL's switch interval while an update is in flight
POLL = 5e-5                # seconds between two looks at the lanes' counts while the main thread waits
_switch = {"lock": threading.Lock(), "updates": 0, "saved": None}


def _updates_in_flight(delta: int) -> None:
    """Count the updates in flight (several ranks may share a process); the first sets the short interval, the
    last restores the one it found."""
    with _switch["lock"]:
        _switch["updates"] += delta
        if delta > 0 and _switch["updates"] == 1:
            _switch["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL)
        elif delta < 0 and _switch["updates"] == 0:
            sys.setswitchinterval(_switch["saved"])


class OverlappedUpdate:
    """``update(i)`` for the pieces ``indices`` (in order) on a worker thread; ``settle`` on the main thread.

    ``starts``: the partition offset where each of those pieces begins. ``publish(i)``: make piece i's new
    values visible (main thread, in order). ``finish()``: after the last one is published."""

    def __init__(self, indices, starts, update, publish, finish):
        self.indices, self.starts = list(indices), list(starts)
        self._update, self._publish, self._finish = update, publish, finish
        self._cond = threading.Condition()
        self._computed = 0       # how many of `indices` the worker has updated
        self._published = 0      # how many of them the main thread has published
        self._error = None
        self.done = False        # every piece published and finish() called
        _updates_in_flight(+1)
        self._thread = threading.Thread(target=self._run, name="refimpl host optimizer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for i in self.indices:
                self._update(i)
                with self._cond:
                    self._computed += 1
                    self._cond.notify_all()
        except BaseException as exc:   # handed to the main thread at its next settle
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _needed(self, hi) -> int:
        """How many pieces (in order) must be updated before partition elements below `hi` are final."""
        return len(self.indices) if hi is None else bisect.bisect_left(self.starts, hi)

    def ready(self, hi) -> bool:
        """Are partition elements below `hi` updated (no waiting)?"""
        with self._cond:
            return self._error is None and self._computed >= self._needed(hi)

    def settle(self, hi=None) -> None:
        """Wait until partition elements below `hi` (all of them when None) are updated, and publish them."""
        need = self._needed(hi)
        if need > self._published:
            with self._cond:
                self._cond.wait_for(lambda: self._computed >= need or self._error is not None)
                if self._error is not None:
                    self._thread.join()
                    self._end()
                    raise self._error
            while self._published < need:
                self._publish(self.indices[self._published])
                self._published += 1
        if self._published == len(self.indices) and not self.done:
            self._thread.join()
            self._end()
            self._finish()

    def _end(self) -> None:
        if not self.done:
            self.done = True
            _updates_in_flight(-1)


class LanedUpdate(OverlappedUpdate):
    """OverlappedUpdate's contract (settle, ready, done) for an update in lanes: ``runs`` is [(sub-group, run)] in
    partition order, where ``run()`` is one lane of that sub-group's update, and ``lanes`` threads each call every
    run in turn. ``pieces_done(work)``: how many pieces (numbered across sub-groups, as ``starts``) are final. Each
    sub-group's update is recorded in the ledger as ``adam sub-group i``, from the end of the one before to the
    return of its last lane."""

    def __init__(self, runs, lanes, starts, work, pieces_done, publish, finish, ledger):
        self.indices, self.starts = list(range(len(starts))), list(starts)
        self._publish, self._finish = publish, finish
        self._runs, self._work, self._pieces_done, self._ledger = list(runs), work, pieces_done, ledger
        self._published, self._error, self.done = 0, None, False
        self._ends = [[] for _ in range(lanes)]     # per lane: the ledger time at which each run returned
        self._t0 = ledger.now()
        _updates_in_flight(+1)
        self._threads = [threading.Thread(target=self._lane, args=(lane,), name=f"refimpl host optimizer {lane}",
                                          daemon=True) for lane in range(lanes)]
        for t in self._threads:
            t.start()

    def _lane(self, lane) -> None:
        try:
            for _, run in self._runs:
                run()
                self._ends[lane].append(self._ledger.now())
        except BaseException as exc:   # handed to the main thread at its next settle
            self._error = exc

    def ready(self, hi) -> bool:
        return self._error is None and self._pieces_done(self._work) >= self._needed(hi)

    def settle(self, hi=None) -> None:
        need = self._needed(hi)
        while self._published < need:
            done = self._pieces_done(self._work)
            if done <= self._published:
                if self._error is None and not any(t.is_alive() for t in self._threads):
                    if self._pieces_done(self._work) > done:
                        continue                 # (finished between the two looks)
                    self._error = RuntimeError(f"the host optimizer's lanes all returned with piece {done} of "
                                               f"{len(self.indices)} unfinished")
                if self._error is not None:
                    self._join()
                    raise self._error
                time.sleep(POLL)
                continue
            while self._published < min(done, need):
                self._publish(self.indices[self._published])
                self._published += 1
        if self._published == len(self.indices) and not self.done:
            self._join()
            start = self._t0
            for j, (group, _) in enumerate(self._runs):
                end = max(ends[j] for ends in self._ends)
                self._ledger.add("compute", start, end, label=f"adam sub-group {group}")
                start = end
            self._finish()

    def _join(self) -> None:
        for t in self._threads:
            t.join()
        self._end()

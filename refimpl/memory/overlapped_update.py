"""The host optimizer step of step n, run beside the forward of step n+1 (ZeRO-Offload §4.2 and ZeRO-Infinity
§6.2: hide the CPU's work under the GPU's).

With the optimizer offloaded, AdamW runs on the host after backward, and the GPU would sit idle meanwhile. But the
next forward needs the parameters in partition order, one module at a time, and the host updates the partition in
that same order, sub-group by sub-group (refimpl/memory/optimizer_offload.py). So the engine's step returns as
soon as the update has started; a worker thread updates the sub-groups in order while the main thread goes on,
and stage 3 waits, before it gathers a parameter, for just the sub-group holding that parameter:

    worker:  update sub-group 0 | update 1 | update 2 | ...
    main:    (step returns) | forward: module 0 waits for 0, gathers | module 1 waits for 0..1 | ...

Nothing is approximated: every parameter is read after its own update, as without overlap (unlike ZeRO-Offload's
delayed parameter update, which changes the numbers). The new values reach the device through `publish`, called on
the main thread, because host -> device copies must be queued by the thread that queues the kernels reading them.
"""
from __future__ import annotations

import bisect
import threading


class OverlappedUpdate:
    """Runs ``work`` (an iterator yielding ``(end, item)`` as partition elements below ``end`` become final, in
    increasing order; elements below ``start`` are final already) on a worker thread; ``settle`` on the main thread
    publishes the finished items in order (``publish(item)``) and, once all are, calls ``finish()``."""

    def __init__(self, work, start, publish, finish):
        self._publish, self._finish = publish, finish
        self._cond = threading.Condition()
        self._reached = start    # partition elements below this are updated
        self._items = []         # finished, not yet published
        self._all = False        # the worker is done (or failed)
        self._error = None
        self.done = False
        self._thread = threading.Thread(target=self._run, args=(work,), name="refimpl host optimizer", daemon=True)
        self._thread.start()

    def _run(self, work) -> None:
        try:
            for end, item in work:
                with self._cond:
                    self._items.append(item)
                    self._reached = end
                    self._cond.notify_all()
        except BaseException as exc:   # handed to the main thread at its next settle
            self._error = exc
        finally:
            with self._cond:
                self._all = True
                self._cond.notify_all()

    def ready(self, hi) -> bool:
        """Are partition elements below `hi` updated (no waiting)?"""
        with self._cond:
            return self._error is None and (self._all or self._reached >= hi)

    def settle(self, hi=None) -> None:
        """Wait until partition elements below `hi` (all of them when None) are updated, and publish them."""
        if self.done:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._all or (hi is not None and self._reached >= hi))
            items, self._items, finished = self._items, [], self._all
        if self._error is not None:
            self._thread.join()
            self.done = True
            raise self._error
        for item in items:
            self._publish(item)
        if finished:
            self._thread.join()
            self._finish()
            self.done = True

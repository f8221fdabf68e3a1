"""Byte budgets per tier: what may be held in device, host (and NVMe) memory at once, per rank.

ZeRO-Infinity §3-4 sizes a run by the bytes each tier must hold; refimpl enforces them (``memory.device_bytes``,
``memory.host_bytes``): every holder of model states, swap buffers, gathered parameters or offloaded activations
charges its bytes here when it takes them and gives them back when done. An allocation past a budget fails at
once with a message naming the budget, the holder and the bytes needed, instead of the run silently using more
than the machine it models has. On CPU backends the "device" is a region of RAM, so ``memory.device_bytes=256MB``
makes a laptop play a 256 MB GPU.
"""
from __future__ import annotations

import threading
from collections import defaultdict


class TierBudgetError(MemoryError):
    """A tier's byte budget cannot hold what must be in it at once; names the budget and the bytes needed."""


class TierBudget:
    def __init__(self, rank: int = 0, limits: dict | None = None):
        self.rank = rank
        self.limits = {k: v for k, v in (limits or {}).items() if v is not None}  # tier -> byte budget
        self.used = defaultdict(int)     # tier -> bytes held now
        self.peak = defaultdict(int)     # tier -> most bytes held at once
        self._lock = threading.Lock()    # I/O threads give bytes back too

    def fits(self, tier: str, nbytes: int) -> bool:
        return tier not in self.limits or self.used[tier] + nbytes <= self.limits[tier]

    def alloc(self, tier: str, nbytes: int, what: str = "") -> None:
        """Count nbytes into `tier`; over its budget -> TierBudgetError naming budget, need and holder."""
        with self._lock:
            if not self.fits(tier, nbytes):
                raise TierBudgetError(
                    f"memory.{tier}_bytes={self.limits[tier]:,} is too small on rank {self.rank}: "
                    f"{what or 'an allocation'} needs {int(nbytes):,} bytes with {self.used[tier]:,} already held "
                    f"(at least {self.used[tier] + int(nbytes):,} bytes needed)")
            self.used[tier] += int(nbytes)
            self.peak[tier] = max(self.peak[tier], self.used[tier])

    def free(self, tier: str, nbytes: int) -> None:
        with self._lock:
            self.used[tier] -= int(nbytes)

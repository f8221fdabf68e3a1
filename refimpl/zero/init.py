"""zero.Init: build a model without ever holding it whole (ZeRO-Infinity §5.1.1, DeepSpeed's ``zero.Init``).

A model whose parameters do not fit in memory cannot be built first and partitioned afterwards. Inside
``with zero.Init():`` the layers defer their weights (refimpl/deferred_init.py: the model core knows nothing of
ZeRO), and ZeRO stage 3, when it takes the model, draws the parameters one at a time, keeps this rank's chunk (on
the device, or straight into the host/NVMe tier) and drops the rest: DeepSpeed's post-init partitioning
(refimpl/zero/stage3.py, ``_partition_as_drawn``). The peak is a few whole parameters: the one being
partitioned and the next three, drawn meanwhile on worker threads.
"""
from __future__ import annotations

from ..deferred_init import deferred


class Init(deferred):
    """``with Init(): model = Transformer(...)``: parameters are created deferred, for stage 3 to partition as
    it draws them. ``enabled=False`` makes it a no-op, as in DeepSpeed, so callers can write one ``with`` for
    every stage."""

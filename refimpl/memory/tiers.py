"""Which store holds an offload tier: ``offload_*.device`` and the ``aio`` section decide (refimpl/memory/store.py).

    device "cpu"                       HostStore: host RAM (pinned behind a GPU backend)
    device "nvme", aio.engine "aio"    AioStore: O_DIRECT requests on I/O threads (DeepNVMe; the default)
    device "nvme", aio.engine "mmap"   MmapStore: numpy.memmap swap files (the readable reference)
"""
from __future__ import annotations

from dataclasses import dataclass

from .aio_store import AioStore
from .mmap_store import MmapStore
from .store import HostStore, Store, aligned_empty

ENGINES = ("aio", "mmap")


@dataclass(frozen=True)
class AioConfig:
    """DeepSpeed's ``aio`` section (deepspeed/runtime/swap_tensor/aio_config.py), the knobs AioStore uses, and
    refimpl's ``engine``: which NVMe store to build ("aio": AioStore, the default; "mmap": MmapStore)."""
    block_size: int = 1 << 20
    queue_depth: int = 8
    intra_op_parallelism: int = 1
    engine: str = "aio"

    @classmethod
    def from_section(cls, aio: dict) -> "AioConfig":
        """From the validated ``aio`` section (DeepSpeed's knobs refimpl doesn't use are left out)."""
        return cls(aio["block_size"], aio["queue_depth"], aio["intra_op_parallelism"], aio.get("engine", "aio"))


def make_store(device: str, path=None, aio: AioConfig = AioConfig(), *, empty=aligned_empty) -> Store:
    """The store of an offload tier: ``device`` "cpu" -> HostStore (``empty`` allocates its arrays); "nvme" -> the
    store ``aio.engine`` names, in the swap folder ``path``."""
    if device == "cpu":
        return HostStore(empty)
    if device != "nvme":
        raise ValueError(f"offload device {device!r}: a store is 'cpu' or 'nvme'")
    if aio.engine == "mmap":
        return MmapStore(path)
    if aio.engine == "aio":
        return AioStore(path, block_size=aio.block_size, queue_depth=aio.queue_depth,
                        intra_op_parallelism=aio.intra_op_parallelism)
    raise ValueError(f"aio.engine={aio.engine!r}: must be one of {', '.join(ENGINES)}")

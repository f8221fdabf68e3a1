"""The ``zero_optimization`` section as typed values: what the stages, their offload tiers and the stage-3
prefetcher read (DeepSpeed's DeepSpeedZeroConfig and offload_config.py, by DeepSpeed's field names).

refimpl/config.py validates the whole config dict; the engine turns its ZeRO part into a ZeroConfig once, and
nothing below the engine sees the dict.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..memory.tiers import AioConfig


@dataclass(frozen=True)
class OffloadConfig:
    """``offload_param`` / ``offload_optimizer`` (device "none" is no OffloadConfig at all)."""
    device: str                       # "cpu" (host memory) or "nvme" (swap files under nvme_path)
    nvme_path: str | None
    buffer_count: int                 # swap buffers (parameters) or sub-group buffer sets (optimizer)
    buffer_size: int | None = None    # offload_param only: elements per parameter swap buffer
    ratio: float = 1.0                # offload_optimizer only: the fraction of sub-groups offloaded (Twin-Flow)

    @classmethod
    def from_section(cls, section: dict | None) -> "OffloadConfig | None":
        if section is None or section["device"] == "none":
            return None
        return cls(section["device"], section["nvme_path"], section["buffer_count"], section.get("buffer_size"),
                   section.get("ratio", 1.0))

    def device_groups(self, n_groups: int) -> int:
        """How many of the first sub-groups stay on the device: DeepSpeed stage 3's rule, sub-group i is offloaded
        when i >= int((1 - ratio) * n_groups)."""
        return int((1 - self.ratio) * n_groups)

    def swap_folder(self, stage: int, what: str, rank: int) -> Path | None:
        """Where this rank's swap files go (DeepSpeed's layout: nvme_path/zero_stage_N/<what>/rankR)."""
        if self.device != "nvme":
            return None
        return Path(self.nvme_path) / f"zero_stage_{stage}" / what / f"rank{rank}"


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = 0
    reduce_bucket_size: int = 500_000_000
    sub_group_size: int = 1_000_000_000
    prefetch_bucket_size: int = 50_000_000          # stage3_prefetch_bucket_size
    param_persistence_threshold: int = 100_000      # stage3_param_persistence_threshold
    max_live_parameters: int = 1_000_000_000        # stage3_max_live_parameters
    max_reuse_distance: int = 1_000_000_000         # stage3_max_reuse_distance
    offload_param: OffloadConfig | None = None
    offload_optimizer: OffloadConfig | None = None
    aio: AioConfig = AioConfig()

    @classmethod
    def from_config(cls, config: dict) -> "ZeroConfig":
        """From a validated config (refimpl/config.py): its zero_optimization and aio sections."""
        z = config["zero_optimization"]
        return cls(stage=z["stage"], reduce_bucket_size=z["reduce_bucket_size"], sub_group_size=z["sub_group_size"],
                   prefetch_bucket_size=z["stage3_prefetch_bucket_size"],
                   param_persistence_threshold=z["stage3_param_persistence_threshold"],
                   max_live_parameters=z["stage3_max_live_parameters"],
                   max_reuse_distance=z["stage3_max_reuse_distance"],
                   offload_param=OffloadConfig.from_section(z["offload_param"]),
                   offload_optimizer=OffloadConfig.from_section(z["offload_optimizer"]),
                   aio=AioConfig.from_section(config["aio"]))

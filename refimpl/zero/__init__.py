"""ZeRO: partitioning model states across data-parallel ranks (Rajbhandari et al. 2020; ZeRO-Infinity §5).

    base.py          the stage protocol the engine drives (ZeroStage), and what every stage shares
    config.py        the zero_optimization section as typed values (ZeroConfig, OffloadConfig)
    partition.py     which rank owns which elements of every parameter (one layout for all stages)
    flat.py          whole low-precision parameters as views of one flat buffer (stages 0-2)
    stage0.py        data parallelism: all-reduce gradients; every rank holds everything (the baseline)
    stage1.py        optimizer states partitioned (P_os)
    stage2.py        + gradients partitioned, reduce-scattered in buckets during backward (P_os+g)
    stage3.py        + parameters partitioned, gathered and released around each module (P_os+g+p)
    buckets.py       the bucketed reduce-scatter of gradients during backward (stages 2-3)
    grad_offload.py  where reduced gradients go: the device, or the host with the optimizer (ZeRO-Offload)
    prefetch.py      stage 3's trace-based all-gather prefetcher
    init.py          zero.Init: a model built deferred, drawn and partitioned one parameter at a time
"""
from .base import ZeroStage
from .config import OffloadConfig, ZeroConfig
from .stage0 import DataParallel
from .stage1 import OptimizerStatePartitioning
from .stage2 import GradientPartitioning
from .partition import ZeroParamStatus
from .stage3 import ParameterPartitioning

ZERO_STAGES = {0: DataParallel, 1: OptimizerStatePartitioning, 2: GradientPartitioning, 3: ParameterPartitioning}

__all__ = ["ZERO_STAGES", "DataParallel", "GradientPartitioning", "OffloadConfig", "OptimizerStatePartitioning",
           "ParameterPartitioning", "ZeroConfig", "ZeroParamStatus", "ZeroStage"]

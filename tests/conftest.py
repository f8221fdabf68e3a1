"""Shared fixtures for tests/: a tiny training config that runs a step in milliseconds."""
import pytest

# A one-layer, 32-wide byte LM on 200 kB of stdlib source: a whole `refimpl train` run takes about a second.
# The tiny model every end-to-end test trains (one block of width 32 on 200 kB of bytes): files add what they vary.
TINY_MODEL = ("model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.max_seq_len=32", "data.seq_len=32",
              "data.max_bytes=200000")
TINY_OVERRIDES = (
    *TINY_MODEL, "train_micro_batch_size_per_gpu=4", "run.eval_batches=2", "run.eval_interval=5",
    "scheduler.params.warmup_num_steps=2",
)


@pytest.fixture
def tiny_config():
    """tiny_config(*overrides) -> a resolved config: TINY_OVERRIDES, then `overrides` ("KEY.PATH=VALUE")."""
    from refimpl.config import load_config

    def make(*overrides):
        return load_config(None, [*TINY_OVERRIDES, *overrides])
    return make


# `refimpl train` without --config starts from the ZeRO-Infinity default run (config.INFINITY_RUN); these put the
# command line back on config.DEFAULT_CONFIG's values, so CLI runs and load_config(None, ...) agree.
PLAIN_RUN = (
    "world_size=1", "zero_optimization.stage=0", "zero_optimization.stage3_param_persistence_threshold=100000",
    "zero_optimization.offload_param=null", "zero_optimization.offload_optimizer=null", "memory.device_bytes=null",
    "run.steps=300",
)


@pytest.fixture
def tiny_set_args():
    """The same tiny config as command-line arguments: ["--set", "model.n_layers=1", "--set", ...]."""
    return [arg for o in (*PLAIN_RUN, *TINY_OVERRIDES) for arg in ("--set", o)]

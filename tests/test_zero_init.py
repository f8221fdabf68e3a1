"""zero.Init (refimpl/zero/init.py) and the streaming paths that let a model bigger than memory train.

- A model built inside zero.Init holds no parameter values; drawn later, they equal the eager model's bitwise.
- Stage 3 partitions one parameter at a time, drawing the next few ahead: building the engine never holds the
  whole model.
- Offloaded sub-groups are runs of whole parameters (DeepSpeed's `_create_fp16_sub_groups`), and each one's new
  low-precision parameters are written back to NVMe before the next sub-group's Adam runs.
"""
import threading
import tracemalloc

import numpy as np
import pytest

from refimpl.backend import use_backend
from refimpl.config import load_config
from refimpl.engine import Engine
from refimpl.memory.optimizer_offload import sub_groups
from refimpl.model import ModelConfig, Transformer
from refimpl.train import build
from refimpl.deferred_init import DeferredInit, materialize, materialize_in_order
from refimpl.zero.init import Init

from conftest import TINY_OVERRIDES


@pytest.mark.parametrize("mlp_tiles", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_deferred_parameters_equal_eager_ones(mlp_tiles, dtype):
    cfg = ModelConfig(vocab_size=50, n_layers=2, d_model=16, n_heads=2, max_seq_len=8, mlp_tiles=mlp_tiles)
    eager = dict(Transformer(cfg, seed=3, dtype=dtype).named_parameters())
    with Init():
        deferred = dict(Transformer(cfg, seed=3, dtype=dtype).named_parameters())
    assert list(deferred) == list(eager)
    drawn_later = [n for n, p in deferred.items() if isinstance(p.data, DeferredInit)]
    # every parameter waits (LayerNorm's ones and zeros included), except the tiles, cut eagerly from the drawn weight
    assert sorted(drawn_later) == sorted(n for n in deferred if mlp_tiles == 1 or ".mlp." not in n)
    assert any("ln_1.weight" in n for n in drawn_later) and any("q_proj.weight" in n for n in drawn_later)
    for name in reversed(list(eager)):     # drawn in any order: every parameter has its own stream
        got = materialize(deferred[name].data)
        assert got.dtype == eager[name].dtype, name
        np.testing.assert_array_equal(got, eager[name].data, err_msg=name)


@pytest.mark.parametrize("ahead", [1, 3])
def test_drawing_ahead_on_threads_gives_the_same_parameters_in_order(ahead):
    """stage 3's zero.Init draws the next parameters on worker threads (materialize_in_order): the same values,
    in the same order, eager arrays passed through; a consumer that stops early leaves no thread behind."""
    cfg = ModelConfig(vocab_size=50, n_layers=3, d_model=16, n_heads=2, max_seq_len=8, mlp_tiles=2)
    with Init():
        datas = [p.data for p in Transformer(cfg, seed=5).parameters()]
    assert any(isinstance(d, DeferredInit) for d in datas) and not all(isinstance(d, DeferredInit) for d in datas)
    got = list(materialize_in_order(datas, ahead=ahead))
    assert len(got) == len(datas)
    for d, g in zip(datas, got):
        want = materialize(d)
        assert g.dtype == want.dtype and g.shape == want.shape
        np.testing.assert_array_equal(g, want)
    before = threading.active_count()
    drawn = materialize_in_order(datas, ahead=ahead)
    next(drawn)
    assert threading.active_count() > before   # drawing ahead on its own threads
    drawn.close()                              # waits for the draws in flight, then the pool is gone
    assert threading.active_count() == before


def test_state_dict_of_a_deferred_model_draws_it():
    cfg = ModelConfig(vocab_size=20, n_layers=1, d_model=8, n_heads=2, max_seq_len=4)
    with Init():
        deferred = Transformer(cfg, seed=4)
    eager = Transformer(cfg, seed=4).state_dict()
    got = deferred.state_dict()
    assert got.keys() == eager.keys()
    for name in eager:
        np.testing.assert_array_equal(got[name], eager[name], err_msg=name)


def test_init_disabled_or_exited_builds_eagerly():
    cfg = ModelConfig(vocab_size=20, n_layers=1, d_model=8, n_heads=2, max_seq_len=4)
    with Init(enabled=False):
        a = Transformer(cfg, seed=0)
    with Init():
        pass
    b = Transformer(cfg, seed=0)
    assert not any(isinstance(p.data, DeferredInit) for p in a.parameters() + b.parameters())


def _config(*extra, tmp_path=None):
    swap = [] if tmp_path is None else [
        "zero_optimization.offload_param.device=nvme", f"zero_optimization.offload_param.nvme_path={tmp_path}",
        "zero_optimization.offload_optimizer.device=nvme", f"zero_optimization.offload_optimizer.nvme_path={tmp_path}"]
    return load_config(None, [*TINY_OVERRIDES, "zero_optimization.stage=3",
                              "zero_optimization.stage3_param_persistence_threshold=0", *swap, *extra])


def test_stage3_engine_from_a_deferred_model_trains_like_an_eager_one(tmp_path):
    losses = {}
    for deferred in (False, True):
        cfg = _config(tmp_path=tmp_path / str(deferred))
        be, dataset, _ = build(cfg)
        with use_backend(be), Init(enabled=deferred):
            model = Transformer(ModelConfig.from_dict({**cfg["model"], "vocab_size": dataset.vocab_size}),
                                seed=cfg["run"]["seed"])
        with use_backend(be):
            engine = Engine(model, cfg, be)
            losses[deferred] = []
            for step in range(3):
                loss, _ = model.loss(dataset.get_batch("train", step, 4, cfg["data"]["seq_len"]))
                engine.backward(loss)
                engine.step()
                losses[deferred].append(float(loss.data))
    assert losses[True] == losses[False]


def test_building_a_stage3_engine_never_holds_the_whole_model(tmp_path):
    """Deep and narrow, so one parameter is tiny next to the model: with parameters and optimizer on NVMe the
    engine's peak allocation is the bf16 gradient partition (2 bytes per parameter) plus buffers of a few
    parameters, well below the 4 bytes per parameter of the fp32 master alone (let alone the 16 of all states)."""
    cfg = _config("model.n_layers=24", "model.d_model=64", "model.n_heads=2", "bf16.enabled=true",
                  "zero_optimization.sub_group_size=20000", tmp_path=tmp_path,
                  *("aio.block_size=16384", "aio.queue_depth=2"))   # the I/O threads' own aligned buffers: small
    be, _, model = build(cfg)        # stage 3: built inside zero.Init
    psi = model.num_parameters()
    largest = max(p.size for p in model.parameters())
    assert psi > 50 * largest        # the premise: the model is many parameters
    with use_backend(be):
        tracemalloc.start()
        try:
            engine = Engine(model, cfg, be)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert engine.zero.grad_partition.nbytes == 2 * psi
    assert peak < 2 * psi + 2 * psi, f"peak {peak:,} bytes for {psi:,} parameters"   # grads + less than half the master


@pytest.mark.parametrize("chunks, size, want", [
    ([3, 3, 3, 3], 5, [(0, 6), (6, 12)]),          # a sub-group closes once it holds >= sub_group_size
    ([3, 3, 3, 3], 1, [(0, 3), (3, 6), (6, 9), (9, 12)]),
    ([3, 3, 3, 3], 100, [(0, 12)]),                # DeepSpeed's default 1e9: one sub-group
    ([10, 1, 1], 4, [(0, 10), (10, 12)]),          # a parameter bigger than sub_group_size is never split
    ([], 4, [(0, 0)]),
])
def test_sub_groups_hold_whole_parameters(chunks, size, want):
    assert sub_groups(chunks, size) == want


def test_parameters_are_written_back_per_sub_group_before_the_next_adam(tmp_path):
    cfg = _config("zero_optimization.sub_group_size=3000", tmp_path=tmp_path)
    be, dataset, model = build(cfg)
    with use_backend(be):
        engine = Engine(model, cfg, be)
        loss, _ = model.loss(dataset.get_batch("train", 0, 4, cfg["data"]["seq_len"]))
        engine.backward(loss)
        engine.ledger.step = 1
        engine.step()
    events = [e for e in engine.ledger.events if e["step"] == 1]
    adam = [e for e in events if e["kind"] == "compute" and e["label"].startswith("adam sub-group")]
    writes = [e for e in events if e["kind"] == "transfer" and e["dst"] == "nvme"
              and e["label"].startswith("parameters of sub-group")]
    groups = engine.optimizer.groups
    assert len(groups) >= 3 and len(adam) == len(writes) == len(groups)
    assert [e["label"] for e in writes] == [f"parameters of sub-group [{lo}, {hi})" for lo, hi in groups]
    assert sum(e["nbytes"] for e in writes) == engine.zero.layout.partition_numel * 4   # fp32 parameters
    for write, next_adam in zip(writes, adam[1:]):
        assert write["start"] <= next_adam["start"]    # issued before the next sub-group computes

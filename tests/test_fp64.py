"""model.dtype=float64: the rounding-free reference run, end to end (master weights, moments, activations,
reductions), on every ZeRO stage and offload tier, and on the numba backend too."""
import numpy as np
import pytest

from refimpl.backend import available_backends, use_backend
from refimpl.config import ConfigError, load_config
from refimpl.crosscheck.refimpl_side import run_refimpl
from refimpl.engine import Engine
from refimpl.train import build, train_step
from tests.conftest import TINY_MODEL

TINY = [*TINY_MODEL, "train_micro_batch_size_per_gpu=4", "scheduler=null", "optimizer.params.lr=3e-3"]


def losses(cfg, steps=3):
    return [r["loss"] for r in run_refimpl(cfg, steps, ()).steps]


@pytest.mark.parametrize("backend", [b for b in ("numpy", "numba") if available_backends().get(b) is None])
def test_everything_is_float64(backend):
    cfg = load_config(None, [*TINY, "model.dtype=float64", f"backend={backend}"])
    be, ds, model = build(cfg)
    with use_backend(be):
        engine = Engine(model, cfg, be)
        captured = {}
        engine.gradient_hooks.append(lambda g, s: captured.setdefault("grad", g))
        batch = ds.get_batch("train", 0, 4, 32)
        loss, logits = model.loss(batch)
        assert logits.dtype == np.float64 and loss.dtype == np.float64
        train_step(cfg, ds, model, engine, 0)
    assert all(p.dtype == np.float64 for p in model.parameters())
    assert captured["grad"].dtype == np.float64
    assert engine.optimizer.master.dtype == engine.optimizer.exp_avg.dtype == np.float64
    assert engine.optimizer.exp_avg_sq.dtype == np.float64 and np.abs(engine.optimizer.exp_avg).max() > 0


def test_float64_is_the_same_run_as_float32_up_to_float32_rounding():
    a = losses(load_config(None, TINY), 5)
    b = losses(load_config(None, [*TINY, "model.dtype=float64"]), 5)
    np.testing.assert_allclose(a, b, rtol=1e-5)      # same start, same batches: only rounding differs
    assert a != b and b[-1] < b[0]                     # and it is a different computation that trains


@pytest.mark.parametrize("extra", [
    ["zero_optimization.stage=1", "world_size=2", "train_micro_batch_size_per_gpu=2"],
    ["zero_optimization.stage=3", "world_size=2", "train_micro_batch_size_per_gpu=2",
     "zero_optimization.stage3_param_persistence_threshold=0",
     'zero_optimization.offload_optimizer={"device": "cpu"}', 'zero_optimization.offload_param={"device": "cpu"}'],
])
def test_float64_stages_and_offload_agree_with_stage0_to_float64_rounding(extra):
    ref = losses(load_config(None, [*TINY, "model.dtype=float64"]))
    got = losses(load_config(None, [*TINY, "model.dtype=float64", *extra]))
    np.testing.assert_allclose(got, ref, rtol=1e-13)


def test_float64_refuses_fp16_and_bf16():
    for sec in ("fp16", "bf16"):
        with pytest.raises(ConfigError, match=r"^model.dtype: float64 .* needs fp16.enabled and bf16.enabled false"):
            load_config(None, ["model.dtype=float64", f"{sec}.enabled=true"])

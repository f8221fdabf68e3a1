"""Tests of refimpl/engine.py: the mixed-precision engine (DeepSpeedEngine's step semantics) at every ZeRO stage.

Each test drives `Engine` directly on the tiny Transformer of `refimpl.train.build` and checks a rule of
DeepSpeed's training loop against a value computed independently here: gradient accumulation equals one
big batch, an fp16 overflow skips the step and moves the loss scale as DeepSpeed's DynamicLossScaler does,
low-precision params mirror the fp32 master, clipping follows torch's clip_grad_norm_ rule, and the logged LR
follows the schedule.

The accumulation, overflow and clipping rules are the engine's, not the stage's, so those tests run at ZeRO
stages 0-3 (refimpl/zero/stage{0,1,2,3}.py) with one rank. With one partition the partition layout is every
parameter flattened in model order, so `engine.zero.master`, Adam's moments and the stage's gradient partition
line up element for element with a whole-model reference computed here.
"""
import json

import ml_dtypes
import numpy as np
import pytest

from refimpl.backend import use_backend
from refimpl.data import Batch
from refimpl.engine import Engine
from refimpl.kernels.optim import adam_step
from refimpl.optim import lr_at
from refimpl.train import build, train

STAGES = [0, 1, 2, 3]


def stage_overrides(stage: int) -> list:
    """Config overrides for ZeRO `stage`. At stage 3 a persistence threshold of 0 partitions every parameter
    (the tiny model's are all below the default 1e5 elements, which would keep them whole)."""
    out = [f"zero_optimization.stage={stage}"]
    if stage == 3:
        out.append("zero_optimization.stage3_param_persistence_threshold=0")
    return out


def make_engine(config):
    be, dataset, model = build(config)
    with use_backend(be):
        engine = Engine(model, config, be)
    return engine, dataset, model


def micro_step(engine, model, batch):
    """Forward + backward of one micro-batch; returns the (unscaled) loss."""
    with use_backend(engine.backend):
        loss, _ = model.loss(batch)
        engine.backward(loss)
    return loss.item()


def full_step(engine, dataset, model, step):
    """One optimizer step on the training batches of `step` (gas micro-batches); returns step()'s result."""
    bs, T = engine.config["train_micro_batch_size_per_gpu"], engine.config["data"]["seq_len"]
    for micro in range(engine.gas):
        micro_step(engine, model, dataset.get_batch("train", step * engine.gas + micro, bs, T))
    with use_backend(engine.backend):
        return engine.step()


def pending_grad(engine) -> np.ndarray:
    """A copy of the fp32 gradient partition the next step() would apply (loss-scaled, summed over ranks).
    Stages 0-1 keep it in each parameter's .grad, stages 2-3 in the stage's gradient partition."""
    with use_backend(engine.backend):
        return np.array(engine.backend.to_numpy(engine.zero.reduce_gradients()), dtype=np.float32, copy=True)


def whole_params(engine) -> np.ndarray:
    """Every low-precision parameter, whole and flattened in model order (stage 3 gathers them)."""
    with use_backend(engine.backend):
        full = engine.zero.full_params()
    return np.concatenate([np.array(engine.backend.to_numpy(full[s.name])).reshape(-1)
                           for s in engine.zero.layout.slots])


def snapshot(engine) -> dict:
    """Copies of every model state the optimizer step may touch."""
    snap = {"params": whole_params(engine), "master": engine.zero.master.copy(),
            "exp_avg": engine.optimizer.exp_avg.copy(), "exp_avg_sq": engine.optimizer.exp_avg_sq.copy(),
            "adam_step": engine.optimizer.step_count}
    if engine.zero.lowp_partition is not None:
        snap["lowp_partition"] = engine.zero.lowp_partition.copy()
    return snap


def concat(a: Batch, b: Batch) -> Batch:
    return Batch(ids=np.concatenate([a.ids, b.ids]), targets=np.concatenate([a.targets, b.targets]),
                 labels=None, key_padding_mask=None)


# ------------------------------------------------------------------------------- gradient accumulation

@pytest.mark.parametrize("stage", STAGES)
def test_gradient_accumulation_equals_one_big_batch(tiny_config, stage):
    # scheduler=null: a constant lr, so the very first step moves the weights.
    acc, ds, m_acc = make_engine(tiny_config("scheduler=null", "gradient_accumulation_steps=2",
                                             "train_micro_batch_size_per_gpu=4", *stage_overrides(stage)))
    big, _, m_big = make_engine(tiny_config("scheduler=null", "gradient_accumulation_steps=1",
                                            "train_micro_batch_size_per_gpu=8", *stage_overrides(stage)))
    assert acc.zero.stage == big.zero.stage == stage
    np.testing.assert_array_equal(acc.zero.master, big.zero.master)   # same seed: same initial weights

    b0, b1 = ds.get_batch("train", 0, 4, 32), ds.get_batch("train", 1, 4, 32)
    micro_step(acc, m_acc, b0)
    assert not acc.is_gradient_accumulation_boundary()
    before = acc.zero.master.copy()
    assert acc.step() is True                      # not a boundary: nothing happens
    np.testing.assert_array_equal(acc.zero.master, before)
    assert acc.global_steps == 0 and acc.optimizer.step_count == 0
    micro_step(acc, m_acc, b1)
    assert acc.is_gradient_accumulation_boundary()
    micro_step(big, m_big, concat(b0, b1))

    # mean over 2 micro-batches of 4 == mean over one batch of 8, up to fp32 summation order
    g_acc, g_big = pending_grad(acc), pending_grad(big)
    assert g_acc.shape == g_big.shape == acc.zero.master.shape
    np.testing.assert_allclose(g_acc, g_big, rtol=1e-4, atol=1e-7)
    assert np.abs(g_acc).max() > 1e-3              # a real gradient, not zeros

    acc.step()
    big.step()
    assert acc.global_steps == big.global_steps == 1
    assert acc.micro_steps == 2 and big.micro_steps == 1
    lr = acc.config["optimizer"]["params"]["lr"]
    # Adam's first step is ~lr * sign(g): the two updates agree far below one step of lr.
    np.testing.assert_allclose(acc.zero.master, big.zero.master, rtol=0, atol=1e-3 * lr)
    np.testing.assert_allclose(acc.optimizer.exp_avg, big.optimizer.exp_avg, rtol=1e-4, atol=1e-9)
    assert np.abs(acc.zero.master - before).max() > 0.5 * lr   # and the step did move the weights
    # the model's parameters (gathered, at stage 3) are the new master
    np.testing.assert_array_equal(whole_params(acc), acc.zero.master)
    assert not pending_grad(acc).any() and not pending_grad(big).any()   # gradients cleared for the next step


# ------------------------------------------------------------------------------------ fp16 overflow

@pytest.mark.parametrize("stage", STAGES)
def test_fp16_overflow_skips_step_and_follows_hysteresis(tiny_config, stage):
    # Linear warmup over 10 steps: every applied step has a different lr, so a schedule that advanced on a
    # skipped step would be visible. Window 3 and hysteresis 2 make both rules show within 8 steps.
    config = tiny_config("fp16.enabled=true", "fp16.initial_scale_power=8", "fp16.hysteresis=2",
                         "fp16.loss_scale_window=3", "gradient_clipping=0",
                         'scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 10, '
                         '"warmup_type": "linear", "warmup_min_lr": 0.0001}}', *stage_overrides(stage))
    engine, ds, model = make_engine(config)
    assert engine.dtype == np.float16 and whole_params(engine).dtype == np.float16
    if stage < 3:
        assert engine.zero.flat.dtype == np.float16

    # Poison one parameter's gradient on chosen steps: an inf gradient is what an fp16 overflow looks like.
    poison = {"on": False}
    name, victim = next(iter(model.named_parameters()))
    victim.register_hook(lambda g: np.full_like(g, np.inf) if poison["on"] else None)

    overflow_at = {2, 3, 8, 9}                      # 1-based steps
    # DeepSpeed's DynamicLossScaler worked by hand for this pattern (init 2^8, hysteresis 2, window 3):
    #  it0 clean; it1 overflow: hysteresis 2->1; it2 overflow: halve -> 128; it3..it5 clean (s = 0, 1, 2);
    #  it6 clean: s = it6 - it2 - 1 = 3 -> double -> 256, hysteresis back to 2;
    #  it7 overflow: hysteresis 2->1; it8 overflow: halve -> 128; it9 clean.
    expected_scale_used = [256, 256, 256, 128, 128, 128, 128, 256, 256, 128]
    sched, base_lr = config["scheduler"], config["optimizer"]["params"]["lr"]
    applied = skipped = 0
    for step, scale in enumerate(expected_scale_used, start=1):
        before = snapshot(engine)
        poison["on"] = step in overflow_at
        assert engine.loss_scale == scale
        ok = full_step(engine, ds, model, step - 1)
        assert engine.last["loss_scale"] == scale
        # the LR of an attempted step counts only the applied steps before it
        assert engine.last["lr"] == pytest.approx(lr_at(applied, sched, base_lr), rel=1e-12)
        after = snapshot(engine)
        if step in overflow_at:
            skipped += 1
            assert ok is False and engine.last["overflow"] is True
            for key in before.keys() - {"adam_step"}:
                np.testing.assert_array_equal(after[key], before[key], err_msg=f"{key} changed on a skipped step")
            assert after["adam_step"] == before["adam_step"] == applied
        else:
            applied += 1
            assert ok is True and engine.last["overflow"] is False
            assert np.isfinite(after["master"]).all()
            assert not np.array_equal(after["master"], before["master"])
            np.testing.assert_array_equal(after["params"], after["master"].astype(np.float16))
            assert after["adam_step"] == applied
        assert engine.global_steps == step
        assert engine.skipped_steps == skipped
        assert not pending_grad(engine).any()      # a skipped step's inf gradient is not carried over
    assert engine.loss_scale == 128
    assert engine.current_lr() == pytest.approx(lr_at(applied, sched, base_lr), rel=1e-12)
    # the schedule really moves between applied steps (else the lr checks above would prove nothing)
    assert lr_at(1, sched, base_lr) != lr_at(2, sched, base_lr)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_fp16_huge_initial_scale_overflows_without_help(tiny_config, stage):
    # 2^40 * loss is far beyond fp16's 65504: the scaled backward overflows without any help.
    engine, ds, model = make_engine(tiny_config("fp16.enabled=true", "fp16.initial_scale_power=40",
                                                "fp16.hysteresis=1", *stage_overrides(stage)))
    before = snapshot(engine)
    assert full_step(engine, ds, model, 0) is False
    assert engine.skipped_steps == 1 and engine.loss_scale == 2.0 ** 39   # hysteresis 1: halve at once
    np.testing.assert_array_equal(engine.zero.master, before["master"])
    np.testing.assert_array_equal(whole_params(engine), before["params"])
    assert engine.optimizer.step_count == 0


# ------------------------------------------------------------------------------ low-precision params

@pytest.mark.parametrize("precision, dtype", [("fp16", np.dtype(np.float16)),
                                              ("bf16", np.dtype(ml_dtypes.bfloat16))])
def test_low_precision_params_mirror_fp32_master(tiny_config, precision, dtype):
    engine, ds, model = make_engine(tiny_config(f"{precision}.enabled=true", "scheduler=null",
                                                "fp16.initial_scale_power=8"))
    assert engine.zero.stage == 0
    assert engine.zero.flat.buffer.dtype == dtype and engine.zero.master.dtype == np.float32
    for name, p in model.named_parameters():
        assert p.data.dtype == dtype, name
        assert np.shares_memory(p.data, engine.zero.flat.buffer), name   # a view into the flat buffer
    initial = engine.zero.master.copy()
    for step in range(2):
        assert full_step(engine, ds, model, step) is True
    assert not np.array_equal(engine.zero.master, initial)
    # The stored params are the master rounded to nearest in their dtype ...
    np.testing.assert_array_equal(engine.zero.flat.buffer, engine.zero.master.astype(dtype))
    for name, p in model.named_parameters():
        assert p.data.dtype == dtype, name
    # ... so the upcast params are within half an ulp of the master (fp16: 2^-11, bf16: 2^-8 relative).
    rel = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}[precision]
    up = engine.zero.flat.buffer.astype(np.float32)
    tiny = np.finfo(dtype).smallest_subnormal if precision == "fp16" else 0
    assert np.all(np.abs(up - engine.zero.master) <= rel * np.abs(engine.zero.master) + tiny)


# ----------------------------------------------------------------------------------------- clipping

@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_clipping_scales_gradient_by_max_norm_over_norm(tiny_config, precision, stage):
    max_norm = 1e-3
    # A large Adam eps makes the update depend on the gradient's size, so clipping is visible in it.
    overrides = ["scheduler=null", f"gradient_clipping={max_norm}", "optimizer.params.eps=1e-4",
                 *stage_overrides(stage)]
    if precision == "fp16":
        overrides += ["fp16.enabled=true", "fp16.loss_scale=512"]     # static scale: unscale + clip together
    engine, ds, model = make_engine(tiny_config(*overrides))
    scale = engine.loss_scale
    micro_step(engine, model, ds.get_batch("train", 0, 4, 32))
    grad = pending_grad(engine)                     # loss-scaled fp32 gradient
    master = engine.zero.master.copy()

    norm = float(np.sqrt(np.sum(grad.astype(np.float64) ** 2))) / scale
    assert norm > 100 * max_norm                    # clipping is active
    coef = max_norm / (norm + 1e-6)                 # torch.nn.utils.clip_grad_norm_

    opt = engine.config["optimizer"]["params"]

    def adam(g):
        p, m, v = master.copy(), np.zeros_like(master), np.zeros_like(master)
        adam_step(p, g, m, v, lr=opt["lr"], beta1=opt["betas"][0], beta2=opt["betas"][1], eps=opt["eps"],
                  weight_decay=opt["weight_decay"], step=1)
        return p, m

    clipped = (grad.astype(np.float64) / scale * coef).astype(np.float32)
    expect_p, expect_m = adam(clipped)
    unclipped_p, _ = adam((grad.astype(np.float64) / scale).astype(np.float32))

    assert engine.step() is True
    assert engine.last["grad_norm"] == pytest.approx(norm, rel=1e-6)
    np.testing.assert_allclose(engine.optimizer.exp_avg, expect_m, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(engine.zero.master, expect_p, rtol=1e-6, atol=1e-6 * opt["lr"])
    # the reference is discriminating: without clipping the update is very different
    assert np.abs(unclipped_p - expect_p).max() > 0.1 * opt["lr"]


@pytest.mark.parametrize("stage", STAGES)
def test_no_clipping_below_max_norm(tiny_config, stage):
    engine, ds, model = make_engine(tiny_config("scheduler=null", "gradient_clipping=1e6",
                                                "optimizer.params.eps=1e-4", *stage_overrides(stage)))
    micro_step(engine, model, ds.get_batch("train", 0, 4, 32))
    grad, master = pending_grad(engine), engine.zero.master.copy()
    opt = engine.config["optimizer"]["params"]
    m, v = np.zeros_like(master), np.zeros_like(master)
    adam_step(master, grad, m, v, lr=opt["lr"], beta1=opt["betas"][0], beta2=opt["betas"][1], eps=opt["eps"],
              weight_decay=opt["weight_decay"], step=1)
    engine.step()
    np.testing.assert_allclose(engine.zero.master, master, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------- LR per step

def test_metrics_lr_follows_schedule(tiny_config, tmp_path):
    config = tiny_config("run.steps=10")             # WarmupCosineLR, 2 warmup steps, total = run.steps
    train(config, tmp_path / "run", progress=False)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    base_lr = config["optimizer"]["params"]["lr"]
    for r in steps:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, config["scheduler"], base_lr), rel=1e-12), r
    assert len({r["lr"] for r in steps}) >= 8       # a schedule, not a constant

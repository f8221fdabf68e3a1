"""Offload moves bytes, it must not change them (ZeRO-Infinity §5; issue: offload equivalence).

Every offload_optimizer device (none, cpu, nvme) at stages 1-3 and world sizes {1, 2, 4} gives bitwise the
same losses, weights and Adam moments as the run without offload in fp32 on the NumPy backend: the host step
runs the same elementwise kernel on the same numbers, sub-group by sub-group. The ledger records the traffic:
grads device->host, low-precision partitions host->device, and with NVMe the sub-groups nvme<->host.
"""
import json

import numpy as np
import pytest

from refimpl.checkpoint import full_optimizer_state
from refimpl.config import ConfigError, load_config
from refimpl.train import train
from tests.conftest import TINY_MODEL

TINY = (*TINY_MODEL, "run.eval_batches=1", "run.eval_interval=1000", "run.steps=4",
        "scheduler.params.warmup_num_steps=2", "zero_optimization.stage3_param_persistence_threshold=0",
        # several sub-groups per partition, the last one partial: the pipeline has to turn over
        "zero_optimization.sub_group_size=3000")
B = 8


def run(tmp_path, stage, world_size, device, *extra):
    out = tmp_path / f"s{stage}w{world_size}{device}" / "run"
    overrides = [*TINY, f"zero_optimization.stage={stage}", f"world_size={world_size}",
                 f"train_micro_batch_size_per_gpu={B // world_size}", *extra]
    if device != "none":
        nvme = tmp_path / f"s{stage}w{world_size}{device}" / "swap"
        overrides.append(f'zero_optimization.offload_optimizer={{"device": "{device}", "nvme_path": "{nvme}"}}')
    train(load_config(None, overrides), out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    state, _ = full_optimizer_state(out)
    return [r["loss"] for r in records if "overflow" in r], state, ledger


def assert_bitwise_same(losses, state, ref_losses, ref_state, what) -> None:
    """Losses, fp32 master weights and Adam moments bitwise those of the reference run (signed zeros included)."""
    assert losses == ref_losses, what
    for key in ref_state:
        for name in ref_state[key]:
            np.testing.assert_array_equal(state[key][name], ref_state[key][name], err_msg=f"{what} {key} {name}")
            assert state[key][name].tobytes() == ref_state[key][name].tobytes(), f"{what} {key} {name}"


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_optimizer_offload_changes_nothing(tmp_path, stage, world_size):
    ref_losses, ref_state, _ = run(tmp_path, stage, world_size, "none")
    for device in ("cpu", "nvme"):
        losses, state, ledger = run(tmp_path, stage, world_size, device)
        assert_bitwise_same(losses, state, ref_losses, ref_state, device)
        pairs = {(e["src"], e["dst"]) for e in ledger if e["kind"] == "transfer"}
        assert ("device", "host") in pairs and ("host", "device") in pairs
        if device == "nvme":
            assert ("nvme", "host") in pairs and ("host", "nvme") in pairs
            # every step reads and writes all three fp32 states of this rank's partition once
            per_step = sum(e["nbytes"] for e in ledger if e["kind"] == "transfer" and e["src"] == "nvme"
                           and e["rank"] == 0 and e["step"] == 1)
            moved = sum(e["nbytes"] for e in ledger if e["kind"] == "transfer" and e["src"] == "device"
                        and e["rank"] == 0 and e["step"] == 1)    # the fp32 gradient partition: 4 bytes each
            assert per_step == 3 * moved


def test_nvme_swap_files_live_under_nvme_path(tmp_path):
    run(tmp_path, 2, 2, "nvme")
    swap = tmp_path / "s2w2nvme" / "swap" / "zero_stage_2" / "optimizer"
    assert sorted(p.name for p in swap.iterdir()) == ["rank0", "rank1"]
    assert any(f.stat().st_size > 0 for f in (swap / "rank0").iterdir())


@pytest.mark.parametrize("overrides, key, fragments", [
    (["zero_optimization.offload_optimizer.device=cpu"], "zero_optimization.offload_optimizer.device",
     ["stage >= 1", "stage 0"]),
    (["zero_optimization.stage=2", "zero_optimization.offload_optimizer.device=nvme"],
     "zero_optimization.offload_optimizer.nvme_path", ["nvme"]),
])
def test_offload_config_errors(overrides, key, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value).startswith(key)
    for fragment in fragments:
        assert fragment in str(info.value)


def run3(tmp_path, world_size, param_device, optim_device, *extra):
    """Stage 3 with every parameter partitioned; returns per-step losses, whole optimizer state, ledger."""
    tag = f"w{world_size}p{param_device}o{optim_device}"
    swap = tmp_path / tag / "swap"
    return run(tmp_path / tag, 3, world_size, "none",
               f'zero_optimization.offload_param={{"device": "{param_device}", "nvme_path": "{swap}", '
               f'"buffer_count": 3}}',
               f'zero_optimization.offload_optimizer={{"device": "{optim_device}", "nvme_path": "{swap}"}}', *extra)


@pytest.mark.parametrize("world_size, combos", [
    (1, [("nvme", "nvme")]),
    (2, [(p, o) for p in ("none", "cpu", "nvme") for o in ("none", "cpu", "nvme") if (p, o) != ("none", "none")]),
    (4, [("cpu", "cpu"), ("nvme", "nvme")]),
])
def test_parameter_offload_changes_nothing(tmp_path, world_size, combos):
    ref_losses, ref_state, _ = run3(tmp_path, world_size, "none", "none")
    for param_device, optim_device in combos:
        losses, state, ledger = run3(tmp_path, world_size, param_device, optim_device)
        what = f"offload_param={param_device} offload_optimizer={optim_device}"
        assert_bitwise_same(losses, state, ref_losses, ref_state, what)
        pairs = {(e["src"], e["dst"]) for e in ledger if e["kind"] == "transfer"}
        if param_device != "none":
            assert ("host", "device") in pairs, what      # every gather moves this rank's chunk up
        if param_device == "nvme":
            assert ("nvme", "host") in pairs and ("host", "nvme") in pairs, what


def test_every_store_trains_bitwise_the_same(tmp_path):
    """Parameters and optimizer states in a HostStore, an MmapStore and an AioStore (refimpl/memory/store.py): the
    tiers are interchangeable, so the runs are bitwise the run that offloads nothing."""
    ref_losses, ref_state, _ = run3(tmp_path, 2, "none", "none")
    for device, engine in (("cpu", "aio"), ("nvme", "mmap"), ("nvme", "aio")):
        losses, state, ledger = run3(tmp_path / engine, 2, device, device, f"aio.engine={engine}")
        what = f"offload device={device} aio.engine={engine}"
        assert_bitwise_same(losses, state, ref_losses, ref_state, what)
        pairs = {(e["src"], e["dst"]) for e in ledger if e["kind"] == "transfer"}
        assert (("nvme", "host") in pairs) == (device == "nvme"), what     # a host tier moves nothing to itself
        assert ("host", "host") not in pairs, what


@pytest.mark.parametrize("param_device, optim_device", [("none", "cpu"), ("cpu", "cpu"), ("nvme", "nvme")])
def test_twin_flow_ratio_changes_nothing(tmp_path, param_device, optim_device):
    """offload_optimizer.ratio (ZeRO-Offload++ Twin-Flow): the first int((1 - ratio) * n) sub-groups stay on the
    device (DeepSpeed stage 3's rule), the rest are offloaded; the run is bitwise the run that offloads nothing."""
    ref_losses, ref_state, _ = run3(tmp_path, 2, "none", "none")
    for ratio in (0.0, 0.4, 1.0):
        losses, state, ledger = run3(tmp_path / str(ratio), 2, param_device, optim_device,
                                     f"zero_optimization.offload_optimizer.ratio={ratio}")
        what = f"params {param_device}, optimizer {optim_device}, ratio {ratio}"
        assert_bitwise_same(losses, state, ref_losses, ref_state, what)
        steps = [e for e in ledger if e["kind"] == "compute" and e["rank"] == 0 and e["step"] == 1
                 and e["label"].startswith("adam sub-group")]
        on_device = [e for e in steps if e["label"].endswith("(device)")]
        assert len(steps) > 2, what                       # several sub-groups, so the split is visible
        assert len(on_device) == int((1 - ratio) * len(steps)), what
        if optim_device == "nvme":                        # only the offloaded sub-groups cross the disk
            read = sum(e["nbytes"] for e in ledger if e["kind"] == "transfer" and e["src"] == "nvme"
                       and e["rank"] == 0 and e["step"] == 1 and e["label"].startswith("optimizer"))
            assert (read == 0) == (ratio == 0.0), what


def test_twin_flow_ratio_is_checked():
    with pytest.raises(ConfigError, match=r"offload_optimizer.ratio.*1\.5"):
        load_config(None, ["zero_optimization.stage=3", "zero_optimization.offload_optimizer.device=cpu",
                           "zero_optimization.offload_optimizer.ratio=1.5"])
    with pytest.warns(UserWarning, match="ratio.*stage 3 only"):   # DeepSpeed ignores it below stage 3
        load_config(None, ["zero_optimization.stage=2", "zero_optimization.offload_optimizer.device=cpu",
                           "zero_optimization.offload_optimizer.ratio=0.5"])


def test_bandwidth_centric_each_rank_reads_only_its_shard(tmp_path):
    """ZeRO-Infinity §6.1: per gather, each rank moves 1/N of the parameter across the slow tier."""
    _, _, led1 = run3(tmp_path, 1, "nvme", "none")
    _, _, led2 = run3(tmp_path, 2, "nvme", "none")

    def nvme_read_bytes(ledger, rank):
        return sum(e["nbytes"] for e in ledger if e["kind"] == "transfer" and e["src"] == "nvme"
                   and e["rank"] == rank and e["step"] == 2)
    one = nvme_read_bytes(led1, 0)
    assert one > 0
    for rank in (0, 1):   # the tiny model's parameters split evenly in two, up to padding
        assert abs(nvme_read_bytes(led2, rank) - one / 2) <= 0.02 * one


def test_param_buffer_too_small_names_the_budget(tmp_path):
    with pytest.raises(MemoryError, match=r"buffer_size=10 elements .* largest parameter chunk"):
        run(tmp_path, 3, 1, "none", f'zero_optimization.offload_param={{"device": "nvme", '
                                    f'"nvme_path": "{tmp_path / "swap"}", "buffer_size": 10}}')


# ------------------------------------------------------------------------------------------ byte budgets
def _stage3_config(tmp_path, *extra):
    swap = tmp_path / "swap"
    return load_config(None, [*TINY, "zero_optimization.stage=3", f"train_micro_batch_size_per_gpu={B}",
                              f'zero_optimization.offload_param={{"device": "nvme", "nvme_path": "{swap}"}}',
                              f'zero_optimization.offload_optimizer={{"device": "nvme", "nvme_path": "{swap}"}}',
                              *extra])


def _device_needs(tmp_path, *extra):
    """(bytes of model states left on the device, bytes of the largest gathered parameter), from an engine
    built without a budget."""
    from refimpl.engine import Engine
    from refimpl.train import build
    cfg = _stage3_config(tmp_path / "probe", *extra)
    be, _, model = build(cfg)
    engine = Engine(model, cfg, be)
    static, S = engine.ledger.budget.used["device"], engine.zero.layout.partition_numel
    if cfg["zero_optimization"]["offload_optimizer"]["device"] == "nvme":
        assert static == 0                                   # everything offloaded; the gradients go to the host
        assert engine.ledger.budget.used["host"] >= 4 * S           # (ZeRO-Offload), as they are reduced
    else:
        assert static == 16 * S                              # fp32 gradients, master and both Adam moments
    largest = max(s.numel for s in engine.zero.layout.slots) * 4      # one rank: a chunk is the whole parameter
    return static, largest


def test_device_budget_too_small_for_the_model_states(tmp_path):
    on_device = "zero_optimization.offload_optimizer.device=none"    # the optimizer states stay on the device
    static, _ = _device_needs(tmp_path, on_device)
    with pytest.raises(MemoryError, match=rf"memory.device_bytes={static - 1:,} is too small .* model states "
                                          rf"kept on the device needs {static:,} bytes"):
        train(_stage3_config(tmp_path, on_device, f"memory.device_bytes={static - 1}"), tmp_path / "run",
              progress=False)


def test_device_budget_too_small_for_one_layer_names_the_parameter(tmp_path):
    static, largest = _device_needs(tmp_path)
    with pytest.raises(MemoryError, match=r"memory.device_bytes=.* gathering parameter \S+ needs"):
        train(_stage3_config(tmp_path, f"memory.device_bytes={static + largest - 4}"), tmp_path / "run",
              progress=False)


def test_device_budget_is_never_exceeded_and_numbers_do_not_change(tmp_path):
    static, largest = _device_needs(tmp_path)
    budget = static + 2 * largest                  # room for about two layers at once: prefetch must hold back
    out = tmp_path / "budget" / "run"
    summary = train(_stage3_config(tmp_path / "budget", f"memory.device_bytes={budget}"), out, progress=False)
    assert static + largest <= summary["peak device bytes"] <= budget
    free = tmp_path / "free" / "run"
    train(_stage3_config(tmp_path / "free"), free, progress=False)

    def losses(o):
        return [json.loads(line)["loss"] for line in (o / "metrics.jsonl").read_text().splitlines() if "overflow" in line]
    assert losses(out) == losses(free)

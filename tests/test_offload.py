"""Offload moves bytes, it must not change them (ZeRO-Infinity §5; issue: offload equivalence).

Every offload_optimizer device (none, cpu, nvme) at stages 1-3 and world sizes {1, 2, 4} gives bitwise the
same losses, weights and Adam moments as the run without offload in fp32 on the NumPy backend: the host step
runs the same elementwise kernel on the same numbers, sub-group by sub-group. The ledger records the traffic:
grads device->host, low-precision partitions host->device, and with NVMe the sub-groups nvme<->host.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from refimpl.checkpoint import full_optimizer_state
from refimpl.config import ConfigError, load_config
from refimpl.train import train

TINY = ("model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "data.max_bytes=200000", "run.eval_batches=1", "run.eval_interval=1000", "run.steps=4",
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


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_optimizer_offload_changes_nothing(tmp_path, stage, world_size):
    ref_losses, ref_state, _ = run(tmp_path, stage, world_size, "none")
    for device in ("cpu", "nvme"):
        losses, state, ledger = run(tmp_path, stage, world_size, device)
        assert losses == ref_losses, device                              # bitwise
        for key in ref_state:
            for name in ref_state[key]:
                np.testing.assert_array_equal(state[key][name], ref_state[key][name], err_msg=f"{device} {key} {name}")
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

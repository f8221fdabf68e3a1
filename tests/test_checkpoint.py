"""Tests of refimpl/checkpoint.py: safetensors + JSON manifest checkpoints, `latest`, atomic saves, ZeRO partitions.

A checkpoint must bring back every model state (params, fp32 master, Adam moments, counters, loss scaler)
so that training continues bit for bit; a damaged, missing or foreign checkpoint must be a CheckpointError
that names the file, parameter or stage at fault; and a save that fails half-way, on any rank, must leave the
previous checkpoint as it was. With N ranks at stages 1-3 there is one optimizer file per rank
(DeepSpeed's zero_pp_rank_{r}_optim_states), and `zero_to_fp32` / `consolidate` put the partitions back
together into whole fp32 weights. Multi-rank tests run simulated ranks as threads (refimpl.comm.local.run_ranks).
"""
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import refimpl.checkpoint as ckpt
from refimpl.backend import use_backend
from refimpl.checkpoint import CheckpointError, consolidate, load_checkpoint, resolve, save_checkpoint, zero_to_fp32
from refimpl.comm.local import run_ranks
from refimpl.engine import Engine
from refimpl.train import build, rank_slice

FILES = ("manifest.json", "model.safetensors", "zero_pp_rank_0_optim_states.safetensors")
OPTIM_KEYS = {"master", "exp_avg", "exp_avg_sq"}


def make_engine(config, comm=None):
    be, dataset, model = build(config)
    with use_backend(be):
        engine = Engine(model, config, be, comm)
    return engine, dataset, model


def train_steps(engine, dataset, model, first, last):
    """Optimizer steps first..last-1 (0-based) on their deterministic training batches; with N ranks each rank
    takes its slice of the same global batch (micro * N rows), as refimpl.train does."""
    bs, T = engine.config["train_micro_batch_size_per_gpu"], engine.config["data"]["seq_len"]
    N, rank = engine.world_size, engine.rank
    with use_backend(engine.backend):
        for step in range(first, last):
            for micro in range(engine.gas):
                batch = dataset.get_batch("train", step * engine.gas + micro, bs * N, T)
                loss, _ = model.loss(rank_slice(batch, rank, N))
                engine.backward(loss)
            engine.step()


def expected_shapes(model):
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def state_of(engine) -> dict:
    """Copies of this rank's model states: whole low-precision params, its optimizer partition, counters."""
    with use_backend(engine.backend):
        params = engine.zero.full_params()   # a collective at stage 3: every rank calls state_of together
    return {
        "params": {n: np.array(engine.backend.to_numpy(a), copy=True) for n, a in params.items()},
        "optimizer": {"master": engine.zero.master.copy(), "exp_avg": engine.optimizer.exp_avg.copy(),
                      "exp_avg_sq": engine.optimizer.exp_avg_sq.copy()},
        "counters": engine.counters(),
        "loss_scaler": engine.loss_scaler.state_dict(),
    }


def assert_states_equal(a: dict, b: dict):
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert a["params"][name].dtype == b["params"][name].dtype, name
        np.testing.assert_array_equal(a["params"][name], b["params"][name], err_msg=name)
    assert a["optimizer"].keys() == b["optimizer"].keys() == OPTIM_KEYS
    for key in a["optimizer"]:
        np.testing.assert_array_equal(a["optimizer"][key], b["optimizer"][key], err_msg=key)
    assert a["counters"] == b["counters"]
    assert a["loss_scaler"] == b["loss_scaler"]


@pytest.fixture
def trained(tiny_config):
    """An fp16 engine after 4 steps, one of them skipped for an injected overflow (hysteresis used up)."""
    config = tiny_config("fp16.enabled=true", "fp16.initial_scale_power=8", "fp16.loss_scale_window=2")
    engine, ds, model = make_engine(config)
    poison = {"on": False}
    _, victim = next(iter(model.named_parameters()))
    victim.register_hook(lambda g: np.full_like(g, np.inf) if poison["on"] else None)
    train_steps(engine, ds, model, 0, 2)
    poison["on"] = True
    train_steps(engine, ds, model, 2, 3)
    poison["on"] = False
    train_steps(engine, ds, model, 3, 4)
    assert engine.skipped_steps == 1 and engine.optimizer.step_count == 3
    return config, engine, ds, model


# ------------------------------------------------------------------------------------------ round trip

def test_round_trip_restores_everything(trained, tmp_path):
    config, engine, ds, model = trained
    tag_dir = save_checkpoint(tmp_path / "ckpt", engine, config)
    assert tag_dir == tmp_path / "ckpt" / "global_step4"

    fresh, _, fresh_model = make_engine(config)     # the initial weights: differs from the trained ones
    assert not np.array_equal(fresh.zero.master, engine.zero.master)
    manifest = load_checkpoint(tmp_path / "ckpt", fresh)
    assert manifest["step"] == 4 and manifest["config"] == config

    assert_states_equal(state_of(fresh), state_of(engine))
    assert fresh.loss_scale == engine.loss_scale
    assert (fresh.global_steps, fresh.skipped_steps, fresh.micro_steps) == (4, 1, 4)
    assert fresh.current_lr() == engine.current_lr()
    for (name, p), (_, q) in zip(model.named_parameters(), fresh_model.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)   # the model's own views see it too
    # The decisive check: both continue identically.
    train_steps(engine, ds, model, 4, 6)
    train_steps(fresh, ds, fresh_model, 4, 6)
    assert_states_equal(state_of(fresh), state_of(engine))


def test_latest_names_the_newest_tag(trained, tmp_path):
    config, engine, ds, model = trained
    root = tmp_path / "ckpt"
    save_checkpoint(root, engine, config)
    assert (root / "latest").read_text().strip() == "global_step4"
    train_steps(engine, ds, model, 4, 6)
    newest = save_checkpoint(root, engine, config)
    assert (root / "latest").read_text().strip() == "global_step6"
    assert resolve(root) == newest == root / "global_step6"
    assert (root / "global_step4" / "manifest.json").is_file()          # older tags are kept
    fresh, _, _ = make_engine(config)
    assert load_checkpoint(root, fresh)["step"] == 6
    assert fresh.counters()["global_steps"] == 6
    assert sorted(p.name for p in root.iterdir()) == ["global_step4", "global_step6", "latest"]


def test_resolve_accepts_run_dir_checkpoint_dir_and_tag_dir(trained, tmp_path):
    config, engine, _, _ = trained
    tag = save_checkpoint(tmp_path / "run" / "checkpoint", engine, config)
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoint", tag):
        assert resolve(path) == tag


def test_files_are_safetensors_and_json_never_pickle(trained, tmp_path):
    config, engine, _, model = trained
    tag = save_checkpoint(tmp_path / "ckpt", engine, config)
    assert sorted(p.name for p in tag.iterdir()) == sorted(FILES)
    manifest = json.loads((tag / "manifest.json").read_text())
    assert manifest["format"] == ckpt.FORMAT
    assert manifest["zero"] == {"stage": 0, "world_size": 1, "partition_count": 1}
    # an ordered list in model order: the order defines the partition layout
    assert manifest["parameters"] == [{"name": n, "shape": list(p.shape), "dtype": "float16"}
                                      for n, p in model.named_parameters()]
    with safe_open(str(tag / "model.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == set(expected_shapes(model))
        for name, p in model.named_parameters():
            t = f.get_tensor(name)
            assert t.dtype == np.float16 and t.shape == p.shape, name   # stored in the params' dtype
            np.testing.assert_array_equal(t, p.data)
    with safe_open(str(tag / "zero_pp_rank_0_optim_states.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == OPTIM_KEYS
        for key in f.keys():
            assert f.get_tensor(key).dtype == np.float32
        np.testing.assert_array_equal(f.get_tensor("master"), engine.zero.master)
        np.testing.assert_array_equal(f.get_tensor("exp_avg_sq"), engine.optimizer.exp_avg_sq)
    for path in [*tag.iterdir(), tmp_path / "ckpt" / "latest"]:
        assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"   # pickle protocol 2+


def test_bf16_params_round_trip(tiny_config, tmp_path):
    config = tiny_config("bf16.enabled=true")
    engine, ds, model = make_engine(config)
    train_steps(engine, ds, model, 0, 3)
    tag = save_checkpoint(tmp_path / "ckpt", engine, config)
    fresh, _, fresh_model = make_engine(config)
    load_checkpoint(tmp_path / "ckpt", fresh)
    assert_states_equal(state_of(fresh), state_of(engine))
    assert str(load_file(str(tag / "model.safetensors"))["tok_emb.weight"].dtype) == "bfloat16"
    assert str(dict(fresh_model.named_parameters())["tok_emb.weight"].data.dtype) == "bfloat16"


# ------------------------------------------------------------------------------- damaged checkpoints

@pytest.fixture
def saved(trained, tmp_path):
    """(tag directory, a fresh engine of the same config to load into)."""
    config, engine, _, _ = trained
    tag = save_checkpoint(tmp_path / "ckpt", engine, config)
    return tag, make_engine(config)[0]


@pytest.mark.parametrize("name", ["model.safetensors", "zero_pp_rank_0_optim_states.safetensors"])
@pytest.mark.parametrize("where", [0.01, 0.5, 0.999])   # header, data, last bytes
def test_flipped_byte_is_named(saved, name, where):
    tag, fresh = saved
    path = tag / name
    raw = bytearray(path.read_bytes())
    raw[int(where * (len(raw) - 1))] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt") as exc:
        load_checkpoint(tag, fresh)
    assert str(path) in str(exc.value)


def test_unparseable_manifest_is_named(saved):
    tag, fresh = saved
    path = tag / "manifest.json"
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0x01                                  # "{" -> "z": no longer JSON
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tag, fresh)
    assert str(path) in str(exc.value)


def test_flipped_byte_in_manifest_values_is_detected(saved):
    # A flip that keeps the JSON valid: the step counter 4 -> 5 ("4" is 0x34, "5" is 0x35). Loading it
    # would silently resume at the wrong step (wrong batches, wrong LR), so it must be refused too.
    tag, fresh = saved
    path = tag / "manifest.json"
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"global_steps": 4') + len(b'"global_steps": ')
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    assert json.loads(raw)["counters"]["global_steps"] == 5     # still a well-formed manifest
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tag, fresh)
    assert str(path) in str(exc.value)
    assert fresh.global_steps == 0                  # nothing was loaded


@pytest.mark.parametrize("name", FILES)
def test_missing_file_is_named(saved, name):
    tag, fresh = saved
    (tag / name).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tag, fresh)
    assert name in str(exc.value)


def test_latest_naming_a_missing_tag_falls_back_to_the_newest_complete_one(saved):
    tag, fresh = saved
    (tag.parent / "latest").write_text("global_step99")
    assert load_checkpoint(tag.parent, fresh)["tag"] == tag.name      # the complete checkpoint beside it
    tag.rename(tag.parent / "moved")                                   # no complete global_stepN left: an error
    with pytest.raises(CheckpointError, match="global_step99"):
        load_checkpoint(tag.parent, fresh)


def test_missing_path_is_named(tiny_config, tmp_path):
    fresh, _, _ = make_engine(tiny_config())
    with pytest.raises(CheckpointError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere", fresh)
    with pytest.raises(CheckpointError, match="nowhere"):
        zero_to_fp32(tmp_path / "nowhere")


@pytest.mark.parametrize("override, param", [
    ("model.d_model=48", "tok_emb.weight"),          # every shape differs; the first in model order is named
    ("model.n_layers=2", "blocks.1."),               # parameters the checkpoint lacks
    ("model.tie_embeddings=true", "lm_head.weight"), # a parameter this model lacks
])
def test_checkpoint_of_a_different_model_names_the_parameter(saved, trained, tiny_config, override, param):
    tag, _ = saved
    config = trained[0]
    other, _, _ = make_engine(tiny_config("fp16.enabled=true", override))
    assert other.zero.stage == config["zero_optimization"]["stage"]   # only the model differs
    with pytest.raises(CheckpointError, match="different model") as exc:
        load_checkpoint(tag, other)
    assert param in str(exc.value)


# ------------------------------------------------------------------------------------- failed saves

def _tree(root):
    """path -> bytes of every file under root (relative paths), to compare before/after."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fail_at", [1, 2], ids=["optimizer-file", "model-file"])
@pytest.mark.parametrize("same_tag", [False, True], ids=["new-tag", "same-tag"])
def test_failed_save_leaves_previous_checkpoint_intact(trained, tmp_path, monkeypatch, same_tag, fail_at):
    config, engine, ds, model = trained
    root = tmp_path / "ckpt"
    save_checkpoint(root, engine, config)
    before = _tree(root)
    if not same_tag:
        train_steps(engine, ds, model, 4, 5)        # the next save would be global_step5

    real_save_file, calls = ckpt.save_file, []

    def failing_save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == fail_at:                   # the disk "fills up" at the fail_at-th file
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(CheckpointError, match="No space left on device; the last complete checkpoint"):
        save_checkpoint(root, engine, config)
    assert len(calls) == fail_at
    # both array files are written before anything is renamed (the optimizer partition first, then the model)
    assert [name.rsplit("/", 1)[-1] for name in calls] == [
        "zero_pp_rank_0_optim_states.safetensors", "model.safetensors"][:fail_at]

    assert _tree(root) == before                    # `latest` and global_step4 byte for byte as they were
    assert sorted(p.name for p in root.iterdir()) == ["global_step4", "latest"]   # no temp dir left behind
    fresh, _, _ = make_engine(config)
    load_checkpoint(root, fresh)
    assert fresh.counters()["global_steps"] == 4


# ------------------------------------------------------------------------------------------ ZeRO ranks

def staged(tiny_config, stage, world_size=2, *extra):
    """A config for `world_size` ranks at ZeRO `stage` (stage 3: every parameter really partitioned)."""
    overrides = [f"world_size={world_size}", f"zero_optimization.stage={stage}", *extra]
    if stage == 3:
        overrides.append("zero_optimization.stage3_param_persistence_threshold=0")
    return tiny_config(*overrides)


def on_ranks(config, fn, world_size=None):
    """fn(engine, dataset, model) on each simulated rank, every rank with its own Engine; results in rank order."""
    def body(comm):
        engine, ds, model = make_engine(config, comm)
        return fn(engine, ds, model)
    return run_ranks(world_size or config["world_size"], body, timeout=30)


def _param_from_partitions(partitions, numel, offset, chunk, shape):
    """Independently of PartitionLayout: rank r holds elements [r*chunk, (r+1)*chunk) of the flattened
    parameter at `offset` in its partition; the last chunk is zero-padded."""
    flat = np.concatenate([p[offset:offset + chunk] for p in partitions])
    assert not flat[numel:].any()                   # the padding is zeros
    return flat[:numel].reshape(shape)


@pytest.mark.parametrize("stage", [2, 3])
def test_partitioned_checkpoint_round_trip_at_world_size_2(tiny_config, tmp_path, stage):
    config = staged(tiny_config, stage)
    root = tmp_path / "ckpt"

    def body(engine, ds, model):
        train_steps(engine, ds, model, 0, 3)
        tag = save_checkpoint(root, engine, config)
        saved = state_of(engine)
        fresh, _, fresh_model = make_engine(config, engine.comm)      # a second engine on the same rank
        assert not np.array_equal(fresh.zero.master, engine.zero.master)
        load_checkpoint(root, fresh)
        loaded = state_of(fresh)
        train_steps(engine, ds, model, 3, 5)                          # both continue identically
        train_steps(fresh, ds, fresh_model, 3, 5)
        return tag, saved, loaded, state_of(engine), state_of(fresh)

    results = on_ranks(config, body)
    tag = results[0][0]
    assert tag == root / "global_step3"
    assert sorted(p.name for p in tag.iterdir()) == sorted(
        ["manifest.json", "model.safetensors", "zero_pp_rank_0_optim_states.safetensors",
         "zero_pp_rank_1_optim_states.safetensors"])
    manifest = json.loads((tag / "manifest.json").read_text())
    assert manifest["zero"] == {"stage": stage, "world_size": 2, "partition_count": 2}
    for rank, (_, saved, loaded, cont, cont_fresh) in enumerate(results):
        shard = load_file(str(tag / f"zero_pp_rank_{rank}_optim_states.safetensors"))
        assert shard.keys() == OPTIM_KEYS
        for key in OPTIM_KEYS:
            np.testing.assert_array_equal(shard[key], saved["optimizer"][key], err_msg=f"rank {rank} {key}")
        assert_states_equal(loaded, saved)
        assert_states_equal(cont_fresh, cont)
    # each rank holds about half of every parameter
    numel = sum(int(np.prod(p["shape"])) for p in manifest["parameters"])
    assert numel / 2 <= results[0][1]["optimizer"]["master"].size < numel / 2 + len(manifest["parameters"])

    # zero_to_fp32 puts the two partitions back together, parameter by parameter
    whole = zero_to_fp32(tag)
    model_file = load_file(str(tag / "model.safetensors"))
    partitions = [r[1]["optimizer"]["master"] for r in results]
    offset = 0
    assert list(whole) == [p["name"] for p in manifest["parameters"]]
    for p in manifest["parameters"]:
        n = int(np.prod(p["shape"]))
        chunk = -(-n // 2)
        expect = _param_from_partitions(partitions, n, offset, chunk, tuple(p["shape"]))
        offset += chunk
        np.testing.assert_array_equal(whole[p["name"]], expect, err_msg=p["name"])
        np.testing.assert_array_equal(model_file[p["name"]], expect, err_msg=p["name"])  # fp32: params == master
        np.testing.assert_array_equal(results[1][1]["params"][p["name"]], expect, err_msg=p["name"])
    assert offset == partitions[0].size


@pytest.fixture
def ws2_tag(tiny_config, tmp_path):
    """A stage-2 checkpoint written by 2 ranks after 2 steps: its global_step2 directory."""
    config = staged(tiny_config, 2)

    def body(engine, ds, model):
        train_steps(engine, ds, model, 0, 2)
        return save_checkpoint(tmp_path / "ckpt", engine, config)

    return on_ranks(config, body)[0]


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_load_reshards_to_another_world_size(ws2_tag, tiny_config, world_size):
    whole = zero_to_fp32(ws2_tag)
    model_file = load_file(str(ws2_tag / "model.safetensors"))
    config = staged(tiny_config, 2, world_size)

    def body(engine, ds, model):
        manifest = load_checkpoint(ws2_tag, engine)
        return manifest, state_of(engine)

    results = on_ranks(config, body)
    for rank, (manifest, state) in enumerate(results):
        assert manifest["zero"]["world_size"] == 2 and state["counters"]["global_steps"] == 2
        # rank r of N: elements [r*c, (r+1)*c) of every flattened parameter, c = ceil(numel / N), zero-padded
        expect = []
        for p in manifest["parameters"]:
            flat = whole[p["name"]].reshape(-1)
            c = -(-flat.size // world_size)
            piece = np.zeros(c, np.float32)
            mine = flat[rank * c:(rank + 1) * c]
            piece[:mine.size] = mine
            expect.append(piece)
        np.testing.assert_array_equal(state["optimizer"]["master"], np.concatenate(expect), err_msg=f"rank {rank}")
        for name, arr in model_file.items():
            np.testing.assert_array_equal(state["params"][name], arr, err_msg=f"rank {rank} {name}")


def test_missing_rank_1_optimizer_file_is_named(ws2_tag, tiny_config):
    missing = ws2_tag / "zero_pp_rank_1_optim_states.safetensors"
    missing.unlink()
    config = staged(tiny_config, 2)
    with pytest.raises(CheckpointError, match="missing") as exc:
        on_ranks(config, lambda engine, ds, model: load_checkpoint(ws2_tag, engine))
    assert str(missing) in str(exc.value)
    for path in (ws2_tag, ws2_tag.parent):
        with pytest.raises(CheckpointError) as exc:
            zero_to_fp32(path)
        assert "zero_pp_rank_1_optim_states.safetensors" in str(exc.value)


@pytest.mark.parametrize("load_stage, world_size", [(3, 2), (1, 2), (0, 1)])
def test_checkpoint_from_another_stage_names_both_stages(ws2_tag, tiny_config, load_stage, world_size):
    config = staged(tiny_config, load_stage, world_size)
    with pytest.raises(CheckpointError) as exc:
        on_ranks(config, lambda engine, ds, model: load_checkpoint(ws2_tag, engine))
    message = str(exc.value)
    assert "stage 2" in message and f"stage {load_stage}" in message, message


def test_failed_save_on_rank_1_raises_on_every_rank_and_keeps_previous(tiny_config, tmp_path, monkeypatch):
    config = staged(tiny_config, 2)
    root = tmp_path / "ckpt"
    real_save_file, calls = ckpt.save_file, []

    def failing_save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if "rank_1" in Path(filename).name and "global_step3" in str(filename):   # rank 1, the second save
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)

    def body(engine, ds, model):
        train_steps(engine, ds, model, 0, 2)
        save_checkpoint(root, engine, config)       # global_step2: succeeds
        before = _tree(root) if engine.rank == 0 else None
        train_steps(engine, ds, model, 2, 3)
        try:
            save_checkpoint(root, engine, config)   # global_step3: rank 1's partition fails
        except BaseException as exc:               # noqa: BLE001 -- returned for the assertions below
            return before, exc
        return before, None

    (before, err0), (_, err1) = on_ranks(config, body)
    assert isinstance(err1, CheckpointError)        # the failing rank raises its own error, as one line
    assert "No space" in str(err1) and "global_step2, is intact" in str(err1)
    assert isinstance(err0, CheckpointError), repr(err0)
    assert "rank(s) [1]" in str(err0)               # the other rank names the one that failed
    assert any("rank_1" in Path(c).name and "global_step3" in str(c) for c in calls)

    assert _tree(root) == before                    # `latest` and global_step2 byte for byte as they were
    assert sorted(p.name for p in root.iterdir()) == ["global_step2", "latest"]   # no .global_step3.tmp
    assert (root / "latest").read_text().strip() == "global_step2"


def test_consolidate_equals_zero_to_fp32_and_the_unpartitioned_master(tiny_config, tmp_path):
    # fp32, 3 steps at world size 2 and stage 3, against one rank at stage 0 that sees the same global batches.
    config = staged(tiny_config, 3, 2, "scheduler=null")
    root = tmp_path / "ckpt"

    def body(engine, ds, model):
        train_steps(engine, ds, model, 0, 3)
        return save_checkpoint(root, engine, config)

    tag = on_ranks(config, body)[0]
    out = consolidate(root, tmp_path / "weights" / "model.safetensors")
    assert out == tmp_path / "weights" / "model.safetensors"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors"]   # no temporary left
    weights = load_file(str(out))
    whole = zero_to_fp32(tag)
    assert weights.keys() == whole.keys()
    for name in whole:
        assert weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name], whole[name], err_msg=name)

    single = tiny_config("scheduler=null", "world_size=1", "zero_optimization.stage=0",
                         f"train_micro_batch_size_per_gpu={2 * config['train_micro_batch_size_per_gpu']}")
    engine, ds, model = make_engine(single)
    initial = engine.zero.master.copy()
    train_steps(engine, ds, model, 0, 3)
    reference = engine.zero.flat.unflatten(engine.zero.master)   # stage 0: the flat master is the whole model
    assert set(weights) == {n for n, _ in model.named_parameters()}
    lr = single["optimizer"]["params"]["lr"]
    moved = 0.0
    for name, ref in reference.items():
        assert weights[name].shape == ref.shape, name
        # The same updates up to the order of fp32 sums (a mean of 2 ranks' means vs one mean over 8 rows).
        # Adam divides by sqrt(v), so where a gradient is ~0 (attn.k_proj.bias: softmax ignores a shift shared
        # by all keys) rounding noise becomes a visible but tiny update: bound it far below one step of lr.
        np.testing.assert_allclose(weights[name], ref, rtol=0, atol=1e-3 * lr, err_msg=name)
        moved = max(moved, float(np.abs(ref - engine.zero.flat.unflatten(initial)[name]).max()))
    assert moved > lr                                # 3 steps really moved the weights

"""Tests of refimpl/checkpoint.py: safetensors + JSON manifest checkpoints, `latest`, atomic saves.

A checkpoint must bring back every model state (params, fp32 master, Adam moments, counters, loss scaler)
so that training continues bit for bit; a damaged, missing or foreign checkpoint must be a CheckpointError
that names the file or parameter at fault; and a save that fails half-way must leave the previous
checkpoint as it was.
"""
import json

import numpy as np
import pytest
from safetensors import safe_open

import refimpl.checkpoint as ckpt
from refimpl.backend import use_backend
from refimpl.checkpoint import CheckpointError, load_checkpoint, resolve, save_checkpoint
from refimpl.engine import Engine
from refimpl.train import build

FILES = ("manifest.json", "model.safetensors", "optimizer.safetensors")


def make_engine(config):
    be, dataset, model = build(config)
    with use_backend(be):
        engine = Engine(model, config, be)
    return engine, dataset, model


def train_steps(engine, dataset, model, first, last):
    """Optimizer steps first..last-1 (0-based) on their deterministic training batches."""
    bs, T = engine.config["train_micro_batch_size_per_gpu"], engine.config["data"]["seq_len"]
    with use_backend(engine.backend):
        for step in range(first, last):
            for micro in range(engine.gas):
                loss, _ = model.loss(dataset.get_batch("train", step * engine.gas + micro, bs, T))
                engine.backward(loss)
            engine.step()


def expected_shapes(model):
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def assert_states_equal(a: dict, b: dict):
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert a["params"][name].dtype == b["params"][name].dtype, name
        np.testing.assert_array_equal(a["params"][name], b["params"][name], err_msg=name)
    assert a["optimizer"].keys() == b["optimizer"].keys() == {"master", "exp_avg", "exp_avg_sq"}
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
    tag_dir = save_checkpoint(tmp_path / "ckpt", engine.state_dict(), config)
    assert tag_dir == tmp_path / "ckpt" / "global_step4"

    fresh, _, fresh_model = make_engine(config)     # the initial weights: differs from the trained ones
    assert not np.array_equal(fresh.master, engine.master)
    state, manifest = load_checkpoint(tmp_path / "ckpt", expected_shapes(fresh_model))
    assert manifest["step"] == 4 and manifest["config"] == config
    fresh.load_state_dict(state)

    assert_states_equal(fresh.state_dict(), engine.state_dict())
    assert fresh.loss_scale == engine.loss_scale
    assert (fresh.global_steps, fresh.skipped_steps, fresh.micro_steps) == (4, 1, 4)
    assert fresh.current_lr() == engine.current_lr()
    for (name, p), (_, q) in zip(model.named_parameters(), fresh_model.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)   # the model's own views see it too
    # The decisive check: both continue identically.
    train_steps(engine, ds, model, 4, 6)
    train_steps(fresh, ds, fresh_model, 4, 6)
    assert_states_equal(fresh.state_dict(), engine.state_dict())


def test_latest_names_the_newest_tag(trained, tmp_path):
    config, engine, ds, model = trained
    root = tmp_path / "ckpt"
    save_checkpoint(root, engine.state_dict(), config)
    assert (root / "latest").read_text().strip() == "global_step4"
    train_steps(engine, ds, model, 4, 6)
    newest = save_checkpoint(root, engine.state_dict(), config)
    assert (root / "latest").read_text().strip() == "global_step6"
    assert resolve(root) == newest == root / "global_step6"
    assert (root / "global_step4" / "manifest.json").is_file()          # older tags are kept
    state, _ = load_checkpoint(root)
    assert state["counters"]["global_steps"] == 6
    assert sorted(p.name for p in root.iterdir()) == ["global_step4", "global_step6", "latest"]


def test_resolve_accepts_run_dir_checkpoint_dir_and_tag_dir(trained, tmp_path):
    config, engine, _, _ = trained
    tag = save_checkpoint(tmp_path / "run" / "checkpoint", engine.state_dict(), config)
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoint", tag):
        assert resolve(path) == tag


def test_files_are_safetensors_and_json_never_pickle(trained, tmp_path):
    config, engine, _, model = trained
    tag = save_checkpoint(tmp_path / "ckpt", engine.state_dict(), config)
    assert sorted(p.name for p in tag.iterdir()) == sorted(FILES)
    manifest = json.loads((tag / "manifest.json").read_text())
    assert manifest["format"] == ckpt.FORMAT
    with safe_open(str(tag / "model.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == set(expected_shapes(model))
        for name, p in model.named_parameters():
            t = f.get_tensor(name)
            assert t.dtype == np.float16 and t.shape == p.shape, name   # stored in the params' dtype
            np.testing.assert_array_equal(t, p.data)
    with safe_open(str(tag / "optimizer.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == {"master", "exp_avg", "exp_avg_sq"}
        for key in f.keys():
            assert f.get_tensor(key).dtype == np.float32
        np.testing.assert_array_equal(f.get_tensor("master"), engine.master)
    for path in [*tag.iterdir(), tmp_path / "ckpt" / "latest"]:
        assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"   # pickle protocol 2+


def test_bf16_params_round_trip(tiny_config, tmp_path):
    config = tiny_config("bf16.enabled=true")
    engine, ds, model = make_engine(config)
    train_steps(engine, ds, model, 0, 3)
    save_checkpoint(tmp_path / "ckpt", engine.state_dict(), config)
    fresh, _, fresh_model = make_engine(config)
    state, _ = load_checkpoint(tmp_path / "ckpt", expected_shapes(fresh_model))
    fresh.load_state_dict(state)
    assert_states_equal(fresh.state_dict(), engine.state_dict())
    assert str(state["params"]["tok_emb.weight"].dtype) == "bfloat16"


# ------------------------------------------------------------------------------- damaged checkpoints

@pytest.fixture
def saved(trained, tmp_path):
    config, engine, _, model = trained
    tag = save_checkpoint(tmp_path / "ckpt", engine.state_dict(), config)
    return tag, expected_shapes(model)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
@pytest.mark.parametrize("where", [0.01, 0.5, 0.999])   # header, data, last bytes
def test_flipped_byte_is_named(saved, name, where):
    tag, shapes = saved
    path = tag / name
    raw = bytearray(path.read_bytes())
    raw[int(where * (len(raw) - 1))] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt") as exc:
        load_checkpoint(tag, shapes)
    assert str(path) in str(exc.value)


def test_unparseable_manifest_is_named(saved):
    tag, shapes = saved
    path = tag / "manifest.json"
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0x01                                  # "{" -> "z": no longer JSON
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tag, shapes)
    assert str(path) in str(exc.value)


def test_flipped_byte_in_manifest_values_is_detected(saved):
    # A flip that keeps the JSON valid: the step counter 4 -> 5 ("4" is 0x34, "5" is 0x35). Loading it
    # would silently resume at the wrong step (wrong batches, wrong LR), so it must be refused too.
    tag, shapes = saved
    path = tag / "manifest.json"
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"global_steps": 4') + len(b'"global_steps": ')
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    assert json.loads(raw)["counters"]["global_steps"] == 5     # still a well-formed manifest
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tag, shapes)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("name", FILES)
def test_missing_file_is_named(saved, name):
    tag, shapes = saved
    (tag / name).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tag, shapes)
    assert name in str(exc.value)


def test_latest_naming_a_missing_tag_is_an_error(saved):
    tag, shapes = saved
    (tag.parent / "latest").write_text("global_step99")
    with pytest.raises(CheckpointError, match="global_step99"):
        load_checkpoint(tag.parent, shapes)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("override, param", [
    ("model.d_model=48", "tok_emb.weight"),          # every shape differs; the first in model order is named
    ("model.n_layers=2", "blocks.1."),               # parameters the checkpoint lacks
    ("model.tie_embeddings=true", "lm_head.weight"), # a parameter this model lacks
])
def test_checkpoint_of_a_different_model_names_the_parameter(saved, tiny_config, override, param):
    tag, _ = saved
    _, _, other = build(tiny_config(override))
    with pytest.raises(CheckpointError, match="different model") as exc:
        load_checkpoint(tag, expected_shapes(other))
    assert param in str(exc.value)


# ------------------------------------------------------------------------------------- failed saves

def _tree(root):
    """path -> bytes of every file under root (relative paths), to compare before/after."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("same_tag", [False, True], ids=["new-tag", "same-tag"])
def test_failed_save_leaves_previous_checkpoint_intact(trained, tmp_path, monkeypatch, same_tag):
    config, engine, ds, model = trained
    root = tmp_path / "ckpt"
    save_checkpoint(root, engine.state_dict(), config)
    before = _tree(root)
    if not same_tag:
        train_steps(engine, ds, model, 4, 5)        # the next save would be global_step5

    real_save_file, calls = ckpt.save_file, []

    def failing_save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:                         # model.safetensors written, then the disk "fills up"
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(root, engine.state_dict(), config)
    assert len(calls) == 2

    assert _tree(root) == before                    # `latest` and global_step4 byte for byte as they were
    assert sorted(p.name for p in root.iterdir()) == ["global_step4", "latest"]   # no temp dir left behind
    state, _ = load_checkpoint(root, expected_shapes(model))
    assert state["counters"]["global_steps"] == 4

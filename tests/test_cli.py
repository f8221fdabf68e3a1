"""Tests of refimpl/cli.py and the run directory refimpl/train.py writes.

`refimpl train` end to end on a tiny model: the files of a run directory, exact continuation with
`--resume` (fp32 and fp16 with a dynamic loss scale, and ZeRO stage 2 on 2 simulated ranks), resuming a
2-rank checkpoint on 4 ranks, `refimpl consolidate`, and bad input answered with one line
`refimpl: error: ...` on stderr and exit code 2, never a traceback. A rank that raises ends the whole run
with a non-zero exit that names the rank. Most tests call `refimpl.cli.main` in-process; one runs the real
entry point as a subprocess.
"""
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from refimpl.checkpoint import full_optimizer_state, zero_to_fp32
from refimpl.cli import main
from refimpl.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *argv):
    """main(argv) in-process -> (exit code, stdout, stderr)."""
    capsys.readouterr()                                  # drop anything printed before
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_cli_as_process(capsys, *argv):
    """main(argv) in-process, ending as `python -m refimpl.cli` would: an exception that escapes main() is
    printed with its traceback and notes on stderr and the exit code is 1 -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except Exception as exc:                             # noqa: BLE001 -- what the interpreter does at top level
        traceback.print_exception(exc, file=sys.stderr)
        code = 1
    out, err = capsys.readouterr()
    return code, out, err


def train_args(tiny_set_args, out, *extra):
    return ["train", "--no-progress", "--out", out, *tiny_set_args, *extra]


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_lines(run_dir):
    return [r for r in read_metrics(run_dir) if "loss" in r]


def optim_files(tag_dir):
    return sorted(p.name for p in Path(tag_dir).glob("zero_pp_rank_*_optim_states.safetensors"))


def assert_same_final_checkpoint(a, b, tag):
    """The two runs' checkpoints `tag` hold identical model states: model.safetensors array for array, the
    whole fp32 optimizer state (zero_to_fp32's master, and Adam's moments), counters and loss scaler."""
    ta = load_file(str(a / "checkpoint" / tag / "model.safetensors"))
    tb = load_file(str(b / "checkpoint" / tag / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype
        np.testing.assert_array_equal(ta[key], tb[key], err_msg=f"model.safetensors:{key}")
    wa, wb = zero_to_fp32(a / "checkpoint" / tag), zero_to_fp32(b / "checkpoint" / tag)
    assert list(wa) == list(wb) and len(wa) == len(ta)
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key], err_msg=f"zero_to_fp32:{key}")
    (oa, ma), (ob, mb) = full_optimizer_state(a / "checkpoint" / tag), full_optimizer_state(b / "checkpoint" / tag)
    for kind in ("exp_avg", "exp_avg_sq"):
        for key in oa[kind]:
            np.testing.assert_array_equal(oa[kind][key], ob[kind][key], err_msg=f"{kind}:{key}")
    assert (ma["counters"], ma["loss_scaler"]) == (mb["counters"], mb["loss_scaler"])


# ----------------------------------------------------------------------------------------------- smoke

def test_train_writes_a_complete_run_directory(capsys, tiny_set_args, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, *train_args(tiny_set_args, out, "--steps", "10"))
    assert code == 0, stderr

    # config.json is the resolved config: the same as resolving the same layers here
    overrides = [a for a in tiny_set_args if a != "--set"] + ["run.steps=10"]
    assert json.loads((out / "config.json").read_text()) == load_config(None, overrides)

    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert len(steps) + len(evals) == len(records)
    assert [r["step"] for r in steps] == list(range(1, 11))
    for r in steps:
        assert {"step", "loss", "lr", "loss_scale", "tokens_per_s"} <= r.keys()
        assert np.isfinite(r["loss"]) and r["loss_scale"] == 1.0 and r["tokens_per_s"] > 0
    assert [r["step"] for r in evals] == [5, 10]     # run.eval_interval=5
    assert all(np.isfinite(r["eval_loss"]) for r in evals)
    assert steps[-1]["loss"] < steps[0]["loss"]      # it learns something even in 10 steps

    assert (out / "checkpoint" / "latest").read_text().strip() == "global_step10"
    assert (out / "checkpoint" / "global_step10" / "manifest.json").is_file()
    assert (out / "loss.png").read_bytes().startswith(PNG_SIGNATURE)

    # the summary table on stdout
    assert str(out) in stdout
    row = re.search(r"^final loss\s+([\d.]+)$", stdout, re.M)
    assert row and float(row.group(1)) == pytest.approx(steps[-1]["loss"], abs=1e-4)
    assert re.search(r"^steps\s+10$", stdout, re.M)
    assert "Traceback" not in stderr


def test_classifier_run_reports_accuracy(capsys, tiny_set_args, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, *train_args(
        tiny_set_args, out, "--steps", "6", "--set", "model.task=classify", "--set", "data.dataset=listops",
        "--set", "data.n_train=64", "--set", "data.n_val=16", "--set", "data.max_length=31"))
    assert code == 0, stderr
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [5, 6]      # every eval_interval and at the end
    for r in evals:
        assert 0.0 <= r["eval_accuracy"] <= 1.0
        # 2 batches of 4 examples: accuracy is a multiple of 1/8
        assert r["eval_accuracy"] * 8 == pytest.approx(round(r["eval_accuracy"] * 8))
    assert "eval accuracy" in stdout
    assert (out / "loss.png").read_bytes().startswith(PNG_SIGNATURE)


def summary_int(stdout, row):
    """The integer of summary row `row` ("model state bytes per rank   301,760" -> 301760)."""
    m = re.search(rf"^{re.escape(row)}\s+([\d,]+)$", stdout, re.M)
    assert m, f"no row {row!r} in the summary:\n{stdout}"
    return int(m.group(1).replace(",", ""))


def test_world_size_2_stage_3_run(capsys, tiny_set_args, tmp_path):
    out = tmp_path / "run"
    # persistence threshold 0: every parameter of the tiny model is really partitioned (default: 1e5 elements)
    code, stdout, stderr = run_cli(capsys, *train_args(
        tiny_set_args, out, "--steps", "6", "--world-size", "2", "--set", "zero_optimization.stage=3",
        "--set", "zero_optimization.stage3_param_persistence_threshold=0"))
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["zero_optimization"]["stage"] == 3
    assert config["train_batch_size"] == 2 * config["train_micro_batch_size_per_gpu"]

    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and not r["overflow"] for r in steps)
    assert [r["step"] for r in records if "eval_loss" in r] == [5, 6]

    tag = out / "checkpoint" / "global_step6"
    assert (out / "checkpoint" / "latest").read_text().strip() == "global_step6"
    assert optim_files(tag) == ["zero_pp_rank_0_optim_states.safetensors",
                                "zero_pp_rank_1_optim_states.safetensors"]
    manifest = json.loads((tag / "manifest.json").read_text())
    assert manifest["zero"] == {"stage": 3, "world_size": 2, "partition_count": 2}
    assert (out / "loss.png").read_bytes().startswith(PNG_SIGNATURE)

    # the summary: ZeRO's memory arithmetic (§5) for this fp32 model of psi parameters on N = 2 ranks
    assert "model state bytes per rank" in stdout and "stage0 model state bytes per rank" in stdout
    psi = summary_int(stdout, "parameters")
    assert psi == sum(int(np.prod(p["shape"])) for p in manifest["parameters"])
    partition = sum(-(-int(np.prod(p["shape"])) // 2) for p in manifest["parameters"])   # ceil(numel / 2) each
    # stage 0: fp32 params 4 + grads 4 + Adam m, v 8 bytes per parameter (the params are the master weights)
    assert summary_int(stdout, "stage0 model state bytes per rank") == 16 * psi
    # stage 3: params 4 + grads 4 + master, m, v 12 bytes per element of this rank's partition
    assert summary_int(stdout, "model state bytes per rank") == 20 * partition
    assert summary_int(stdout, "world size") == 2 and summary_int(stdout, "zero stage") == 3
    assert "Traceback" not in stderr


def test_backends_lists_numpy_as_ok(capsys):
    code, out, err = run_cli(capsys, "backends")
    assert code == 0 and err == ""
    assert re.search(r"^numpy\s+ok$", out, re.M), out


# ---------------------------------------------------------------------------------------------- resume

@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # fp16 overflows are expected
@pytest.mark.parametrize("precision", [
    [],
    # dynamic loss scaling with a short window: the scale moves (and may overflow) after the resume point
    ["--set", "fp16.enabled=true", "--set", "fp16.loss_scale_window=3"],
    # 2 ranks at ZeRO stage 2: the resumed run (same world size, from the checkpoint's config) reloads both
    # partitions; the same reductions in the same order, so still exactly equal
    ["--world-size", "2", "--set", "zero_optimization.stage=2"],
], ids=["fp32", "fp16", "ws2-stage2"])
def test_resume_continues_exactly(capsys, tiny_set_args, tmp_path, precision):
    a, b = tmp_path / "a", tmp_path / "b"
    code, _, err = run_cli(capsys, *train_args(tiny_set_args, a, "--set", "run.steps=12",
                                               "--set", "run.checkpoint_interval=6", *precision))
    assert code == 0, err
    assert (a / "checkpoint" / "global_step6").is_dir()
    code, _, err = run_cli(capsys, "train", "--no-progress", "--resume", a / "checkpoint" / "global_step6",
                           "--out", b)
    assert code == 0, err

    steps_a, steps_b = step_lines(a), step_lines(b)
    assert [r["step"] for r in steps_b] == list(range(7, 13))
    for ra, rb in zip(steps_a[6:], steps_b):
        for key in ("loss", "lr", "loss_scale", "grad_norm", "overflow"):
            assert rb[key] == ra[key], (rb["step"], key)     # exactly, not approximately
    if "fp16.enabled=true" in precision:
        assert len({r["loss_scale"] for r in steps_a[6:]}) > 1   # the scaler state mattered after step 6

    assert_same_final_checkpoint(a, b, "global_step12")
    ranks = 2 if "--world-size" in precision else 1
    for run in (a, b):
        assert len(optim_files(run / "checkpoint" / "global_step12")) == ranks
        assert json.loads((run / "config.json").read_text())["world_size"] == ranks


def test_a_checkpoint_from_before_newer_config_keys_still_resumes(capsys, tiny_set_args, tmp_path):
    """A checkpoint whose config predates model.dtype and aio.engine (written by an older refimpl) was trained with
    their defaults: it resumes, and continues exactly as the uninterrupted run."""
    from refimpl.checkpoint import _manifest_digest
    a, b = tmp_path / "a", tmp_path / "b"
    code, _, err = run_cli(capsys, *train_args(tiny_set_args, a, "--set", "run.steps=6",
                                               "--set", "run.checkpoint_interval=3"))
    assert code == 0, err
    path = a / "checkpoint" / "global_step3" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["config"]["model"]["dtype"], manifest["config"]["aio"]["engine"]
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    path.write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "train", "--no-progress", "--resume", path.parent, "--out", b)
    assert code == 0, err
    assert [r["loss"] for r in step_lines(b)] == [r["loss"] for r in step_lines(a)[3:]]


def test_resume_on_4_ranks_from_a_2_rank_checkpoint(capsys, tiny_set_args, tmp_path):
    """A checkpoint is resharded to the new world size; the global batch (micro * ranks = 8 rows) stays the
    same, so the losses follow the uninterrupted 2-rank run up to the order of fp32 sums."""
    a, b = tmp_path / "a", tmp_path / "b"
    code, _, err = run_cli(capsys, *train_args(tiny_set_args, a, "--set", "run.steps=12",
                                               "--set", "run.checkpoint_interval=6", "--world-size", "2",
                                               "--set", "zero_optimization.stage=2"))
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--no-progress", "--resume", a / "checkpoint" / "global_step6",
                           "--out", b, "--world-size", "4", "--set", "train_micro_batch_size_per_gpu=2")
    assert code == 0, err
    config = json.loads((b / "config.json").read_text())
    assert (config["world_size"], config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (4, 2, 8)

    steps_a, steps_b = step_lines(a), step_lines(b)
    assert [r["step"] for r in steps_b] == list(range(7, 13))
    for ra, rb in zip(steps_a[6:], steps_b):
        assert rb["lr"] == ra["lr"], rb["step"]                  # the schedule continues from step 6
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), rb["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4), rb["step"]
    assert len({r["loss"] for r in steps_b}) > 1                 # it is training, not a constant
    tag = b / "checkpoint" / "global_step12"
    assert len(optim_files(tag)) == 4
    assert json.loads((tag / "manifest.json").read_text())["zero"]["world_size"] == 4


# ------------------------------------------------------------------------------------------- bad input

def _tiny_run(capsys, tiny_set_args, out):
    code, _, err = run_cli(capsys, *train_args(tiny_set_args, out, "--steps", "2"))
    assert code == 0, err
    return out


# Each case: (tmp_path, capsys, tiny_set_args) -> (the arguments after `train --no-progress --out DIR`,
# what the one error line must name).

def case_missing_config(tmp_path, tiny, **_):
    return [*tiny, "--config", tmp_path / "nope.json"], "nope.json"


def case_malformed_json(tmp_path, tiny, **_):
    (tmp_path / "bad.json").write_text('{"model": {"d_model": 32,}}')
    return [*tiny, "--config", tmp_path / "bad.json"], "bad.json"


def case_unknown_key(tiny, **_):
    return [*tiny, "--set", "model.d_modle=32"], "model.d_modle"


def case_negative_steps(tiny, **_):
    return [*tiny, "--steps", "-1"], "run.steps"


def case_unknown_backend(tiny, **_):
    return [*tiny, "--backend", "nosuch"], "nosuch"


def case_unreadable_data_path(tiny, **_):
    return [*tiny, "--set", "data.path=/nonexistent"], "/nonexistent"


def case_resume_other_model_config(tmp_path, capsys, tiny):
    """--resume with a --config file that describes a wider model (and nothing else differs)."""
    ckpt = _tiny_run(capsys, tiny, tmp_path / "a") / "checkpoint"
    layers = {}
    for override in tiny[1::2]:                      # the tiny config as a nested JSON file
        key, value = override.split("=")
        *parents, leaf = key.split(".")
        node = layers
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = json.loads(value)
    layers["model"]["d_model"] = 48
    layers.pop("scheduler")        # a file's scheduler needs its type (under a file there is no default one)
    (tmp_path / "other.json").write_text(json.dumps(layers))
    return ["--resume", ckpt, "--config", tmp_path / "other.json"], "d_model"


def case_resume_other_model_set(tmp_path, capsys, tiny):
    ckpt = _tiny_run(capsys, tiny, tmp_path / "a") / "checkpoint"
    return ["--resume", ckpt, "--set", "model.d_model=48"], "model.d_model is 32 there and 48"


def case_resume_no_checkpoint(tmp_path, **_):
    (tmp_path / "empty").mkdir()
    return ["--resume", tmp_path / "empty"], str(tmp_path / "empty")


def case_resume_missing_path(tmp_path, **_):
    return ["--resume", tmp_path / "gone"], str(tmp_path / "gone")


def case_world_size_not_dividing_batch(tiny, **_):
    # 4 ranks of 2 rows can not make a global batch of 10: DeepSpeed's micro * accumulation * ranks rule
    return ([*tiny, "--set", "train_batch_size=10", "--world-size", "4", "--set", "train_micro_batch_size_per_gpu=2"],
            ("train_batch_size", "got 10"))


def case_resume_other_zero_stage(tmp_path, capsys, tiny):
    ckpt = _tiny_run(capsys, tiny, tmp_path / "a") / "checkpoint"     # written at stage 0
    return ["--resume", ckpt, "--set", "zero_optimization.stage=2"], ("stage 0", "stage 2")


BAD_INPUT = [case_missing_config, case_malformed_json, case_unknown_key, case_negative_steps,
             case_unknown_backend, case_unreadable_data_path, case_resume_other_model_config,
             case_resume_other_model_set, case_resume_no_checkpoint, case_resume_missing_path,
             case_world_size_not_dividing_batch, case_resume_other_zero_stage]


def assert_one_line_error(code, out, err, needle):
    """Exit 2, one line `refimpl: error: ...` on stderr naming `needle` (a string, or a tuple of strings)."""
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("refimpl: error: "), err
    for n in (needle,) if isinstance(needle, str) else needle:
        assert n in lines[0], err
    assert out == ""                                 # no summary table for a failed run


@pytest.mark.parametrize("case", BAD_INPUT, ids=lambda c: c.__name__.removeprefix("case_"))
def test_bad_input_is_one_line_and_exit_2(capsys, tiny_set_args, tmp_path, case):
    extra, needle = case(tmp_path=tmp_path, capsys=capsys, tiny=tiny_set_args)
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "train", "--no-progress", "--out", out_dir, *extra)
    assert_one_line_error(code, out, err, needle)
    if case is case_unknown_backend:
        assert "numpy" in err                        # the message lists the installed backends
    # nothing of a run was written (an empty directory may be left by a failed --resume)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_resume_with_other_precision_is_a_user_error(capsys, tiny_set_args, tmp_path):
    # An fp32 checkpoint holds a static loss scaler; an fp16 run needs a dynamic one.
    ckpt = _tiny_run(capsys, tiny_set_args, tmp_path / "a") / "checkpoint"
    code, out, err = run_cli(capsys, "train", "--no-progress", "--resume", ckpt, "--out", tmp_path / "b",
                             "--set", "fp16.enabled=true")
    assert_one_line_error(code, out, err, "fp16")


def test_existing_out_dir_is_refused_and_untouched(capsys, tiny_set_args, tmp_path):
    out_dir = tmp_path / "old"
    (out_dir / "checkpoint").mkdir(parents=True)
    (out_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (out_dir / "checkpoint" / "latest").write_text("global_step1")
    before = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    code, out, err = run_cli(capsys, *train_args(tiny_set_args, out_dir, "--steps", "2"))
    assert_one_line_error(code, out, err, str(out_dir))
    after = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["checkpoint", "metrics.jsonl"]


# ------------------------------------------------------------------------------------------ consolidate

def test_consolidate_writes_whole_fp32_weights(capsys, tiny_set_args, tmp_path):
    # bf16 on 2 ranks at stage 2: the consolidated weights are the fp32 master, not the bf16 parameters
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(tiny_set_args, run, "--steps", "3", "--world-size", "2",
                                               "--set", "zero_optimization.stage=2", "--set", "bf16.enabled=true"))
    assert code == 0, err
    out_file = tmp_path / "export" / "weights.safetensors"
    code, stdout, err = run_cli(capsys, "consolidate", run, out_file)
    assert code == 0 and err == "", err
    assert str(out_file) in stdout
    assert sorted(p.name for p in out_file.parent.iterdir()) == ["weights.safetensors"]   # no temporary left

    weights = load_file(str(out_file))
    tag = run / "checkpoint" / "global_step3"
    manifest = json.loads((tag / "manifest.json").read_text())
    assert manifest["zero"]["partition_count"] == 2
    assert set(weights) == {p["name"] for p in manifest["parameters"]}
    params = load_file(str(tag / "model.safetensors"))
    whole = zero_to_fp32(tag)
    for p in manifest["parameters"]:
        w = weights[p["name"]]
        assert w.dtype == np.float32 and list(w.shape) == p["shape"], p["name"]
        np.testing.assert_array_equal(w, whole[p["name"]], err_msg=p["name"])
        # the bf16 parameters are the fp32 master rounded to nearest
        assert str(params[p["name"]].dtype) == "bfloat16"
        np.testing.assert_array_equal(w.astype(params[p["name"]].dtype), params[p["name"]], err_msg=p["name"])
    assert any(not np.array_equal(w, w.astype(params[n].dtype).astype(np.float32)) for n, w in weights.items())


@pytest.mark.parametrize("broken", ["no-checkpoint", "missing-shard"])
def test_consolidate_bad_input_is_one_line_and_exit_2(capsys, tiny_set_args, tmp_path, broken):
    if broken == "no-checkpoint":
        path = tmp_path / "empty"
        path.mkdir()
        needle = str(path)
    else:
        path = tmp_path / "run"
        code, _, err = run_cli(capsys, *train_args(tiny_set_args, path, "--steps", "2", "--world-size", "2",
                                                   "--set", "zero_optimization.stage=2"))
        assert code == 0, err
        (path / "checkpoint" / "global_step2" / "zero_pp_rank_1_optim_states.safetensors").unlink()
        needle = "zero_pp_rank_1_optim_states.safetensors"
    out_file = tmp_path / "out" / "weights.safetensors"
    code, out, err = run_cli(capsys, "consolidate", path, out_file)
    assert_one_line_error(code, out, err, needle)
    assert not out_file.exists()
    assert not out_file.parent.exists() or not any(out_file.parent.iterdir())   # no temporary left either


# ---------------------------------------------------------------------------------------- failing rank

def test_a_rank_that_raises_ends_the_run_and_is_named(capsys, tiny_set_args, tmp_path, monkeypatch):
    import refimpl.train

    real_evaluate = refimpl.train.evaluate

    def evaluate(model, dataset, config, comm):
        if comm.rank == 1:
            raise RuntimeError("injected evaluation failure")
        return real_evaluate(model, dataset, config, comm)   # rank 0 waits in its all-reduce

    monkeypatch.setattr(refimpl.train, "evaluate", evaluate)
    run = tmp_path / "run"
    # comm_timeout bounds any wait: a hang would end in a CommError after 5 s rather than block the suite
    code, out, err = run_cli_as_process(capsys, *train_args(
        tiny_set_args, run, "--steps", "4", "--world-size", "2", "--set", "run.comm_timeout=5",
        "--set", "run.eval_interval=2"))
    assert code != 0
    assert "injected evaluation failure" in err                 # the failing rank's own error ...
    assert re.search(r"\brank 1\b", err), err                  # ... and which rank raised it
    assert out == ""                                            # no summary for a failed run
    assert all(r["step"] <= 2 for r in step_lines(run))        # it stopped at the first evaluation
    assert not (run / "checkpoint").exists()


def test_console_entry_point_exit_codes(tmp_path):
    """The real `python -m refimpl.cli`: exit 0 for `backends`, exit 2 and no traceback for bad input."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    ok = subprocess.run([sys.executable, "-m", "refimpl.cli", "backends"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"^numpy\s+ok$", ok.stdout, re.M)
    bad = subprocess.run([sys.executable, "-m", "refimpl.cli", "train", "--no-progress", "--config", "missing.json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith("refimpl: error: ") and "missing.json" in bad.stderr
    assert not (tmp_path / "runs").exists()           # the default run directory was not created


def test_a_deepspeed_key_without_effect_is_one_warning_line(tmp_path):
    """`refimpl train` with a DeepSpeed key refimpl does not act on: it runs, and says so once, in one line."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "refimpl.cli", "train", "--steps", "0", "--no-progress",
                           "--out", str(tmp_path / "o"), "--set", "zero_optimization.overlap_comm=true"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "overlap_comm" in ln]
    assert lines == [lines[0]] and lines[0].startswith("refimpl: warning: zero_optimization.overlap_comm: "
                                                       "DeepSpeed key with no effect in refimpl")

"""Tests of refimpl/cli.py and the run directory refimpl/train.py writes.

`refimpl train` end to end on a tiny model: the files of a run directory, exact continuation with
`--resume` (fp32 and fp16 with a dynamic loss scale), and bad input answered with one line
`refimpl: error: ...` on stderr and exit code 2, never a traceback. Most tests call `refimpl.cli.main`
in-process; one runs the real entry point as a subprocess.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

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


def train_args(tiny_set_args, out, *extra):
    return ["train", "--no-progress", "--out", out, *tiny_set_args, *extra]


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_lines(run_dir):
    return [r for r in read_metrics(run_dir) if "loss" in r]


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
], ids=["fp32", "fp16"])
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
    if precision:
        assert len({r["loss_scale"] for r in steps_a[6:]}) > 1   # the scaler state mattered after step 6

    for name in ("model.safetensors", "optimizer.safetensors"):
        ta = load_file(str(a / "checkpoint" / "global_step12" / name))
        tb = load_file(str(b / "checkpoint" / "global_step12" / name))
        assert ta.keys() == tb.keys()
        for key in ta:
            assert ta[key].dtype == tb[key].dtype
            np.testing.assert_array_equal(ta[key], tb[key], err_msg=f"{name}:{key}")
    ma = json.loads((a / "checkpoint" / "global_step12" / "manifest.json").read_text())
    mb = json.loads((b / "checkpoint" / "global_step12" / "manifest.json").read_text())
    assert (ma["counters"], ma["loss_scaler"]) == (mb["counters"], mb["loss_scaler"])


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


BAD_INPUT = [case_missing_config, case_malformed_json, case_unknown_key, case_negative_steps,
             case_unknown_backend, case_unreadable_data_path, case_resume_other_model_config,
             case_resume_other_model_set, case_resume_no_checkpoint, case_resume_missing_path]


def assert_one_line_error(code, out, err, needle):
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("refimpl: error: "), err
    assert needle in lines[0], err
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

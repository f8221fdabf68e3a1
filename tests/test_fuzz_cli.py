"""Fuzzing the command line: whatever a user types, refimpl answers with exit 0 or one line and exit 2.

Hypothesis builds argument lists for `refimpl train`, `consolidate` and `estimate`: --set strings with wrong
types, negatives, huge numbers, NaN, unknown keys, nested junk and unicode; config files holding random JSON or
TOML, raw bytes, nothing, or invalid UTF-8; junk flags and paths. For every case: the exit code is 0 or 2, no
traceback reaches stderr, it ends within a time limit (SIGALRM), and an existing run directory is not changed.
The `ci` profile runs a few dozen cases; HYPOTHESIS_PROFILE=thorough runs hundreds. Paths the fuzzer could point
anywhere (nvme_path, data.path, run.out) are not fuzzed: they are tested on their own in test_untrusted_input.py.
"""
import contextlib
import hashlib
import io
import json
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from refimpl.cli import main

HANG_SECONDS = 60
COUNTS = {"cases": 0, "tracebacks": 0, "hangs": 0, "exit": {}}

TINY = ["--set", "model.n_layers=1", "--set", "model.d_model=16", "--set", "model.n_heads=2",
        "--set", "model.max_seq_len=16", "--set", "data.seq_len=16", "--set", "train_micro_batch_size_per_gpu=2",
        "--set", "data.max_bytes=50000", "--set", "run.eval_batches=1", "--set", "world_size=1",
        "--set", "zero_optimization.stage=0", "--set", "zero_optimization.offload_param=null",
        "--set", "zero_optimization.offload_optimizer=null", "--set", "memory.device_bytes=null"]

KEYS = ["run.steps", "run.seed", "run.eval_interval", "model.n_layers", "model.d_model", "model.n_heads",
        "model.d_head", "model.d_ff", "model.vocab_size", "model.task", "model.attention", "model.dtype",
        "model.mlp_tiles", "data.dataset", "data.seq_len", "data.val_fraction", "optimizer.type",
        "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps", "optimizer.params.weight_decay",
        "optimizer.params.adam_w_mode", "scheduler", "scheduler.type", "scheduler.params.warmup_num_steps",
        "fp16.enabled", "fp16.initial_scale_power", "fp16.loss_scale_window", "bf16.enabled", "gradient_clipping",
        "train_batch_size", "gradient_accumulation_steps", "zero_optimization.stage", "zero_optimization",
        "aio.block_size", "aio.queue_depth", "memory.device_bytes", "backend", "world_size", "wandb",
        "zero_optimization.overlap_comm", "amp.enabled", "bfloat16", "nope", "model.nope", "ünïcødé", "a.b.c.d.e"]

junk_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 4), st.integers(-10**30, 10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "auto", "", "0x10", "1_000", "☃", "null"]))
junk = st.recursive(junk_scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                         st.dictionaries(st.text(max_size=6), kids, max_size=3)),
                    max_leaves=8)


def _json(value) -> str:
    try:
        return json.dumps(value, allow_nan=True)
    except (ValueError, TypeError):
        return str(value)


set_args = st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=10), junk | st.text(max_size=10)).map(
    lambda kv: ["--set", f"{kv[0]}={kv[1] if isinstance(kv[1], str) else _json(kv[1])}"]), max_size=3)
flag_args = st.lists(st.one_of(
    st.tuples(st.sampled_from(["--steps", "--world-size"]),
              st.sampled_from(["0", "-1", "2", "1025", "99999999999999999999999", "x", "", "1.5", "nan"])),
    st.tuples(st.just("--backend"), st.sampled_from(["numpy", "numba", "cupy", "torch", "", "../x", "☃"])),
    st.tuples(st.just("--resume"), st.sampled_from(["EXISTING", "MISSING", "FILE"])),
    st.tuples(st.sampled_from(["--bogus", "-x", "--set"]), st.text(max_size=8)),
).map(list), max_size=2)
config_files = st.one_of(
    st.none(),
    st.tuples(st.sampled_from([".json", ".toml", ".yaml", ""]),
              st.one_of(junk.map(lambda v: _json({"model": v}).encode()),
                        st.dictionaries(st.sampled_from(["model", "run", "optimizer", "zero_optimization", "x"]),
                                        junk, max_size=3).map(lambda d: _json(d).encode()),
                        st.binary(max_size=64), st.just(b""), st.just(b"\xff\xfe{}"),
                        st.just(b"[model]\nn_layers = -1\n"), st.just(b"a = [[[[[[[[1]]]]]]]]\n"))))


@pytest.fixture(scope="module")
def existing_run():
    """A finished run directory every case must leave exactly as it is."""
    root = Path(tempfile.mkdtemp(prefix="refimpl-fuzz-"))
    run = root / "existing"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", "--no-progress", "--out", str(run), *TINY, "--steps", "1"]) == 0
    yield run
    shutil.rmtree(root, ignore_errors=True)
    print(f"\nfuzz counts: {json.dumps(COUNTS)}")


def _snapshot(folder):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


class _Hang(Exception):
    pass


def _alarm(*_):
    raise _Hang


def run_case(argv, existing):
    """main(argv) in-process under an alarm -> (exit code, stderr); a hang raises _Hang."""
    before = _snapshot(existing)
    err, out = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as exc:             # argparse's usage errors: exit 2 with a usage line
                code = exc.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert _snapshot(existing) == before, f"{argv} changed the existing run directory"
    return code, err.getvalue()


def _check(argv, existing):
    COUNTS["cases"] += 1
    try:
        code, err = run_case(argv, existing)
    except _Hang:
        COUNTS["hangs"] += 1
        pytest.fail(f"no answer within {HANG_SECONDS} s: {argv}")
    except Exception as exc:                      # noqa: BLE001 -- an exception escaping main is a traceback
        COUNTS["tracebacks"] += 1
        raise AssertionError(f"{argv} raised {exc!r}") from exc
    COUNTS["exit"][str(code)] = COUNTS["exit"].get(str(code), 0) + 1
    assert code in (0, 2), f"exit {code} for {argv}:\n{err}"
    assert "Traceback" not in err, f"{argv}:\n{err}"
    if code == 2:
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("refimpl: warning:")]
        assert lines and (lines[-1].startswith("refimpl: error: ") or lines[-1].startswith("refimpl ")
                          or "error:" in lines[-1]), f"{argv}:\n{err}"


def _resolve(args, existing, work):
    out = []
    for a in args:
        if a == "EXISTING":
            a = str(existing)
        elif a == "MISSING":
            a = str(work / "missing")
        elif a == "FILE":
            (work / "plain.txt").write_text("not a checkpoint")
            a = str(work / "plain.txt")
        out.append(a)
    return out


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sets=set_args, flags=flag_args, config=config_files, out_choice=st.sampled_from(["new", "existing", "new"]))
def test_train_answers_every_input_with_0_or_one_line(existing_run, sets, flags, config, out_choice):
    work = Path(tempfile.mkdtemp(prefix="refimpl-fuzz-case-"))
    try:
        argv = ["train", "--no-progress", "--out", str(existing_run if out_choice == "existing" else work / "run"),
                *TINY, "--steps", "1"]
        if config is not None:
            suffix, data = config
            path = work / f"cfg{suffix}"
            path.write_bytes(data)
            argv += ["--config", str(path)]
        argv += _resolve([a for f in flags for a in f], existing_run, work)
        argv += [a for s in sets for a in s]
        _check(argv, existing_run)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["consolidate", "estimate", "backends"]),
       args=st.lists(st.one_of(st.sampled_from(["EXISTING", "MISSING", "FILE", "--force", "--params", "3B",
                                                "--gpus", "-1", "--layers", "0", "--hidden", "99999999999999999999"]),
                               st.text(max_size=8)), max_size=4))
def test_other_commands_answer_every_input_with_0_or_one_line(existing_run, command, args):
    work = Path(tempfile.mkdtemp(prefix="refimpl-fuzz-case-"))
    try:
        argv = [command, *_resolve(args, existing_run, work)]
        if command == "consolidate" and len(argv) >= 3:
            argv = [command, argv[1], str(work / "w.safetensors"), *argv[3:]]   # never an output we did not make
        _check(argv, existing_run)
    finally:
        shutil.rmtree(work, ignore_errors=True)

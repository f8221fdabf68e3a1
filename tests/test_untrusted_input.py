"""Nothing lost, nobody in: the backend the environment asks for, a resumed run's own files, and checkpoints
that try to decide where refimpl reads and writes.

A checkpoint may come from anyone. Its manifest carries a sha256 of itself, but whoever edits a manifest can
recompute that too (``forge`` below does), so everything a checkpoint says is checked on its own merits: a path
it names is refused unless it stays inside the run or the user names it, and its `latest` file can only name a
directory beside it. Every refusal is one line and exit 2, and nothing is created outside the test's folder.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refimpl.checkpoint import _manifest_digest
from refimpl.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_run(capsys, tiny_set_args, out, *extra, steps=2):
    code, _, err = cli(capsys, "train", "--no-progress", "--out", out, *tiny_set_args, "--steps", steps, *extra)
    assert code == 0, err
    return Path(out)


def forge(run_dir, edit):
    """Rewrite the latest checkpoint's manifest with ``edit(manifest)`` and a matching manifest_sha256."""
    ckpt = Path(run_dir) / "checkpoint"
    path = ckpt / (ckpt / "latest").read_text().strip() / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    path.write_text(json.dumps(manifest))
    return ckpt


def snapshot(folder):
    """path -> sha256 of every file under folder (to show nothing was changed)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refimpl: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


NVME = ["--set", 'zero_optimization.offload_optimizer={"device": "nvme", "nvme_path": "swap"}',
        "--set", "zero_optimization.stage=1"]


# ------------------------------------------------------------------------------------- bug 1: REFIMPL_BACKEND
@pytest.mark.parametrize("extra, expected", [([], "numba"), (["--backend", "numpy"], "numpy"),
                                             (["--set", "backend=numpy"], "numpy")])
def test_refimpl_backend_is_honoured_below_the_command_line(tmp_path, tiny_set_args, extra, expected):
    out = tmp_path / "run"
    env = {**os.environ, "REFIMPL_BACKEND": "numba"}
    proc = subprocess.run([sys.executable, "-m", "refimpl.cli", "train", "--no-progress", "--steps", "1", "--out",
                           str(out), *tiny_set_args, *extra], capture_output=True, text=True, env=env, timeout=600,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["backend"] == expected
    assert any(line.split() == ["backend", expected] for line in proc.stdout.splitlines()), proc.stdout


# ----------------------------------------------------------------------------- bug 2: a resume's own swap folder
def test_a_resumed_run_swaps_inside_its_own_directory(capsys, tiny_set_args, tmp_path):
    a = tiny_run(capsys, tiny_set_args, tmp_path / "a", *NVME)
    assert json.loads((a / "config.json").read_text())["zero_optimization"]["offload_optimizer"]["nvme_path"] == "swap"
    before = snapshot(a)
    for name in ("b", "c"):                      # two resumes of one checkpoint: each in its own folder
        tiny_run(capsys, tiny_set_args, tmp_path / name, "--resume", a, *NVME, steps=3)
        assert any((tmp_path / name / "swap").rglob("*.swp"))
    assert snapshot(a) == before                 # the old run is not written to


# -------------------------------------------------------------------- bug 3: paths a checkpoint names are not taken
def _set_offload_path(path):
    def edit(m):
        m["config"]["zero_optimization"]["offload_optimizer"]["nvme_path"] = path
    return edit


@pytest.mark.parametrize("case", ["absolute", "dotdot", "data_path"])
def test_a_checkpoint_cannot_choose_where_files_are_read_or_written(capsys, tiny_set_args, tmp_path, case):
    a = tiny_run(capsys, tiny_set_args, tmp_path / "a", *NVME)
    evil = tmp_path / "evil"
    edit, key = {"absolute": (_set_offload_path(str(evil)), "nvme_path"),
                 "dotdot": (_set_offload_path("../../evil"), "nvme_path"),
                 "data_path": (lambda m: m["config"]["data"].__setitem__("path", str(evil / "corpus.txt")),
                               "data.path")}[case]
    forge(a, edit)
    code, _, err = cli(capsys, "train", "--no-progress", "--out", tmp_path / "b", "--resume", a)
    one_line_error(code, err, key, "--set")
    assert not evil.exists() and not (tmp_path / "b").exists()
    # the same path named on the command line is the user's choice, and is taken
    if case == "absolute":
        code, _, err = cli(capsys, "train", "--no-progress", "--out", tmp_path / "b", "--resume", a, "--steps", 3,
                           "--set", f"zero_optimization.offload_optimizer.nvme_path={evil}")
        assert code == 0, err
        assert evil.is_dir()


def test_a_checkpoint_does_not_choose_the_output_directory(capsys, tiny_set_args, tmp_path, monkeypatch):
    a = tiny_run(capsys, tiny_set_args, tmp_path / "a")
    evil = tmp_path / "evil"
    forge(a, lambda m: m["config"]["run"].__setitem__("out", str(evil)))
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "train", "--no-progress", "--resume", a, "--steps", 3)
    assert code == 0, err
    assert not evil.exists() and len(list((tmp_path / "runs").iterdir())) == 1   # a new default run directory


@pytest.mark.parametrize("latest", ["../a", "/tmp", "link", "", "global_step2/../../a"])
def test_latest_can_only_name_a_directory_beside_it(capsys, tiny_set_args, tmp_path, latest):
    a = tiny_run(capsys, tiny_set_args, tmp_path / "a")
    ckpt = a / "checkpoint"
    (ckpt / "link").symlink_to(ckpt / "global_step2")      # a link, even to a good checkpoint, is not followed
    (ckpt / "latest").write_text(latest)
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "train", "--no-progress", "--out", tmp_path / "b", "--resume", a, "--steps", 3)
    one_line_error(code, err, "latest")
    assert snapshot(tmp_path) == before and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------- bug 5: one run per directory (locks)
@pytest.fixture
def held_elsewhere():
    """held_elsewhere(path): another process takes the lock on directory ``path`` (and keeps it until the test
    ends or it is killed); returns that process."""
    procs = []

    def hold(path):
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                                 "fd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                                 "print('locked', flush=True)\ntime.sleep(120)", str(path)],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc
    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_run_directory_in_use_is_refused_before_anything_is_written(capsys, tiny_set_args, tmp_path,
                                                                      held_elsewhere):
    out = tmp_path / "run"
    pid = held_elsewhere(out).pid
    code, _, err = cli(capsys, "train", "--no-progress", "--out", out, *tiny_set_args, "--steps", 1)
    one_line_error(code, err, f"{out} is in use by pid {pid}")
    assert list(out.iterdir()) == []


def test_a_swap_folder_in_use_is_refused_before_anything_is_written(capsys, tiny_set_args, tmp_path,
                                                                    held_elsewhere):
    swap = tmp_path / "shared_swap"
    folder = swap / "zero_stage_1" / "optimizer" / "rank0"
    holder = held_elsewhere(folder)
    args = [*tiny_set_args, "--steps", 1, "--set", "zero_optimization.stage=1",
            "--set", f'zero_optimization.offload_optimizer={{"device": "nvme", "nvme_path": "{swap}"}}']
    code, _, err = cli(capsys, "train", "--no-progress", "--out", tmp_path / "run", *args)
    one_line_error(code, err, f"{folder} is in use by pid {holder.pid}")
    assert list(folder.iterdir()) == []
    # once the holder is gone (killed: the kernel drops its lock), the folder is free; and a finished run frees it
    holder.kill()
    holder.wait()
    for out in ("run2", "run3"):
        code, _, err = cli(capsys, "train", "--no-progress", "--out", tmp_path / out, *args)
        assert code == 0, err


# --------------------------------------------------------------- bug 4 and malformed files: what a checkpoint holds
def tag_dir(run):
    ckpt = Path(run) / "checkpoint"
    return ckpt / (ckpt / "latest").read_text().strip()


def replace_file(run, name, data: bytes):
    """Put ``data`` in the checkpoint as file ``name`` and forge the manifest to match (as an attacker can)."""
    (tag_dir(run) / name).write_bytes(data)
    forge(run, lambda m: m["files"].__setitem__(name, hashlib.sha256(data).hexdigest()))


def tensors_bytes(tensors):
    from safetensors.numpy import save
    return save(tensors)


def optim_tensors(run, rank=0):
    from safetensors.numpy import load_file
    return load_file(str(tag_dir(run) / f"zero_pp_rank_{rank}_optim_states.safetensors"))


def _header(payload: bytes, n=None):
    import struct
    return struct.pack("<Q", len(payload) if n is None else n) + payload


MALFORMED_OPTIM = {
    # the cases: right byte size, wrong dtype; NaN; fp16 / fp64 instead of fp32
    "int32": (lambda t: tensors_bytes({**t, "master": t["master"].view("int32")}), ["'master'", "int32", "float32"]),
    "nan": (lambda t: tensors_bytes({**t, "master": t["master"] * float("nan")}), ["'master'", "non-finite"]),
    "fp16": (lambda t: tensors_bytes({k: v.astype("float16") for k, v in t.items()}), ["float16", "float32"]),
    "fp64": (lambda t: tensors_bytes({k: v.astype("float64") for k, v in t.items()}), ["float64", "float32"]),
    "negative_v": (lambda t: tensors_bytes({**t, "exp_avg_sq": -1.0 - t["exp_avg_sq"]}), ["'exp_avg_sq'", "negative"]),
    "short": (lambda t: tensors_bytes({k: v[:-1] for k, v in t.items()}), ["shape"]),
    "missing": (lambda t: tensors_bytes({k: v for k, v in t.items() if k != "exp_avg"}), ["lacks tensor 'exp_avg'"]),
    "extra": (lambda t: tensors_bytes({**t, "evil": t["master"]}), ["unexpected tensor 'evil'"]),
    # malformed safetensors: a header length beyond the file, a tiny one, one that is not JSON, offsets out of range
    "header_huge": (lambda t: _header(b"{}", n=2**62), ["not a valid safetensors file"]),
    "header_small": (lambda t: b"\x01\x00", ["not a valid safetensors file"]),
    "header_junk": (lambda t: _header(b"\xff\xfe not json"), ["not a valid safetensors file"]),
    "offsets": (lambda t: _header(json.dumps({"master": {"dtype": "F32", "shape": [4],
                                                         "data_offsets": [0, 10**9]}}).encode()),
                ["not a valid safetensors file"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_OPTIM))
def test_a_bad_optimizer_file_is_refused_by_name(capsys, tiny_set_args, tmp_path, case):
    a = tiny_run(capsys, tiny_set_args, tmp_path / "a")
    make, needles = MALFORMED_OPTIM[case]
    name = "zero_pp_rank_0_optim_states.safetensors"
    replace_file(a, name, make(optim_tensors(a)))
    before = snapshot(a)
    code, _, err = cli(capsys, "train", "--no-progress", "--out", tmp_path / "b", "--resume", a, "--steps", 3)
    one_line_error(code, err, name, *needles)
    code, _, err = cli(capsys, "consolidate", a, tmp_path / "w.safetensors")
    one_line_error(code, err, name)
    assert snapshot(a) == before and not (tmp_path / "w.safetensors").exists()


def test_a_model_file_with_nan_is_refused(capsys, tiny_set_args, tmp_path):
    from safetensors.numpy import load_file
    a = tiny_run(capsys, tiny_set_args, tmp_path / "a")
    model = load_file(str(tag_dir(a) / "model.safetensors"))
    name = next(iter(model))
    replace_file(a, "model.safetensors", tensors_bytes({**model, name: model[name] * float("nan")}))
    code, _, err = cli(capsys, "train", "--no-progress", "--out", tmp_path / "b", "--resume", a, "--steps", 3)
    one_line_error(code, err, "model.safetensors", repr(name), "non-finite")


MALFORMED_MANIFEST = {
    "not_utf8": (b"\xff\xfe\x00{", "not UTF-8"),
    "not_json": (b"{'step': 1", "not valid JSON"),
    "not_object": (b"[1, 2, 3]", "JSON object"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_MANIFEST) + ["no_files", "partitions_0", "bad_shape",
                                                                 "bad_counters", "bad_scaler"])
def test_a_bad_manifest_is_refused_by_name(capsys, tiny_set_args, tmp_path, case):
    a = tiny_run(capsys, tiny_set_args, tmp_path / "a")
    path = tag_dir(a) / "manifest.json"
    if case in MALFORMED_MANIFEST:
        data, needle = MALFORMED_MANIFEST[case]
        path.write_bytes(data)
    else:
        edit, needle = {"no_files": (lambda m: m.pop("files"), "'files'"),
                        "partitions_0": (lambda m: m["zero"].__setitem__("partition_count", 0), "partition_count"),
                        "bad_shape": (lambda m: m["parameters"][0].__setitem__("shape", [-3]), "'parameters'"),
                        "bad_counters": (lambda m: m["counters"].__setitem__("global_steps", "many"), "'counters'"),
                        "bad_scaler": (lambda m: m["loss_scaler"].__setitem__("cur_scale", -5.0), "cur_scale"),
                        }[case]
        forge(a, edit)
    for argv in (["train", "--no-progress", "--out", tmp_path / "b", "--resume", a, "--steps", 3],
                 ["consolidate", a, tmp_path / "w.safetensors"]):
        code, _, err = cli(capsys, *argv)
        if case == "bad_scaler" and argv[0] == "consolidate":
            assert code == 0, err            # consolidate reads weights, not the loss scaler
            continue
        one_line_error(code, err, needle)


def test_latest_that_is_not_utf8_is_one_line(capsys, tiny_set_args, tmp_path):
    a = tiny_run(capsys, tiny_set_args, tmp_path / "a")
    (a / "checkpoint" / "latest").write_bytes(b"\xff\xfe")
    code, _, err = cli(capsys, "train", "--no-progress", "--out", tmp_path / "b", "--resume", a)
    one_line_error(code, err, "latest")


# ------------------------------------------------------------------------------- bug 6: consolidate overwrites nothing
@pytest.mark.parametrize("case", ["exists", "latest", "inside_tag", "directory", "unwritable", "empty_name"])
def test_consolidate_refuses_outputs_that_would_lose_something(capsys, tiny_set_args, tmp_path, case):
    a = tiny_run(capsys, tiny_set_args, tmp_path / "a")
    existing = tmp_path / "w.safetensors"
    existing.write_bytes(b"precious")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    out, needle = {"exists": (existing, "--force"), "latest": (a / "checkpoint" / "latest", "inside the checkpoint"),
                   "inside_tag": (tag_dir(a) / "model.safetensors", "inside the checkpoint"),
                   "directory": (tmp_path, "is a directory"), "unwritable": (ro / "sub" / "w.safetensors", "cannot write"),
                   "empty_name": ("", "not a file name")}[case]
    if case == "unwritable" and os.geteuid() == 0:
        out, needle = Path("/proc/refimpl/w.safetensors"), "cannot write"    # root writes anywhere but /proc
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "consolidate", a, out)
    one_line_error(code, err, needle)
    assert snapshot(tmp_path) == before
    ro.chmod(0o700)


def test_consolidate_replaces_with_force(capsys, tiny_set_args, tmp_path):
    a = tiny_run(capsys, tiny_set_args, tmp_path / "a")
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"old")
    code, _, err = cli(capsys, "consolidate", a, out, "--force")
    assert code == 0, err
    from safetensors.numpy import load_file
    assert set(load_file(str(out))) == {p["name"] for p in json.loads((tag_dir(a) / "manifest.json").read_text())
                                        ["parameters"]}


# ------------------------------------------------------------------- bug 7: a finished checkpoint is always reachable
def first_step(run):
    return min(json.loads(line)["step"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("case, resumes_after", [("latest_missing", 4), ("latest_stale", 4),
                                                 ("newest_incomplete", 2), ("latest_gone", 4)])
def test_resume_finds_the_newest_complete_checkpoint(capsys, tiny_set_args, tmp_path, case, resumes_after):
    a = tiny_run(capsys, tiny_set_args, tmp_path / "a", "--set", "run.checkpoint_interval=2", steps=4)
    ckpt = a / "checkpoint"
    if case == "latest_missing":                  # the crash came after the rename, before `latest` was written
        (ckpt / "latest").unlink()
    elif case == "latest_stale":
        (ckpt / "latest").write_text("global_step2")
    elif case == "newest_incomplete":             # ... or the newest is damaged: the one before it is taken
        (ckpt / "latest").unlink()
        (ckpt / "global_step4" / "zero_pp_rank_0_optim_states.safetensors").unlink()
    else:                                         # `latest` names a tag that is not there
        (ckpt / "latest").write_text("global_step9")
    b = tiny_run(capsys, tiny_set_args, tmp_path / "b", "--resume", a, steps=6)
    assert first_step(b) == resumes_after + 1


def test_a_resume_cleans_the_leftovers_of_a_crashed_save(capsys, tiny_set_args, tmp_path, held_elsewhere):
    a = tiny_run(capsys, tiny_set_args, tmp_path / "a")
    ckpt = a / "checkpoint"
    leftovers = [ckpt / ".global_step3.tmp", ckpt / ".latest.k2j3h4", ckpt / ".global_step2.old-x1"]
    leftovers[0].mkdir()
    (leftovers[0] / "model.safetensors").write_bytes(b"half")
    leftovers[1].write_text("global_step3")
    leftovers[2].mkdir()
    holder = held_elsewhere(a)                    # the run that wrote them is still running: nothing is touched
    tiny_run(capsys, tiny_set_args, tmp_path / "b", "--resume", a, steps=3)
    assert all(p.exists() for p in leftovers)
    holder.kill()
    holder.wait()
    tiny_run(capsys, tiny_set_args, tmp_path / "c", "--resume", a, steps=3)
    assert not any(p.exists() for p in leftovers) and (ckpt / "global_step2" / "manifest.json").is_file()


# ------------------------------------------------------------------------------ bug 8: a pause is not a timeout
def test_ctrl_z_longer_than_comm_timeout_does_not_kill_a_healthy_job(tmp_path, tiny_set_args):
    """SIGSTOP the whole job for 1.5x run.comm_timeout, six times in the middle of training: it finishes."""
    import signal
    import time
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "refimpl.cli", "train", "--no-progress", "--out", str(out),
                             *tiny_set_args, "--world-size", "2", "--steps", "200", "--set", "run.comm_timeout=1",
                             "--set", "run.eval_interval=1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        for _ in range(6):                        # the ranks are mid-training, some waiting in collectives
            proc.send_signal(signal.SIGSTOP)
            time.sleep(1.5)
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.2)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert (out / "metrics.jsonl").read_text().count('"step": 200, "loss"') == 1


def test_the_barrier_counts_running_time_not_wall_time(monkeypatch):
    """What a SIGSTOP looks like from inside: the monotonic clock jumps. A jump of 100 s while one rank waits
    is not a timeout; waiting alone for longer than the timeout is."""
    import threading
    import time as real_time
    from refimpl.comm import local

    class Clock:
        offset = 0.0

        @staticmethod
        def monotonic():
            return real_time.monotonic() + Clock.offset
    monkeypatch.setattr(local, "time", Clock)
    barrier = local.PauseAwareBarrier(2, timeout=2.0)
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(_wait(barrier)))
    waiter.start()
    real_time.sleep(0.3)
    Clock.offset += 100.0                 # the whole process was stopped for 100 s
    real_time.sleep(0.3)
    barrier.wait()                        # the other rank arrives: both pass
    waiter.join()
    assert outcome == ["passed"]
    alone = local.PauseAwareBarrier(2, timeout=0.6)
    t0 = real_time.monotonic()
    assert _wait(alone) == "broken" and 0.5 < real_time.monotonic() - t0 < 5


def _wait(barrier):
    import threading
    try:
        barrier.wait()
        return "passed"
    except threading.BrokenBarrierError:
        return "broken"


# ---------------------------------------------------------------------------- every bad input: one line, exit 2
def _fifo(tmp_path):
    path = tmp_path / "pipe.json"
    os.mkfifo(path)
    return path


def _file(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


BAD_INPUTS = {
    # config files that are not files, or would never end
    "config_fifo": (lambda t: ["--config", _fifo(t)], "not a regular file"),
    "config_dev_zero": (lambda t: ["--config", "/dev/zero"], "unsupported config file type"),
    "config_dev_zero_json": (lambda t: ["--config", _dev_zero_json(t)], "not a regular file"),
    "config_directory": (lambda t: ["--config", _dir_json(t)], "not a regular file"),
    # nested too deeply, numbers too long
    "deep_json": (lambda t: ["--config", _file(t, "d.json", b'{"model": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")],
                  "nested too deeply"),
    "deep_toml": (lambda t: ["--config", _file(t, "d.toml", b"a = " + b"[" * 50_000 + b"]" * 50_000)],
                  "d.toml"),
    "digits_config": (lambda t: ["--config", _file(t, "n.json", b'{"run": {"steps": ' + b"9" * 5000 + b"}}")],
                      "cannot be read"),
    "digits_set": (lambda t: ["--set", "run.steps=" + "9" * 5000], "cannot be read"),
    "huge_steps": (lambda t: ["--steps", "99999999999999999999999"], "run.steps"),
    "huge_int_set": (lambda t: ["--set", "model.d_model=" + "9" * 40], "model.d_model"),
    # values the run would only trip over later
    "block_size": (lambda t: ["--set", "aio.block_size=1000"], "aio.block_size: must be a multiple of 4096"),
    "world_size": (lambda t: ["--world-size", "100000"], "world_size: must be in [1, 1024]"),
    # output directories that cannot be
    "out_empty": (lambda t: ["--out", ""], "empty string"),
    "out_proc": (lambda t: ["--out", "/proc/refimpl-run"], "/proc/refimpl-run"),
    "out_sys": (lambda t: ["--out", "/sys/refimpl-run"], "/sys/refimpl-run"),
    "out_too_long": (lambda t: ["--out", str(t / ("x" * 5000))], "File name too long"),
    "out_under_a_file": (lambda t: ["--out", str(_file(t, "f", b"") / "run")], "Not a directory"),
}


def _dev_zero_json(tmp_path):
    link = tmp_path / "zero.json"
    link.symlink_to("/dev/zero")
    return link


def _dir_json(tmp_path):
    d = tmp_path / "dir.json"
    d.mkdir()
    return d


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(capsys, tiny_set_args, tmp_path, case):
    make, needle = BAD_INPUTS[case]
    extra = [str(a) for a in make(tmp_path)]
    out = [] if "--out" in extra else ["--out", tmp_path / "run"]
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "train", "--no-progress", *out, *tiny_set_args, "--steps", 1, *extra)
    one_line_error(code, err, needle)
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_a_read_only_output_is_one_line(capsys, tiny_set_args, tmp_path):
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
    else:                                     # root writes through file modes: a read-only mount refuses it
        ro = tmp_path / "ro"
        ro.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
    try:
        code, _, err = cli(capsys, "train", "--no-progress", "--out", ro / "run", *tiny_set_args, "--steps", 1)
        one_line_error(code, err, str(ro / "run"), "Read-only file system" if os.geteuid() == 0 else "Permission")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)])


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(capsys, tiny_set_args, tmp_path,
                                                                            monkeypatch):
    import errno
    import refimpl.checkpoint as ckpt
    real_save, saves = ckpt.save_file, []

    def save_file(tensors, path):
        saves.append(path)
        if "global_step4" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(tensors, path)
    monkeypatch.setattr(ckpt, "save_file", save_file)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--no-progress", "--out", out, *tiny_set_args, "--steps", 4,
                       "--set", "run.checkpoint_interval=2")
    one_line_error(code, err, "No space left on device", "global_step2, is intact")
    assert (out / "checkpoint" / "latest").read_text() == "global_step2"
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["global_step2", "latest"]
    monkeypatch.setattr(ckpt, "save_file", real_save)
    tiny_run(capsys, tiny_set_args, tmp_path / "resumed", "--resume", out, steps=4)   # and it resumes

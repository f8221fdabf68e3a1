"""kill -9 at any moment, then --resume: the losses are bitwise those of a run that never stopped, and no
checkpoint a resume reads is ever corrupt.

tests/crash_worker.py runs `refimpl train` in a subprocess and SIGKILLs it at planned points of a checkpoint save
(half an optimizer file written; every tensor file but no manifest; the tag renamed into place but `latest` not
updated; `latest`'s temporary half written), or the test kills it at random moments (seeded). The resumed run
continues from the newest complete checkpoint, and every step it trains has exactly the reference run's loss.
"""
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refimpl.cli import main
from tests.conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "crash_worker.py"
STEPS, EVERY = 8, 2


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


TINY = (*TINY_MODEL, "train_micro_batch_size_per_gpu=4", "run.eval_batches=2", "scheduler.params.warmup_num_steps=2")


@pytest.fixture(scope="module")
def train_args():
    plain = ["world_size=2", "zero_optimization.stage=2", "zero_optimization.offload_param=null",
             "zero_optimization.offload_optimizer=null", "memory.device_bytes=null",
             f"run.checkpoint_interval={EVERY}", f"run.steps={STEPS}", "run.eval_interval=1000"]
    return [a for o in (*TINY, *plain) for a in ("--set", o)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_args):
    out = tmp_path_factory.mktemp("crash") / "reference"
    assert main(["train", "--no-progress", "--out", str(out), *train_args]) == 0
    return losses(out)


def crash(mode, save, out, train_args, kill_at=None):
    """Run the worker; with kill_at=(step, seconds), SIGKILL it that long after metrics.jsonl shows that step."""
    proc = subprocess.Popen([sys.executable, str(WORKER), mode, str(save), str(out), *train_args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_at is not None:
        step, delay = kill_at
        metrics, deadline = Path(out) / "metrics.jsonl", time.monotonic() + 300
        while not (metrics.exists() and f'"step": {step},' in metrics.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def resume_and_check(crashed, tmp_path, train_args, reference, capsys):
    checkpoint = crashed / "checkpoint"
    complete = sorted(int(p.name[len("global_step"):]) for p in checkpoint.glob("global_step*")
                      if (p / "manifest.json").is_file()) if checkpoint.is_dir() else []
    out = tmp_path / "resumed"
    code = main(["train", "--no-progress", "--out", str(out), "--resume", str(crashed), *train_args])
    err = capsys.readouterr().err
    if not complete:                              # killed before the first save finished: nothing to resume
        assert code == 2 and "checkpoint" in err, err
        return None
    assert code == 0, err
    got = losses(out)
    if max(complete) == STEPS:                    # killed after the last save: nothing left to train
        assert got == {}
        return STEPS
    assert min(got) == max(complete) + 1          # from the newest complete checkpoint
    assert got == {s: loss for s, loss in reference.items() if s in got}     # bitwise
    assert max(got) == STEPS
    return max(complete)


@pytest.mark.parametrize("mode", ["mid_optimizer_file", "before_manifest", "before_latest", "mid_latest"])
def test_kill_during_a_checkpoint_save_then_resume_is_exact(tmp_path, capsys, train_args, reference, mode):
    crashed = tmp_path / "crashed"
    code, err = crash(mode, 2, crashed, train_args)          # the second save (global_step4) dies
    assert code == -signal.SIGKILL, err
    resumed_from = resume_and_check(crashed, tmp_path, train_args, reference, capsys)
    # the save that died is never the one resumed from, except when only `latest` was missing
    assert resumed_from == (4 if mode in ("before_latest", "mid_latest") else 2)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_at_a_random_moment_then_resume_is_exact(tmp_path, capsys, train_args, reference, seed):
    """Killed a random few milliseconds after a random step was logged: inside a step, an evaluation, or a
    checkpoint save, wherever the process happens to be."""
    rng = random.Random(seed)
    crashed = tmp_path / "crashed"
    code, err = crash("none", 0, crashed, train_args, kill_at=(rng.randint(1, STEPS - 1), rng.uniform(0, 0.05)))
    assert code == -signal.SIGKILL, err
    resume_and_check(crashed, tmp_path, train_args, reference, capsys)

"""Faults of the NVMe tier and of the byte budgets, end to end through `refimpl train` (issue: offload faults).

ZeRO-Infinity (arXiv 2104.07857) §5-6 moves parameters and optimizer states to NVMe swap files; the issue asks
what a user sees when that tier fails: a full filesystem (ENOSPC), a swap folder that cannot be created or
vanishes, a swap file truncated or corrupted between steps, and budgets (`memory.device_bytes`,
`memory.host_bytes`, `offload_param.buffer_size`) too small for even one layer. For each, a run of
`refimpl.cli.main` at ZeRO stage 3 with both offloads on NVMe must end promptly with exit code 2 and ONE
stderr line `refimpl: error: ...` naming the file (or the budget and the bytes needed), and a checkpoint saved
earlier in the same run must still be intact: `latest` unchanged, no `.global_step*.tmp` left, loadable into a
fresh engine, `zero_to_fp32` equal to an unfaulted run's, and `--resume` from it reproduces that run's losses.

Faults are real where the machine allows (a 256 KiB tmpfs mount as root) and injected otherwise: a wrapper of
`refimpl.checkpoint.save_checkpoint` damages the swap folder right after the step-2 checkpoint, on the rank
whose files it damages, and a stand-in for the `os` module inside the NVMe store
fails `pwrite` (mid-training) or `posix_fallocate` (at allocation) with ENOSPC.
Expected sizes come from the partition arithmetic (ZeRO §5: chunk = ceil(numel / N)) and the 4096-byte
rounding of swap files, computed here from the model's parameter shapes.
"""
import errno
import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import refimpl.checkpoint as checkpoint
import refimpl.memory.aio_store as aio_store
import refimpl.memory.swap_files as swap_files
from refimpl.backend import use_backend
from refimpl.cli import main
from refimpl.config import load_config
from refimpl.engine import Engine
from refimpl.train import build

COMM_TIMEOUT = 20          # seconds a rank waits in a collective before the run gives up
HANG_LIMIT = 15            # a run that takes longer than this has hung (a tiny run takes about a second)
STEPS, FAULT_STEP = 4, 2   # checkpoints at steps 2 and 4; faults strike right after the one at step 2
ALIGN = 4096               # swap files are preallocated in multiples of the O_DIRECT alignment


def stage3_args(swap, world_size=2):
    """Stage 3, every parameter partitioned, parameters and optimizer states in NVMe files under `swap`."""
    sets = ["zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=0",
            f'zero_optimization.offload_param={{"device": "nvme", "nvme_path": "{swap}"}}',
            f'zero_optimization.offload_optimizer={{"device": "nvme", "nvme_path": "{swap}"}}',
            f"run.comm_timeout={COMM_TIMEOUT}", "run.eval_interval=1000", "run.eval_batches=1",
            f"run.checkpoint_interval={FAULT_STEP}"]
    return ["--world-size", str(world_size), "--steps", str(STEPS), *[a for s in sets for a in ("--set", s)]]


def run_cli(capsys, *argv):
    """main(argv) on a watchdog thread -> (exit code, stdout, stderr); fails the test if the run hangs."""
    capsys.readouterr()
    result = {}

    def body():
        try:
            result["code"] = main([str(a) for a in argv])
        except BaseException as exc:  # noqa: BLE001 -- an escaped exception is itself a failure, shown below
            result["exc"] = exc
    t0 = time.monotonic()
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(HANG_LIMIT)
    assert not thread.is_alive(), f"refimpl train still running after {HANG_LIMIT} s (comm_timeout={COMM_TIMEOUT})"
    out, err = capsys.readouterr()
    if "exc" in result:
        raise AssertionError(f"an exception escaped main() instead of one error line: {result['exc']!r}\n{err}") \
            from result["exc"]
    assert time.monotonic() - t0 < COMM_TIMEOUT   # it did not end by a collective timing out either
    return result["code"], out, err


def error_line(err):
    """The one stderr line of a failed run, without its prefix."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refimpl: error: "), f"want one error line, got:\n{err}"
    return lines[0][len("refimpl: error: "):]


def round_up(n):
    return -(-n // ALIGN) * ALIGN


@pytest.fixture(scope="module")
def shapes():
    """{parameter name: shape} of the tiny model (the layout order), built from the config, no training."""
    from tests.conftest import TINY_OVERRIDES
    _, _, model = build(load_config(None, list(TINY_OVERRIDES)))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def chunk(shape, world_size):
    return -(-math.prod(shape) // world_size)     # ZeRO §5: every parameter cut into N equal, padded chunks


def swap_file_bytes(name, shapes, world_size):
    """Preallocated size of a swap file from its name: param.<parameter>.swp holds one fp32 chunk,
    optim.<state>.sg0.swp one fp32 state of the whole partition (the default sub_group_size holds it all)."""
    if name.startswith("param."):
        return round_up(4 * chunk(shapes[name[len("param."):-len(".swp")]], world_size))
    assert re.fullmatch(r"optim\.(master|exp_avg|exp_avg_sq)\.sg0\.swp", name), name
    return round_up(4 * sum(chunk(s, world_size) for s in shapes.values()))


@pytest.fixture
def args(tiny_set_args):
    """The whole `refimpl train` command line of a stage-3 NVMe run: args(out, swap, world_size=2)."""
    def make(out, swap, world_size=2):
        return ["train", "--no-progress", "--out", out, *tiny_set_args, *stage3_args(swap, world_size)]
    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An unfaulted run of the same config: per-step losses and the step-2 checkpoint's fp32 weights."""
    from tests.conftest import PLAIN_RUN, TINY_OVERRIDES
    root = tmp_path_factory.mktemp("reference")
    argv = ["train", "--no-progress", "--out", root / "run",
            *[a for o in (*PLAIN_RUN, *TINY_OVERRIDES) for a in ("--set", o)], *stage3_args(root / "swap")]
    assert main([str(a) for a in argv]) == 0
    losses = {r["step"]: r["loss"] for r in read_metrics(root / "run")}
    return losses, checkpoint.zero_to_fp32(root / "run" / "checkpoint" / f"global_step{FAULT_STEP}")


def read_metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and '"eval_loss"' not in line]


@pytest.fixture
def after_checkpoint(monkeypatch):
    """after_checkpoint(fault): once the step-2 checkpoint is saved, every rank runs fault(engine), then all
    ranks meet in a barrier, so every fault is in place before any rank starts step 3."""
    def install(fault):
        save = checkpoint.save_checkpoint

        def save_then_fault(root, engine, config):
            final = save(root, engine, config)
            if engine.global_steps == FAULT_STEP:
                fault(engine)
                engine.comm.barrier()
            return final
        monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_fault)
    return install


def swap_file(store, key):
    """The path of `key`'s swap file, from the store's manifest."""
    return store.file(key)


def assert_checkpoint_survives(capsys, run, tmp_path, reference):
    """The step-2 checkpoint of a run that then failed: intact, loadable, and the state of an unfaulted run."""
    ckpt_root = Path(run) / "checkpoint"
    assert (ckpt_root / "latest").read_text().strip() == f"global_step{FAULT_STEP}"
    # nothing else: no .global_step*.tmp of a save cut short, no checkpoint of the failed step
    assert sorted(p.name for p in ckpt_root.iterdir()) == [f"global_step{FAULT_STEP}", "latest"]
    ref_losses, ref_weights = reference
    weights = checkpoint.zero_to_fp32(run)
    assert sorted(weights) == sorted(ref_weights)
    for name in ref_weights:
        np.testing.assert_array_equal(weights[name], ref_weights[name], err_msg=name)
    # into a fresh single-rank engine without offload: resharded, the parameters are the master weights
    _, manifest = checkpoint.read_manifest(run)
    cfg = load_config(None, ["world_size=1", "train_batch_size=null", "zero_optimization.offload_param=null",
                             "zero_optimization.offload_optimizer=null"], base=manifest["config"])
    be, _, model = build(cfg)
    with use_backend(be):
        engine = Engine(model, cfg, be)
        checkpoint.load_checkpoint(run, engine)
        params = {k: be.to_numpy(v) for k, v in engine.zero.full_params().items()}
    assert engine.global_steps == FAULT_STEP
    for name in ref_weights:
        np.testing.assert_array_equal(params[name], ref_weights[name], err_msg=name)
    # --resume (same swap folder as the failed run, named again: a checkpoint does not choose where a run
    # writes) continues exactly as the unfaulted run did
    resumed = tmp_path / "resumed"
    zero = manifest["config"]["zero_optimization"]
    same_swap = [arg for sec in ("offload_param", "offload_optimizer") if zero[sec]
                 for arg in ("--set", f"zero_optimization.{sec}.nvme_path={zero[sec]['nvme_path']}")]
    code, _, err = run_cli(capsys, "train", "--no-progress", "--resume", run, "--out", resumed, *same_swap)
    assert code == 0, err
    assert {r["step"]: r["loss"] for r in read_metrics(resumed)} == \
        {s: loss for s, loss in ref_losses.items() if s > FAULT_STEP}


# ------------------------------------------------------------------------------------------------ ENOSPC
@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs: too small for the ~580 KiB of swap files of two ranks."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_real_enospc_names_the_swap_file_and_the_bytes(capsys, tmp_path, tiny_tmpfs, args, shapes):
    code, _, err = run_cli(capsys, *args(tmp_path / "run", tiny_tmpfs / "swap"))
    line = error_line(err)
    assert code == 2
    m = re.search(r"no space left for swap file (\S+): needs (\d+) bytes, (\d+) bytes available", line)
    assert m, line
    file, need, free = Path(m[1]), int(m[2]), int(m[3])
    assert tiny_tmpfs in file.parents
    assert need == swap_file_bytes(file.name, shapes, 2)
    assert free < need
    assert not file.exists()        # the half-allocated file is gone


class _OsWithFaults:
    """`os` as the NVMe store (refimpl/memory/aio_store.py, swap_files.py) sees it, with pwrite or posix_fallocate failing with ENOSPC when told to."""

    def __init__(self):
        self.full = False                # every pwrite fails
        self.fallocate_over = None       # posix_fallocate of more bytes than this fails

    def __getattr__(self, name):
        return getattr(os, name)

    def pwrite(self, fd, data, offset):
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.pwrite(fd, data, offset)

    def posix_fallocate(self, fd, offset, length):
        if self.fallocate_over is not None and length > self.fallocate_over:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.posix_fallocate(fd, offset, length)


@pytest.fixture
def faulty_os(monkeypatch):
    fake = _OsWithFaults()
    monkeypatch.setattr(aio_store, "os", fake)     # pwrite
    monkeypatch.setattr(swap_files, "os", fake)    # posix_fallocate
    return fake


def test_enospc_in_the_middle_of_training(capsys, tmp_path, args, faulty_os, after_checkpoint, reference):
    swap = tmp_path / "swap"
    after_checkpoint(lambda engine: setattr(faulty_os, "full", True))
    code, _, err = run_cli(capsys, *args(tmp_path / "run", swap))
    line = error_line(err)
    assert code == 2
    m = re.search(r"no space left for swap file (\S+): needs (\d+) bytes", line)
    assert m, line
    file = Path(m[1])
    assert swap in file.parents and file.suffix == ".swp"
    assert int(m[2]) == os.path.getsize(file)     # the swap file's preallocated size
    faulty_os.full = False                         # the disk has room again: the checkpoint must still work
    assert_checkpoint_survives(capsys, tmp_path / "run", tmp_path, reference)


def test_enospc_when_allocating_on_one_rank(capsys, tmp_path, args, faulty_os, shapes):
    """world_size 1: the parameter files fit, the optimizer's do not."""
    total = sum(math.prod(s) for s in shapes.values())
    faulty_os.fallocate_over = round_up(4 * total) - 1
    swap = tmp_path / "swap"
    code, _, err = run_cli(capsys, *args(tmp_path / "run", swap, world_size=1))
    line = error_line(err)
    assert code == 2
    m = re.search(r"no space left for swap file (\S+): needs (\d+) bytes", line)
    assert m, line
    file = Path(m[1])
    assert swap / "zero_stage_3" / "optimizer" / "rank0" == file.parent and file.name.startswith("optim.")
    assert int(m[2]) == round_up(4 * total)       # one fp32 state of the whole model
    assert not file.exists()


# -------------------------------------------------------------------------------------- the swap folder
def test_swap_folder_under_a_regular_file(capsys, tmp_path, args):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the swap folder's parent should be\n")
    code, _, err = run_cli(capsys, *args(tmp_path / "run", blocker / "swap"))
    line = error_line(err)
    assert code == 2
    assert str(blocker / "swap" / "zero_stage_3") in line and "swap folder" in line
    assert blocker.read_text().startswith("a file")      # untouched


def test_swap_folder_deleted_between_steps(capsys, tmp_path, args, after_checkpoint, reference):
    swap = tmp_path / "swap"
    after_checkpoint(lambda engine: engine.rank == 0 and shutil.rmtree(swap))
    code, _, err = run_cli(capsys, *args(tmp_path / "run", swap))
    line = error_line(err)
    assert code == 2
    assert "vanished" in line and str(swap / "zero_stage_3") in line
    assert_checkpoint_survives(capsys, tmp_path / "run", tmp_path, reference)


# ------------------------------------------------------------------------------ damaged swap files
def truncate(file):
    os.truncate(file, os.path.getsize(file) // 2)


def flip_a_byte(file):
    """Flip one bit of the first byte: inside the data, not the alignment padding."""
    with open(file, "r+b") as f:
        b = f.read(1)[0]
        f.seek(0)
        f.write(bytes([b ^ 0x10]))


@pytest.mark.parametrize("damage, word", [(truncate, "truncated"), (flip_a_byte, "corrupt")],
                         ids=["truncated", "flipped"])
@pytest.mark.parametrize("target, rank", [("param", 1), ("optimizer", 0)])
def test_damaged_swap_file_between_steps(capsys, tmp_path, args, after_checkpoint, reference, damage, word,
                                         target, rank):
    """Step 3 reads every parameter chunk (forward) and every optimizer sub-group (step) of every rank: the
    damaged file is read before it is rewritten, and must not be taken for data."""
    damaged = []

    def fault(engine):
        if engine.rank == rank:
            if target == "param":
                store, key = engine.zero.swapper.store, "param.tok_emb.weight"
            else:
                store, key = engine.optimizer.store, "optim.exp_avg_sq.sg0"
            damaged.append(swap_file(store, key))
            damage(damaged[0])
    after_checkpoint(fault)
    code, _, err = run_cli(capsys, *args(tmp_path / "run", tmp_path / "swap"))
    assert damaged, "the fault never ran"
    line = error_line(err)
    assert code == 2
    assert damaged[0] in line and word in line
    assert_checkpoint_survives(capsys, tmp_path / "run", tmp_path, reference)


# ---------------------------------------------------------------------------------------------- budgets
def device_state_bytes(shapes, world_size):
    """What stage 3 with the parameters offloaded but the optimizer on the device keeps there: this rank's fp32
    gradient, master and two Adam moment partitions, 16 bytes per element (ZeRO §5.3). With the optimizer
    offloaded too, nothing: the gradients go to the host as they are reduced (ZeRO-Offload)."""
    return 16 * sum(chunk(s, world_size) for s in shapes.values())


def gathered_bytes(shape, world_size):
    return 4 * chunk(shape, world_size) * world_size       # a whole parameter, padding included


def test_device_budget_below_the_model_states(capsys, tmp_path, args, shapes):
    need = device_state_bytes(shapes, 2)
    code, _, err = run_cli(capsys, *args(tmp_path / "run", tmp_path / "swap"),
                           "--set", "zero_optimization.offload_optimizer.device=none",
                           "--set", f"memory.device_bytes={need - 1}")
    line = error_line(err)
    assert code == 2
    assert line.startswith(f"memory.device_bytes={need - 1:,} is too small") and f"needs {need:,} bytes" in line


def test_device_budget_below_the_largest_layer_names_it(capsys, tmp_path, args, shapes):
    largest = max(gathered_bytes(s, 2) for s in shapes.values())
    budget = largest - 4          # both offloaded: the device holds only gathered parameters
    code, _, err = run_cli(capsys, *args(tmp_path / "run", tmp_path / "swap"),
                           "--set", f"memory.device_bytes={budget}")
    line = error_line(err)
    assert code == 2
    m = re.fullmatch(rf"memory\.device_bytes={budget:,} is too small on rank \d: gathering parameter (\S+) needs "
                     r"([\d,]+) bytes.*", line)
    assert m, line
    assert m[1] in shapes and gathered_bytes(shapes[m[1]], 2) == largest
    assert int(m[2].replace(",", "")) == largest


def test_param_buffer_size_below_a_chunk(capsys, tmp_path, args, shapes):
    largest = max(math.prod(s) for s in shapes.values())      # one rank: the chunk is the whole parameter
    code, _, err = run_cli(capsys, *args(tmp_path / "run", tmp_path / "swap", world_size=1),
                           "--set", "zero_optimization.offload_param.buffer_size=10")
    line = error_line(err)
    assert code == 2
    assert "offload_param.buffer_size=10" in line and f"({largest} elements)" in line


def test_host_budget_below_a_parameter_chunk_names_it(capsys, tmp_path, args, shapes):
    largest = max(4 * chunk(s, 2) for s in shapes.values())
    code, _, err = run_cli(capsys, *args(tmp_path / "run", tmp_path / "swap"),
                           "--set", f"memory.host_bytes={largest - 4}")
    line = error_line(err)
    assert code == 2
    m = re.fullmatch(rf"memory\.host_bytes={largest - 4:,} is too small on rank \d: the swap buffer of (\S+) "
                     r"needs ([\d,]+) bytes.*", line)
    assert m, line
    assert int(m[2].replace(",", "")) == 4 * chunk(shapes[m[1]], 2) > largest - 4


def test_host_budget_below_an_optimizer_sub_group(capsys, tmp_path, args, shapes):
    """Room for any one parameter chunk, none for one optimizer sub-group's fp32 master, exp_avg and exp_avg_sq
    (3 x 4 x sub_group_size bytes): the NVMe optimizer step stages sub-groups in host memory, so the host
    budget must refuse it rather than be silently exceeded (docs/architecture.md: every byte budget is enforced)."""
    sub_group = 3000
    one_group = 3 * 4 * sub_group
    budget = max(4 * chunk(s, 2) for s in shapes.values()) + 1024
    assert budget < one_group
    code, _, err = run_cli(capsys, *args(tmp_path / "run", tmp_path / "swap"), "--set", f"memory.host_bytes={budget}",
                           "--set", f"zero_optimization.sub_group_size={sub_group}")
    assert code == 2, "training ran with host buffers larger than memory.host_bytes"
    line = error_line(err)
    m = re.fullmatch(rf"memory\.host_bytes={budget:,} is too small on rank \d: .* \(at least ([\d,]+) bytes needed\)",
                     line)
    assert m, line
    assert int(m[1].replace(",", "")) > budget

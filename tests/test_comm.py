"""Communicators (refimpl/comm): LocalComm against NumPy references computed in rank order, failure modes, the
ZeRO §7 byte accounting, and MPIComm under `mpiexec -n 2` against LocalComm bit for bit."""
import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.comm import (CommArgumentError, CommError, LocalWorld, MPIComm, MPIUnavailableError,
                          launched_under_mpi, run_ranks)

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("mpi_comm_worker.py")
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16]


def rank_inputs(world_size, shape, dtype, seed=0):
    """One random array per rank (drawn in float64, then cast)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(world_size)]


def reference_reduce(arrays, op):
    """The contract, written independently: fold in rank order; fp16/bf16 sums in float32, rounded once."""
    dtype = arrays[0].dtype
    if op == "sum" and dtype in (np.dtype(np.float16), BF16):
        return functools.reduce(np.add, [a.astype(np.float32) for a in arrays]).astype(dtype)
    fold = {"sum": lambda a, b: a + b, "max": np.fmax, "min": np.fmin}[op]  # no NaNs here: fmax == maximum
    return functools.reduce(fold, arrays)


def assert_bitwise_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert a.tobytes() == b.tobytes()


def per_rank(fn):
    """run_ranks adapter: fn(comm, inputs) -> result, where inputs[rank] is this rank's data."""
    return lambda comm, inputs, *a: fn(comm, inputs[comm.rank], *a)


# -- LocalComm results ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("op", ["sum", "max", "min"])
def test_all_reduce_equals_rank_order_reference(world_size, dtype, op):
    inputs = rank_inputs(world_size, (3, 4), dtype, seed=world_size)
    copies = [a.copy() for a in inputs]
    results = run_ranks(world_size, per_rank(lambda comm, x: comm.all_reduce(x, op)), inputs)
    expected = reference_reduce(copies, op)
    for r, out in enumerate(results):
        assert_bitwise_equal(out, expected)                       # exact, and identical on every rank
        assert not np.shares_memory(out, inputs[r])               # a new array
        assert_bitwise_equal(inputs[r], copies[r])                # input untouched
    if world_size == 2 and op == "sum" and dtype.itemsize >= 4:
        assert_bitwise_equal(results[0], copies[0] + copies[1])


def test_all_reduce_sums_in_rank_order_not_any_order():
    # float32: (1e8 + -1e8) + 1 = 1, but 1e8 + (-1e8 + 1) = 0 because -1e8 + 1 rounds back to -1e8
    inputs = [np.array([v], np.float32) for v in (1e8, -1e8, 1.0)]
    assert np.float32(1e8) + (np.float32(-1e8) + np.float32(1.0)) == 0.0
    for out in run_ranks(3, per_rank(lambda comm, x: comm.all_reduce(x)), inputs):
        assert out[0] == 1.0


def test_bf16_sum_rounds_once():
    # bf16 spacing at 1.0 is 2**-7: adding 2**-8 three times in bf16 leaves 1.0 each time (round to even),
    # float32 accumulation gives 1 + 3 * 2**-8, which rounds to a bf16 above 1.0.
    inputs = [np.array([1.0], BF16)] + [np.array([2.0 ** -8], BF16)] * 3
    naive = inputs[0]
    for a in inputs[1:]:
        naive = naive + a
    assert naive[0] == 1.0
    expected = np.array([1 + 3 * 2.0 ** -8], np.float32).astype(BF16)
    for out in run_ranks(4, per_rank(lambda comm, x: comm.all_reduce(x)), inputs):
        assert out.dtype == BF16 and out[0] == expected[0] and out[0] > 1.0


@given(world_size=st.integers(1, 4), n=st.integers(0, 17), seed=st.integers(0, 2 ** 16))
def test_all_reduce_property(world_size, n, seed):
    inputs = rank_inputs(world_size, (n,), np.float32, seed)
    expected = reference_reduce(inputs, "sum")
    for out in run_ranks(world_size, per_rank(lambda comm, x: comm.all_reduce(x)), inputs):
        assert_bitwise_equal(out, expected)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.bool_, np.int64])
def test_all_gather_concatenates_in_rank_order(world_size, dtype):
    n = 5
    inputs = [np.arange(r * 10, r * 10 + n).astype(dtype) if dtype != np.bool_ else np.arange(n) % (r + 2) == 0
              for r in range(world_size)]
    results = run_ranks(world_size, per_rank(lambda comm, x: comm.all_gather(x)), inputs)
    for out in results:
        assert out.shape == (world_size * n,) and out.dtype == np.dtype(dtype)
        for r in range(world_size):
            assert_bitwise_equal(out[r * n:(r + 1) * n], inputs[r])
        assert_bitwise_equal(out, results[0])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_reduce_scatter_gives_each_rank_its_slice(world_size, dtype):
    n = 3
    inputs = rank_inputs(world_size, (world_size * n,), dtype, seed=7)
    full = reference_reduce(inputs, "sum")
    results = run_ranks(world_size, per_rank(lambda comm, x: comm.reduce_scatter(x)), inputs)
    for r, out in enumerate(results):
        assert_bitwise_equal(out, full[r * n:(r + 1) * n])
    maxes = run_ranks(world_size, per_rank(lambda comm, x: comm.reduce_scatter(x, op="max")), inputs)
    assert_bitwise_equal(np.concatenate(maxes), reference_reduce(inputs, "max"))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_broadcast_from_last_rank(world_size):
    root = world_size - 1
    inputs = [np.full((2, 3), r, BF16) for r in range(world_size)]
    results = run_ranks(world_size, per_rank(lambda comm, x: comm.broadcast(x, root=root)), inputs)
    for r, out in enumerate(results):
        assert_bitwise_equal(out, np.full((2, 3), root, BF16))
        assert not np.shares_memory(out, inputs[r])
        assert_bitwise_equal(inputs[r], np.full((2, 3), r, BF16))


def test_async_handles_mixed_with_sync_ops():
    world_size, n = 3, 4
    shards = rank_inputs(world_size, (n,), np.float32, seed=1)
    grads = rank_inputs(world_size, (world_size * n,), np.float32, seed=2)
    scalars = [np.array([r + 1.0]) for r in range(world_size)]

    def step(comm):
        h_gather = comm.all_gather_async(shards[comm.rank])
        total = comm.all_reduce(scalars[comm.rank])               # sync op between two async ones
        h_scatter = comm.reduce_scatter_async(grads[comm.rank])
        comm.barrier()
        # ranks wait in different orders; execution order is still issue order
        first, second = (h_scatter, h_gather) if comm.rank % 2 else (h_gather, h_scatter)
        first.wait(), second.wait()
        assert h_gather.done() and h_scatter.done()
        return h_gather.wait(), total, h_scatter.wait()

    full = reference_reduce(grads, "sum")
    for r, (gathered, total, mine) in enumerate(run_ranks(world_size, step)):
        assert_bitwise_equal(gathered, np.concatenate(shards))
        assert total[0] == 6.0
        assert_bitwise_equal(mine, full[r * n:(r + 1) * n])


def test_stats_follow_the_ring_cost_model():
    world_size = 4

    def step(comm):
        comm.all_reduce(np.zeros(10, np.float32))                 # payload 40 B
        comm.all_gather(np.zeros(6, np.float64))                  # payload 48 B (the shard)
        comm.reduce_scatter_async(np.zeros(8, np.float32)).wait() # payload 32 B
        comm.broadcast(np.zeros(5, np.int16), root=2)             # payload 10 B
        comm.barrier()
        before = {op: dict(s) for op, s in comm.stats.items()}
        comm.reset_stats()
        return before, comm.stats

    for rank, (stats, after) in enumerate(run_ranks(world_size, step)):
        assert stats["all_reduce"] == {"calls": 1, "payload_bytes": 40, "ring_bytes_sent": 60}      # 2*3/4*40
        assert stats["all_gather"] == {"calls": 1, "payload_bytes": 48, "ring_bytes_sent": 144}     # 3*48
        assert stats["reduce_scatter"] == {"calls": 1, "payload_bytes": 32, "ring_bytes_sent": 24}  # 3/4*32
        assert stats["broadcast"] == {"calls": 1, "payload_bytes": 10, "ring_bytes_sent": 10 if rank == 2 else 0}
        assert stats["barrier"]["calls"] == 1
        assert all(s == {"calls": 0, "payload_bytes": 0, "ring_bytes_sent": 0} for s in after.values())


def test_bad_arguments_name_the_value():
    comm = LocalWorld(1, timeout=5).comm(0)
    with pytest.raises(CommArgumentError, match="'prod'.*sum, max, min"):
        comm.all_reduce(np.ones(3), op="prod")
    with pytest.raises(ValueError, match=r"1-D.*\(2, 2\)"):
        comm.all_gather(np.ones((2, 2)))
    with pytest.raises(CommArgumentError, match="broadcast root 3"):
        comm.broadcast(np.ones(2), root=3)
    with pytest.raises(CommArgumentError, match="dtype <U1"):
        comm.all_reduce(np.array(["a"]))
    world = LocalWorld(2, timeout=5)
    with pytest.raises(CommArgumentError, match="length 5 is not a multiple of world_size=2"):
        world.comm(0).reduce_scatter(np.ones(5))
    world.close()
    comm.close()


# -- failures ---------------------------------------------------------------------------------------------------
def test_a_raising_rank_releases_the_others_promptly():
    seen = {}

    def step(comm):
        if comm.rank == 1:
            time.sleep(0.05)
            raise ValueError("boom on purpose")
        try:
            comm.all_reduce(np.ones(3))
        except CommError as e:
            seen[comm.rank] = str(e)
            raise

    with pytest.raises(ValueError, match="boom on purpose") as info:
        run_ranks(3, step, timeout=5)
    assert any("rank 1" in note for note in info.value.__notes__)
    assert set(seen) == {0, 2}
    assert all("all_reduce" in m and "rank 1 failed" in m and "boom on purpose" in m for m in seen.values())


def test_a_skipped_collective_times_out():
    def step(comm):
        if comm.rank == 0:
            comm.all_reduce(np.ones(3))                           # rank 1 never issues it

    with pytest.raises(CommError, match=r"all_reduce on rank 0: timed out after 0.5 s") as info:
        run_ranks(2, step, timeout=0.5)
    assert any("rank 0" in note for note in info.value.__notes__)


def test_a_different_collective_is_reported():
    def step(comm):
        if comm.rank == 0:
            comm.all_reduce(np.ones(2, np.float32))
        else:
            comm.all_gather(np.ones(2, np.float32))

    with pytest.raises(CommError, match=r"disagree.*rank 0 issued all_reduce.*rank 1 issued all_gather"):
        run_ranks(2, step, timeout=5)


def test_mismatched_sizes_are_reported_on_every_rank():
    messages = {}

    def step(comm):
        try:
            comm.all_gather(np.zeros(2 + comm.rank, np.float32))
        except CommError as e:
            messages[comm.rank] = str(e)

    run_ranks(2, step, timeout=5)
    assert set(messages) == {0, 1}
    for rank, m in messages.items():
        assert f"all_gather on rank {rank}" in m and "shape=(2,)" in m and "shape=(3,)" in m


def test_a_rank_hung_outside_a_collective_ends_run_ranks():
    release = threading.Event()

    def step(comm):
        if comm.rank == 1:
            release.wait(30)                                      # "hangs" in its own code, no collective
        return comm.rank

    try:
        with pytest.raises(CommError, match=r"rank\(s\) \[1\] still running"):
            run_ranks(2, step, timeout=0.2)
    finally:
        release.set()


def test_wait_with_explicit_timeout_leaves_the_collective_in_flight():
    world = LocalWorld(2, timeout=5)
    c0, c1 = world.comm(0), world.comm(1)
    h0 = c0.all_reduce_async(np.array([1.0]))
    with pytest.raises(CommError, match="all_reduce on rank 0: not done"):
        h0.wait(timeout=0.05)
    assert not h0.done()
    h1 = c1.all_reduce_async(np.array([2.0]))                     # the peer arrives: both complete
    assert h0.wait()[0] == 3.0 and h1.wait()[0] == 3.0
    world.close()


# -- MPI --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"PMI_SIZE": "2", "PMI_RANK": "1"}, True),
    ({"PMI_SIZE": "1", "PMI_RANK": "0"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
    ({"PMIX_RANK": "0"}, True),
])
def test_launched_under_mpi(monkeypatch, env, expected):
    for var in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launched_under_mpi() is expected


def test_mpicomm_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)              # makes `from mpi4py import MPI` fail
    with pytest.raises(ModuleNotFoundError, match=r"refimpl\[mpi\]") as info:
        MPIComm()
    assert isinstance(info.value, CommError) and isinstance(info.value, MPIUnavailableError)


def _mpiexec():
    pytest.importorskip("mpi4py", reason="MPI tests need mpi4py: pip install -e '.[mpi]'")
    path = Path(sys.executable).parent / "mpiexec"
    found = str(path) if path.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("MPI tests need an mpiexec next to sys.executable or on PATH (pip install mpich)")
    return found


def _run_worker(mode, out_dir, limit=120):
    """mpiexec -n 2 python tests/mpi_comm_worker.py MODE OUT_DIR; returns (returncode, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([_mpiexec(), "-n", "2", sys.executable, str(WORKER), mode, str(out_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)                       # the group this test started
        out, err = proc.communicate()
        pytest.fail(f"mpiexec {mode} did not end within {limit} s:\n{out}\n{err}")
    return proc.returncode, out, err


def _load_worker():
    spec = importlib.util.spec_from_file_location("mpi_comm_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _decode(d):
    dtype = BF16 if d["dtype"] == "bfloat16" else np.dtype(d["dtype"])
    return np.frombuffer(bytes.fromhex(d["hex"]), dtype=dtype).reshape(d["shape"])


@pytest.mark.mpi
def test_mpi_matches_localcomm_bitwise(tmp_path):
    code, out, err = _run_worker("collectives", tmp_path)
    assert code == 0, f"worker failed:\n{out}\n{err}"
    worker = _load_worker()
    local = run_ranks(2, worker.run_collectives, timeout=30)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world_size"] == 2, "mpiexec and mpi4py use different MPI libraries?"
        assert set(report["results"]) == set(local[rank])
        for name, encoded in report["results"].items():
            assert_bitwise_equal(_decode(encoded), local[rank][name])
        assert report["stats"]["all_reduce"]["calls"] == 8 and report["stats"]["barrier"]["calls"] == 1
    # and an independent check of two entries: 2-rank float32 sum and an all_gather
    x0, x1 = worker.make_inputs(0), worker.make_inputs(1)
    assert_bitwise_equal(local[0]["all_reduce_f32_sum"], x0["f32"] + x1["f32"])
    assert_bitwise_equal(local[1]["all_gather_shard_async"], np.concatenate([x0["shard"], x1["shard"]]))


@pytest.mark.mpi
def test_mpi_mismatched_sizes_raise_on_both_ranks(tmp_path):
    code, out, err = _run_worker("mismatch", tmp_path)
    assert code == 0, f"worker failed:\n{out}\n{err}"
    for rank in range(2):
        message = json.loads((tmp_path / f"rank{rank}.json").read_text())["error"]
        assert message and f"all_gather on rank {rank}" in message and "shape=(2,)" in message \
            and "shape=(3,)" in message


@pytest.mark.mpi
def test_mpi_skipped_collective_aborts_the_job(tmp_path):
    code, out, err = _run_worker("skip", tmp_path, limit=60)     # rank 1 sleeps 600 s: only Abort ends it
    assert code != 0
    assert "all_reduce on rank 0 of 2 did not complete within 1 s" in err and "aborting" in err
    assert not (tmp_path / "rank0.json").exists()


@pytest.mark.mpi
def test_mpi_a_rank_that_stops_with_a_clean_error_ends_the_job_at_once(tmp_path):
    """run.comm_timeout is 300 s; rank 1 fails before its first collective: the job must end long before."""
    t0 = time.monotonic()
    code, out, err = _run_worker("train_fail", tmp_path, limit=120)
    assert code == 2, f"{out}\n{err}"
    assert "refimpl: error: rank 1: injected data error on rank 1" in err
    assert time.monotonic() - t0 < 100

"""Run by tests/test_comm.py under mpiexec: the collectives of `run_collectives` on MPIComm, results as JSON.

    mpiexec -n 2 python tests/mpi_comm_worker.py collectives OUT_DIR   # OUT_DIR/rank{r}.json: encoded results
    mpiexec -n 2 python tests/mpi_comm_worker.py mismatch OUT_DIR      # all_gather sizes differ: CommError on both
    mpiexec -n 2 python tests/mpi_comm_worker.py skip OUT_DIR          # rank 1 skips an all_reduce and hangs:
                                                                       # rank 0 must print the error and abort
    mpiexec -n 2 python tests/mpi_comm_worker.py train_fail OUT_DIR    # `refimpl train`, rank 1 stops with a
                                                                       # user error: the job ends at once
The test runs the same `run_collectives` on LocalComm and compares the results bit for bit. Each rank writes its
own file (interleaved stdout lines from several processes are hard to parse); the JSON is also printed.
"""
import json
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

SKIP_TIMEOUT = 1.0  # seconds MPIComm waits in "skip" mode before aborting the job


def make_inputs(rank):
    """This rank's inputs: deterministic per rank, so the test can rebuild every rank's data."""
    rng = np.random.default_rng(1000 + rank)
    f32 = rng.standard_normal(24).astype(np.float32)
    return {
        "f32": f32,                                               # (24,)
        "f32_2d": rng.standard_normal((3, 5)).astype(np.float32),
        "f64": rng.standard_normal(24),
        "f16": rng.standard_normal(24).astype(np.float16),
        "bf16": rng.standard_normal(24).astype(ml_dtypes.bfloat16),
        "i32": rng.integers(-1000, 1000, 24, dtype=np.int32),
        "bool": rng.random(5) < 0.5,
        "shard": rng.standard_normal(6).astype(np.float32),
    }


def run_collectives(comm):
    """A fixed sequence of collectives (sync and async interleaved); returns {name: array}."""
    x = make_inputs(comm.rank)
    out = {}
    for op in ("sum", "max", "min"):
        out[f"all_reduce_f32_{op}"] = comm.all_reduce(x["f32"], op)
    for key in ("f32_2d", "f64", "f16", "bf16", "i32"):
        out[f"all_reduce_{key}"] = comm.all_reduce(x[key])
    h_gather = comm.all_gather_async(x["shard"])                  # in flight while the next ones run
    for key in ("bf16", "bool", "i32"):
        out[f"all_gather_{key}"] = comm.all_gather(x[key])
    h_scatter = comm.reduce_scatter_async(x["f32"])
    out["reduce_scatter_bf16"] = comm.reduce_scatter(x["bf16"])
    out["reduce_scatter_f64_max"] = comm.reduce_scatter(x["f64"], op="max")
    out["broadcast_f64_root1"] = comm.broadcast(x["f64"], root=comm.world_size - 1)
    out["broadcast_bf16_root0"] = comm.broadcast(x["bf16"], root=0)
    comm.barrier()
    out["reduce_scatter_f32_async"] = h_scatter.wait()              # waited in the opposite order of issue
    out["all_gather_shard_async"] = h_gather.wait()
    return out


def encode(a):
    """An array as JSON that round-trips bit for bit."""
    return {"dtype": a.dtype.name, "shape": list(a.shape), "hex": a.tobytes().hex()}


def main(mode, out_dir):
    from refimpl.comm import CommError, MPIComm

    comm = MPIComm(timeout=SKIP_TIMEOUT if mode == "skip" else 60.0)
    if mode == "collectives":
        report = {"world_size": comm.world_size, "results": {k: encode(v) for k, v in run_collectives(comm).items()},
                  "stats": comm.stats}
    elif mode == "mismatch":
        try:
            comm.all_gather(np.zeros(2 + comm.rank, np.float32))
            report = {"error": None}
        except CommError as e:
            report = {"error": str(e)}
    elif mode == "train_fail":
        # rank 1 stops with a clean user error before its first collective; rank 0 must not wait out the
        # 300 s comm_timeout: rank 1 ends the job at once
        import refimpl.train
        from refimpl.cli import main as cli_main
        from refimpl.data import DataError
        real_build = refimpl.train.build

        def build(config):
            if comm.rank == 1:
                raise DataError("injected data error on rank 1")
            return real_build(config)
        refimpl.train.build = build
        comm.close()
        code = cli_main(["train", "--no-progress", "--out", str(Path(out_dir) / "run"), "--steps", "2",
                         "--set", "run.comm_timeout=300", "--set", "model.n_layers=1", "--set", "model.d_model=32",
                         "--set", "model.n_heads=2", "--set", "data.max_bytes=200000",
                         "--set", "zero_optimization.offload_param=null",
                         "--set", "zero_optimization.offload_optimizer=null", "--set", "memory.device_bytes=null"])
        raise SystemExit(code)
    elif mode == "skip":
        if comm.rank == 1:
            time.sleep(600)  # skipped the all_reduce and hangs: only rank 0's Abort can end this job
        comm.all_reduce(np.ones(4, np.float32))
        report = {"error": "rank 0's all_reduce completed although rank 1 never issued it"}
    else:
        raise SystemExit(f"unknown mode {mode!r}; allowed: collectives, mismatch, skip, train_fail")
    text = json.dumps(report)
    Path(out_dir, f"rank{comm.rank}.json").write_text(text)
    print(text, flush=True)
    comm.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])

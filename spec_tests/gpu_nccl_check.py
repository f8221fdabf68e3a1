"""NCCLComm against numpy, on real GPUs: `mpirun -n 2 python3 spec_tests/gpu_nccl_check.py` (one process per GPU).

Every rank builds every rank's input from the same seeds, so each can compute the expected result with numpy
(base.reduce_in_rank_order, the reduction every Communicator promises) and compare it with what NCCLComm returned:
bit for bit in exact mode, within rounding for NCCL's own reductions (exact=False). Also checks async handles
issued back to back, numpy in -> numpy out, a mismatch error, and the byte stats. Prints one line per rank and
exits non-zero on any failure (run_gpu.py counts it).
"""
import sys

import ml_dtypes
import numpy as np

from refimpl.comm.base import CommError, reduce_in_rank_order
from refimpl.comm.nccl import NCCLComm

DTYPES = (np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int32)


def inputs(world, n, dtype, seed):
    """Every rank's input for one collective (rank r's is row r)."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind in "iu":
        return [rng.integers(-1000, 1000, n).astype(dtype) for _ in range(world)]
    return [(rng.standard_normal(n) * 3).astype(dtype) for _ in range(world)]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def same(a, b):
    return np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def main():
    import cupy as cp
    from refimpl_cupy import CupyBackend
    be = CupyBackend()
    print("starting NCCLComm", file=sys.stderr, flush=True)
    comm = NCCLComm()
    r, world = comm.rank, comm.world_size
    failures = []

    def run(name, fn):
        print(f"rank {r}: {name}", file=sys.stderr, flush=True)  # how far each rank got, if one hangs
        try:
            fn()
        except Exception as exc:  # report every failing check, not just the first
            failures.append(f"{name}: {type(exc).__name__}: {exc}")

    n = 1000 * world + 8 * world  # a multiple of world_size
    for seed, dtype in enumerate(DTYPES):
        dn = np.dtype(dtype).name
        xs = inputs(world, n, dtype, seed)
        mine = be.asarray(xs[r])

        def all_reduce():
            for op in ("sum", "max", "min"):
                got = be.to_numpy(comm.all_reduce(mine, op))
                check(same(got, reduce_in_rank_order(xs, op)), f"all_reduce {op} {dn} differs from numpy")

        def reduce_scatter():
            m = n // world
            got = be.to_numpy(comm.reduce_scatter(mine))
            check(same(got, reduce_in_rank_order(xs, "sum")[r * m:(r + 1) * m]), f"reduce_scatter {dn}")

        def all_gather():
            got = be.to_numpy(comm.all_gather(mine))
            check(same(got, np.concatenate(xs)), f"all_gather {dn}")

        def broadcast():
            root = world - 1
            got = be.to_numpy(comm.broadcast(mine, root=root))
            check(same(got, xs[root]), f"broadcast root={root} {dn}")

        for name, fn in (("all_reduce", all_reduce), ("reduce_scatter", reduce_scatter),
                         ("all_gather", all_gather), ("broadcast", broadcast)):
            run(f"{name} {dn}", fn)

    def asynchronous():
        xs = inputs(world, n, np.float32, 99)
        x = be.asarray(xs[r])
        h1, h2 = comm.all_reduce_async(x), comm.all_gather_async(x)
        g = h2.wait()
        s = h1.wait()
        check(h1.done() and h2.done(), "handles not done after wait()")
        check(same(be.to_numpy(s), reduce_in_rank_order(xs)), "async all_reduce")
        check(same(be.to_numpy(g), np.concatenate(xs)), "async all_gather")

    def host_arrays():
        xs = inputs(world, n, np.float32, 7)
        got = comm.all_reduce(xs[r])
        check(isinstance(got, np.ndarray) and same(got, reduce_in_rank_order(xs)), "numpy in -> numpy out")

    def native_nccl():
        fast = NCCLComm(exact=False)
        try:
            xs = inputs(world, n, np.float32, 5)
            got = be.to_numpy(fast.all_reduce(be.asarray(xs[r])))
            want = np.sum(np.stack(xs).astype(np.float64), axis=0)
            check(np.allclose(got, want, rtol=1e-6, atol=1e-5), "exact=False all_reduce")
            m = n // world
            got = be.to_numpy(fast.reduce_scatter(be.asarray(xs[r])))
            check(np.allclose(got, want[r * m:(r + 1) * m], rtol=1e-6, atol=1e-5), "exact=False reduce_scatter")
        finally:
            fast.close()

    def mismatch():
        if world == 1:
            print("rank 0: mismatch check needs 2 ranks, skipped", file=sys.stderr, flush=True)
            return
        try:
            comm.all_reduce(be.asarray(np.zeros(4 + r, np.float32)))  # ranks disagree about the size
        except CommError as exc:
            check("disagree" in str(exc), f"mismatch error does not say so: {exc}")
        else:
            raise AssertionError("mismatched all_reduce did not raise CommError")

    def stats():
        comm.reset_stats()
        x = be.asarray(np.zeros(64 * world, np.float32))
        comm.all_reduce(x)
        comm.reduce_scatter(x)
        comm.all_gather(x)
        want = {"all_reduce": 2 * (world - 1) * x.nbytes // world,
                "reduce_scatter": (world - 1) * x.nbytes // world, "all_gather": (world - 1) * x.nbytes}
        for op, ring in want.items():
            check(comm.stats[op]["calls"] == 1 and comm.stats[op]["ring_bytes_sent"] == ring, f"stats[{op}]")

    for name, fn in (("async", asynchronous), ("host arrays", host_arrays), ("exact=False", native_nccl),
                     ("mismatch", mismatch), ("stats", stats)):
        run(name, fn)
    comm.barrier()
    comm.close()
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    if failures:
        print(f"rank {r}/{world} ({dev}): {len(failures)} FAILED: " + "; ".join(failures), flush=True)
        sys.exit(1)
    print(f"rank {r}/{world} ({dev}): all NCCLComm checks passed", flush=True)


if __name__ == "__main__":
    main()

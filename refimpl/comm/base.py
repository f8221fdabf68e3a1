"""The Communicator interface: the only way ZeRO code talks to other data-parallel ranks.

ZeRO (Rajbhandari et al., SC20, §7 "Communication Analysis") argues about cost in terms of three collectives and
the bytes a *ring* algorithm sends per rank for a model of Ψ elements:

    all_reduce      2Ψ   (a reduce-scatter followed by an all-gather)
    reduce_scatter   Ψ   (stage 2: each rank keeps only its shard of the summed gradients)
    all_gather       Ψ   (stage 3: parameters are gathered just before they are used)

Every implementation (LocalComm: threads in one process; MPIComm: processes through mpi4py; NCCLComm: GPUs through CuPy's NCCL) shares
this interface and these semantics:

* Deterministic, identical results on every rank. A sum is ((x_0 + x_1) + x_2) + ... in rank order, in the input
  dtype for float32/float64/integers; float16/bfloat16 inputs are summed in float32 and rounded once
  (`reduce_in_rank_order`). So a result does not depend on the implementation or on the number of threads.
* SPMD ordering. All ranks issue the same collectives in the same order; a sync call is `*_async(...).wait()`, so
  sync and async calls queue in issue order and mixing them cannot deadlock.
* Bounded failure. A collective that does not complete within `timeout` seconds raises CommError (or, under MPI,
  prints the error and aborts the job) naming the op, the rank and the timeout. Ranks that disagree about the
  collective (a different op, size, dtype or root) raise CommError naming what each rank issued.
* Inputs are never modified and outputs are new arrays. An async input must not be modified until its Handle is
  done (the MPI/NCCL rule).
"""
import numpy as np

import ml_dtypes

from ..kernels import array_module

REDUCE_OPS = ("sum", "max", "min")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier")


class CommError(RuntimeError):
    """A collective failed: the message names the collective, the rank and why (timeout, peer failed, mismatch)."""


class CommArgumentError(CommError, ValueError):
    """A collective was called with bad arguments (an unknown op, a 2-D all_gather input, a root out of range)."""


def _is_float(dtype):
    """True for numpy floats and ml_dtypes' floats (bfloat16 has dtype.kind 'V', so kind alone is not enough)."""
    try:
        ml_dtypes.finfo(dtype)
        return dtype.kind != "c"
    except ValueError:
        return False


def reduce_in_rank_order(arrays, op="sum"):
    """Reduce one array per rank, in rank order: ((a_0 + a_1) + a_2) + ... for op="sum", elementwise max/min.

    The single reduction used by every Communicator, so LocalComm and MPIComm agree bit for bit for any world
    size. float32/float64 (and integers) are reduced in their own dtype; floats narrower than 32 bits (float16,
    bfloat16) are summed in float32 and rounded once at the end, because MPI and NumPy have no bf16 accumulator
    and rounding after every addition would make the result depend on the number of ranks. Returns a new array.
    """
    if op not in REDUCE_OPS:
        raise CommArgumentError(f"unknown reduction op {op!r}; allowed: {', '.join(REDUCE_OPS)}")
    xp = array_module(arrays[0])                         # device arrays (CuPy) are reduced on the device
    dtype = arrays[0].dtype
    accumulate = np.float32 if op == "sum" and _is_float(dtype) and dtype.itemsize < 4 else dtype
    combine = {"sum": xp.add, "max": xp.maximum, "min": xp.minimum}[op]
    acc = arrays[0].astype(accumulate, copy=True)
    with np.errstate(over="ignore", invalid="ignore"):  # inf/nan are data here (fp16 overflow detection)
        for a in arrays[1:]:
            acc = combine(acc, a.astype(accumulate, copy=False))
    return acc.astype(dtype, copy=False)


def as_array(x):
    """x as an array of its own module: numpy arrays and lists as numpy, device (CuPy) arrays left on the device."""
    return x if array_module(x) is not np else np.asarray(x)


def describe(op, x, reduce_op=None, root=None):
    """What this rank is about to do, as a short string; all ranks must issue identical descriptions."""
    if op == "barrier":
        return "barrier()"
    extra = f", op={reduce_op}" if reduce_op else f", root={root}" if root is not None else ""
    return f"{op}(shape={tuple(x.shape)}, dtype={x.dtype.name}{extra})"


def check_same(op, rank, descriptions):
    """Raise CommError unless every rank issued the same collective with the same sizes."""
    if any(d != descriptions[0] for d in descriptions):
        issued = "; ".join(f"rank {r} issued {d}" for r, d in enumerate(descriptions))
        raise CommError(f"{op} on rank {rank}: ranks disagree about the collective ({issued})")


class Handle:
    """An in-flight collective. wait() returns its result (raising CommError on timeout or failure)."""

    def wait(self, timeout=None):
        raise NotImplementedError

    def done(self) -> bool:
        raise NotImplementedError


class TimedHandle(Handle):
    """A collective whose wait() the ledger records as a "collective" interval: the time the rank's thread
    blocked for the other ranks (and for the transfer itself)."""

    def __init__(self, handle, ledger, op):
        self.handle, self.ledger, self.op = handle, ledger, op

    def wait(self, timeout=None):
        start = self.ledger.now()
        try:
            return self.handle.wait(timeout)
        finally:
            self.ledger.add("collective", start, self.ledger.now(), label=self.op)

    def done(self) -> bool:
        return self.handle.done()


class Communicator:
    """Collectives over `world_size` ranks; subclasses implement `_start` (issue one collective, return a Handle).

    `stats[op]` counts calls and bytes per collective ("all_reduce", "all_gather", "reduce_scatter", "broadcast",
    "barrier"), async calls included:
      payload_bytes    the input size in bytes (for all_gather: the shard this rank contributes)
      ring_bytes_sent  what a ring algorithm would send from this rank for that payload, N = world_size
                       (ZeRO paper §7; floor-divided to whole bytes):
                         all_reduce      2(N-1)/N * payload   (reduce-scatter + all-gather: the "2Ψ")
                         reduce_scatter   (N-1)/N * payload   (the "Ψ" of stage 2 gradients)
                         all_gather       (N-1)   * payload   (payload is the shard; Ψ in total for stage 3)
                         broadcast        payload on the root, 0 elsewhere
    This is the cost model the paper reasons with, not what a given implementation moves: the reference
    implementations gather every rank's input and reduce locally (exact and deterministic, N x the memory).
    """

    rank: int
    world_size: int
    timeout: float

    def __init__(self):
        self.reset_stats()
        self.ledger = None   # the rank's ledger (memory/ledger.py), set by the Engine: records waits on collectives

    def reset_stats(self):
        self.stats = {op: {"calls": 0, "payload_bytes": 0, "ring_bytes_sent": 0} for op in COLLECTIVES}

    # -- the collectives: validate, count, issue -------------------------------------------------------------
    def all_reduce(self, x, op="sum"):
        """Elementwise reduction of x over ranks; a new array of x's shape and dtype on every rank."""
        return self.all_reduce_async(x, op).wait()

    def all_gather(self, x):
        """x (n,) from every rank -> (world_size * n,), concatenated in rank order."""
        return self.all_gather_async(x).wait()

    def reduce_scatter(self, x, op="sum"):
        """x (world_size * n,) from every rank -> (n,): this rank's slice [rank*n, (rank+1)*n) of the reduction."""
        return self.reduce_scatter_async(x, op).wait()

    def broadcast(self, x, root=0):
        """The root's x on every rank (other ranks pass an array of the same shape and dtype)."""
        x = as_array(x)
        if not (isinstance(root, (int, np.integer)) and 0 <= root < self.world_size):
            raise CommArgumentError(f"broadcast root {root!r} is not a rank in [0, {self.world_size})")
        root = int(root)
        self._count("broadcast", x.nbytes, x.nbytes if self.rank == root else 0)
        return self._issue("broadcast", x, describe("broadcast", x, root=root), root=root).wait()

    def barrier(self) -> None:
        """Return once every rank has called barrier()."""
        self._count("barrier", 0, 0)
        self._issue("barrier", None, describe("barrier", None)).wait()

    def all_reduce_async(self, x, op="sum") -> Handle:
        x = self._check_reduce("all_reduce", x, op)
        n = self.world_size
        self._count("all_reduce", x.nbytes, 2 * (n - 1) * x.nbytes // n)
        return self._issue("all_reduce", x, describe("all_reduce", x, reduce_op=op), reduce_op=op)

    def all_gather_async(self, x) -> Handle:
        x = self._check_flat("all_gather", x)
        self._count("all_gather", x.nbytes, (self.world_size - 1) * x.nbytes)
        return self._issue("all_gather", x, describe("all_gather", x))

    def reduce_scatter_async(self, x, op="sum") -> Handle:
        x = self._check_flat("reduce_scatter", self._check_reduce("reduce_scatter", x, op))
        n = self.world_size
        if x.shape[0] % n:
            raise CommArgumentError(f"reduce_scatter input length {x.shape[0]} is not a multiple of "
                                    f"world_size={n} (pad the flat buffer to a multiple of world_size)")
        self._count("reduce_scatter", x.nbytes, (n - 1) * x.nbytes // n)
        return self._issue("reduce_scatter", x, describe("reduce_scatter", x, reduce_op=op), reduce_op=op)

    def close(self) -> None:
        """Release this rank's resources; no collective may follow."""

    def _start(self, op, x, description, reduce_op=None, root=None) -> Handle:
        raise NotImplementedError

    def _issue(self, op, x, description, **kw) -> Handle:
        """_start, with the caller's wait for the result recorded in the ledger when there is one."""
        handle = self._start(op, x, description, **kw)
        return handle if self.ledger is None else TimedHandle(handle, self.ledger, op)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _count(self, op, payload, ring):
        s = self.stats[op]
        s["calls"] += 1
        s["payload_bytes"] += int(payload)
        s["ring_bytes_sent"] += int(ring)

    @staticmethod
    def _check_reduce(name, x, op):
        x = as_array(x)
        if op not in REDUCE_OPS:
            raise CommArgumentError(f"{name}: unknown reduction op {op!r}; allowed: {', '.join(REDUCE_OPS)}")
        if not (x.dtype.kind in "biuf" or _is_float(x.dtype)):
            raise CommArgumentError(f"{name}: cannot reduce dtype {x.dtype}; allowed: bool, integer and float "
                                    "dtypes (including ml_dtypes.bfloat16)")
        return x

    @staticmethod
    def _check_flat(name, x):
        x = as_array(x)
        if x.ndim != 1:
            raise CommArgumentError(f"{name} expects a 1-D array (a flat ZeRO partition), got shape {x.shape}")
        return x

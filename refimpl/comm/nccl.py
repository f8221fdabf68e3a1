"""NCCLComm: data-parallel ranks as processes with one GPU each, collectives through NCCL (cupy.cuda.nccl).

`mpirun -n 2 python train.py ...`: MPI starts the processes and bootstraps NCCL (rank 0 makes the unique id,
MPI broadcasts it), each process uses the GPU of its local rank, and the payload moves GPU to GPU. The interface
and semantics are Communicator's (base.py), on device (cupy) arrays; numpy inputs are moved to the device and
their results come back as numpy.

* Agreement: as MPIComm, every collective first all-gathers a description of itself over MPI (host, a few hundred
  bytes), so ranks that disagree raise CommError naming what each issued instead of hanging in NCCL.
* Determinism (exact=True, the default): reductions are not NCCL reductions. all_reduce all-gathers the inputs
  with ncclAllGather and sums them on the GPU in rank order, in float32 for float16/bfloat16 (base.py's
  `reduce_in_rank_order`, element for element), so results are bit-identical to LocalComm and MPIComm for any
  world size; reduce_scatter does the same on the slices it owns (all-gather of N slices, ring-equivalent
  traffic to an all-to-all). exact=False uses ncclAllReduce / ncclReduceScatter: the ring's bytes and speed, but
  the summation order is NCCL's, and float16/bfloat16 are accumulated in their own precision.
* Asynchrony: collectives run on the communicator's own CUDA stream, after the work already queued on the
  caller's current stream (an event orders them), so they overlap later compute. Handle.wait() blocks the host
  until the collective (and its local reduction) is done and returns the result; done() polls. Inputs must not
  be modified until then. A collective not done within `timeout` seconds prints one line naming the op, the
  rank and the timeout, and aborts the MPI job (wait(timeout=t) raises CommError instead), as MPIComm does.
* Bytes: `stats` counts the ring model of base.py, the same for every implementation.
"""

import numpy as np

from .base import CommArgumentError, CommError, Communicator, Handle, _is_float, describe
from .mpi import MPIComm

# ncclDataType_t values (nccl.h); NCCL >= 2.10 has bfloat16
_NCCL_DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5, "float16": 6,
                "float32": 7, "float64": 8, "bfloat16": 9, "bool": 1}
_NCCL_OPS = {"sum": 0, "max": 2, "min": 3}  # ncclRedOp_t (prod = 1)


class NCCLUnavailableError(ModuleNotFoundError, CommError):
    """cupy (with its NCCL bindings) or a CUDA device is missing."""


def _import_cupy_nccl():
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError as e:
        raise NCCLUnavailableError("NCCLComm needs cupy with NCCL: install refimpl[cupy] (cupy-cuda13x) and "
                                   "NCCL (pip install nvidia-nccl-cu13)", name="cupy") from e
    if not getattr(nccl, "available", True):
        raise NCCLUnavailableError("NCCLComm: this cupy was built without NCCL", name="cupy.cuda.nccl")
    return cupy, nccl


def local_rank(mpi_comm, MPI) -> int:
    """This process's rank among the processes on its host (the GPU it uses)."""
    node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank()
    finally:
        node.Free()


class _NCCLHandle(Handle):
    def __init__(self, comm, op, event, finish, keep):
        self._comm, self._op, self._event, self._finish = comm, op, event, finish
        self._keep = keep  # inputs and outputs stay alive until the GPU is done with them
        self._complete, self._result = False, None

    def wait(self, timeout=None):
        if not self._complete:
            self._comm._wait(self._op, self._event, timeout)
            self._result, self._complete, self._keep = self._finish(), True, None
        return self._result

    def done(self) -> bool:
        if not self._complete and self._event.done:
            self._result, self._complete, self._keep = self._finish(), True, None
        return self._complete


class NCCLComm(Communicator):
    """One rank of an MPI job, one GPU per process. `comm` defaults to MPI.COMM_WORLD (duplicated)."""

    def __init__(self, comm=None, timeout: float = 300.0, exact: bool = True, device: int | None = None):
        super().__init__()
        self._mpi = MPIComm(comm, timeout=timeout)  # agreement, barrier, bootstrap, abort
        self.MPI = self._mpi.MPI
        self.rank, self.world_size, self.timeout = self._mpi.rank, self._mpi.world_size, float(timeout)
        self.exact = bool(exact)
        self.cupy, nccl = _import_cupy_nccl()
        cp = self.cupy
        ngpu = cp.cuda.runtime.getDeviceCount()
        self.device_id = local_rank(self._mpi.comm, self.MPI) if device is None else int(device)
        if not 0 <= self.device_id < ngpu:
            raise CommError(f"NCCLComm rank {self.rank}: GPU {self.device_id} (local rank) does not exist; this "
                            f"host has {ngpu} (start at most one process per GPU)")
        cp.cuda.Device(self.device_id).use()
        self.nccl = nccl.NcclCommunicator(self.world_size, self._bcast_unique_id(nccl), self.rank)
        self.stream = cp.cuda.Stream(non_blocking=True)

    def _bcast_unique_id(self, nccl):
        """Rank 0's ncclUniqueId on every rank, as 128 raw bytes over MPI (no pickle). CuPy 14 gives the id as
        bytes, older CuPy as a tuple of 128 signed chars; byte 128 says which, so each rank rebuilds that type."""
        buf = np.zeros(129, np.uint8)
        if self.rank == 0:
            uid = nccl.get_unique_id()
            if isinstance(uid, (bytes, bytearray)):
                buf[:128], buf[128] = np.frombuffer(bytes(uid), np.uint8)[:128], 1
            else:
                buf[:128] = np.asarray(uid, np.int64).astype(np.int8).view(np.uint8)
        self._mpi.comm.Bcast([buf, self.MPI.BYTE], root=0)
        if buf[128]:
            return bytes(buf[:128])
        return tuple(int(c) for c in buf[:128].view(np.int8))

    def close(self) -> None:
        if self.nccl is not None:
            self.stream.synchronize()
            self.nccl.destroy()
            self.nccl = None
        self._mpi.close()

    def abort(self, code: int) -> None:
        self._mpi.abort(code)

    # -- inputs go to the device; base.py's validation (_check_reduce, _check_flat) works on device arrays --------
    def _as_device(self, x):
        cp = self.cupy
        return (x, False) if isinstance(x, cp.ndarray) else (cp.asarray(np.ascontiguousarray(x)), True)

    def all_reduce_async(self, x, op="sum") -> Handle:
        x, host = self._as_device(x)
        self._check_reduce("all_reduce", x, op)
        n = self.world_size
        self._count("all_reduce", x.nbytes, 2 * (n - 1) * x.nbytes // n)
        return self._issue("all_reduce", x, describe("all_reduce", x, reduce_op=op), reduce_op=op, host=host)

    def all_gather_async(self, x) -> Handle:
        x, host = self._as_device(x)
        self._check_flat("all_gather", x)
        self._count("all_gather", x.nbytes, (self.world_size - 1) * x.nbytes)
        return self._issue("all_gather", x, describe("all_gather", x), host=host)

    def reduce_scatter_async(self, x, op="sum") -> Handle:
        x, host = self._as_device(x)
        self._check_flat("reduce_scatter", self._check_reduce("reduce_scatter", x, op))
        n = self.world_size
        if x.shape[0] % n:
            raise CommArgumentError(f"reduce_scatter input length {x.shape[0]} is not a multiple of "
                                    f"world_size={n} (pad the flat buffer to a multiple of world_size)")
        self._count("reduce_scatter", x.nbytes, (n - 1) * x.nbytes // n)
        return self._issue("reduce_scatter", x, describe("reduce_scatter", x, reduce_op=op), reduce_op=op,
                           host=host)

    def broadcast(self, x, root=0):
        x, host = self._as_device(x)
        if not (isinstance(root, (int, np.integer)) and 0 <= root < self.world_size):
            raise CommArgumentError(f"broadcast root {root!r} is not a rank in [0, {self.world_size})")
        root = int(root)
        self._count("broadcast", x.nbytes, x.nbytes if self.rank == root else 0)
        return self._issue("broadcast", x, describe("broadcast", x, root=root), root=root, host=host).wait()

    def barrier(self) -> None:
        self._count("barrier", 0, 0)
        self.stream.synchronize()
        self._mpi.comm.Barrier()

    # -- issuing --------------------------------------------------------------------------------------------------
    def _start(self, op, x, description, reduce_op=None, root=None, host=False) -> Handle:
        cp = self.cupy
        if self.nccl is None:
            raise CommError(f"{op} on rank {self.rank}: the communicator is closed")
        self._mpi._agree(op, description)
        n, s = self.world_size, self.stream
        ready = cp.cuda.Event(disable_timing=True)
        ready.record(cp.cuda.get_current_stream())  # the input is written by work queued before this call
        s.wait_event(ready)
        with s:  # outputs are allocated on the comm stream: the memory pool orders their reuse after it
            x = cp.ascontiguousarray(x)
            if op == "broadcast":
                out = x.copy() if self.rank == root else cp.empty_like(x)
                self.nccl.bcast(out.data.ptr, out.nbytes, _NCCL_DTYPES["uint8"], root, s.ptr)
            elif op == "all_gather" or (self.exact and reduce_op is not None):
                gathered = cp.empty((n,) + x.shape, x.dtype)                       # (N, *x.shape)
                self.nccl.allGather(x.data.ptr, gathered.data.ptr, x.nbytes, _NCCL_DTYPES["uint8"], s.ptr)
                if op == "all_gather":
                    out = gathered.reshape(-1)                                     # (N * n,)
                elif op == "all_reduce":
                    out = _reduce_rows(cp, gathered, reduce_op)
                else:  # reduce_scatter: this rank's slice of every rank's input, summed in rank order
                    m = x.shape[0] // n
                    out = _reduce_rows(cp, gathered[:, self.rank * m:(self.rank + 1) * m], reduce_op)
            else:
                code = self._nccl_dtype(op, x)
                if op == "all_reduce":
                    out = cp.empty_like(x)
                    self.nccl.allReduce(x.data.ptr, out.data.ptr, x.size, code, _NCCL_OPS[reduce_op], s.ptr)
                else:
                    out = cp.empty(x.shape[0] // n, x.dtype)
                    self.nccl.reduceScatter(x.data.ptr, out.data.ptr, out.size, code, _NCCL_OPS[reduce_op], s.ptr)
        done = cp.cuda.Event(disable_timing=True)
        done.record(s)
        finish = (lambda: out.get()) if host else (lambda: out)
        return _NCCLHandle(self, op, done, finish, (x, out))

    def _nccl_dtype(self, op, x):
        name = "bool" if x.dtype == np.bool_ else x.dtype.name
        if name not in _NCCL_DTYPES:
            raise CommArgumentError(f"{op}: NCCL has no reduction for dtype {x.dtype}; allowed: "
                                    f"{', '.join(sorted(_NCCL_DTYPES))}")
        return _NCCL_DTYPES[name]

    def _wait(self, op, event, timeout):
        self._mpi.poll(op, lambda: event.done, timeout, limit=self.timeout)  # past the limit: abort the MPI job


def _reduce_rows(cp, rows, op):
    """((rows[0] + rows[1]) + rows[2]) + ... on the GPU, as base.reduce_in_rank_order: in float32 for floats
    narrower than 32 bits (rounded once at the end), in the input dtype otherwise. rows: (N, ...)."""
    dtype = rows.dtype
    narrow = op == "sum" and _is_float(dtype) and dtype.itemsize < 4
    if narrow:   # the backend's cast kernel (RNE): the interface, never a plugin's private module
        from ..backend import get_backend
        cast = get_backend("cupy").cast
        acc = cast(rows[0], np.float32)
        for r in range(1, rows.shape[0]):
            acc += cast(rows[r], np.float32)
        return cast(acc, dtype)
    combine = {"sum": cp.add, "max": cp.maximum, "min": cp.minimum}[op]
    acc = rows[0].copy()
    for r in range(1, rows.shape[0]):
        combine(acc, rows[r], out=acc)
    return acc

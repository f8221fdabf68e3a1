"""MPIComm: data-parallel ranks as real processes, through mpi4py (`mpiexec -n 4 python train.py`).

Same interface and semantics as LocalComm (refimpl/comm/base.py; ZeRO paper §7 for the byte accounting in
`stats`). The implementation is the readable reference, not the fast one:

* Every collective first all-gathers a short description of itself from every rank (op, shape, dtype, root), so
  ranks that disagree raise CommError naming what each issued, instead of exchanging garbage or hanging.
* The payload moves with mpi4py's buffer-based nonblocking calls (Iallgather, Ialltoall, Ibcast, Ibarrier) as raw
  bytes, so any dtype travels, ml_dtypes.bfloat16 included.
* Reductions are not MPI reductions: all_reduce all-gathers the inputs and sums them locally in rank order with
  `reduce_in_rank_order` (N x the memory of a ring all-reduce), reduce_scatter exchanges slices with an
  all-to-all and sums the N slices it receives. That makes results bit-identical to LocalComm for any N and
  gives bf16/fp16 the float32 accumulation MPI has no datatype for.
* Waiting polls `Request.Test()`. A collective not done within `timeout` seconds prints one line to stderr naming
  the op, the rank and the timeout, then calls `Abort(1)`: a hung MPI job must end. (`Handle.wait(timeout=t)`
  with an explicit t instead raises CommError and leaves the collective in flight.)
"""
import os
import sys
import time

import numpy as np

from .base import CommArgumentError, CommError, Communicator, Handle, check_same, reduce_in_rank_order
from .local import RunningClock

HEADER_BYTES = 512  # room for one rank's description of the collective it issues


class MPIUnavailableError(ModuleNotFoundError, CommError):
    """mpi4py is not installed."""


def launched_under_mpi() -> bool:
    """True when this process was started by mpiexec/mpirun with more than one rank (does not import mpi4py).

    Reads the launcher's environment: PMI_SIZE/PMI_RANK (MPICH hydra), OMPI_COMM_WORLD_SIZE (Open MPI),
    PMIX_RANK (PMIx launchers). When only a rank variable is set the size is unknown and the answer is True.
    """
    for size_var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(size_var, "").strip().isdigit():
            return int(os.environ[size_var]) > 1
    return any(os.environ.get(v, "").strip().isdigit() for v in ("PMI_RANK", "PMIX_RANK"))


def _import_mpi():
    try:
        from mpi4py import MPI
    except ModuleNotFoundError as e:
        raise MPIUnavailableError('MPIComm needs mpi4py and an MPI library: install refimpl[mpi] '
                                  '(pip install -e ".[mpi]")', name="mpi4py") from e
    return MPI


def _as_bytes(a):
    """A C-contiguous array as a flat uint8 view (a buffer MPI can send or fill as MPI.BYTE)."""
    return a.reshape(-1).view(np.uint8)


class _MPIHandle(Handle):
    def __init__(self, comm, op, request, finish, buffers):
        self._comm, self._op, self._request, self._finish = comm, op, request, finish
        self._buffers = buffers  # keep send/receive buffers alive until MPI is done with them
        self._complete, self._result = False, None

    def wait(self, timeout=None):
        if not self._complete:
            self._comm._wait(self._op, self._request, timeout)
            self._complete_now()
        return self._result

    def done(self) -> bool:
        if not self._complete and self._request.Test():
            self._complete_now()
        return self._complete

    def _complete_now(self):
        self._result, self._complete, self._buffers = self._finish(), True, None


class MPIComm(Communicator):
    """One rank of an MPI job. `comm` defaults to MPI.COMM_WORLD (duplicated, so our traffic stays separate)."""

    def __init__(self, comm=None, timeout: float = 300.0):
        super().__init__()
        if not timeout > 0:
            raise CommArgumentError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.MPI = _import_mpi()
        self.comm = (self.MPI.COMM_WORLD if comm is None else comm).Dup()
        self.rank, self.world_size, self.timeout = self.comm.Get_rank(), self.comm.Get_size(), float(timeout)

    def close(self) -> None:
        if self.comm is not None and not self.MPI.Is_finalized():
            self.comm.Free()
        self.comm = None

    def abort(self, code: int) -> None:
        """End every process of the job now (MPI_Abort): a rank that failed must not leave the others waiting."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.5)     # let the launcher forward this rank's last words before MPI_Abort tears it down
        self.MPI.COMM_WORLD.Abort(code)

    def _start(self, op, x, description, reduce_op=None, root=None) -> Handle:
        if self.comm is None:
            raise CommError(f"{op} on rank {self.rank}: the communicator is closed")
        self._agree(op, description)
        comm, BYTE, n = self.comm, self.MPI.BYTE, self.world_size
        if op == "barrier":
            return _MPIHandle(self, op, comm.Ibarrier(), lambda: None, ())
        if op == "broadcast":
            buf = np.array(x, order="C", copy=True) if self.rank == root else np.empty(x.shape, x.dtype)
            return _MPIHandle(self, op, comm.Ibcast([_as_bytes(buf), BYTE], root=root), lambda: buf, (buf,))
        send = np.ascontiguousarray(x)
        if op == "reduce_scatter":
            # all-to-all: slice j of every rank's input goes to rank j, which sums the N slices in rank order
            recv = np.empty((n, x.shape[0] // n), x.dtype)                                  # (N, n)
            request = comm.Ialltoall([_as_bytes(send), BYTE], [_as_bytes(recv), BYTE])
            return _MPIHandle(self, op, request, lambda: reduce_in_rank_order(list(recv), reduce_op), (send, recv))
        recv = np.empty((n, *x.shape), x.dtype)                                              # (N, *x.shape)
        request = comm.Iallgather([_as_bytes(send), BYTE], [_as_bytes(recv), BYTE])
        if op == "all_gather":
            return _MPIHandle(self, op, request, lambda: recv.reshape(-1), (send, recv))      # (N * n,)
        return _MPIHandle(self, op, request, lambda: reduce_in_rank_order(list(recv), reduce_op), (send, recv))

    def _agree(self, op, description):
        """All-gather every rank's description of this collective; raise CommError unless they all match."""
        mine = description.encode()
        if len(mine) > HEADER_BYTES:
            raise CommArgumentError(f"{op}: description longer than {HEADER_BYTES} bytes: {description[:80]}...")
        send = np.zeros(HEADER_BYTES, np.uint8)
        send[:len(mine)] = np.frombuffer(mine, np.uint8)
        recv = np.empty((self.world_size, HEADER_BYTES), np.uint8)
        self._wait(op, self.comm.Iallgather([send, self.MPI.BYTE], [recv, self.MPI.BYTE]), None)
        check_same(op, self.rank, [bytes(row).rstrip(b"\0").decode() for row in recv])

    def _wait(self, op, request, timeout):
        self.poll(op, request.Test, timeout)

    def poll(self, op, done, timeout, limit=None):
        """Poll until `done()`. Past `limit` (default self.timeout): report and abort the job; past an explicit
        `timeout`: raise CommError (the operation stays in flight). NCCLComm polls its CUDA events through it."""
        limit = (self.timeout if limit is None else limit) if timeout is None else timeout
        clock, pause = RunningClock(), 1e-5     # a stop of the process (Ctrl-Z) does not count
        while not done():
            if clock.tick() > limit:
                message = f"{op} on rank {self.rank} of {self.world_size} did not complete within {limit:g} s"
                if timeout is not None:
                    raise CommError(f"{message} (wait(timeout=...); still in flight, wait again)")
                print(f"refimpl.comm.CommError: {message} (timed out: a rank died, raised, skipped this collective "
                      "or issued a different one); aborting the MPI job", file=sys.stderr, flush=True)
                self.comm.Abort(1)
                raise CommError(message)  # not reached: Abort ends the process
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)  # answer fast collectives fast, idle cheaply on slow ones

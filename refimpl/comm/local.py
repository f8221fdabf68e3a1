"""LocalComm: N simulated data-parallel ranks inside one process, one thread per rank.

This is how the whole ZeRO system runs and is tested under plain pytest on a laptop (see refimpl/comm/base.py
for the shared semantics and the ZeRO §7 byte accounting). A collective is a shared slot table plus a
`threading.Barrier`:

    1. every rank writes (description, input) into its slot     -> barrier (everyone has written)
    2. every rank checks the descriptions agree and computes its result from all the slots
                                                                 -> barrier (everyone has read; slots reusable)

Each rank runs its collectives on its own single worker thread, so async and sync calls execute in issue order.
A rank that raises aborts the barrier, which releases the other ranks at once with CommError "rank k failed";
a rank that never arrives makes the barrier time out after `timeout` seconds of the process running: a pause of
the whole process (Ctrl-Z, a debugger, a host that stalls it) does not count, since no rank made progress then
either.

    results = run_ranks(4, train_step, batch)      # train_step(comm, batch) on threads "rank0".."rank3"
"""
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from ..kernels import array_module
from .base import CommArgumentError, CommError, Communicator, Handle, check_same, reduce_in_rank_order


_SLICE = 0.25       # seconds: waits are cut into slices; a slice that lasted far longer means the process was stopped


class RunningClock:
    """Seconds this process ran while someone waited: each ``tick()`` adds the time since the last one, at most
    2 slices, so a stop of the whole process (SIGSTOP, then SIGCONT) adds nearly nothing."""

    def __init__(self):
        self.elapsed, self._last = 0.0, time.monotonic()

    def tick(self) -> float:
        now = time.monotonic()
        self.elapsed += min(now - self._last, 2 * _SLICE)
        self._last = now
        return self.elapsed


class PauseAwareBarrier:
    """threading.Barrier whose timeout counts only the time the process ran (RunningClock): ``wait()`` returns
    when all parties arrived, raises threading.BrokenBarrierError when aborted or timed out (which breaks it for
    every party, as threading.Barrier does)."""

    def __init__(self, parties: int, timeout: float):
        self.parties, self.timeout = parties, timeout
        self._cond = threading.Condition()
        self._count, self._generation, self._broken = 0, 0, False

    def wait(self) -> None:
        with self._cond:
            if self._broken:
                raise threading.BrokenBarrierError
            generation = self._generation
            self._count += 1
            if self._count == self.parties:        # the last to arrive releases everyone
                self._count, self._generation = 0, self._generation + 1
                self._cond.notify_all()
                return
            clock = RunningClock()
            while generation == self._generation:
                if self._broken:
                    raise threading.BrokenBarrierError
                self._cond.wait(_SLICE)
                if generation == self._generation and clock.tick() >= self.timeout:
                    self._broken = True
                    self._cond.notify_all()
                    raise threading.BrokenBarrierError

    def abort(self) -> None:
        with self._cond:
            self._broken = True
            self._cond.notify_all()


class LocalWorld:
    """The shared state of one simulated job: a slot per rank, one barrier, and the first failure (if any)."""

    def __init__(self, world_size: int, timeout: float = 60.0):
        if not (isinstance(world_size, int) and world_size >= 1):
            raise CommArgumentError(f"world_size must be an int >= 1, got {world_size!r}")
        if not timeout > 0:
            raise CommArgumentError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.world_size, self.timeout = world_size, float(timeout)
        self.slots = [None] * world_size
        self.barrier = PauseAwareBarrier(world_size, self.timeout)
        self.failure = None  # why the job broke: "rank 1 failed: ...", or a timeout; set once
        self._lock = threading.Lock()
        self._comms = {}

    def comm(self, rank) -> "LocalComm":
        """The Communicator of `rank` (one per rank: a second one would break the per-rank issue order)."""
        if not (isinstance(rank, int) and 0 <= rank < self.world_size):
            raise CommArgumentError(f"rank {rank!r} is not in [0, {self.world_size})")
        with self._lock:
            if rank not in self._comms:
                self._comms[rank] = LocalComm(self, rank)
            return self._comms[rank]

    def abort(self, reason: str):
        """Break the job: every pending and future collective raises CommError with `reason` (the first one)."""
        with self._lock:
            if self.failure is None:
                self.failure = reason
        self.barrier.abort()

    def close(self):
        for c in list(self._comms.values()):
            c.close()


class _FutureHandle(Handle):
    def __init__(self, future, op, rank):
        self._future, self._op, self._rank = future, op, rank

    def wait(self, timeout=None):
        # timeout=None: the worker's barrier already bounds the wait by the world's timeout.
        try:
            return self._future.result(timeout)
        except FutureTimeout:
            raise CommError(f"{self._op} on rank {self._rank}: not done after wait(timeout={timeout}) "
                            "(still in flight; wait again)") from None

    def done(self) -> bool:
        return self._future.done()


class LocalComm(Communicator):
    """One simulated rank of a LocalWorld. Get it from `LocalWorld.comm(rank)` or `run_ranks`."""

    def __init__(self, world: LocalWorld, rank: int):
        super().__init__()
        self.world, self.rank = world, rank
        self.world_size, self.timeout = world.world_size, world.timeout
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rank{rank}-comm")

    def _start(self, op, x, description, reduce_op=None, root=None) -> Handle:
        try:
            future = self._worker.submit(self._collective, op, x, description, reduce_op, root)
        except RuntimeError:  # the executor was shut down
            raise CommError(f"{op} on rank {self.rank}: the communicator is closed") from None
        return _FutureHandle(future, op, self.rank)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- runs on this rank's worker thread --------------------------------------------------------------------
    def _collective(self, op, x, description, reduce_op, root):
        w = self.world
        w.slots[self.rank] = (description, x)
        self._barrier(op)                                   # every rank has written its slot
        try:
            check_same(op, self.rank, [d for d, _ in w.slots])
            result, error = self._combine(op, [a for _, a in w.slots], reduce_op, root), None
        except CommError as e:                               # every rank sees the same slots: all raise together
            result, error = None, e
        self._barrier(op)                                   # every rank has read: the slots may be reused
        if error is not None:
            raise error
        return result

    def _combine(self, op, inputs, reduce_op, root):
        """This rank's result, computed from every rank's input (the same arithmetic MPIComm does)."""
        if op == "all_reduce":
            return reduce_in_rank_order(inputs, reduce_op)
        if op == "all_gather":
            return array_module(inputs[0]).concatenate(inputs)   # (world_size * n,), on the inputs' device
        if op == "reduce_scatter":
            n = inputs[0].shape[0] // self.world_size
            mine = slice(self.rank * n, (self.rank + 1) * n)
            return reduce_in_rank_order([a[mine] for a in inputs], reduce_op)
        if op == "broadcast":
            return inputs[root].copy()
        return None                                         # barrier

    def _barrier(self, op):
        w = self.world
        try:
            w.barrier.wait()
        except threading.BrokenBarrierError:
            with w._lock:
                if w.failure is None:  # nobody aborted: the barrier timed out waiting for a rank
                    w.failure = (f"timed out after {w.timeout:g} s waiting for the other ranks (a rank died, "
                                 "raised, skipped this collective or issued a different one)")
            raise CommError(f"{op} on rank {self.rank}: {w.failure}") from None


def run_ranks(world_size: int, fn, *args, timeout: float = 60.0, **kwargs) -> list:
    """Run fn(comm, *args, **kwargs) on `world_size` threads ("rank0", ...); return the results in rank order.

    If a rank raises, the others are released at once (their collectives raise CommError "rank k failed: ...")
    and the first failing rank's exception is re-raised with a note naming the rank. SPMD ranks finish
    together, so once one rank has finished the others get 2 x `timeout` more seconds (long enough for a
    collective they wait in to time out and report itself); a rank still running then (hung outside a
    collective) makes run_ranks raise CommError naming it.
    """
    world = LocalWorld(world_size, timeout)
    results, failures, finished = [None] * world_size, [], queue.SimpleQueue()

    def body(rank):
        try:
            results[rank] = fn(world.comm(rank), *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 -- reported to the caller below
            failures.append((rank, exc))  # list.append is atomic: failures[0] is the first to fail
            world.abort(f"rank {rank} failed: {exc!r}")
        finally:
            finished.put(rank)

    for r in range(world_size):
        threading.Thread(target=body, args=(r,), name=f"rank{r}", daemon=True).start()
    running, clock = set(range(world_size)), None   # clock: running time since the first rank finished
    while running:
        try:
            running.discard(finished.get(timeout=_SLICE))
        except queue.Empty:
            if clock is not None and clock.tick() >= 2 * timeout:
                break
            continue
        clock = clock or RunningClock()
    if running:  # release the stragglers' next collective too
        world.abort(f"run_ranks gave up on rank(s) {sorted(running)}")
    world.close()
    if failures:
        rank, exc = failures[0]
        exc.add_note(f"raised on rank {rank} of {world_size} (refimpl.comm.run_ranks)")
        raise exc
    if running:
        raise CommError(f"run_ranks: rank(s) {sorted(running)} still running {2 * timeout:g} s after another rank "
                        "finished (hung outside a collective?)")
    return results

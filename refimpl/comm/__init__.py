"""Communicators: how data-parallel ranks talk (ZeRO paper §7: all-reduce 2Ψ, reduce-scatter Ψ, all-gather Ψ).

    LocalComm / run_ranks   N simulated ranks as threads in one process (tests, laptops)
    MPIComm                 real processes through mpi4py (`mpiexec -n N ...`; install refimpl[mpi])
    NCCLComm (nccl.py)      one process per GPU, the collectives over NCCL through CuPy, bootstrapped by MPI

All share the interface and semantics of `Communicator` in base.py.
"""
from .base import CommArgumentError, CommError, Communicator, Handle, reduce_in_rank_order
from .local import LocalComm, LocalWorld, run_ranks
from .mpi import MPIComm, MPIUnavailableError, launched_under_mpi

__all__ = ["CommArgumentError", "CommError", "Communicator", "Handle", "LocalComm", "LocalWorld", "MPIComm",
           "MPIUnavailableError", "launched_under_mpi", "reduce_in_rank_order", "run_ranks"]

"""The OpenMP wait policy every CPU benchmark runs under; import it before numpy, numba and torch.

torch bundles its own libgomp, numba's "omp" layer (and DeepSpeed's op) use the system's: two OpenMP thread pools.
By default an idle pool spins ~5 ms after each parallel region, and when variants alternate in one process each
pool's spinning steals the 2 cores from the other's step (a 0.5 ms kernel took ~20 ms). Fully passive waits
cost torch's step 45% instead (49.1 against 33.8 ms at its defaults, 2026-12-04: a sleeping thread takes
50-100 us to wake). Both pools spin ~0.6 ms, then sleep: torch's step runs at its default speed (33.7 ms in
train_step_cpu.py), and the numba backend chooses the same. Set OMP_WAIT_POLICY or GOMP_SPINCOUNT to override.
"""
import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")


def setting() -> str:
    """The policy in force, for a benchmark's details line."""
    return f"OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']} GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}"

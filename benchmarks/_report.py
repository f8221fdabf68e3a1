"""What every benchmark prints under its table: the date, the machine, and the exact command (benchmarks/README.md)."""
import datetime
import os
import platform
import shlex
import subprocess
import sys


def median_range(values, digits=1) -> str:
    """"median (min-max)" of a list of timings, as every benchmark table writes them."""
    import numpy as np
    return f"{np.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def filesystem(path) -> str:
    """The filesystem type and device of `path`, from `df -T`."""
    out = subprocess.run(["df", "-T", path], capture_output=True, text=True).stdout.splitlines()[-1].split()
    return f"{out[1]} ({out[0]})"


def machine() -> str:
    return (f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {platform.machine()}, "
            f"nproc {len(os.sched_getaffinity(0))}, Linux {platform.release()}")


def blas_threads() -> str:
    """NumPy's OpenBLAS thread count now (the numba backend pins it to 1 when selected), or why it is not known."""
    from refimpl.blas_threads import get_threads
    n = get_threads()
    return "NumPy's BLAS is not a known OpenBLAS" if n is None else f"NumPy's OpenBLAS threads {n}"


def emit(lines: list, details: str, script: str, out=None) -> str:
    """Print the table, then "<date>; <machine>; <details>" and the command line; also write it to `out`."""
    command = "python3 " + " ".join(shlex.quote(a) for a in [os.path.relpath(script), *sys.argv[1:]])
    text = "\n".join(lines + ["", f"{machine()}; {details}", f"command: `{command}`"])
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return text

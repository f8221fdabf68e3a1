"""NVMe tier bandwidth: the two NVMe stores' write and read GB/s against `dd` with O_DIRECT, same filesystem, same run.

ZeRO-Infinity §6 (DeepNVMe) claims the NVMe tier runs near the disk's peak. Here the peak is what `dd` reaches with
O_DIRECT and 1 MiB requests (queue depth 1), measured before and after every sweep; the table gives the reference
MmapStore (numpy.memmap: slice copies through the page cache, synchronous) and each AioStore setting (DeepSpeed
``aio`` knobs: block_size x queue_depth x intra_op_parallelism) as GB/s (10^9 bytes/s) and as a ratio to the median
of the dd runs. Host arrays are plain numpy (O_DIRECT copies them through aligned bounce buffers) or 4096-aligned
(``aligned_empty``: no copy for full blocks). The page cache is dropped before each read where permitted (root),
and the output says whether it was. Write times include each store's crc32 (AioStore: each request checksums its
block; MmapStore: one pass); MmapStore's write includes its flush (msync) and the buffered AioStore row's an
fsync, or they would time the page cache.

Two writes, because a filesystem treats them differently (ext4: the first write into fallocate()d, "unwritten"
extents converts them to written at I/O completion; a rewrite of written extents changes no metadata):
- first write: into a freshly preallocated file (store.allocate(), then write; dd: posix_fallocate, then
  `dd conv=notrunc`), what a swap file's first step costs;
- rewrite: the same file written again, what every later step costs (the offload paths rewrite their swap files).
dd and the stores are in the same state for each, both with O_DIRECT and neither fsyncing (no conv=fdatasync: the
store's write handles don't fsync either). The read follows the rewrite.

    python3 benchmarks/nvme_bandwidth.py --gib 2 [--repeat 3] [--path DIR] [--out table.md]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _report import emit, filesystem  # noqa: E402  (benchmarks/ is the script's folder)
from refimpl.memory.aio_store import AioStore  # noqa: E402
from refimpl.memory.mmap_store import MmapStore  # noqa: E402
from refimpl.memory.store import aligned_empty  # noqa: E402

MiB = 1 << 20
# (engine, block_size, queue_depth, intra_op_parallelism, direct, host buffer 4096-aligned); the first aio row is
# DeepSpeed's default aio section. An aligned host buffer lets O_DIRECT skip the bounce copy (as DeepSpeed's aligned
# swap buffers). MmapStore has no knobs: the kernel's page cache and readahead decide.
SETTINGS = [("mmap", None, None, None, False, False),
            ("aio", MiB, 8, 1, True, False), ("aio", MiB, 1, 1, True, False), ("aio", 256 * 1024, 8, 1, True, False),
            ("aio", 4 * MiB, 8, 1, True, False), ("aio", MiB, 32, 1, True, False), ("aio", MiB, 8, 2, True, False),
            ("aio", MiB, 1, 1, True, True), ("aio", MiB, 8, 1, True, True), ("aio", MiB, 16, 1, True, True),
            ("aio", 2 * MiB, 8, 1, True, True), ("aio", 4 * MiB, 8, 1, True, True), ("aio", MiB, 8, 1, False, False)]


def drop_caches():
    """Empty the page cache so a read comes from the disk; False where not permitted (not root, a container)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def dd(args):
    """Run dd and return the seconds it reports (the wall time if its report can't be parsed)."""
    t = time.perf_counter()
    r = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    m = re.search(r"copied, ([0-9.]+) s", r.stderr)
    return float(m.group(1)) if m else time.perf_counter() - t


def preallocate(file, nbytes):
    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    finally:
        os.close(fd)


def measure_dd(folder, n_mib):
    """dd's O_DIRECT first write into a preallocated file, rewrite of it, then read of n_mib MiB:
    (first write GB/s, rewrite GB/s, read GB/s, page cache dropped before the read)."""
    f, nbytes = os.path.join(folder, "dd.bin"), n_mib * MiB
    preallocate(f, nbytes)
    write = ["if=/dev/zero", f"of={f}", "bs=1M", f"count={n_mib}", "oflag=direct", "conv=notrunc"]
    w1 = dd(write)
    os.sync()                                           # the first write's metadata, not the rewrite's business
    w2 = dd(write)
    dropped = drop_caches()
    r = dd([f"if={f}", "of=/dev/null", "bs=1M", "iflag=direct"])
    os.unlink(f)
    return nbytes / w1 / 1e9, nbytes / w2 / 1e9, nbytes / r / 1e9, dropped


def fsync(file):
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_store(folder, setting):
    engine, block_size, queue_depth, threads, direct, _ = setting
    if engine == "mmap":
        return MmapStore(folder)
    return AioStore(folder, block_size=block_size, queue_depth=queue_depth, intra_op_parallelism=threads,
                    direct=direct)


def measure_store(folder, setting, array, out):
    """A store's first write, rewrite and read of `array` with one setting, as measure_dd."""
    buffered = setting[0] == "aio" and not setting[4]

    def timed_write(store):
        t = time.perf_counter()
        store.write("a", array).wait()
        if buffered:
            fsync(store.file("a"))
        return array.nbytes / (time.perf_counter() - t) / 1e9
    with open_store(os.path.join(folder, "store"), setting) as store:
        store.allocate("a", array.nbytes)
        w1 = timed_write(store)
        os.sync()
        w2 = timed_write(store)
        dropped = drop_caches()
        t = time.perf_counter()
        store.read("a", out).wait()                     # verified against the write's crc32
        r = time.perf_counter() - t
        if not np.array_equal(out, array):              # the bytes came back (outside the timed region)
            raise AssertionError(f"{setting}: the read returned other bytes than were written")
        store.free("a")
    return w1, w2, array.nbytes / r / 1e9, dropped


def cell(values):
    """The median, and the range when there are several runs (a virtual disk's figures vary a lot)."""
    med = float(np.median(values))
    return f"{med:.2f}" if len(values) == 1 else f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default=".", help="a folder on the filesystem to measure (default: the current one)")
    ap.add_argument("--gib", type=float, default=2.0, help="GiB per transfer (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="sweeps; the table gives medians and ranges (default 3)")
    ap.add_argument("--out", help="also write the Markdown table to this file")
    args = ap.parse_args(argv)
    n_mib = max(1, int(args.gib * 1024))
    nbytes = n_mib * MiB
    folder = tempfile.mkdtemp(prefix="nvme-bench-", dir=args.path)
    free = shutil.disk_usage(folder).free
    if free < 2 * nbytes:
        shutil.rmtree(folder)
        sys.exit(f"{folder}: needs {2 * nbytes} bytes free, has {free}")
    # Not zeros: a filesystem or virtual disk could shortcut zero pages (dd writes zeros; we note it below).
    # np.empty memory is not 4096-aligned: the rows with an aligned host buffer use aligned_empty copies.
    plain = {"array": np.tile(np.frombuffer(os.urandom(MiB), np.uint8), n_mib), "out": np.ones(nbytes, np.uint8)}
    aligned = {name: aligned_empty(nbytes) for name in plain}
    for name in plain:
        aligned[name][:] = plain[name]              # also touches every page, so no row pays for first-touch faults
    runs = {key: [] for key in ["dd", *SETTINGS]}   # key -> [(first write, rewrite, read GB/s, dropped)]
    try:
        with tqdm(total=args.repeat * (2 + len(SETTINGS)), desc="nvme bandwidth", unit="transfer pair") as steps:
            for _ in range(args.repeat):            # dd at both ends of every sweep: the disk drifts
                for key in ["dd", *SETTINGS, "dd"]:
                    if key == "dd":
                        runs[key].append(measure_dd(folder, n_mib))
                    else:
                        runs[key].append(measure_store(folder, key, *(aligned if key[5] else plain).values()))
                    steps.update(1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    dd_ref = [float(np.median([run[i] for run in runs["dd"]])) for i in range(3)]
    lines = ["| tool | block_size | queue_depth | threads | O_DIRECT | host buffer | first write GB/s | rewrite GB/s "
             "| read GB/s | first write / dd | rewrite / dd | read / dd |", "|---" * 12 + "|"]
    for key, results in runs.items():
        columns = [[run[i] for run in results] for i in range(3)]
        cells = " | ".join(cell(values) for values in columns)
        ratios = " | ".join(f"{np.median(values) / ref:.2f}" for values, ref in zip(columns, dd_ref))
        if key == "dd":
            lines.append(f"| dd | 1 MiB | 1 | 1 | yes | dd's own | {cells} | {ratios} |")
            continue
        engine, block_size, queue_depth, threads, direct, is_aligned = key
        if engine == "mmap":
            lines.append(f"| MmapStore | page | - | caller | no | numpy | {cells} | {ratios} |")
            continue
        size = f"{block_size // MiB} MiB" if block_size >= MiB else f"{block_size // 1024} KiB"
        buffer = "aligned, no copy" if is_aligned else ("numpy, bounce copy" if direct else "numpy")
        lines.append(f"| AioStore | {size} | {queue_depth} | {threads} | {'yes' if direct else 'no'} | {buffer} "
                     f"| {cells} | {ratios} |")
    dropped = all(run[3] for results in runs.values() for run in results)
    details = (f"filesystem {filesystem(args.path)}; {nbytes / 2**30:g} GiB per transfer, median (min-max) of "
               f"{args.repeat} sweeps (dd: {len(runs['dd'])} runs, before and after each sweep); page cache dropped "
               f"before each read: {'yes' if dropped else 'no (not permitted)'}; first write: into a fresh "
               f"fallocate()d file, rewrite: the same file again; dd writes zeros, the stores random bytes; "
               f"no fsync but the buffered rows' (MmapStore's flush, the buffered AioStore's fsync)")
    emit(lines, details, __file__, args.out)


if __name__ == "__main__":
    main()

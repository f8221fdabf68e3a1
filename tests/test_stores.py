"""Tests of the memory tiers as stores (refimpl/memory/store.py): every store keeps the same contract (round
trips bit-exact under concurrent handles, rewrites, shapes, bad arguments), the NVMe stores detect every kind of
damage to their swap files, and the fast store (aio_store.py) keeps its DeepNVMe promises (requests in flight,
per-block checksums, O_DIRECT with a fallback)."""
import errno
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.memory import aio_store
from refimpl.memory.aio_store import AioStore
from refimpl.memory.crc32 import crc32_combine
from refimpl.memory.mmap_store import MmapStore
from refimpl.memory.store import HostStore, aligned_empty
from refimpl.memory.tiers import AioConfig, make_store
from refimpl.memory.swap_files import SwapError

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def padded(nbytes):                     # the file size the store must preallocate, computed independently
    return (nbytes + 4095) // 4096 * 4096


def crc(array):
    return "crc32:%08x" % zlib.crc32(np.ascontiguousarray(array).tobytes())


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def random_array(n, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(DTYPES[dtype])


def read_back(store, key, like):
    out = np.empty_like(np.ascontiguousarray(like))
    out[...] = 7                        # garbage that a missing block would leave behind
    store.read(key, out).wait()
    return out


def write(store, key, array):
    store.write(key, array).wait()


def o_direct_refused(folder):
    """Why the filesystem of `folder` refuses O_DIRECT (probed here, not by the code under test), or None."""
    if not hasattr(os, "O_DIRECT"):
        return "this OS has no O_DIRECT"
    probe = os.path.join(folder, "probe")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        try:
            block = aligned_empty(4096)
            block[:] = 0
            os.pwrite(fd, block, 0)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"O_DIRECT refused on {folder}: {exc.strerror}"
    finally:
        if os.path.exists(probe):
            os.unlink(probe)
    return None


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(tmp_path_factory.mktemp("stores"))


def open_store(kind, folder):
    """Each store under test, by name: host, mmap, and aio buffered or with O_DIRECT."""
    if kind == "host":
        return HostStore()
    if kind == "mmap":
        return MmapStore(folder)
    return AioStore(folder, block_size=8192, queue_depth=2, intra_op_parallelism=2, direct=kind == "aio-direct")


STORES = ["host", "mmap", "aio-buffered", "aio-direct"]
FILE_STORES = STORES[1:]


def skip_refused(kind, base):
    if kind == "aio-direct" and o_direct_refused(base):
        pytest.skip(o_direct_refused(base))


@pytest.fixture(params=STORES)
def any_store(request, tmp_path, base):
    skip_refused(request.param, base)
    with open_store(request.param, tmp_path / "swap") as s:
        yield s


@pytest.fixture(params=FILE_STORES)
def file_store(request, tmp_path, base):
    skip_refused(request.param, base)
    with open_store(request.param, tmp_path / "swap") as s:
        yield s


@pytest.fixture(params=[False, True], ids=["buffered", "direct"])
def store(request, tmp_path, base):
    """The fast store, with and without O_DIRECT."""
    if request.param and o_direct_refused(base):
        pytest.skip(o_direct_refused(base))
    with AioStore(tmp_path / "swap", block_size=8192, queue_depth=2, intra_op_parallelism=2,
                  direct=request.param) as s:
        yield s


# ------------------------------------------------------------------------------------ every store, one contract
@given(sizes=st.lists(st.integers(0, 20_000), min_size=1, max_size=6), dtype=st.sampled_from(sorted(DTYPES)),
       kind=st.sampled_from(STORES), aligned=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_under_concurrent_handles(base, sizes, dtype, kind, aligned, seed):
    """Every store: several arrays written with all handles in flight at once, then read back with all reads in
    flight at once, come back bit-exact (O_DIRECT uses 4096-aligned memory itself, else bounces)."""
    if kind == "aio-direct" and o_direct_refused(base):
        kind = "aio-buffered"
    arrays = {}
    for i, n in enumerate(sizes):
        a = random_array(n, dtype, seed=seed + i)
        if aligned:
            a, b = aligned_empty(a.nbytes).view(DTYPES[dtype]), a
            a[...] = b
        arrays[f"k/{i}"] = a
    with tempfile.TemporaryDirectory(dir=base) as folder, open_store(kind, folder) as s:
        writes = [s.write(k, a) for k, a in arrays.items()]
        for h in writes:
            h.wait()
            assert h.done() and h.end >= h.start
        outs = {k: np.full_like(a, 7) for k, a in arrays.items()}
        reads = [s.read(k, outs[k]) for k in arrays]
        for h in reads:
            h.wait()
        for k, a in arrays.items():
            assert same_bytes(outs[k], a), k
        if kind != "host":
            for k, a in arrays.items():
                assert os.path.getsize(s.file(k)) == padded(a.nbytes)
                assert s.manifest[k]["checksum"] == crc(a) and s.manifest[k]["nbytes"] == a.nbytes
            total = sum(a.nbytes for a in arrays.values())
            assert s.stats.bytes_written == s.stats.bytes_read == total


def test_rewrite_replaces_contents(any_store):
    first, second = random_array(30_000, "float32", seed=1), random_array(30_000, "float32", seed=2)
    write(any_store, "a", first)
    write(any_store, "a", second)                       # the offload paths rewrite the same key every step
    assert same_bytes(read_back(any_store, "a", second), second)
    write(any_store, "a", first[:7000])                 # a shorter array reuses the larger allocation
    assert same_bytes(read_back(any_store, "a", first[:7000]), first[:7000])
    write(any_store, "a", np.concatenate([first, second]))   # a longer one grows it
    assert same_bytes(read_back(any_store, "a", np.concatenate([first, second])), np.concatenate([first, second]))


def test_shapes_and_non_contiguous_input(any_store):
    array = random_array(6 * 777, "bfloat16").reshape(6, 777)
    write(any_store, "strided", array[:, ::2])          # a non-contiguous view is written as its contiguous copy
    assert same_bytes(read_back(any_store, "strided", array[:, ::2]), np.ascontiguousarray(array[:, ::2]))
    write(any_store, "scalar", np.array(3.5, np.float32))
    assert read_back(any_store, "scalar", np.array(0, np.float32)) == np.float32(3.5)


def test_bad_arguments(any_store):
    s = any_store
    write(s, "a", np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="out has 36 bytes.*40"):
        s.read("a", np.zeros(9, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        s.read("a", np.zeros(20, np.float32)[::2])
    with pytest.raises(ValueError, match="'nope'"):
        s.read("nope", np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="nbytes=-1"):
        s.allocate("b", -1)
    with pytest.raises(ValueError, match="swap key ''"):
        s.allocate("", 10)
    with pytest.raises(TypeError, match="numpy array"):
        s.write("a", [1.0, 2.0])
    s.allocate("fresh", 40)
    with pytest.raises((ValueError, SwapError), match="no completed write"):
        s.read("fresh", np.zeros(10, np.float32))      # allocated, never written: nothing to trust
    s.free("a")
    with pytest.raises(ValueError, match="'a'"):
        s.read("a", np.zeros(10, np.float32))


def test_host_store_is_resident_and_reads_in_place():
    """A HostStore's view is the stored array: stepping it changes the key, and reading or writing a key through
    its own view moves no bytes (the ledger records no transfer for it)."""
    s = HostStore()
    assert s.resident and s.tier == "host"
    s.allocate("m", 16)
    view = s.view("m").view(np.float32)
    view[...] = [1, 2, 3, 4]
    assert s.write("m", view).nbytes == 0
    view *= 2                                           # the optimizer steps the array in place
    out = np.empty(4, np.float32)
    assert s.read("m", out).nbytes == 16 and list(out) == [2, 4, 6, 8]
    assert s.read("m", view).nbytes == 0
    other = np.arange(4, dtype=np.float32)
    assert s.write("m", other).nbytes == 16 and list(s.view("m").view(np.float32)) == [0, 1, 2, 3]


def test_host_store_keys_allocated_together_are_one_array():
    """allocate_contiguous: the keys are consecutive views of the returned array (a parameter partition whose
    chunks are keys, updated whole by one kernel call), zeroed; writes through a key land in the array."""
    s = HostStore()
    arena = s.allocate_contiguous([("a", 8), ("b", 4), ("c", 12)])
    assert arena.nbytes == 24 and not arena.any()
    s.write("b", np.array([7], np.float32))
    assert arena[8:12].view(np.float32)[0] == 7
    arena.view(np.float32)[3:] = [1, 2, 3]               # the whole array written: key "c" sees it
    out = np.empty(3, np.float32)
    s.write("c", s.view("c"))
    s.read("c", out).wait()
    assert list(out) == [1, 2, 3]
    with pytest.raises(ValueError, match="nbytes"):
        HostStore().allocate_contiguous([("x", 8), ("y", -1)])


def test_disk_stores_are_not_resident(file_store):
    assert not file_store.resident and file_store.tier == "nvme"
    file_store.allocate("a", 10)
    with pytest.raises(TypeError, match="read"):
        file_store.view("a")


def test_make_store_picks_the_engine(tmp_path):
    assert isinstance(make_store("cpu"), HostStore)
    with make_store("nvme", tmp_path / "m", AioConfig(engine="mmap")) as m:
        assert type(m) is MmapStore
    with make_store("nvme", tmp_path / "a", AioConfig(block_size=8192, queue_depth=3)) as a:
        assert type(a) is AioStore and (a.block_size, a.queue_depth) == (8192, 3)
    with pytest.raises(ValueError, match="aio.engine='dd'.*aio, mmap"):
        make_store("nvme", tmp_path / "x", AioConfig(engine="dd"))
    with pytest.raises(ValueError, match="'gpu'"):
        make_store("gpu")


def test_aio_engine_is_a_checked_config_key():
    from refimpl.config import ConfigError, load_config
    assert load_config(None, [])["aio"]["engine"] == "aio"           # the fast path is the default
    assert load_config(None, ["aio.engine=mmap"])["aio"]["engine"] == "mmap"
    with pytest.raises(ConfigError, match="aio.engine.*'dd'.*'aio', 'mmap'"):
        load_config(None, ["aio.engine=dd"])


# ------------------------------------------------------------------------------------- the NVMe stores' files
def test_aligned_empty_is_aligned():
    for nbytes in (1, 4095, 4096, 12345, 1 << 20):
        buf = aligned_empty(nbytes)
        assert buf.ctypes.data % 4096 == 0 and buf.nbytes == nbytes and buf.dtype == np.uint8
    assert aligned_empty(100, align=512).ctypes.data % 512 == 0


def test_file_and_folder_modes(file_store):
    write(file_store, "a", random_array(100, "float32"))
    assert stat.S_IMODE(os.stat(file_store.path).st_mode) == 0o700
    for name in os.listdir(file_store.path):
        if not name.startswith("."):                    # the folder's lock file
            assert stat.S_IMODE(os.stat(os.path.join(file_store.path, name)).st_mode) == 0o600, name


def flip(file, where):
    with open(file, "r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("where", [4321, 9001, 9999])   # 10,000 bytes in 8 KiB blocks: first, second, last byte
def test_flipped_byte_is_detected(file_store, where):
    array = random_array(5000, "float16")
    write(file_store, "a", array)
    file = file_store.file("a")
    flip(file, where)
    with pytest.raises(SwapError, match="corrupt or was changed since it was written") as info:
        file_store.read("a", np.empty_like(array)).wait()     # reads verify the bytes that landed
    assert file in str(info.value) and info.value.filename == file
    write(file_store, "a", array)                       # a rewrite repairs it
    assert same_bytes(read_back(file_store, "a", array), array)


def test_truncated_file(file_store):
    array = random_array(5000, "float32")
    write(file_store, "a", array)
    file = file_store.file("a")
    os.truncate(file, 4096)
    with pytest.raises(SwapError, match="truncated") as info:      # not SIGBUS through a memory map
        file_store.read("a", np.empty_like(array)).wait()
    assert file in str(info.value) and "4096 bytes on disk" in str(info.value) and "20000 bytes" in str(info.value)


def test_vanished_file_and_folder(file_store):
    array = random_array(100, "float32")
    write(file_store, "a", array)
    write(file_store, "b", array)
    file = file_store.file("a")
    os.unlink(file)
    with pytest.raises(SwapError, match="missing") as info:
        file_store.read("a", np.empty_like(array)).wait()
    assert info.value.filename == file and file in str(info.value)
    shutil.rmtree(file_store.path)
    for action in (lambda: file_store.read("b", np.empty_like(array)).wait(),
                   lambda: write(file_store, "b", array), lambda: write(file_store, "new", array)):
        with pytest.raises(SwapError, match="vanished") as info:
            action()
        assert file_store.path in str(info.value)


def test_free_deletes_the_file(file_store):
    write(file_store, "a", random_array(100, "float32"))
    file = file_store.file("a")
    file_store.free("a")
    assert not os.path.exists(file) and "a" not in file_store.manifest


@pytest.mark.parametrize("cls", [MmapStore, AioStore])
def test_folder_under_a_regular_file(tmp_path, cls):
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(SwapError) as info:
        cls(tmp_path / "plain" / "swap")
    assert str(tmp_path / "plain" / "swap") in str(info.value)
    with pytest.raises(SwapError, match="not a directory") as info:
        cls(tmp_path / "plain")
    assert str(tmp_path / "plain") in str(info.value)


@pytest.mark.parametrize("cls", [MmapStore, AioStore])
def test_a_swap_folder_has_one_user(tmp_path, cls):
    with cls(tmp_path / "s"):
        with pytest.raises(Exception, match="swap folder"):
            MmapStore(tmp_path / "s")
    with cls(tmp_path / "s") as again:                  # released on close
        write(again, "a", np.zeros(3, np.float32))


@pytest.mark.parametrize("cls", [MmapStore, AioStore])
def test_closed_store_refuses_work(tmp_path, cls):
    s = cls(tmp_path / "s")
    write(s, "a", np.zeros(10, np.float32))
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.write("a", np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="closed"):
        s.read("a", np.zeros(10, np.float32))


@pytest.fixture
def tiny_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("cls", [MmapStore, AioStore])
def test_real_enospc_on_a_full_tmpfs(tiny_tmpfs, cls):
    with cls(tiny_tmpfs / "swap") as s:
        write(s, "fits", random_array(1000, "float32"))
        with pytest.raises(SwapError, match="no space left") as info:
            s.allocate("big", 3 << 20)
        file = os.path.join(s.path, "big.swp")
        assert info.value.errno == errno.ENOSPC and file in str(info.value) and str(3 << 20) in str(info.value)
        assert not os.path.exists(file)                 # no half-allocated file left behind
        with pytest.raises(SwapError, match="no space left"):
            write(s, "also_big", np.zeros(2 << 20, np.uint8))
        assert same_bytes(read_back(s, "fits", random_array(1000, "float32")), random_array(1000, "float32"))


@pytest.mark.parametrize("cls", [MmapStore, AioStore])
def test_injected_enospc_in_fallocate(tmp_path, monkeypatch, cls):
    s = cls(tmp_path / "s")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(SwapError, match="no space left") as info:
        write(s, "opt/exp_avg", np.zeros(10_000, np.float32))    # write allocates first
    file = info.value.filename
    assert os.path.dirname(file) == s.path and os.path.basename(file).startswith("opt_exp_avg")
    assert info.value.errno == errno.ENOSPC and file in str(info.value) and "available" in str(info.value)
    assert f"needs {padded(40_000)} bytes" in str(info.value)
    assert not os.path.exists(file)                     # no half-allocated file left behind
    s.close()


# ------------------------------------------------------------------------------ the fast store (DeepNVMe)
@given(a=st.binary(max_size=3000), b=st.binary(max_size=3000), c=st.binary(max_size=20))
def test_crc32_combine_matches_zlib_on_the_concatenation(a, b, c):
    ab = crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b))
    assert ab == zlib.crc32(a + b)
    assert crc32_combine(ab, zlib.crc32(c), len(c)) == zlib.crc32(a + b + c)


def test_write_checksums_each_block_in_its_request(tmp_path, monkeypatch):
    # The crc32 of a write is built from per-block crc32s computed by the I/O workers, never one pass over the whole
    # array after (or beside) the I/O, which would be a serial step as long as the disk write itself.
    block_size, seen, real_crc32 = 8192, [], zlib.crc32
    monkeypatch.setattr(aio_store.zlib, "crc32", lambda data, *value: seen.append(len(data)) or real_crc32(data, *value))
    array = random_array(10 * 2048 + 300, "float32")                  # 10 full blocks and a 1200-byte tail
    with AioStore(tmp_path, block_size=block_size, queue_depth=3, direct=False) as s:
        write(s, "a", array)
        assert sorted(seen, reverse=True)[:11] == [block_size] * 10 + [1200] and max(seen) == block_size
        monkeypatch.undo()
        assert s.manifest["a"]["checksum"] == crc(array)


def test_direct_round_trip_on_this_filesystem(tmp_path):
    if o_direct_refused(str(tmp_path)):
        pytest.skip(o_direct_refused(str(tmp_path)))
    with AioStore(tmp_path / "s", block_size=4096) as s:
        assert s.direct is True          # direct=None picks O_DIRECT where the filesystem allows it
        array = random_array(3 * 1024 + 5, "float32").reshape(-1, 1)
        write(s, "a", array)
        assert same_bytes(read_back(s, "a", array), array)


def test_requests_in_flight_are_queue_depth_times_threads(tmp_path, monkeypatch):
    threads, queue_depth = 2, 3
    limit = threads * queue_depth
    s = AioStore(tmp_path / "s", block_size=4096, queue_depth=queue_depth, intra_op_parallelism=threads,
                 direct=False)
    # Every pwrite waits at a barrier of `limit` parties: the write completes only if `limit` requests are in
    # flight together, and a counter shows there are never more.
    barrier, lock, now, peak = threading.Barrier(limit, timeout=10), threading.Lock(), [0], [0]
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        barrier.wait()
        with lock:
            now[0] -= 1
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    array = np.arange(3 * limit * 1024, dtype=np.float32)          # 3 * limit blocks of 4096 bytes
    write(s, "a", array)
    monkeypatch.undo()
    assert peak[0] == limit
    assert same_bytes(read_back(s, "a", array), array)
    assert s.stats.write_seconds > 0 and s.stats.read_seconds > 0
    s.close()


def test_unwritable_folder(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    real_open = os.open

    def refuse(path, flags, *args, **kw):       # what a 0o500 folder does to a non-root user
        if str(path).startswith(str(folder)) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kw)
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(SwapError, match="not writable") as info:
        AioStore(folder)
    assert str(folder) in str(info.value) and info.value.errno == errno.EACCES


def test_falls_back_to_buffered_io_when_o_direct_is_refused(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("this OS has no O_DIRECT")
    real_open = os.open

    def tmpfs_like(path, flags, *args, **kw):   # tmpfs before Linux 6.6 refused O_DIRECT with EINVAL
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kw)
    monkeypatch.setattr(os, "open", tmpfs_like)
    with AioStore(tmp_path / "a", block_size=4096) as s:
        assert s.direct is False
        array = random_array(3000, "float16")
        write(s, "a", array)
        assert same_bytes(read_back(s, "a", array), array)
    with pytest.raises(SwapError, match="refuses O_DIRECT") as info:
        AioStore(tmp_path / "b", direct=True)
    assert str(tmp_path / "b") in str(info.value)


def test_injected_enospc_in_pwrite_fails_the_handle(store, monkeypatch):
    array = random_array(10_000, "float32")
    store.allocate("a", array.nbytes)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    handle = store.write("a", array)
    with pytest.raises(SwapError, match="no space left") as info:
        handle.wait(timeout=10)
    file = store.file("a")
    assert handle.done() and file in str(info.value) and str(padded(array.nbytes)) in str(info.value)
    with pytest.raises(SwapError, match="no completed write"):
        store.read("a", np.empty_like(array))           # a failed write leaves no checksum to trust
    monkeypatch.undo()
    write(store, "a", array)                            # the store is still usable
    assert same_bytes(read_back(store, "a", array), array)


@pytest.mark.parametrize("result", ["eio", "short"])
def test_failed_or_short_read_raises_instead_of_hanging(store, monkeypatch, result):
    array = random_array(20_000, "float32")
    write(store, "a", array)

    def preadv(fd, buffers, offset):
        if result == "eio":
            raise OSError(errno.EIO, "Input/output error")
        return 0
    monkeypatch.setattr(os, "preadv", preadv)
    handle = store.read("a", np.empty_like(array))
    with pytest.raises(SwapError, match="I/O error" if result == "eio" else "short read") as info:
        handle.wait(timeout=10)
    assert store.manifest["a"]["file"] in str(info.value)


def test_bad_aio_arguments(tmp_path):
    with pytest.raises(ValueError, match="block_size=1000.*4096"):
        AioStore(tmp_path, block_size=1000)
    with pytest.raises(ValueError, match="queue_depth=0"):
        AioStore(tmp_path, queue_depth=0)


def test_accepts_deepspeeds_aio_section(tmp_path):
    from refimpl.config import load_config
    aio = load_config(None, ["aio.thread_count=2", "aio.block_size=65536", "aio.single_submit=true"])["aio"]
    with make_store("nvme", tmp_path, AioConfig.from_section(aio)) as s:
        assert (s.block_size, s.queue_depth, s.intra_op_parallelism) == (65536, 8, 2)
        array = random_array(100_000, "bfloat16")
        write(s, "a", array)
        assert same_bytes(read_back(s, "a", array), array)

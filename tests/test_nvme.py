"""Tests of the NVMe tier (refimpl/memory/nvme.py): round trips, async overlap, files, manifest and every failure."""
import errno
import json
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

from refimpl.memory import nvme
from refimpl.memory.nvme import NVMeStore, SwapError, aligned_empty, crc32_combine

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def padded(nbytes):                     # the file size the store must preallocate, computed independently
    return (nbytes + 4095) // 4096 * 4096


def crc(array):
    return "crc32:%08x" % zlib.crc32(np.ascontiguousarray(array).tobytes())


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def random_array(n, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(DTYPES[dtype])


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
    return str(tmp_path_factory.mktemp("nvme"))


@pytest.fixture(params=[False, True], ids=["buffered", "direct"])
def direct(request, base):
    if request.param and o_direct_refused(base):
        pytest.skip(o_direct_refused(base))
    return request.param


@pytest.fixture
def store(tmp_path, direct):
    with NVMeStore(tmp_path / "swap", block_size=8192, queue_depth=2, intra_op_parallelism=2, direct=direct) as s:
        yield s


def test_aligned_empty_is_aligned():
    for nbytes in (1, 4095, 4096, 12345, 1 << 20):
        buf = aligned_empty(nbytes)
        assert buf.ctypes.data % 4096 == 0 and buf.nbytes == nbytes and buf.dtype == np.uint8
    assert aligned_empty(100, align=512).ctypes.data % 512 == 0


@given(n=st.integers(0, 40_000), dtype=st.sampled_from(sorted(DTYPES)),
       block_size=st.sampled_from([4096, 8192, 12288, 65536]), queue_depth=st.integers(1, 4),
       threads=st.integers(1, 3), direct=st.booleans(), aligned=st.booleans())
def test_round_trip(base, n, dtype, block_size, queue_depth, threads, direct, aligned):
    if direct and o_direct_refused(base):
        direct = False                  # the buffered case still runs; test_direct_* below skip with the reason
    array = random_array(n, dtype, seed=n)
    if aligned:                         # in 4096-aligned memory, O_DIRECT uses the array itself for full blocks
        array = aligned_empty(array.nbytes).view(DTYPES[dtype])
        array[:] = random_array(n, dtype, seed=n)
    with tempfile.TemporaryDirectory(dir=base) as folder, \
            NVMeStore(folder, block_size=block_size, queue_depth=queue_depth,
                      intra_op_parallelism=threads, direct=direct) as s:
        assert s.direct == direct
        s.write_sync("w", array)
        entry = s.manifest["w"]
        assert os.path.getsize(os.path.join(folder, entry["file"])) == padded(array.nbytes)
        assert entry["nbytes"] == array.nbytes and entry["dtype"] == dtype and entry["shape"] == [n]
        assert s.checksum("w") == crc(array)
        out = aligned_empty(array.nbytes).view(DTYPES[dtype]) if aligned else np.empty(n, DTYPES[dtype])
        out[:] = 7                      # garbage that a missing block would leave behind
        s.read("w", out).wait()
        assert same_bytes(out, array)
        s.verify("w", out)
        assert s.stats.bytes_written == s.stats.bytes_read == array.nbytes


@given(a=st.binary(max_size=3000), b=st.binary(max_size=3000), c=st.binary(max_size=20))
def test_crc32_combine_matches_zlib_on_the_concatenation(a, b, c):
    ab = crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b))
    assert ab == zlib.crc32(a + b)
    assert crc32_combine(ab, zlib.crc32(c), len(c)) == zlib.crc32(a + b + c)


def test_write_checksums_each_block_in_its_request(tmp_path, monkeypatch):
    # The crc32 of a write is built from per-block crc32s computed by the I/O workers, never one pass over the whole
    # array after (or beside) the I/O, which would be a serial step as long as the disk write itself.
    block_size, seen, real_crc32 = 8192, [], zlib.crc32
    monkeypatch.setattr(nvme.zlib, "crc32", lambda data, *value: seen.append(len(data)) or real_crc32(data, *value))
    array = random_array(10 * 2048 + 300, "float32")                  # 10 full blocks and a 1200-byte tail
    with NVMeStore(tmp_path, block_size=block_size, queue_depth=3, direct=False) as s:
        s.write_sync("a", array)
        assert sorted(seen, reverse=True)[:11] == [block_size] * 10 + [1200] and max(seen) == block_size
        monkeypatch.undo()
        assert s.checksum("a") == crc(array)


def test_rewrite_replaces_contents_and_checksum(store):
    first, second = random_array(30_000, "float32", seed=1), random_array(30_000, "float32", seed=2)
    store.write_sync("a", first)
    store.write_sync("a", second)                       # the offload paths rewrite the same swap file every step
    assert store.checksum("a") == crc(second) and same_bytes(store.read_sync("a"), second)
    store.write_sync("a", first[:7000])                 # a shorter array reuses the larger file
    assert store.checksum("a") == crc(first[:7000]) and same_bytes(store.read_sync("a"), first[:7000])


def test_direct_round_trip_on_this_filesystem(tmp_path):
    if o_direct_refused(str(tmp_path)):
        pytest.skip(o_direct_refused(str(tmp_path)))
    with NVMeStore(tmp_path / "s", block_size=4096) as s:
        assert s.direct is True          # direct=None picks O_DIRECT where the filesystem allows it
        array = random_array(3 * 1024 + 5, "float32").reshape(-1, 1)
        s.write_sync("a", array)
        assert same_bytes(s.read_sync("a"), array)


def test_shapes_and_non_contiguous_input(store):
    array = random_array(6 * 777, "bfloat16").reshape(6, 777)
    store.write_sync("strided", array[:, ::2])      # a non-contiguous view is written as its contiguous copy
    back = store.read_sync("strided")
    assert same_bytes(back, np.ascontiguousarray(array[:, ::2]))
    store.write_sync("scalar", np.array(3.5, np.float32))
    assert store.read_sync("scalar").shape == () and store.read_sync("scalar") == np.float32(3.5)


def test_async_writes_and_reads_overlap(store):
    arrays = {f"k{i}": random_array(5000 + 999 * i, dtype, seed=i)
              for i, dtype in enumerate(["float32", "float16", "bfloat16"] * 2)}
    writes = [store.write(k, a) for k, a in arrays.items()]        # all in flight at once
    for h in writes:
        h.wait()
        assert h.done() and h.end >= h.start
    outs = {k: np.empty_like(a) for k, a in arrays.items()}
    reads = [store.read(k, outs[k]) for k in arrays]
    for h in reads:
        h.wait()
    for k, a in arrays.items():
        assert same_bytes(outs[k], a)
    total = sum(a.nbytes for a in arrays.values())
    assert store.stats.bytes_written == store.stats.bytes_read == total
    assert store.stats.write_seconds > 0 and store.stats.read_seconds > 0


def test_requests_in_flight_are_queue_depth_times_threads(tmp_path, monkeypatch):
    threads, queue_depth = 2, 3
    limit = threads * queue_depth
    s = NVMeStore(tmp_path / "s", block_size=4096, queue_depth=queue_depth, intra_op_parallelism=threads,
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
    s.write_sync("a", array)
    monkeypatch.undo()
    assert peak[0] == limit
    assert same_bytes(s.read_sync("a"), array)
    s.close()


def test_file_and_folder_modes(tmp_path, store):
    store.write_sync("a", random_array(100, "float32"))
    store.save_manifest()
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o700
    for name in os.listdir(store.path):
        assert stat.S_IMODE(os.stat(os.path.join(store.path, name)).st_mode) == 0o600, name


def test_manifest_is_reloadable(tmp_path, direct):
    arrays = {"p/rank0": random_array(1234, "bfloat16"), "exp_avg": random_array(4321, "float32").reshape(29, 149)}
    with NVMeStore(tmp_path, block_size=4096, direct=direct) as s:
        for k, a in arrays.items():
            s.write_sync(k, a)
        s.save_manifest()
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert set(on_disk) == set(arrays)
    for k, a in arrays.items():
        assert on_disk[k]["nbytes"] == a.nbytes and on_disk[k]["checksum"] == crc(a)
        assert on_disk[k]["shape"] == list(a.shape) and on_disk[k]["dtype"] == str(a.dtype)
    with NVMeStore(tmp_path, block_size=8192, direct=direct) as again:    # a new store finds the old files
        for k, a in arrays.items():
            assert same_bytes(again.read_sync(k), a)


def test_manifest_save_is_atomic(tmp_path, monkeypatch):
    s = NVMeStore(tmp_path, block_size=4096)
    s.write_sync("a", random_array(10, "float32"))
    s.save_manifest()
    before = (tmp_path / "manifest.json").read_text()
    s.write_sync("b", random_array(20, "float32"))

    def crash(src, dst):
        raise OSError(errno.EIO, "simulated crash before the rename")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SwapError, match="manifest.json"):
        s.save_manifest()
    assert (tmp_path / "manifest.json").read_text() == before      # the old manifest is intact
    monkeypatch.undo()
    s.save_manifest()
    assert set(json.loads((tmp_path / "manifest.json").read_text())) == {"a", "b"}


@pytest.mark.parametrize("where", [4321, 9001, 9999])   # 10,000 bytes in 8 KiB blocks: first, second, last byte
def test_flipped_byte_is_detected(store, where):
    array = random_array(5000, "float16")
    store.write_sync("a", array)
    file = os.path.join(store.path, store.manifest["a"]["file"])
    with open(file, "r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0x10]))
    out = np.empty_like(array)
    with pytest.raises(SwapError, match="corrupt or was changed since it was written") as info:
        store.read("a", out).wait()                     # reads verify as the blocks land
    assert file in str(info.value) and info.value.filename == file
    store.read("a", out, verify=False).wait()           # the bytes as they are on disk ...
    with pytest.raises(SwapError, match="corrupt"):
        store.verify("a", out)                          # ... and the separate check agrees
    with pytest.raises(SwapError, match="corrupt"):
        store.read_sync("a")


def test_truncated_file(store):
    array = random_array(5000, "float32")
    store.write_sync("a", array)
    file = os.path.join(store.path, store.manifest["a"]["file"])
    os.truncate(file, 4096)
    with pytest.raises(SwapError, match="truncated") as info:
        store.read("a", np.empty_like(array))
    assert file in str(info.value) and "4096 bytes on disk" in str(info.value) and "20000 bytes" in str(info.value)


def test_vanished_file_and_folder(store):
    array = random_array(100, "float32")
    store.write_sync("a", array)
    store.write_sync("b", array)
    file = os.path.join(store.path, store.manifest["a"]["file"])
    os.unlink(file)
    with pytest.raises(SwapError, match="missing") as info:
        store.read("a", np.empty_like(array))
    assert info.value.filename == file and file in str(info.value)
    shutil.rmtree(store.path)
    for action in (lambda: store.read("b", np.empty_like(array)), lambda: store.write_sync("b", array),
                   lambda: store.write_sync("new", array), store.flush):
        with pytest.raises(SwapError, match="vanished") as info:
            action()
        assert store.path in str(info.value)


def test_folder_under_a_regular_file(tmp_path):
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(SwapError) as info:
        NVMeStore(tmp_path / "plain" / "swap")
    assert str(tmp_path / "plain" / "swap") in str(info.value)
    with pytest.raises(SwapError, match="not a directory") as info:
        NVMeStore(tmp_path / "plain")
    assert str(tmp_path / "plain") in str(info.value)


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
        NVMeStore(folder)
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
    with NVMeStore(tmp_path / "a", block_size=4096) as s:
        assert s.direct is False
        array = random_array(3000, "float16")
        s.write_sync("a", array)
        assert same_bytes(s.read_sync("a"), array)
    with pytest.raises(SwapError, match="refuses O_DIRECT") as info:
        NVMeStore(tmp_path / "b", direct=True)
    assert str(tmp_path / "b") in str(info.value)


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


def test_real_enospc_on_a_full_tmpfs(tiny_tmpfs):
    with NVMeStore(tiny_tmpfs / "swap", block_size=4096) as s:
        s.write_sync("fits", random_array(1000, "float32"))
        with pytest.raises(SwapError, match="no space left") as info:
            s.allocate("big", 3 << 20)
        file = os.path.join(s.path, "big.swp")
        assert info.value.errno == errno.ENOSPC and file in str(info.value) and str(3 << 20) in str(info.value)
        assert not os.path.exists(file)                 # no half-allocated file left behind
        with pytest.raises(SwapError, match="no space left"):
            s.write_sync("also_big", np.zeros(2 << 20, np.uint8))
        assert same_bytes(s.read_sync("fits"), random_array(1000, "float32"))


def test_injected_enospc_in_fallocate(tmp_path, monkeypatch):
    s = NVMeStore(tmp_path / "s")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(SwapError, match="no space left") as info:
        s.write_sync("opt/exp_avg", np.zeros(10_000, np.float32))    # write allocates first
    file = info.value.filename
    assert os.path.dirname(file) == s.path and os.path.basename(file).startswith("opt_exp_avg")
    assert info.value.errno == errno.ENOSPC and file in str(info.value) and "available" in str(info.value)
    assert f"needs {padded(40_000)} bytes" in str(info.value)
    assert not os.path.exists(file)                     # no half-allocated file left behind
    s.close()


def test_injected_enospc_in_pwrite_fails_the_handle(store, monkeypatch):
    array = random_array(10_000, "float32")
    store.allocate("a", array.nbytes)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    handle = store.write("a", array)
    with pytest.raises(SwapError, match="no space left") as info:
        handle.wait(timeout=10)
    file = os.path.join(store.path, store.manifest["a"]["file"])
    assert handle.done() and file in str(info.value) and str(padded(array.nbytes)) in str(info.value)
    with pytest.raises(SwapError, match="no completed write"):
        store.checksum("a")                             # a failed write leaves no checksum to trust
    monkeypatch.undo()
    store.write_sync("a", array)                        # the store is still usable
    assert same_bytes(store.read_sync("a"), array)


@pytest.mark.parametrize("result", ["eio", "short"])
def test_failed_or_short_read_raises_instead_of_hanging(store, monkeypatch, result):
    array = random_array(20_000, "float32")
    store.write_sync("a", array)

    def preadv(fd, buffers, offset):
        if result == "eio":
            raise OSError(errno.EIO, "Input/output error")
        return 0
    monkeypatch.setattr(os, "preadv", preadv)
    handle = store.read("a", np.empty_like(array))
    with pytest.raises(SwapError, match="I/O error" if result == "eio" else "short read") as info:
        handle.wait(timeout=10)
    assert store.manifest["a"]["file"] in str(info.value)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="block_size=1000.*4096"):
        NVMeStore(tmp_path, block_size=1000)
    with pytest.raises(ValueError, match="queue_depth=0"):
        NVMeStore(tmp_path, queue_depth=0)
    s = NVMeStore(tmp_path, block_size=4096)
    s.write_sync("a", np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="out has 36 bytes.*40"):
        s.read("a", np.zeros(9, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        s.read("a", np.zeros(20, np.float32)[::2])
    with pytest.raises(ValueError, match="'nope'"):
        s.read("nope", np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="nbytes=-1"):
        s.allocate("b", -1)
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.write("a", np.zeros(10, np.float32))


def test_accepts_deepspeeds_aio_section(tmp_path):
    from refimpl.config import load_config
    aio = load_config(None, ["aio.thread_count=2", "aio.block_size=65536", "aio.single_submit=true"])["aio"]
    with NVMeStore(tmp_path, **aio) as s:
        assert (s.block_size, s.queue_depth, s.intra_op_parallelism) == (65536, 8, 2)
        array = random_array(100_000, "bfloat16")
        s.write_sync("a", array)
        assert same_bytes(s.read_sync("a"), array)


def test_flush_and_free(store):
    store.write_sync("a", random_array(100, "float32"))
    store.flush()
    file = os.path.join(store.path, store.manifest["a"]["file"])
    store.free("a")
    assert not os.path.exists(file) and "a" not in store.manifest

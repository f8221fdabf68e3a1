"""crc32 of a transfer from the crc32s of its blocks (zlib's crc32_combine, which Python's zlib doesn't expose).

The NVMe tier checksums each block in the I/O request that moves it (refimpl/memory/aio_store.py): every core
helps, and no serial pass over the whole array follows the transfer. Combining the blocks' crc32s in order gives
zlib.crc32 of all the bytes.
"""
import functools
import zlib


def _gf2_times(matrix, vector):
    """A 32x32 matrix over GF(2) (``matrix[i]`` is column i, as a 32-bit int) times a 32-bit vector."""
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector, i = vector >> 1, i + 1
    return out


@functools.lru_cache(maxsize=64)
def _crc32_shift(nbytes):
    """The GF(2) operator that feeds ``nbytes`` zero bytes through crc32's register, built by repeated squaring;
    a transfer has at most two block lengths (block_size and its tail), so it's cached."""
    one_bit = [0xEDB88320] + [1 << i for i in range(31)]           # crc32's reversed polynomial: one zero bit
    power = one_bit
    for _ in range(3):                                              # 2, 4, 8 zero bits: one zero byte
        power = [_gf2_times(power, column) for column in power]
    shift = [1 << i for i in range(32)]                             # the identity
    while nbytes:
        if nbytes & 1:
            shift = [_gf2_times(power, column) for column in shift]
        power = [_gf2_times(power, column) for column in power]
        nbytes >>= 1
    return tuple(shift)


def crc32_combine(crc1, crc2, len2):
    """zlib.crc32(a + b) from crc1 = zlib.crc32(a), crc2 = zlib.crc32(b) and len2 = len(b)."""
    return _gf2_times(_crc32_shift(len2), crc1) ^ crc2


def combine_blocks(crcs, nbytes, block_size):
    """The crc32s of consecutive ``block_size`` blocks of an ``nbytes`` transfer, combined: "crc32:xxxxxxxx"."""
    crc = zlib.crc32(b"")
    for i, block_crc in enumerate(crcs):
        crc = crc32_combine(crc, block_crc, min(block_size, nbytes - i * block_size))
    return f"crc32:{crc:08x}"


def crc32_of(data):
    """One pass over ``data`` (the reference store's checksum): "crc32:xxxxxxxx"."""
    return f"crc32:{zlib.crc32(data):08x}"

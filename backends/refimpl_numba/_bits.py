"""Bit-level float16 / bfloat16 <-> float32 conversions, usable inside numba kernels.

numba's CPU target has no float16 type and cannot see ml_dtypes.bfloat16, so low-precision arrays enter
kernels viewed as uint16 and are converted here with integer arithmetic. Rounding is to nearest even,
bit-identical to NumPy's float32 -> float16 cast and to ml_dtypes' float32 -> bfloat16 cast for every
non-NaN value, so a fused kernel's low-precision copy equals `param.astype(dtype)` exactly (NaN maps to a
quiet NaN of the same sign; its payload bits may differ).
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

#: how a kernel should read a value array: native floats, or uint16 bits of float16 / bfloat16
NATIVE, F16, BF16 = 0, 1, 2


@intrinsic
def f32_as_u32(typingctx, x):
    """Reinterpret a float32's bits as uint32 (C's memcpy / numpy's .view)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def u32_as_f32(typingctx, x):
    """Reinterpret a uint32 as the float32 with those bits."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@njit(cache=True)
def f32_to_bf16(x):
    """float32 -> bfloat16 bits: add half an ulp (0x7FFF plus the lowest kept bit, so ties go to even) and
    drop the low 16 bits; an overflow carries into the exponent and gives inf. NaN stays a (quiet) NaN."""
    b = np.int64(f32_as_u32(np.float32(x)))
    if x != x:
        return (b >> 16) | 0x40
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


@njit(cache=True)
def bf16_to_f32(h):
    """bfloat16 bits -> float32 (exact: bfloat16 is float32's top half)."""
    return u32_as_f32(np.uint32(np.int64(h) << 16))


@njit(cache=True)
def f32_to_f16(x):
    """float32 -> float16 bits, round to nearest even, overflow to inf, underflow through the subnormals."""
    f = np.int64(f32_as_u32(np.float32(x)))
    sign = (f >> 16) & 0x8000
    biased = (f >> 23) & 0xFF                     # float32 exponent field
    mant = f & 0x7FFFFF
    if biased == 0xFF:                            # inf, or NaN (kept quiet)
        return sign | 0x7C00 | (0x200 if mant != 0 else 0) | (mant >> 13)
    if biased >= 143:                             # |x| >= 2**16: beyond float16's max even after rounding
        return sign | 0x7C00
    if biased >= 113:                             # a normal float16: keep 10 of 23 mantissa bits
        h = ((biased - 112) << 10) | (mant >> 13)
        rest = mant & 0x1FFF
        if rest > 0x1000 or (rest == 0x1000 and (h & 1) == 1):
            h += 1                                # a carry may round up into the exponent, or to inf
        return sign | h
    if biased < 102:                              # below half the smallest subnormal (2**-25): zero
        return sign
    sig = mant | 0x800000                         # a float16 subnormal: m * 2**-24
    shift = 126 - biased                          # 14..24
    m = sig >> shift
    rest = sig & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rest > half or (rest == half and (m & 1) == 1):
        m += 1                                    # 1024 is the smallest normal: the encoding carries over
    return sign | m


@njit(cache=True)
def f16_to_f32(h):
    """float16 bits -> float32 (exact)."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0:                                  # zero or subnormal: mant * 2**-24
        value = np.float32(mant) * np.float32(2.0 ** -24)
        return -value if sign else value
    if exp == 0x1F:                               # inf / NaN
        return u32_as_f32(np.uint32(sign | 0x7F800000 | (mant << 13)))
    return u32_as_f32(np.uint32(sign | ((exp + 112) << 23) | (mant << 13)))


def widen(x, kind):
    """An element of a value array as a float: itself for float arrays, decoded for uint16 views."""


@overload(widen)
def _widen(x, kind):
    if isinstance(x, types.Float):
        return lambda x, kind: x
    return lambda x, kind: f16_to_f32(x) if kind == F16 else bf16_to_f32(x)


def bits_and_kind(a):
    """(array numba can read, kind): float16 / bfloat16 arrays as their uint16 bits, others unchanged."""
    if a.dtype == np.float16:
        return a.view(np.uint16), F16
    if a.dtype.name == "bfloat16":
        return a.view(np.uint16), BF16
    return a, NATIVE

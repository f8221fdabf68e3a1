"""exp and tanh that LLVM can vectorise, for the float32 kernels (float64 keeps libm's np.exp / np.tanh).

Without SVML, numba lowers np.exp / np.tanh to one scalar libm call per element, which keeps every loop
that uses them scalar: GELU was 5-10x slower than NumPy's SIMD ufuncs, and the exps dominate softmax,
cross-entropy and attention. These are branch-free float32 arithmetic (Cody-Waite range reduction and a
degree-7 Taylor polynomial, the textbook construction: Muller, "Elementary Functions", ch. 11), accurate
to a few ulps, far inside the float32 tolerance of the spec tests (256 ulps). Edge cases are selects,
not branches: exp(-inf) and every result below float32's smallest normal are exactly 0 (masked
attention scores must give exactly 0), exp(+inf) and overflow are inf, nan stays nan.
"""
import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from ._bits import u32_as_f32

_f = np.float32
_LOG2E = _f(1.0 / math.log(2.0))
_LN2_HI = _f(0.693145751953125)         # ln 2 to 16 bits: n * _LN2_HI is exact for |n| <= 2**8
_LN2_LO = _f(1.4286068203094172e-06)    # ln 2 - _LN2_HI
_ROUND = _f(12582912.0)                 # 1.5 * 2**23: x + _ROUND - _ROUND rounds x to an integer (|x| < 2**22)
_LO = _f(-87.33654)                     # ln(smallest normal float32): below, the result is 0
_HI = _f(88.72283)                      # ln(largest float32): above, the result is inf
_C = tuple(_f(1.0 / math.factorial(k)) for k in range(8))


@njit(inline="always", fastmath=False)
def exp32(x):
    """exp of a float32, vectorisable (see the module docstring)."""
    xc = x if x > _LO else _LO
    xc = xc if xc < _HI else _HI
    n = (xc * _LOG2E + _ROUND) - _ROUND                  # nearest integer to x / ln 2
    n = n if n < _f(127.0) else _f(127.0)                # 2**n must be a normal float32
    r = (xc - n * _LN2_HI) - n * _LN2_LO                 # |r| <= ln(2)/2 (up to ln 2 at the very top)
    p = _C[7]
    p = p * r + _C[6]
    p = p * r + _C[5]
    p = p * r + _C[4]
    p = p * r + _C[3]
    p = p * r + _C[2]
    p = p * r + _C[1]
    p = p * r + _C[0]
    scale = u32_as_f32(np.uint32((np.int32(n) + 127) << 23))  # 2**n from its exponent bits
    e = p * scale
    e = e if x >= _LO else _f(0.0)
    e = e if x <= _HI else _f(np.inf)
    return e if x == x else x


@njit(inline="always", fastmath=False)
def tanh32(x):
    """tanh of a float32 as 1 - 2 / (exp(2x) + 1): absolute error ~1 ulp of 1 (GELU uses 1 + tanh and
    1 - tanh**2, whose rounding is of that size anyway); +-inf give +-1, nan stays nan."""
    return _f(1.0) - _f(2.0) / (exp32(_f(2.0) * x) + _f(1.0))


def vexp(x):
    """exp: exp32 for float32, libm's np.exp for float64 (the gradient checks need its accuracy)."""


@overload(vexp)
def _vexp(x):
    if x == types.float32:
        return lambda x: exp32(x)
    return lambda x: np.exp(x)


def vtanh(x):
    """tanh: tanh32 for float32, libm's np.tanh for float64."""


@overload(vtanh)
def _vtanh(x):
    if x == types.float32:
        return lambda x: tanh32(x)
    return lambda x: np.tanh(x)

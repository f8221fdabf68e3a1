"""How close is close enough: the one dtype-aware tolerance table of the spec tests, and its helpers.

docs/architecture.md, "Numerics": results are compared with one dtype-aware tolerance table, never atol = 0 near
zero, and float64 central differences for gradient checks. Everything a spec test compares goes through
`assert_close` (backend vs reference) or `assert_grad_close` (analytic vs finite-difference gradient).

The comparison, elementwise, is

    |actual - expected| <= rtol * |expected| + atol * scale + tiny

where `scale` is the magnitude the rounding errors are proportional to. By default it is max|expected|
(so atol is relative to the size of the result and never 0 near zero). A test passes a sharper `scale`
when the result is a cancellation of larger terms: for a sum, the same sum of the *absolute values* of
its terms (the classic bound |fl(sum) - sum| <= n u sum|terms|, Higham, "Accuracy and Stability of
Numerical Algorithms", ch. 3-4). An elementwise scale of exactly 0 demands exact zeros (up to tiny),
which is right only where the algorithm promises them (masked attention rows, embedding rows never read).
`tiny` is the dtype's smallest normal number: below it the spacing of representable values is absolute,
not relative, and a backend may flush such results to zero (FTZ/DAZ, usual on GPUs). It matters for
float16 (6.1e-5); bfloat16 shares float32's range (1.2e-38), so there and in float64 it is negligible.

Each entry is (rtol, atol) = (growth * u, growth * u) with u the unit roundoff of the arithmetic (half
the machine epsilon), except that a low-precision result takes its rtol from its own dtype and its atol
from float32, the dtype it is computed in:

              rtol                          atol
    float64   256 * 2**-53 ~ 2.8e-14        256 * 2**-53 ~ 2.8e-14
    float32   256 * 2**-24 ~ 1.5e-5         256 * 2**-24 ~ 1.5e-5
    float16     4 * 2**-11 ~ 2.0e-3         256 * 2**-24 ~ 1.5e-5   (float32 arithmetic)
    bfloat16    4 * 2**-8  ~ 1.6e-2         256 * 2**-24 ~ 1.5e-5   (float32 arithmetic)

- float32 / float64 results are computed in their own precision, so they carry the error of every
  rounding on the way: reductions of up to n ~ 4096 terms in these tests, whose error grows like
  sqrt(n) u for round-to-nearest (64 u at n = 4096), times 4 for different summation orders, FMA
  contraction and libm's last-ulp differences between backends.
- float16 / bfloat16 results are computed in float32 and rounded once to the dtype (the reference
  kernels' contract; docs/architecture.md: "CPU backends may compute in fp32 on upcast operands"). Against the
  float64 reference of the same inputs the error is that final rounding, relative to the result
  (<= u of the dtype; two correct backends may round to the two neighbours of a value, 1 ulp = 2 u
  apart, so rtol is 4 u = 2 ulps), plus the float32 work, proportional to `scale` (atol of float32).
  A backend that accumulates in float16 / bfloat16 has errors of u_lowp * scale and fails.

Gradient checks use FD_TOL, not the table: a central difference with step eps has truncation error
eps**2 |f'''| / 6 (~1e-12 at eps = 1e-6) plus roundoff u |L| / eps (~1e-10 |L| in float64), so 1e-6
leaves two orders of margin for |L| ~ 100 while a real gradient bug is off by O(1). Those errors are
absolute (they do not shrink with the gradient), so the default scale there is max(max|gradient|, 1).
"""
import ml_dtypes
import numpy as np

bfloat16 = ml_dtypes.bfloat16

TOL = {
    np.float64: (2.8e-14, 2.8e-14),  # 256 * 2**-53
    np.float32: (1.5e-5, 1.5e-5),    # 256 * 2**-24
    np.float16: (2.0e-3, 1.5e-5),    # 4 * 2**-11, float32's
    bfloat16: (1.6e-2, 1.5e-5),      # 4 * 2**-8,  float32's
}

#: central differences in float64 (see the module docstring)
FD_EPS = 1e-6
FD_TOL = (1e-6, 1e-6)


def tol(dtype) -> tuple[float, float]:
    """(rtol, atol) for results of `dtype` (a numpy dtype, a scalar type, or bfloat16)."""
    key = np.dtype(dtype).type
    if key not in TOL:
        raise ValueError(f"no tolerance for dtype {np.dtype(dtype).name}; the table has "
                         f"{', '.join(np.dtype(t).name for t in TOL)}")
    return TOL[key]


def assert_close(actual, expected, dtype, *, scale=None, what=""):
    """Assert `actual` (a backend's result, as numpy) matches `expected` within TOL[dtype].

    scale: None (max|expected|, or 1 if expected is all zero), a number, or an array broadcastable to
    expected (elementwise magnitudes, e.g. sum|terms| of each reduction). Non-finite entries of
    expected (-inf lse of a fully masked row) must be matched exactly by actual.
    """
    rtol, atol = tol(dtype)
    tiny = float(ml_dtypes.finfo(dtype).smallest_normal)
    _compare(actual, expected, rtol, atol, scale, tiny, f"{what} [{np.dtype(dtype).name}]")


def assert_grad_close(analytic, numeric, *, scale=None, what=""):
    """Assert a backward kernel's float64 gradient matches central finite differences (FD_TOL)."""
    if scale is None:
        scale = max(float(np.abs(np.asarray(numeric)).max(initial=0.0)), 1.0)
    _compare(analytic, numeric, *FD_TOL, scale, 0.0, f"{what} [vs finite differences]")


def _compare(actual, expected, rtol, atol, scale, tiny, what):
    actual = np.asarray(actual).astype(np.float64)
    expected = np.asarray(expected).astype(np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape}, expected {expected.shape}")

    # Non-finite expected values (inf, -inf, nan) must be reproduced exactly, and no others may appear.
    finite = np.isfinite(expected)
    same_nonfinite = np.where(np.isnan(expected), np.isnan(actual), actual == expected)
    bad_nonfinite = ~finite & ~same_nonfinite
    bad_nonfinite |= finite & ~np.isfinite(actual)
    if bad_nonfinite.any():
        idx = _unravel(np.argmax(bad_nonfinite), expected.shape)
        raise AssertionError(f"{what}: {int(bad_nonfinite.sum())} non-finite mismatches; first at index "
                             f"{idx}: actual {actual[idx]!r}, expected {expected[idx]!r}")

    a = np.where(finite, actual, 0.0)
    e = np.where(finite, expected, 0.0)
    if scale is None:
        scale = float(np.abs(e).max(initial=0.0)) or 1.0
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), e.shape)
    err = np.abs(a - e)
    allowed = rtol * np.abs(e) + atol * scale + tiny
    bad = err > allowed
    if bad.any():
        worst = _unravel(np.argmax(err - allowed), e.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(e != 0, err / np.abs(e), np.where(err > 0, np.inf, 0.0))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {e.size} elements differ beyond rtol={rtol:g}, "
            f"atol={atol:g} * scale\n"
            f"  max abs error {err.max():.3e}, max rel error {rel.max():.3e}\n"
            f"  worst index {worst}: actual {a[worst]!r}, expected {e[worst]!r}, "
            f"allowed {allowed[worst]:.3e} (scale {scale[worst]:.3e})")


def _unravel(flat_index, shape):
    return tuple(int(i) for i in np.unravel_index(flat_index, shape)) if shape else ()


# ---------------------------------------------------------------------------------- gradient oracle
def central_difference(loss, x, eps=FD_EPS) -> np.ndarray:
    """d loss / d x by float64 central differences, one element at a time (small x only).

    loss: a function of x alone returning a float (typically sum(forward(x) * G) for a fixed random
    projection G, whose gradient is exactly backward(G, ...)).
    """
    x = np.array(x, dtype=np.float64)  # a private copy, perturbed in place
    grad = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        x0 = x[idx]
        x[idx] = x0 + eps
        up = loss(x)
        x[idx] = x0 - eps
        down = loss(x)
        x[idx] = x0
        grad[idx] = (up - down) / (2 * eps)
    return grad


# ------------------------------------------------------------------------- running a kernel on a backend
def run_kernel(be, name, *args, **kwargs):
    """Call kernel `name` of backend `be` on numpy inputs and return its outputs as numpy.

    Array arguments go through be.asarray, array outputs (also inside a tuple) come back through
    be.to_numpy. Kernels are pure functions (docs/architecture.md, "The backend interface"), so this also asserts
    that no array argument was modified.
    """
    host = [np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in args]
    dev = [be.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
    dev_kwargs = {k: be.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    out = getattr(be, name)(*dev, **dev_kwargs)
    for i, (h, d) in enumerate(zip(host, dev)):
        if isinstance(h, np.ndarray):
            after = np.ascontiguousarray(be.to_numpy(d))
            assert after.tobytes() == np.ascontiguousarray(h).tobytes(), \
                f"{be.name}.{name} modified its input argument {i} (kernels must be pure)"
    if isinstance(out, tuple):
        return tuple(_host(be, o) for o in out)
    return _host(be, out)


def _host(be, x):
    if x is None or isinstance(x, (bool, int, float, np.generic)):
        return x
    return be.to_numpy(x)

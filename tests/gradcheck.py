"""Float64 finite-difference gradient checking for refimpl's autodiff (the test oracle for every op).

`gradcheck(f, inputs)` compares the gradients the tape computes with central differences of `f`
(torch.autograd.gradcheck's method; Chainer's `check_backward`): for an entry x_i,

    d<R, f(x)>/dx_i  ~=  (<R, f(x + eps e_i)> - <R, f(x - eps e_i)>) / (2 eps)

where R is a fixed random cotangent (ones for a scalar f), so a non-scalar output is checked through
one vector-Jacobian product, exactly what `backward(out, grad=R)` computes. Everything is float64: the
central difference's error is O(eps^2) truncation plus O(1e-16 / eps) rounding, about 1e-10 at eps=1e-6.

`order=4` uses the five-point stencil (error O(eps^4)) with a larger eps: accurate to ~1e-11, tight
enough to catch a float64 op that silently computes part of its gradient in float32 (~1e-8 relative).
"""
from __future__ import annotations

import numpy as np

from refimpl.autodiff import Tensor, no_grad

__all__ = ["gradcheck", "GradcheckError"]


class GradcheckError(AssertionError):
    """Analytic and numerical gradients disagree (the message lists the worst entries)."""


def gradcheck(f, inputs, *, eps=1e-6, rtol=1e-6, atol=1e-9, order=2, max_entries=None, seed=0,
              check_inputs=None):
    """Check d f / d inputs. Returns the largest error relative to the tolerance (< 1 when it passes).

    f: f(list of Tensors) -> Tensor (any shape; contracted with a random cotangent when not scalar).
    inputs: float64 numpy arrays (wrapped here in Tensors that require grad) or Tensors that already
        require grad (e.g. a module's Parameters, which f reads from the module): those are perturbed
        in place through `.data` and restored afterwards.
    max_entries: check at most this many randomly chosen entries per input (None: all of them).
    check_inputs: indices of the inputs whose gradients are checked (default: all).
    Tolerance per entry: |analytic - numerical| <= atol + noise + rtol * max(|analytic|, |numerical|),
    where noise is the rounding error of the difference quotient (large outputs sum many terms).
    """
    rng = np.random.default_rng(seed)
    tensors = [x if isinstance(x, Tensor) else Tensor(np.array(x, dtype=np.float64), requires_grad=True)
               for x in inputs]
    for t in tensors:
        if t.dtype != np.float64:
            raise ValueError(f"gradcheck needs float64 inputs, got {t.dtype} for {t!r}")
        if not t.requires_grad:
            raise ValueError(f"gradcheck input {t!r} does not require grad")
        t.grad = None
    check = range(len(tensors)) if check_inputs is None else check_inputs

    # Analytic: one backward pass with the cotangent R.
    out = f(tensors)
    R = rng.standard_normal(out.shape) if out.size > 1 else np.ones(out.shape)
    out.backward(R)
    analytic = [None if t.grad is None else np.array(t.grad, dtype=np.float64) for t in tensors]
    for t in tensors:
        if t.grad is not None and np.asarray(t.grad).dtype != np.float64:
            raise GradcheckError(f"gradient of float64 input {t!r} came back as {np.asarray(t.grad).dtype}")

    # Rounding noise of one difference quotient: each evaluation of <R, f> is off by about
    # u * sum|R * f| (u = float64 unit roundoff), and the quotient divides that by eps.
    noise_floor = np.finfo(np.float64).eps * float(np.sum(np.abs(R * np.asarray(out.data, np.float64)))) / eps

    def objective():
        with no_grad():
            return float(np.sum(np.asarray(f(tensors).data, dtype=np.float64) * R))

    stencil = {2: ((1, 0.5), (-1, -0.5)),
               4: ((2, -1 / 12), (1, 8 / 12), (-1, -8 / 12), (-2, 1 / 12))}[order]
    tol_abs = atol + noise_floor * sum(abs(w) for _, w in stencil)
    worst, report = 0.0, []
    for i in check:
        t = tensors[i]
        a = np.zeros(t.shape) if analytic[i] is None else analytic[i]
        if a.shape != t.shape:
            raise GradcheckError(f"input {i}: gradient has shape {a.shape}, input has {t.shape}")
        flat = np.arange(t.size)
        if max_entries is not None and t.size > max_entries:
            flat = rng.choice(t.size, size=max_entries, replace=False)
        for j in flat:
            idx = np.unravel_index(j, t.shape)
            orig = t.data[idx]
            num = 0.0
            for k, w in stencil:
                t.data[idx] = orig + k * eps
                num += w * objective()
            t.data[idx] = orig
            num /= eps
            err = abs(a[idx] - num) / (tol_abs + rtol * max(abs(a[idx]), abs(num)))
            worst = max(worst, err)
            if err > 1:
                report.append(f"input {i} entry {tuple(int(n) for n in idx)}: analytic {a[idx]:.12g}, "
                              f"numerical {num:.12g}")
    if report:
        raise GradcheckError(f"{len(report)} gradient entries differ (rtol={rtol}, atol={tol_abs:.3g}):\n  "
                             + "\n  ".join(report[:10]))
    return worst

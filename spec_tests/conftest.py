"""The `backend` fixture: every spec test runs once per registered backend.

docs/architecture.md, "Numerics and tests": spec_tests/ parametrises over every registered backend (the
`refimpl.backends` entry-point group); a registered backend that cannot run here is skipped with its
reason ("cupy: no CUDA device"), and GPU backends carry the `gpu` marker so `-m "not gpu"` drops them.
REFIMPL_TEST_BACKENDS=numpy,numba narrows the set. The fixture is session-scoped so a JIT backend
compiles its kernels once per session (numba's `cache=True` makes later sessions cheap), through an
optional `warmup()` method.

The hypothesis profiles are registered in the repository's top-level conftest.py.
"""
import os

import pytest

from refimpl.backend import NumpyBackend, available_backends, get_backend, registered_backends

ENV_VAR = "REFIMPL_TEST_BACKENDS"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "kernel(*names): the kernels of refimpl.backend.KERNELS that an equivalence test covers "
        "(spec_tests/test_meta.py fails when a kernel has none)")


def _is_gpu(name, entry_point) -> bool:
    """A backend's `is_gpu` flag; when its class cannot even be imported, guess from the name."""
    try:
        cls = NumpyBackend if entry_point is None else entry_point.load()
        return bool(getattr(cls, "is_gpu", False))
    except Exception:
        return any(word in name.lower() for word in ("cupy", "cuda", "gpu"))


def backend_params(available, wanted=None, is_gpu=lambda name: False):
    """pytest.params for the backends under test.

    available: name -> None (usable) or the reason it is not (refimpl.backend.available_backends()).
    wanted: the REFIMPL_TEST_BACKENDS value ("numpy,numba"), None or "" for all registered backends.
    A wanted name that is not registered, or a registered one that is unusable, becomes a skipped
    param whose reason names it.
    """
    names = sorted(available)
    if wanted and wanted.strip():
        names = [n.strip() for n in wanted.split(",") if n.strip()]
    params = []
    for name in names:
        marks = [pytest.mark.gpu] if is_gpu(name) else []
        if name not in available:
            marks.append(pytest.mark.skip(
                reason=f"{name}: not a registered backend (registered: {', '.join(sorted(available))})"))
        elif available[name] is not None:
            reason = available[name]   # check_available's message usually names the backend already
            marks.append(pytest.mark.skip(reason=reason if reason.startswith(f"{name}:") else f"{name}: {reason}"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _params_here():
    eps = registered_backends()
    return backend_params(available_backends(), os.environ.get(ENV_VAR),
                          is_gpu=lambda name: name in eps and _is_gpu(name, eps[name]))


@pytest.fixture(scope="session", params=_params_here())
def backend(request):
    """The backend under test (a refimpl.backend.Backend instance), warmed up once per session."""
    be = get_backend(request.param)
    warmup = getattr(be, "warmup", None)
    if callable(warmup):
        warmup()
    return be

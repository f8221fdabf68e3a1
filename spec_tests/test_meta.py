"""Tests of the test suite and of backend selection.

The meta-test (docs/architecture.md, "Numerics and tests"): every kernel named in refimpl.backend.KERNELS has at
least one equivalence test, i.e. a test in spec_tests/ that takes the `backend` fixture and declares the
kernel with `@pytest.mark.kernel("name", ...)`; and no marker names a kernel that does not exist. The
marks are read from the imported test modules (function marks and module `pytestmark`), not by running
pytest, so adding a name to KERNELS without a test fails here at once.

Backend selection (refimpl/backend.py): `use_backend(...)` > $REFIMPL_BACKEND > "numpy"; unknown names
are a BackendError that lists what is installed; the fixture's parametrisation (conftest.py).
"""
import importlib
import inspect
import threading
from pathlib import Path

import pytest

from refimpl.backend import (KERNELS, Backend, BackendError, NumpyBackend, available_backends, get_backend,
                             use_backend)

from .conftest import backend_params

SPEC_DIR = Path(__file__).parent


# ------------------------------------------------------------------------------------------- meta-test
def _marks(obj):
    marks = getattr(obj, "pytestmark", [])
    return list(marks) if isinstance(marks, (list, tuple)) else [marks]


def kernel_marked_tests():
    """[(qualified test name, kernels it declares, takes the backend fixture)] over spec_tests/test_*.py."""
    found = []
    for path in sorted(SPEC_DIR.glob("test_*.py")):
        module = importlib.import_module(f"{__package__}.{path.stem}")
        module_marks = _marks(module)
        candidates = [(name, obj) for name, obj in vars(module).items()
                      if name.startswith("test") and inspect.isfunction(obj)]
        for cls_name, cls in vars(module).items():
            if cls_name.startswith("Test") and inspect.isclass(cls):
                candidates += [(f"{cls_name}.{name}", obj) for name, obj in vars(cls).items()
                               if name.startswith("test") and inspect.isfunction(obj)]
        for name, fn in candidates:
            kernel_marks = [m for m in module_marks + _marks(fn) if m.name == "kernel"]
            if kernel_marks:
                takes_backend = "backend" in inspect.signature(fn).parameters
                found.append((f"{path.stem}::{name}", [a for m in kernel_marks for a in m.args] or [None],
                              takes_backend))
    return found


def test_every_kernel_has_an_equivalence_test():
    covered = {k for _, kernels, takes_backend in kernel_marked_tests() if takes_backend for k in kernels}
    missing = [k for k in KERNELS if k not in covered]
    assert not missing, (f"kernels in refimpl.backend.KERNELS with no equivalence test (a spec_tests test "
                         f"taking the `backend` fixture, marked @pytest.mark.kernel(...)): {missing}")


def test_kernel_markers_name_real_kernels():
    bad = [(test, k) for test, kernels, _ in kernel_marked_tests() for k in kernels if k not in KERNELS]
    assert not bad, f"kernel markers naming no kernel of refimpl.backend.KERNELS (or naming none): {bad}"


def test_meta_test_sees_every_kernel_module():
    # Guards the collector itself: an import or naming slip would otherwise make it see nothing.
    modules = {test.split("::")[0] for test, _, _ in kernel_marked_tests()}
    assert {p.stem for p in SPEC_DIR.glob("test_kernels_*.py")} <= modules
    assert len(kernel_marked_tests()) >= len(KERNELS)


def test_meta_test_fails_on_an_untested_or_unknown_kernel(monkeypatch):
    import sys
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "KERNELS", KERNELS + ("fused_rope",))  # a new kernel, no test yet
    with pytest.raises(AssertionError, match="fused_rope"):
        test_every_kernel_has_an_equivalence_test()
    monkeypatch.setattr(this, "KERNELS", tuple(k for k in KERNELS if k != "gelu"))  # a kernel removed
    with pytest.raises(AssertionError, match="gelu"):
        test_kernel_markers_name_real_kernels()


def test_kernel_marker_is_registered(pytestconfig):
    assert any(line.startswith("kernel(") for line in pytestconfig.getini("markers"))


# ------------------------------------------------------------------------------------ fixture params
def _param_info(params):
    return {p.values[0]: ([m.kwargs.get("reason") for m in p.marks if m.name == "skip"],
                          any(m.name == "gpu" for m in p.marks)) for p in params}


def test_backend_params_skip_unusable_and_mark_gpu():
    available = {"numpy": None, "cupy": "no CUDA device", "numba": None}
    info = _param_info(backend_params(available, None, is_gpu=lambda name: name == "cupy"))
    assert info == {"cupy": (["cupy: no CUDA device"], True), "numba": ([], False), "numpy": ([], False)}
    named = _param_info(backend_params({"cupy": "cupy: no CUDA device"}))   # a reason that names it already
    assert named["cupy"][0] == ["cupy: no CUDA device"]


def test_backend_params_narrowed_by_env_value():
    available = {"numpy": None, "numba": None, "cupy": "no CUDA device"}
    assert list(_param_info(backend_params(available, "numba, numpy"))) == ["numba", "numpy"]
    assert list(_param_info(backend_params(available, ""))) == ["cupy", "numba", "numpy"]  # empty: all
    reasons, _ = _param_info(backend_params(available, "numbaa"))["numbaa"]  # a typo is reported
    assert reasons and "not a registered backend" in reasons[0] and "numpy" in reasons[0]


# ------------------------------------------------------------------------------------ backend selection
def test_numpy_backend_is_always_available():
    assert available_backends()["numpy"] is None
    assert isinstance(get_backend("numpy"), NumpyBackend)


def test_unknown_backend_error_lists_installed_backends():
    with pytest.raises(BackendError) as info:
        get_backend("nope")
    message = str(info.value)
    assert "'nope'" in message and "installed backends" in message and "numpy" in message
    with pytest.raises(BackendError):
        with use_backend("nope"):
            pass


def test_default_is_numpy_never_a_gpu(monkeypatch):
    monkeypatch.delenv("REFIMPL_BACKEND", raising=False)
    be = get_backend()
    assert be is get_backend("numpy") and not be.is_gpu


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("REFIMPL_BACKEND", "numpy")
    assert get_backend() is get_backend("numpy")
    monkeypatch.setenv("REFIMPL_BACKEND", "nope")
    with pytest.raises(BackendError, match="nope"):
        get_backend()


class _Other(NumpyBackend):
    name = "other"


def test_use_backend_beats_environment_and_nests(monkeypatch):
    monkeypatch.setenv("REFIMPL_BACKEND", "nope")  # would fail if consulted
    other = _Other()
    with use_backend("numpy") as be:
        assert be is get_backend("numpy") and get_backend() is be
        with use_backend(other) as inner:  # a Backend instance works too
            assert inner is other and get_backend() is other
        assert get_backend() is be
    with pytest.raises(BackendError):  # outside the context the environment applies again
        get_backend()


def test_use_backend_is_per_thread(monkeypatch):
    monkeypatch.delenv("REFIMPL_BACKEND", raising=False)
    seen = []
    with use_backend(_Other()):
        worker = threading.Thread(target=lambda: seen.append(get_backend()))
        worker.start()
        worker.join()
    assert isinstance(seen[0], Backend) and seen[0].name == "numpy"

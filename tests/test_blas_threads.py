"""NumPy's BLAS thread count (refimpl/blas_threads.py) and how training uses it.

- set_threads refuses counts that are not ints >= 1, naming the value;
- limited(n) lowers OpenBLAS's count to n inside and gives the earlier count back on leaving (and never raises it);
- train() with simulated ranks runs them with an equal share of the cores each, and restores the count after;
- where NumPy's BLAS is not an OpenBLAS whose count can be read, all of it does nothing (the tests that need the
  count say so when they skip).
"""
import numpy as np
import pytest

from refimpl import blas_threads


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", None, True])
def test_set_threads_names_a_bad_count(bad):
    with pytest.raises(ValueError, match=r"int >= 1, got"):
        blas_threads.set_threads(bad)


@pytest.fixture
def openblas(monkeypatch):
    """The count before the test, restored after it, and no pin from an earlier numba selection; skips where the
    count cannot be read."""
    before = blas_threads.get_threads()
    if before is None:
        pytest.skip("NumPy's BLAS here is not an OpenBLAS whose thread count can be read")
    monkeypatch.setattr(blas_threads, "_pinned", False)
    yield before
    blas_threads.set_threads(before)


def test_limited_lowers_then_restores(openblas):
    assert blas_threads.set_threads(2)
    with blas_threads.limited(1):
        assert blas_threads.get_threads() == 1
        a = np.ones((300, 300), np.float32)
        assert float((a @ a)[0, 0]) == 300.0               # BLAS still works on one thread
    assert blas_threads.get_threads() == 2
    with blas_threads.limited(4):                           # a limit above the count changes nothing
        assert blas_threads.get_threads() == 2
    assert blas_threads.get_threads() == 2


def test_simulated_ranks_share_the_cores(openblas, tiny_config, tmp_path, monkeypatch):
    import refimpl.train as train_module
    seen = []
    real = train_module.run_ranks

    def spy(*args, **kw):
        seen.append(blas_threads.get_threads())
        return real(*args, **kw)

    monkeypatch.setattr(train_module, "run_ranks", spy)
    monkeypatch.setattr(blas_threads, "cores", lambda: 4)
    assert blas_threads.set_threads(3)
    train_module.train(tiny_config("world_size=2", "run.steps=1"), tmp_path / "run", progress=False)
    assert seen == [2]                                      # 4 cores / 2 ranks
    assert blas_threads.get_threads() == 3                  # and the count comes back

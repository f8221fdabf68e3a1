"""The backend interface, its NumPy reference implementation, and backend selection.

A backend is a table of op -> function (tinygrad's ops.py idea): memory management plus the kernels a
transformer and its optimizer need, forward and backward in pairs. `NumpyBackend` *is* the specification:
its kernels live in refimpl/kernels/ and are readable, exact and float64-capable. Other backends (numba,
CuPy, third parties) subclass `Backend`, override what they make faster, and inherit the rest; the
inherited reference kernels run on their arrays through `xp` (the array-api-compat / Chainer pattern).

Selection order: `use_backend(name)` context > the REFIMPL_BACKEND environment variable > "numpy".
A GPU is never picked silently. Backends register through the `refimpl.backends` entry-point group,
first-party ones exactly as a third party would (pyproject.toml).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from importlib.metadata import entry_points

import numpy as np

from .kernels import attention as _attn
from .kernels import dense as _dense
from .kernels import optim as _optim

ENTRY_POINT_GROUP = "refimpl.backends"

#: The kernel half of the interface. The spec_tests meta-test fails when one of these has no
#: equivalence test, so adding a kernel here obliges a test.
KERNELS = (
    "matmul", "add",
    "softmax", "softmax_backward",
    "layernorm", "layernorm_backward",
    "gelu", "gelu_backward",
    "attention", "attention_backward",
    "embedding", "embedding_backward",
    "cross_entropy", "cross_entropy_backward",
    "adam_step", "sum_squares", "has_inf_or_nan", "cast",
)


class BackendError(RuntimeError):
    """An unknown or unusable backend name; the message lists what is installed and why others fail."""


class Backend:
    """Interface + NumPy reference kernels. Subclasses set `name`, `xp`, `is_gpu` and override kernels."""

    name = "numpy"
    xp = np
    is_gpu = False

    @classmethod
    def check_available(cls) -> None:
        """Raise BackendError with a one-line reason when this backend cannot run here."""

    # ------------------------------------------------------------------------------------- memory
    def asarray(self, host, dtype=None):
        return self.xp.asarray(host, dtype=dtype)

    def to_numpy(self, arr) -> np.ndarray:
        return np.asarray(arr)

    def empty(self, shape, dtype=np.float32):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype=np.float32):
        return self.xp.zeros(shape, dtype=dtype)

    def pinned_empty(self, shape, dtype=np.float32) -> np.ndarray:
        """Host buffer for device transfers: page-locked on GPU backends, plain numpy here."""
        return np.empty(shape, dtype=dtype)

    #: do copy_async calls on a non-current stream run beside compute (GPU copy engines)? CPU backends copy
    #: synchronously, so refimpl/memory/transfer.py records their copies as plain synchronous transfers.
    async_copies = False

    def stream(self):
        """An execution stream; CPU backends run everything in order, so a null stream will do."""
        return _NullStream()

    def current_stream(self):
        """The stream that kernels are queued on now (compute)."""
        return _NullStream()

    def event(self):
        """A marker in a stream: record(stream), synchronize(), .done; its time is read by elapsed_ms."""
        return _NullEvent()

    def elapsed_ms(self, start, end) -> float:
        """Milliseconds between two recorded (and completed) events."""
        return (end.time - start.time) * 1e3

    def copy_async(self, dst, src, stream=None) -> None:
        """dst[...] = src, possibly asynchronous on `stream` (synchronous on CPU backends)."""
        dst[...] = src

    def synchronize(self) -> None:
        """Wait for all queued work (nothing is ever queued on CPU backends)."""

    # ------------------------------------------------------------------------------------ kernels
    matmul = staticmethod(_dense.matmul)
    add = staticmethod(_dense.add)
    softmax = staticmethod(_dense.softmax)
    softmax_backward = staticmethod(_dense.softmax_backward)
    layernorm = staticmethod(_dense.layernorm)
    layernorm_backward = staticmethod(_dense.layernorm_backward)
    gelu = staticmethod(_dense.gelu)
    gelu_backward = staticmethod(_dense.gelu_backward)
    embedding = staticmethod(_dense.embedding)
    embedding_backward = staticmethod(_dense.embedding_backward)
    cross_entropy = staticmethod(_dense.cross_entropy)
    cross_entropy_backward = staticmethod(_dense.cross_entropy_backward)
    adam_step = staticmethod(_optim.adam_step)
    sum_squares = staticmethod(_optim.sum_squares)
    has_inf_or_nan = staticmethod(_optim.has_inf_or_nan)
    cast = staticmethod(_optim.cast)

    @staticmethod
    def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, block_size=None):
        """Scaled dot-product attention -> (out, lse). block_size=None: the plain form (materialised
        scores); an int: the tiled online-softmax form (FlashAttention) with square blocks."""
        if block_size is None:
            return _attn.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        return _attn.attention_tiled(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                     scale=scale, block_q=block_size, block_k=block_size)

    @staticmethod
    def attention_backward(dout, q, k, v, out, lse, *, causal=False, key_padding_mask=None, scale=None,
                           block_size=None):
        if block_size is None:
            return _attn.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                            key_padding_mask=key_padding_mask, scale=scale)
        return _attn.attention_tiled_backward(dout, q, k, v, out, lse, causal=causal,
                                              key_padding_mask=key_padding_mask, scale=scale,
                                              block_q=block_size, block_k=block_size)

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r}>"


class NumpyBackend(Backend):
    """The reference backend: everything as declared above."""


class _NullStream:
    def synchronize(self):
        pass

    def wait_event(self, event):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    """On CPU backends work is done when it is queued: an event is the host time at which it was recorded."""
    done = True
    time = 0.0

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass


# ---------------------------------------------------------------------------------- registry & selection
def registered_backends() -> dict[str, object]:
    """name -> entry point, for every installed backend plugin (numpy is always there)."""
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    eps.setdefault("numpy", None)  # even when running from a source tree that was never pip-installed
    return eps


def _load_class(name, ep):
    return NumpyBackend if ep is None else ep.load()


def available_backends() -> dict[str, str | None]:
    """name -> None if usable here, else the one-line reason it is not."""
    out = {}
    for name, ep in sorted(registered_backends().items()):
        try:
            _load_class(name, ep).check_available()
            out[name] = None
        except Exception as exc:  # a plugin that fails to import is unusable, not fatal
            out[name] = _reason(exc)
    return out


def _reason(exc) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return f"missing module {exc.name!r} (install its extra, e.g. pip install 'refimpl[{exc.name}]')"
    return str(exc) or type(exc).__name__


_instances: dict[str, Backend] = {}
_lock = threading.Lock()
_local = threading.local()  # use_backend is per thread: simulated ranks may each hold one


def get_backend(name: str | None = None) -> Backend:
    """The backend called `name`, or the selected one: use_backend(...) > $REFIMPL_BACKEND > numpy."""
    if name is None:
        stack = getattr(_local, "stack", None)
        if stack:
            return stack[-1]
        name = os.environ.get("REFIMPL_BACKEND", "").strip() or "numpy"
    with _lock:
        if name in _instances:
            return _instances[name]
        eps = registered_backends()
        if name not in eps:
            raise BackendError(f"unknown backend {name!r}; {_describe(available_backends())}")
        try:
            cls = _load_class(name, eps[name])
            cls.check_available()
        except Exception as exc:
            raise BackendError(f"backend {name!r} is not usable: {_reason(exc)}; "
                               f"{_describe(available_backends())}") from exc
        _instances[name] = cls()
        return _instances[name]


def host_backend(backend: Backend) -> Backend:
    """The CPU backend for host-side work behind `backend` (the offloaded optimizer's Adam): the backend itself on
    the CPU; behind a GPU, numba when it is installed (DeepSpeedCPUAdam's role in ZeRO-Offload; bit-exact with the
    reference's adam_step), else the NumPy reference."""
    if not backend.is_gpu:
        return backend
    try:
        return get_backend("numba")
    except BackendError:
        return get_backend("numpy")


def _describe(avail) -> str:
    parts = [name if why is None else f"{name} (unusable: {why})" for name, why in avail.items()]
    return "installed backends: " + ", ".join(parts)


@contextlib.contextmanager
def use_backend(name_or_backend):
    """Select a backend for the code inside the `with` block (this thread only)."""
    be = name_or_backend if isinstance(name_or_backend, Backend) else get_backend(name_or_backend)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(be)
    try:
        yield be
    finally:
        stack.pop()

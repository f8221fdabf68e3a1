"""Deferred initialisation: build a module without drawing its weights (the model core knows nothing of ZeRO).

Inside ``with deferred():`` a layer does not draw its parameters; each Parameter holds a ``DeferredInit`` (shape,
dtype, and how to fill it: the seed of its own random stream, or a constant) that answers shape/dtype/size like
an array, so a module can be built and inspected. ``materialize`` draws one parameter when its owner wants it:
ZeRO stage 3 draws them one at a time and keeps only its chunk (refimpl/zero/init.py is DeepSpeed's zero.Init
on top of this), stages 0-2 draw them all (``materialize_all``).

Every parameter draws from its own stream, seeded from the model's rng in construction order, so a parameter drawn
late is equal to the same parameter drawn eagerly: deferral changes when bytes exist, never their values.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_state = threading.local()   # LocalComm ranks are threads: each builds its own model


def is_active() -> bool:
    return getattr(_state, "depth", 0) > 0


class deferred:                         # noqa: N801 -- a context manager, used as `with deferred():`
    """``with deferred(): model = Transformer(...)``: parameters are created deferred. ``enabled=False`` makes it
    a no-op, so callers can write one ``with`` whether or not they defer."""

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)

    def __enter__(self):
        if self.enabled:
            _state.depth = getattr(_state, "depth", 0) + 1
        return self

    def __exit__(self, *exc):
        if self.enabled:
            _state.depth -= 1


class eager:                            # noqa: N801
    """Build eagerly inside a deferred block (layers that must see their values at construction: tiling)."""

    def __enter__(self):
        self.saved, _state.depth = getattr(_state, "depth", 0), 0

    def __exit__(self, *exc):
        _state.depth = self.saved


class DeferredInit:
    """A parameter not drawn yet: N(0, std) from ``default_rng(seed)`` (zeros when std is 0), or the constant
    ``fill`` (LayerNorm's ones and zeros), rounded to float32, then cast to ``dtype``."""

    def __init__(self, shape, std: float = 0.0, seed=None, dtype=np.float32, fill=None):
        self.shape, self.std, self.seed, self.dtype = tuple(shape), float(std), seed, np.dtype(dtype)
        self.fill = fill
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.ndim = len(self.shape)

    def materialize(self, host=None):
        """The parameter on the current backend; ``host``: its float32 values, drawn already (host_values)."""
        from .backend import get_backend
        return get_backend().asarray(self.host_values() if host is None else host).astype(self.dtype)

    def host_values(self):
        """The float32 values on the host (thread-safe: the parameter's own stream, no backend)."""
        if self.fill is not None:
            return np.full(self.shape, self.fill, np.float32)
        return draw(self.shape, self.std, self.seed)

    def __repr__(self):
        how = f"fill={self.fill}" if self.fill is not None else f"std={self.std}"
        return f"DeferredInit(shape={self.shape}, {how}, dtype={self.dtype})"


def draw(shape, std: float, seed):
    """N(0, std) in float64 from the parameter's own stream, rounded to float32 (zeros for std 0)."""
    if std <= 0:
        return np.zeros(shape, np.float32)
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


def materialize(data):
    """The array behind a parameter's data: drawn now if it was deferred."""
    return data.materialize() if isinstance(data, DeferredInit) else data


def materialize_in_order(datas, ahead: int = 3):
    """materialize(d) for each of ``datas``, in order, while worker threads draw the next ``ahead`` deferred ones
    (NumPy's generators and casts release the GIL). Each parameter draws from its own stream, so the values do
    not depend on which thread drew them; at most ``ahead`` + 1 whole parameters are in memory."""
    datas = list(datas)
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        drawn = {}

        def draw_ahead(k):
            if k < len(datas) and isinstance(datas[k], DeferredInit):
                drawn[k] = pool.submit(datas[k].host_values)
        for k in range(ahead):
            draw_ahead(k)
        for k, data in enumerate(datas):
            draw_ahead(k + ahead)
            yield data.materialize(drawn.pop(k).result()) if k in drawn else data


def materialize_all(model) -> None:
    """Draw every deferred parameter of ``model`` whole."""
    for p in model.parameters():
        p.data = materialize(p.data)

"""zero.Init: build a model without ever holding it whole (ZeRO-Infinity §5.1.1, DeepSpeed's `zero.Init`).

A model whose parameters do not fit in memory cannot be built first and partitioned afterwards. Inside
`with zero.Init():` the layers do not draw their weights; each Parameter holds a `DeferredInit` (shape, dtype,
and the seed of its own random stream). ZeRO stage 3 then draws the parameters one at a time, keeps this rank's
chunk (on the device, or straight into the host/NVMe tier) and drops the rest, so the peak is one parameter
(refimpl/zero/stage3.py, `materialize`).

Every parameter draws from its own stream, seeded from the model's rng in construction order, so a parameter drawn
late is equal to the same parameter drawn eagerly: `with zero.Init()` changes when bytes exist, never their values.
"""
from __future__ import annotations

import threading

import numpy as np

_state = threading.local()   # LocalComm ranks are threads: each builds its own model


def init_active() -> bool:
    return getattr(_state, "depth", 0) > 0


class Init:
    """`with Init(): model = Transformer(...)`: parameters are created deferred (DeepSpeed's zero.Init).

    `enabled=False` makes it a no-op, as in DeepSpeed, so callers can write one `with` for every stage."""

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)

    def __enter__(self):
        if self.enabled:
            _state.depth = getattr(_state, "depth", 0) + 1
        return self

    def __exit__(self, *exc):
        if self.enabled:
            _state.depth -= 1


class Suspended:
    """Build eagerly inside an Init block (layers that must see their values at construction, e.g. tiling)."""

    def __enter__(self):
        self.saved, _state.depth = getattr(_state, "depth", 0), 0

    def __exit__(self, *exc):
        _state.depth = self.saved


class DeferredInit:
    """A parameter not drawn yet: N(0, std) from `default_rng(seed)` (zeros when std is 0), cast to `dtype`.

    It answers shape/dtype/size/ndim like an array, so a module can be built and inspected; `materialize()`
    draws it (the same values every time)."""

    def __init__(self, shape, std: float, seed, dtype):
        self.shape, self.std, self.seed, self.dtype = tuple(shape), float(std), seed, np.dtype(dtype)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.ndim = len(self.shape)

    def materialize(self):
        from ..backend import get_backend
        host = draw(self.shape, self.std, self.seed)
        return get_backend().asarray(host).astype(self.dtype)

    def __repr__(self):
        return f"DeferredInit(shape={self.shape}, std={self.std}, dtype={self.dtype})"


def draw(shape, std: float, seed):
    """N(0, std) in float64 from the parameter's own stream, rounded to float32 (zeros for std 0)."""
    if std <= 0:
        return np.zeros(shape, np.float32)
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


def materialize(data):
    """The array behind a parameter's data: drawn now if it was deferred."""
    return data.materialize() if isinstance(data, DeferredInit) else data


def materialize_all(model) -> None:
    """Draw every deferred parameter of `model` whole (stages 0-2 keep whole parameters anyway)."""
    for p in model.parameters():
        p.data = materialize(p.data)

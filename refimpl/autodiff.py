"""Reverse-mode automatic differentiation: Tensor, Function, the tape, no_grad and hooks.

A `Function` holds its forward and its backward side by side (Chainer's FunctionNode). Calling
`Fn.apply(*inputs)` runs `forward` on the inputs' arrays and, when gradients are wanted, records the node
on the tape: each output Tensor remembers the node that created it, and every node gets a global sequence
number. `backward(loss)` walks the recorded nodes in decreasing sequence number — the reverse of the order
they ran, which is a topological order — and hands each node the summed gradient of its outputs.

Hooks are where ZeRO plugs in (ZeRO-Infinity §5, DeepSpeed's stage 3 hooks):
- `Tensor.register_hook(fn)`: fn(grad) -> grad or None, when the tensor's gradient is complete;
- `Tensor.register_post_accumulate_grad_hook(fn)`: fn(tensor) after a leaf's `.grad` was updated —
  the moment stage 2 can reduce-scatter a gradient;
- module hooks (pre/post forward, pre/post backward) are built on these in nn.py.
"""
from __future__ import annotations

import contextlib
import itertools
import threading

import numpy as np

from .backend import get_backend

_state = threading.local()  # grad mode is per thread: simulated ranks run in threads
_sequence = itertools.count()


def is_grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def set_grad_enabled(mode: bool):
    """Record (True) or not (False) inside the block, on this thread."""
    prev = is_grad_enabled()
    _state.grad_enabled = bool(mode)
    try:
        yield
    finally:
        _state.grad_enabled = prev


def no_grad():
    """Run without recording: no node is kept, outputs do not require grad (evaluation, optimizer)."""
    return set_grad_enabled(False)


def enable_grad():
    """Record again inside a no_grad region (activation checkpointing's recompute in backward)."""
    return set_grad_enabled(True)


class Tensor:
    """An array (of the current backend) plus what autodiff needs to know about it."""

    def __init__(self, data, requires_grad=False, name=None):
        self.data = data
        self.requires_grad = requires_grad
        self.grad = None
        self.name = name
        self.creator: Function | None = None  # None for leaves
        self.output_index = 0                  # which output of `creator` this is
        self._hooks = []
        self._post_accumulate_grad_hooks = []

    # --- array facts
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    is_leaf = property(lambda self: self.creator is None)

    def __repr__(self):
        extra = f", name={self.name!r}" if self.name else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad}{extra})"

    def numpy(self) -> np.ndarray:
        return get_backend().to_numpy(self.data)

    def item(self) -> float:
        return float(self.numpy())

    def detach(self) -> Tensor:
        return Tensor(self.data)

    # --- hooks
    def register_hook(self, fn):
        """fn(grad) -> new grad or None; runs once, when this tensor's gradient is complete."""
        hooks = self._hooks
        if not self.is_leaf:  # a node does not reference its outputs, so their hooks live on the node
            node = self.creator
            if not getattr(node, "output_hooks", None):
                node.output_hooks = [[] for _ in node.grad_outputs]
            hooks = node.output_hooks[self.output_index]
        hooks.append(fn)
        return _Handle(hooks, fn)

    def register_post_accumulate_grad_hook(self, fn):
        """fn(tensor) after a leaf's .grad has been accumulated (PyTorch 2.1's hook of the same name)."""
        if not self.is_leaf:
            raise RuntimeError("post-accumulate-grad hooks only exist on leaf tensors")
        self._post_accumulate_grad_hooks.append(fn)
        return _Handle(self._post_accumulate_grad_hooks, fn)

    def backward(self, grad=None, retain_graph=False):
        backward(self, grad, retain_graph=retain_graph)

    # --- operators (defined in functional.py, attached there to avoid an import cycle)


class _Handle:
    """What register_*_hook returns: `.remove()` unregisters the hook."""

    def __init__(self, hooks, fn):
        self._hooks, self._fn = hooks, fn

    def remove(self):
        if self._fn in self._hooks:
            self._hooks.remove(self._fn)


class Function:
    """One differentiable operation: `forward` on arrays, `backward` on output gradients.

    Subclasses implement forward(self, *arrays, **params) -> array or tuple of arrays, saving on `self`
    what backward needs, and backward(self, *grad_outputs) -> one gradient (or None) per input.
    `self.backend` is the backend that ran forward; `self.needs_input_grad[i]` says which grads to compute.
    """

    #: Record this node even when no input requires grad, and run its backward even when no gradient
    #: reaches it (module backward hooks must fire for a module whose inputs are integer ids).
    always_record = False

    @classmethod
    def apply(cls, *inputs, **params):
        fn = cls()
        fn.backend = get_backend()
        fn.needs_input_grad = tuple(isinstance(x, Tensor) and x.requires_grad for x in inputs)
        arrays = [x.data if isinstance(x, Tensor) else x for x in inputs]
        raw = fn.forward(*arrays, **params)
        multi = isinstance(raw, tuple)
        record = is_grad_enabled() and (any(fn.needs_input_grad) or cls.always_record)
        outputs = tuple(Tensor(a, requires_grad=record) for a in (raw if multi else (raw,)))
        if record:
            fn.inputs = inputs
            fn.sequence_nr = next(_sequence)
            fn.grad_outputs = [None] * len(outputs)
            for i, out in enumerate(outputs):
                out.creator, out.output_index = fn, i
        return outputs if multi else outputs[0]

    def forward(self, *arrays, **params):
        raise NotImplementedError

    def input_data(self, i):
        """The array of input i *now*. Functions re-read parameters in backward instead of keeping the array
        forward saw: ZeRO stage 3 frees a parameter after forward and gathers it again before backward."""
        x = self.inputs[i]
        return x.data if isinstance(x, Tensor) else x

    def backward(self, *grad_outputs):
        raise NotImplementedError


def _graph(root: Tensor) -> tuple[list[Function], dict[int, int]]:
    """Every node reachable from root, in backward order, and how many gradients each leaf will get."""
    nodes, seen, stack = [], set(), [root.creator]
    leaf_uses: dict[int, int] = {}
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        if fn.sequence_nr < 0:
            raise RuntimeError("backward() through a graph that was already freed; pass retain_graph=True "
                               "to the first backward() to go through it twice")
        seen.add(id(fn))
        nodes.append(fn)
        for x in fn.inputs:
            if isinstance(x, Tensor) and x.requires_grad:
                if x.is_leaf:
                    leaf_uses[id(x)] = leaf_uses.get(id(x), 0) + 1
                else:
                    stack.append(x.creator)
    nodes.sort(key=lambda f: f.sequence_nr, reverse=True)  # reverse of execution order
    return nodes, leaf_uses


def _add(a, b, backend):
    """a + b by the backend of the node the gradient comes from (out of place: gradients may alias forward
    arrays)."""
    return b if a is None else backend.add(a, b)


def backward(root: Tensor, grad=None, retain_graph=False) -> None:
    """Accumulate d(root)/d(leaf) into every reachable leaf's `.grad` that requires grad."""
    if not root.requires_grad:
        raise RuntimeError("backward() on a tensor that does not require grad (was it made under no_grad?)")
    if grad is None:
        if root.size != 1:
            raise RuntimeError(f"backward() needs an explicit gradient for a non-scalar of shape {root.shape}")
        be = getattr(root.creator, "backend", None) or get_backend()   # a freed node has none: backward says so
        grad = be.xp.ones(root.shape, dtype=root.dtype)
    if root.is_leaf:
        _accumulate_leaf(root, grad, get_backend())
        return
    nodes, leaf_uses = _graph(root)
    pending_leaf: dict[int, object] = {}
    root.creator.grad_outputs[root.output_index] = grad
    for fn in nodes:
        be, grads = fn.backend, fn.grad_outputs
        if all(g is None for g in grads) and not fn.always_record:
            grad_inputs = (None,) * len(fn.inputs)  # no gradient reached this node (only integer paths)
        else:
            grads = [_run_hooks(hooks, g) for hooks, g in zip(_output_hooks(fn), grads)]
            grad_inputs = fn.backward(*grads)
            if not isinstance(grad_inputs, tuple):
                grad_inputs = (grad_inputs,)
        for x, g in zip(fn.inputs, grad_inputs):
            if not (isinstance(x, Tensor) and x.requires_grad):
                continue
            if x.is_leaf:
                pending_leaf[id(x)] = _add(pending_leaf.get(id(x)), g, be)
                leaf_uses[id(x)] -= 1
                if leaf_uses[id(x)] == 0 and pending_leaf[id(x)] is not None:
                    _accumulate_leaf(x, pending_leaf.pop(id(x)), be)  # its gradient is complete now
            elif g is not None:
                x.creator.grad_outputs[x.output_index] = _add(x.creator.grad_outputs[x.output_index], g, be)
        fn.grad_outputs = [None] * len(fn.grad_outputs)
        if not retain_graph:
            fn.__dict__.clear()  # free saved activations; the node cannot run backward again
            fn.grad_outputs, fn.inputs, fn.sequence_nr = [], (), -1


def _output_hooks(fn):
    return getattr(fn, "output_hooks", None) or [()] * len(fn.grad_outputs)


def _run_hooks(hooks, grad):
    for h in hooks:
        if grad is not None:
            new = h(grad)
            grad = grad if new is None else new
    return grad


def _accumulate_leaf(t: Tensor, grad, backend) -> None:
    grad = _run_hooks(t._hooks, grad)
    t.grad = _add(t.grad, grad, backend)
    for h in t._post_accumulate_grad_hooks:
        h(t)

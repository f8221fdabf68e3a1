"""Modules and parameters: Module (with PyTorch's four hook points), Linear, Embedding, LayerNorm, MLP.

Module hooks are how ZeRO stage 3 gathers a module's partitioned parameters just before the module runs
and releases them right after, in forward and again in backward (ZeRO-Infinity §5; DeepSpeed's
`deepspeed/runtime/zero/parameter_offload.py` registers exactly these four):
    forward pre-hook   hook(module, args) -> None or new args        before forward  (gather)
    forward hook       hook(module, args, output) -> None or output  after forward   (release)
    backward pre-hook  hook(module, grad_output)                     gradient reached the outputs (gather)
    backward hook      hook(module, grad_input, grad_output)         inputs' gradients done (release)
Backward hooks work as PyTorch's do: identity nodes wrap the module's tensor inputs and outputs on the
tape, so the tape calls them at the right moment.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from . import functional as F
from .autodiff import Function, Tensor, is_grad_enabled
from . import deferred_init
from .backend import get_backend


class Parameter(Tensor):
    """A leaf tensor that requires grad and belongs to a module."""

    def __init__(self, data, name=None):
        super().__init__(data, requires_grad=True, name=name)


class Module:
    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_hooks", {"forward_pre": [], "forward": [], "backward_pre": [], "backward": []})

    def __setattr__(self, name, value):
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------------------------------------ call
    def __call__(self, *args):
        for hook in self._hooks["forward_pre"]:
            new = hook(self, args)
            args = args if new is None else (new if isinstance(new, tuple) else (new,))
        wants_backward_hooks = is_grad_enabled() and (self._hooks["backward_pre"] or self._hooks["backward"])
        if wants_backward_hooks:
            state = _BackwardHookState(self)
            args = _wrap(_PostBackwardHook, state, args)
        out = self.forward(*args)
        for hook in self._hooks["forward"]:
            new = hook(self, args, out)
            out = out if new is None else new
        if wants_backward_hooks:
            wrapped = _wrap(_PreBackwardHook, state, out if isinstance(out, tuple) else (out,))
            out = wrapped if isinstance(out, tuple) else wrapped[0]
        return out

    def forward(self, *args):
        raise NotImplementedError

    def register_forward_pre_hook(self, hook):
        return self._add_hook("forward_pre", hook)

    def register_forward_hook(self, hook):
        return self._add_hook("forward", hook)

    def register_full_backward_pre_hook(self, hook):
        return self._add_hook("backward_pre", hook)

    def register_full_backward_hook(self, hook):
        return self._add_hook("backward", hook)

    def _add_hook(self, kind, hook):
        from .autodiff import _Handle
        self._hooks[kind].append(hook)
        return _Handle(self._hooks[kind], hook)

    # -------------------------------------------------------------------------------------- traversal
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [m for _, m in self.named_modules()]

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) in registration order — the order flat buffers use."""
        for mname, m in self.named_modules(prefix):
            for pname, p in m._parameters.items():
                yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def state_dict(self) -> dict[str, np.ndarray]:
        from .deferred_init import materialize   # a deferred parameter is drawn here
        be = get_backend()
        return {name: np.array(be.to_numpy(materialize(p.data))) for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict) -> None:
        """Copy arrays into the parameters; names and shapes must match exactly."""
        params = dict(self.named_parameters())
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        be = get_backend()
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"state dict entry {name!r} has shape {tuple(state[name].shape)}, model has {tuple(p.shape)}")
            p.data[...] = be.asarray(state[name]).astype(p.dtype)


class ModuleList(Module):
    def __init__(self, modules=()):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return self._modules[str(i)]


# ----------------------------------------------------------------------------------- backward hooks
class _BackwardHookState:
    """Shared by the two identity nodes of one module call: the pre node saves grad_output for the post."""

    def __init__(self, module):
        self.module, self.grad_output = module, None


def _wrap(node_cls, state, values):
    """Pass the Tensors among `values` through one identity node; other values pass unchanged."""
    idx = [i for i, v in enumerate(values) if isinstance(v, Tensor)]
    if not idx and node_cls is _PostBackwardHook:
        # A module fed only arrays (token ids) still needs its post-backward node on the tape, so the
        # node must sit on the path of its inputs: carry them as (gradient-free) Tensors through it.
        values = tuple(Tensor(v) if hasattr(v, "shape") else v for v in values)
        idx = [i for i, v in enumerate(values) if isinstance(v, Tensor)]
    if not idx:
        return values
    outs = node_cls.apply(state, *[values[i] for i in idx])
    outs = outs if isinstance(outs, tuple) else (outs,)
    values = list(values)
    for i, o in zip(idx, outs):
        values[i] = o
    return tuple(values)


class _PreBackwardHook(Function):
    """Identity on the module's outputs; its backward runs when the gradient reaches the module."""

    def forward(self, state, *xs):
        self.state = state
        return xs if len(xs) > 1 else xs[0]

    def backward(self, *grads):
        self.state.grad_output = grads
        for hook in self.state.module._hooks["backward_pre"]:
            hook(self.state.module, grads)
        return (None, *grads)


class _PostBackwardHook(Function):
    """Identity on the module's inputs; its backward runs once every op of the module has run backward.

    Recorded even when the inputs need no gradient (token ids), so the hook still fires."""

    always_record = True

    def forward(self, state, *xs):
        self.state = state
        return xs if len(xs) > 1 else xs[0]

    def backward(self, *grads):
        for hook in self.state.module._hooks["backward"]:
            hook(self.state.module, grads, self.state.grad_output)
        return (None, *grads)


# --------------------------------------------------------------------------------------------- layers
def _init(rng, shape, std, dtype):
    """Normal(0, std) from the parameter's own random stream, seeded from the model's rng in construction order
    (refimpl/deferred_init.py): drawn in float64 on the host, then cast, so the weights are the same on every
    backend and dtype. Inside `deferred()` (zero.Init) the draw waits until the parameter's owner wants it."""
    seed = int(rng.integers(2**63)) if std > 0 else None   # zeros draw nothing
    if deferred_init.is_active():
        return deferred_init.DeferredInit(shape, std, seed, dtype)
    return get_backend().asarray(deferred_init.draw(shape, std, seed)).astype(dtype)


def _constant(shape, fill, dtype):
    """A constant parameter (LayerNorm's ones and zeros), deferred like every other."""
    if deferred_init.is_active():
        return deferred_init.DeferredInit(shape, dtype=dtype, fill=fill)
    return get_backend().asarray(np.full(shape, fill, np.float32)).astype(dtype)


class Linear(Module):
    """y = x W^T + b with W (out_features, in_features), as torch.nn.Linear."""

    def __init__(self, in_features, out_features, bias=True, *, rng, std=0.02, dtype=np.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(_init(rng, (out_features, in_features), std, dtype))
        self.bias = Parameter(_init(rng, (out_features,), 0.0, dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Embedding(Module):
    def __init__(self, num_embeddings, embedding_dim, *, rng, std=0.02, dtype=np.float32):
        super().__init__()
        self.weight = Parameter(_init(rng, (num_embeddings, embedding_dim), std, dtype))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class LayerNorm(Module):
    def __init__(self, dim, eps=1e-5, *, dtype=np.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(_constant((dim,), 1.0, dtype))
        self.bias = Parameter(_constant((dim,), 0.0, dtype))

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class MLP(Module):
    """The transformer's feed-forward block: Linear -> GELU -> Linear (d_model -> d_ff -> d_model)."""

    def __init__(self, d_model, d_ff, *, rng, std=0.02, out_std=0.02, dtype=np.float32):
        super().__init__()
        self.fc1 = Linear(d_model, d_ff, rng=rng, std=std, dtype=dtype)
        self.fc2 = Linear(d_ff, d_model, rng=rng, std=out_std, dtype=dtype)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))

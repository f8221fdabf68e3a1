"""Activation checkpointing: keep a block's inputs, recompute its activations in backward.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost": instead of keeping every intermediate of a
block on the tape until backward, run the block's forward *without recording*, keep only its inputs (the
"checkpoint"), and when backward reaches the block, run its forward again with recording on and backpropagate
through that fresh sub-graph. Memory drops from all activations of all blocks to the blocks' inputs plus one
block's activations, for the price of one extra forward per block. This is DeepSpeed's
`deepspeed.checkpointing.checkpoint(function, *args)` (the "reentrant" form, as in PyTorch's
`torch.utils.checkpoint(use_reentrant=True)`):

    forward:   outputs = function(*args)      under no_grad; the node saves args          (the checkpoint)
    backward:  outputs = function(*args')     recorded, args' = the saved args as fresh leaves
               backward(outputs, grad_outputs) -> parameters' .grad accumulate as usual; args'.grad
               return args'.grad                                   -> handed on down the outer tape

`cpu_checkpointing=True` (DeepSpeed's `activation_checkpointing.cpu_checkpointing`; ZeRO-Infinity §5.1.2)
moves the saved inputs to the host tier right after forward and brings them back just before recomputation,
so device memory holds no checkpoints at all. The host tier is handed in (`host`): the engine gives the model
one whose copies run on its copy stream, are recorded by its ledger and charged to its host budget
(refimpl/memory/transfer.py, OffloadedCheckpoints). On the NumPy backend host and device are the same RAM, on
a GPU backend it is a real device->host transfer.

There is no random-number state to save and restore: refimpl has no dropout, so a block's forward is a pure
function of its inputs and parameters and the recomputation sees exactly what forward saw (DeepSpeed and
PyTorch save and restore the RNG state so that dropout draws the same masks twice). That is also why the
gradients are bitwise those of the run without checkpointing.

Two facts of refimpl's autodiff shape this file:
- A node keeps its input Tensors (to find their producers in backward), and with them their arrays. The
  checkpoint node swaps each non-leaf input for a data-less *edge* (same producer, same output index), so
  after offload the tape really holds no device copy of the checkpoint.
- The recomputed sub-graph's leaves are the real Parameters, so its backward accumulates their `.grad` and
  fires their post-accumulate-grad hooks (ZeRO stage 2/3 reduce-scatter there). A parameter used only inside
  one checkpointed call gets its whole gradient from that one inner backward: its hook fires once, with the
  gradient complete, as without checkpointing. A parameter used in two checkpointed calls, or inside and
  outside one, ends with the right `.grad` but its hook fires once per backward that touched it (PyTorch's
  reentrant checkpoint has the same limit; its non-reentrant form fixes it).

ZeRO stage 3 needs nothing special: the recomputation calls the block's modules again, so their forward hooks
gather and release parameters again, inside backward, at the same place in every pass, and the prefetch
coordinator's trace (refimpl/zero/prefetch.py) records and replays the same sequence every pass. The
no_grad forward is fetched on demand, like evaluation.
"""
from __future__ import annotations

from . import autodiff
from .autodiff import Function, Tensor, enable_grad, is_grad_enabled, no_grad


def checkpoint(function, *args, cpu_checkpointing: bool = False, host=None):
    """Run function(*args) without recording its graph; keep only the inputs (the 'checkpoint').

    In backward, re-run function(*args) with recording on (from the saved inputs, detached, requires_grad as
    the originals), backprop the incoming gradient through it, and hand back the inputs' gradients;
    parameters used inside get their .grad (and post-accumulate-grad hooks) as without checkpointing.

    function: a callable (typically a Module, e.g. a transformer Block) returning a Tensor or a tuple of
        Tensors. It must compute the same thing when called twice on the same inputs (no randomness).
    args: Tensors (checkpointed) and anything else (masks, flags, None), passed through unchanged.
    cpu_checkpointing: move the saved Tensor inputs to the host tier after forward (DeepSpeed's
        `cpu_checkpointing`); the node's `offloaded_bytes` says how many bytes went.
    host: where offloaded inputs go (needed with cpu_checkpointing): an object with store(array) -> handle and
        load(handle) -> array, and optionally release(array), called once the recomputation's backward has
        been issued (refimpl/memory/transfer.py, OffloadedCheckpoints).
    Under no_grad there is no backward to prepare for: function(*args) is simply called.
    """
    if not callable(function):
        raise ValueError(f"checkpoint() needs a callable function (a Module or a function), got {function!r}")
    if not isinstance(cpu_checkpointing, bool):
        raise ValueError(f"cpu_checkpointing must be True or False, got {cpu_checkpointing!r}")
    if host is not None and not (callable(getattr(host, "store", None)) and callable(getattr(host, "load", None))):
        raise ValueError(f"host must have store(array) -> handle and load(handle) -> array methods, got {host!r}")
    if cpu_checkpointing and host is None:
        raise ValueError("cpu_checkpointing=True needs a host tier to keep the inputs in (host=...); the engine "
                         "gives its model one (OffloadedCheckpoints, refimpl/memory/transfer.py)")
    if not is_grad_enabled():
        return function(*args)
    outputs = CheckpointFunction.apply(function, *args, is_tensor=tuple(isinstance(a, Tensor) for a in args),
                                       cpu_checkpointing=cpu_checkpointing, host=host)
    node = (outputs[0] if isinstance(outputs, tuple) else outputs).creator
    node.inputs = tuple(_edge(x) for x in node.inputs)  # the tape keeps the checkpoint only through the node
    return outputs


class CheckpointFunction(Function):
    """The tape node of one checkpointed call: forward runs `function` unrecorded, backward recomputes it.

    Recorded even when no input requires grad (a checkpointed embedding takes integer ids): the parameters
    inside still need their gradients. If no gradient reaches the node, backward does not recompute.
    """

    always_record = True

    def forward(self, function, *args, is_tensor, cpu_checkpointing, host):
        self.function, self.is_tensor = function, is_tensor
        with no_grad():
            outputs = function(*[Tensor(a) if t else a for a, t in zip(args, is_tensor)])
        self.multi = isinstance(outputs, tuple)
        outputs = outputs if self.multi else (outputs,)
        if not outputs or not all(isinstance(o, Tensor) for o in outputs):
            raise ValueError(f"a checkpointed function must return a Tensor or a tuple of Tensors, got "
                             f"{[type(o).__name__ for o in outputs]} from {function!r}")
        self.args = list(args)          # the checkpoint: Tensor inputs' arrays, other args as they came
        self.host, self.handles, self.offloaded_bytes = None, {}, 0
        if cpu_checkpointing:
            self.host = host
            for i, t in enumerate(is_tensor):
                if t:
                    self.handles[i] = self.host.store(self.args[i])
                    self.offloaded_bytes += self.args[i].nbytes
                    self.args[i] = None     # no device reference left on this node
        out = tuple(o.data for o in outputs)
        return out if self.multi else out[0]

    def backward(self, *grad_outputs):
        nothing = (None,) * (1 + len(self.args))  # one per input: function, *args
        if all(g is None for g in grad_outputs):
            return nothing
        for i, handle in list(self.handles.items()):  # host -> device, just before recomputation
            self.args[i] = self.host.load(handle)
            del self.handles[i]  # kept on device from here on: a retain_graph backward can run again
        inputs = [Tensor(a, requires_grad=self.needs_input_grad[1 + i]) if t else a
                  for i, (a, t) in enumerate(zip(self.args, self.is_tensor))]
        with enable_grad():    # record the recomputation even if backward was called under no_grad
            outputs = self.function(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        seeded = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        if len(seeded) == 1:
            autodiff.backward(*seeded[0])
        elif seeded:  # autodiff.backward takes one root: join the outputs under one
            autodiff.backward(_Seed.apply(*[o for o, _ in seeded], grads=tuple(g for _, g in seeded)))
        release = getattr(self.host, "release", None)
        if release is not None:          # the loaded inputs' readers are all issued now
            for i, t in enumerate(self.is_tensor):
                if t:
                    release(self.args[i])
        return (None, *[x.grad if isinstance(x, Tensor) else None for x in inputs])


class _Seed(Function):
    """A scalar that depends on several recomputed outputs; its backward hands each one its gradient."""

    def forward(self, *outputs, grads):
        self.grads = grads
        return self.backend.zeros((), outputs[0].dtype)

    def backward(self, g):
        return self.grads


def _edge(x):
    """What the checkpoint node keeps of input x: x itself if it is a leaf that collects a gradient (or not
    a Tensor at all), else a Tensor without data that points at x's producer exactly as x does — the
    backward pass routes gradients by producer and output index only, so nothing else is needed."""
    if not isinstance(x, Tensor) or (x.is_leaf and x.requires_grad):
        return x
    edge = Tensor(None, requires_grad=x.requires_grad, name=x.name)
    edge.creator, edge.output_index = x.creator, x.output_index
    return edge

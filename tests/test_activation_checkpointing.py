"""Tests of activation checkpointing (refimpl/activation_checkpointing.py; Chen et al. 2016, DeepSpeed's
`deepspeed.checkpointing.checkpoint`, ZeRO-Infinity §5.1.2 for the CPU offload of checkpoints).

Oracles: the same model run *without* checkpointing (refimpl has no dropout, so recomputation must give the
very same bits: loss, every parameter gradient, and the order in which gradients complete); float64 central
differences for a small checkpointed function with two outputs; memory as bytes counted here by walking the
tape, against sizes computed here from the model's dimensions; under ZeRO stages 2-3 on two simulated ranks,
whole training runs with and without checkpointing compared bit for bit.
"""
import contextlib
import functools
import warnings

import numpy as np
import pytest

import refimpl.functional as F
from refimpl.activation_checkpointing import CheckpointFunction, checkpoint
from refimpl.autodiff import Tensor, no_grad
from refimpl.backend import get_backend, use_backend
from refimpl.comm.local import run_ranks
from refimpl.config import load_config
from refimpl.engine import Engine
from refimpl.memory.ledger import Ledger
from refimpl.memory.transfer import CopyStream, OffloadedCheckpoints
from refimpl.model import Block, ModelConfig, Transformer
from refimpl.nn import Linear, Module, Parameter
from refimpl.train import build, rank_slice
from refimpl.zero import ZeroParamStatus

from batches import N_CLASSES, V, classify_batch, lm_batch
from gradcheck import gradcheck

C, L = 16, 3


def model_config(**kw):
    base = dict(vocab_size=V, n_layers=L, n_heads=2, d_model=C, max_seq_len=12, n_classes=N_CLASSES,
                attention_block_size=3)
    return ModelConfig(**{**base, **kw})


def host_tier(ledger=None):
    """The host tier an engine gives cpu_checkpointing: pinned buffers on a copy stream, charged to a budget."""
    return OffloadedCheckpoints(CopyStream(get_backend(), ledger or Ledger()))


@contextlib.contextmanager
def checkpointed_blocks(**options):
    """Route every Block call through checkpoint(), as a model with activation checkpointing on does.
    Yields the list of blocks called, so a test can tell that checkpointing really happened."""
    calls = []
    if options.get("cpu_checkpointing") and "host" not in options:
        options["host"] = host_tier()

    def call(block, *args):
        calls.append(block)
        return checkpoint(functools.partial(Module.__call__, block), *args, **options)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Block, "__call__", call)
        yield calls


def optional(ctx, on):
    return ctx if on else contextlib.nullcontext()


def loss_and_grads(model, batch, ckpt=None):
    """(loss, {name: grad}) of one forward + backward; ckpt=None: plain, else checkpoint() options."""
    model.zero_grad()
    with optional(checkpointed_blocks(**(ckpt or {})), ckpt is not None) as calls:
        loss, _ = model.loss(batch)
        loss.backward()
    if ckpt is not None:
        assert len(calls) == model.cfg.n_layers       # premise: every block went through checkpoint()
    return loss.numpy().copy(), {n: p.grad.copy() for n, p in model.named_parameters()}


def tape_nodes(root):
    nodes, seen, stack = [], set(), [root.creator]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        nodes.append(fn)
        stack += [x.creator for x in fn.inputs if isinstance(x, Tensor)]
    return nodes


def tape_bytes(root) -> int:
    """Bytes of distinct arrays the tape keeps alive from `root`: arrays in the nodes' attributes (saved
    arrays, input Tensors' data, inside tuples/lists/dicts), parameters excluded, each memory block counted
    once (a view keeps its whole base alive). Objects of other kinds (modules, host stores) are not entered."""
    blocks = {}

    def visit(v):
        if isinstance(v, np.ndarray):
            while isinstance(v.base, np.ndarray):
                v = v.base
            blocks[id(v)] = v
        elif isinstance(v, Tensor) and not isinstance(v, Parameter):
            visit(v.data)
        elif isinstance(v, (tuple, list)):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)

    for fn in tape_nodes(root):
        for v in vars(fn).values():
            visit(v)
    return sum(b.nbytes for b in blocks.values())


# ------------------------------------------------------------------------------- 1. same bits, less tape
@pytest.mark.parametrize("cpu_checkpointing", [False, True])
@pytest.mark.parametrize("task, attention", [("lm", "plain"), ("lm", "tiled"), ("classify", "plain")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_checkpointed_transformer_gives_the_same_loss_and_gradients_bitwise(dtype, task, attention,
                                                                            cpu_checkpointing):
    model = Transformer(model_config(task=task, attention=attention), seed=1, dtype=dtype)
    batch = lm_batch() if task == "lm" else classify_batch()
    want_loss, want = loss_and_grads(model, batch)
    got_loss, got = loss_and_grads(model, batch, {"cpu_checkpointing": cpu_checkpointing})
    assert got_loss.dtype == dtype
    np.testing.assert_array_equal(got_loss, want_loss)
    for name in want:
        assert got[name].dtype == dtype
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # every block parameter received a gradient that is not trivially zero
    assert all(np.abs(g).max() > 0 for n, g in got.items() if n.startswith("blocks.") and "k_proj.bias" not in n)


def test_the_tape_holds_checkpoint_nodes_instead_of_the_blocks_ops():
    model = Transformer(model_config(), seed=0)
    with checkpointed_blocks():
        loss, _ = model.loss(lm_batch())
    ckpt_nodes = [fn for fn in tape_nodes(loss) if isinstance(fn, CheckpointFunction)]
    plain_loss, _ = model.loss(lm_batch())
    assert len(ckpt_nodes) == L
    # per block, the plain tape has layer norms, 4 projections, attention, GELU, ...: many more nodes
    assert len(tape_nodes(plain_loss)) - len(tape_nodes(loss)) >= L * (10 - 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_checkpointing_keeps_fewer_bytes_on_the_tape_and_offload_moves_exactly_the_block_inputs(dtype):
    cfg = model_config()
    model = Transformer(cfg, seed=0, dtype=dtype)
    batch = lm_batch(B=2, T=7)
    B, T = batch.ids.shape
    item = np.dtype(dtype).itemsize
    block_input = B * T * C * item                     # x entering a block: (B, T, C)

    plain, _ = model.loss(batch)
    with checkpointed_blocks():
        ckpt, _ = model.loss(batch)
    host = host_tier()
    with checkpointed_blocks(cpu_checkpointing=True, host=host):
        offl, _ = model.loss(batch)

    # Without checkpointing each block keeps at least its MLP hidden layer twice on the tape: fc1's output
    # (saved by GELU) and GELU's output (saved by fc2), each (B, T, 4C).
    assert tape_bytes(plain) - tape_bytes(ckpt) >= L * 2 * B * T * 4 * C * item
    # Offload moves every block's input to the host tier, and the tape keeps no device copy of it.
    assert host.bytes_stored == host.resident_bytes == L * block_input
    nodes = [fn for fn in tape_nodes(offl) if isinstance(fn, CheckpointFunction)]
    assert [fn.offloaded_bytes for fn in nodes] == [block_input] * L
    assert tape_bytes(ckpt) - tape_bytes(offl) == L * block_input
    # Backward brings every checkpoint back, once.
    offl.backward()
    assert host.bytes_loaded == L * block_input and host.resident_bytes == 0


def test_offload_stores_each_block_input_and_loads_it_back_in_reverse_block_order():
    class RecordingHost:  # the protocol checkpoint() relies on: store(array) -> handle, load(handle) -> array
        def __init__(self):
            self.stored, self.loaded = {}, []

        def store(self, array):
            handle = f"h{len(self.stored)}"
            self.stored[handle] = array.copy()
            return handle

        def load(self, handle):
            self.loaded.append(handle)
            return self.stored[handle].copy()

    model = Transformer(model_config(task="classify"), seed=0)
    batch = classify_batch()
    seen_inputs = []
    handles = [b.register_forward_pre_hook(lambda m, args: seen_inputs.append(args[0].numpy().copy()))
               for b in model.blocks]
    host = RecordingHost()
    with checkpointed_blocks(cpu_checkpointing=True, host=host):
        loss, _ = model.loss(batch)
        assert len(seen_inputs) == L
        for want, got in zip(seen_inputs, host.stored.values()):
            np.testing.assert_array_equal(got, want)
        loss.backward()
    assert host.loaded == ["h2", "h1", "h0"]          # backward reaches the last block first
    for h in handles:
        h.remove()


# ------------------------------------------------------------------------------------- 2. gradient hooks
def test_post_accumulate_grad_hooks_fire_once_per_parameter_with_the_complete_gradient():
    """A block parameter gets its gradient from the inner (recomputation) backward only: one hook call, after
    the gradient is whole, and in the same order as without checkpointing (ZeRO stage 2 buckets by it)."""
    model = Transformer(model_config(), seed=0)
    batch = lm_batch()
    log = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: log.append((name, p.grad.copy())))
    _, plain = loss_and_grads(model, batch)
    plain_log, log[:] = list(log), []
    _, ckpt = loss_and_grads(model, batch, {})
    names = [n for n, _ in log]
    assert len(names) == len(set(names)) == len(plain)               # once each
    assert names == [n for n, _ in plain_log]                        # in the same order
    for name, grad_at_hook in log:
        np.testing.assert_array_equal(grad_at_hook, ckpt[name])      # complete when the hook ran
        np.testing.assert_array_equal(grad_at_hook, plain[name])


def test_a_parameter_shared_by_two_checkpointed_calls_and_the_outside_gets_the_sum_of_its_gradients():
    rng = np.random.default_rng(0)
    lin = Linear(4, 4, rng=rng, std=0.5, dtype=np.float64)
    x0 = rng.standard_normal((3, 4))

    def run(ckpt):
        lin.zero_grad()
        x = Tensor(x0.copy(), requires_grad=True)
        f = (lambda *a: checkpoint(lambda t: F.gelu(lin(t)), *a)) if ckpt else (lambda t: F.gelu(lin(t)))
        y = lin(f(f(x)))                                             # lin used three times
        (y * y).sum().backward()
        return x.grad, lin.weight.grad, lin.bias.grad

    for got, want in zip(run(True), run(False)):
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


# ------------------------------------------------------------------------------------ 3. the node itself
def test_two_output_function_matches_finite_differences():
    """A checkpointed function of two Tensors, a mask it passes through and a closed-over Parameter, with
    two outputs (one backward through both): d/d(x, y, W) against float64 central differences."""
    rng = np.random.default_rng(3)
    W = Parameter(rng.standard_normal((4, 5)))
    mask = rng.random((3, 5)) > 0.5
    seen = []

    def f(x, m, y):
        seen.append(m)
        h = F.gelu(x @ W)                                            # (3, 5)
        return h * Tensor(m.astype(np.float64)), h * y + x @ W

    def loss(inputs):
        x, y = inputs[0], inputs[1]
        a, b = checkpoint(f, x, mask, y)
        return (a * b).sum() + (a * a).sum()

    gradcheck(loss, [rng.standard_normal((3, 4)), rng.standard_normal((3, 5)), W])
    assert seen and all(m is mask for m in seen)                   # the non-Tensor arg, unchanged, every time


def test_inputs_that_need_no_gradient_still_give_the_parameters_inside_theirs():
    """A checkpointed embedding takes integer ids: no input requires grad, the weight still needs its own."""
    model = Transformer(model_config(), seed=0)
    ids = lm_batch().ids
    for ckpt in (False, True):
        model.zero_grad()
        out = checkpoint(model.tok_emb, ids) if ckpt else model.tok_emb(ids)
        (out * out).sum().backward()
        if not ckpt:
            want = model.tok_emb.weight.grad.copy()
    np.testing.assert_array_equal(model.tok_emb.weight.grad, want)
    assert np.abs(want).max() > 0


def test_inputs_that_do_not_require_grad_get_none_and_those_that_do_get_theirs():
    rng = np.random.default_rng(0)
    a = Tensor(rng.standard_normal((2, 3)), requires_grad=True)
    b = Tensor(rng.standard_normal((2, 3)))                          # a constant
    out = checkpoint(lambda p, q: p * q, a, b)
    out.sum().backward()
    np.testing.assert_array_equal(a.grad, b.data)                   # d(sum a*b)/da = b
    assert b.grad is None


def test_retain_graph_backward_twice_doubles_the_gradients_even_after_offload():
    model = Transformer(model_config(), seed=0, dtype=np.float64)
    _, once = loss_and_grads(model, lm_batch())
    model.zero_grad()
    with checkpointed_blocks(cpu_checkpointing=True):
        loss, _ = model.loss(lm_batch())
        loss.backward(retain_graph=True)
        loss.backward()
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.grad, 2 * once[name], err_msg=name)  # g + g == 2g exactly


def test_under_no_grad_checkpoint_is_a_plain_call():
    x = Tensor(np.ones((2, 2)), requires_grad=True)
    host = host_tier()
    with no_grad():
        out = checkpoint(lambda t: t * 3.0, x, cpu_checkpointing=True, host=host)
    assert out.creator is None and not out.requires_grad and host.bytes_stored == 0
    np.testing.assert_array_equal(out.data, 3 * np.ones((2, 2)))


def test_a_stored_checkpoint_loads_once_and_is_charged_to_the_host_budget_and_ledger():
    ledger = Ledger(limits={"host": 100})
    host = host_tier(ledger)
    h = host.store(np.arange(6.0).reshape(2, 3))
    assert ledger.budget.used["host"] == 48 and host.resident_bytes == 48
    with pytest.raises(MemoryError, match="memory.host_bytes=100 .* activation checkpoint"):
        host.store(np.zeros(8))                        # 48 + 64 > 100
    np.testing.assert_array_equal(host.load(h), np.arange(6.0).reshape(2, 3))
    assert ledger.budget.used["host"] == 0
    pairs = [(e["src"], e["dst"], e["nbytes"]) for e in ledger.events if e["kind"] == "transfer"]
    assert pairs == [("device", "host", 48), ("host", "device", 48)]
    with pytest.raises(ValueError, match="handle"):
        host.load(h)


@pytest.mark.parametrize("call, match", [
    (lambda x: checkpoint("not a function", x), "callable"),
    (lambda x: checkpoint(lambda t: t.data, x), "must return a Tensor"),
    (lambda x: checkpoint(lambda t: t, x, cpu_checkpointing="yes"), "cpu_checkpointing"),
    (lambda x: checkpoint(lambda t: t, x, cpu_checkpointing=True, host=object()), "store"),
    (lambda x: checkpoint(lambda t: t, x, cpu_checkpointing=True), "needs a host tier"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call(Tensor(np.ones(3), requires_grad=True))


# --------------------------------------------------------------------------------- 4. under ZeRO stage 2/3
STEPS, GLOBAL_B, T = 3, 8, 16


def zero_config(stage, gas, world_size=2):
    return load_config(None, [
        "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.max_seq_len=16", f"data.seq_len={T}",
        "data.max_bytes=200000", "scheduler=null", "optimizer.params.lr=1e-3", f"zero_optimization.stage={stage}",
        "zero_optimization.stage3_param_persistence_threshold=0", f"world_size={world_size}",
        f"train_micro_batch_size_per_gpu={GLOBAL_B // world_size}", f"gradient_accumulation_steps={gas}"])


def _train_rank(comm, stage, gas):
    """STEPS optimizer steps; per step: the local losses, every parameter's status, the coordinator stats."""
    cfg = zero_config(stage, gas, comm.world_size)
    be, dataset, model = build(cfg)
    out = {"losses": [], "status": [], "stats": []}
    with use_backend(be):
        engine = Engine(model, cfg, be, comm)
        coordinator = getattr(engine.zero, "coordinator", None)
        for step in range(STEPS):
            before = dict(coordinator.stats) if coordinator else {}
            for micro in range(gas):
                batch = dataset.get_batch("train", step * gas + micro, GLOBAL_B, T)
                loss, _ = model.loss(rank_slice(batch, comm.rank, comm.world_size))
                engine.backward(loss)
                out["losses"].append(loss.numpy().copy())
            assert engine.step()
            out["status"].append({n: (p.ds_status, p.data.size) for n, p in model.named_parameters()}
                                 if stage == 3 else {})
            if coordinator:
                out["stats"].append({k: v - before[k] for k, v in coordinator.stats.items()})
        out["state"] = engine.zero.full_state()
    return out


@pytest.mark.parametrize("stage, gas, cpu_checkpointing", [(3, 1, False), (3, 2, True), (2, 2, False)])
def test_zero_training_with_checkpointed_blocks_equals_training_without_bitwise(stage, gas, cpu_checkpointing):
    plain = run_ranks(2, _train_rank, stage, gas)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with checkpointed_blocks(cpu_checkpointing=cpu_checkpointing) as calls:
            ckpt = run_ranks(2, _train_rank, stage, gas)
    assert len(calls) == 2 * STEPS * gas * 2                     # ranks x micro-steps x blocks
    assert not [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    for rank, (a, b) in enumerate(zip(ckpt, plain)):
        for la, lb in zip(a["losses"], b["losses"]):
            np.testing.assert_array_equal(la, lb)
        for key in b["state"]:
            for name in b["state"][key]:
                np.testing.assert_array_equal(a["state"][key][name], b["state"][key][name],
                                              err_msg=f"rank {rank}: {key} of {name}")
        for snapshot in a["status"]:                             # stage 3: only chunks remain after each step
            for name, (status, size) in snapshot.items():
                assert status is ZeroParamStatus.NOT_AVAILABLE and size == 0, (rank, name)
        if stage == 3:
            assert all(s["trace_invalidations"] == 0 for s in a["stats"])
            assert a["stats"][1] == a["stats"][2]                # the replayed passes are the same every time
            assert a["stats"][1]["prefetched"] > 0               # and the trace is used to prefetch

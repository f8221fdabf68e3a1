"""Tests of the autodiff engine (refimpl/autodiff.py) and of the module hooks built on it (refimpl/nn.py).

What ZeRO relies on is tested as a property of the tape:
- stage 2 reduce-scatters a gradient from `register_post_accumulate_grad_hook`, so that hook must fire
  exactly once per leaf and backward, only when the leaf's gradient is complete, last-used leaf first;
- stage 3 gathers/releases parameters from the four module hooks, and its prefetcher replays the order
  recorded on the first step, so the backward trace must be the exact mirror of the forward trace.
Expected values are written out by hand or computed with numpy formulas in the test.
"""
import threading

import numpy as np
import pytest

import refimpl.functional as F
from refimpl.autodiff import Tensor, is_grad_enabled, no_grad
from refimpl.model import ModelConfig, Transformer
from refimpl.nn import MLP, Embedding, LayerNorm, Linear, Module


def leaf(values):
    return Tensor(np.asarray(values, dtype=np.float64), requires_grad=True)


def rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------- accumulation
def test_grad_accumulates_across_two_backward_calls():
    x, w = leaf([1.0, -2.0, 3.0]), np.array([0.5, 4.0, -1.0])
    for expected in (w, 2 * w):
        F.sum(F.mul(x, Tensor(w))).backward()
        np.testing.assert_array_equal(x.grad, expected)


def test_tensor_used_twice_in_one_op_gets_both_gradients():
    x = leaf([1.5, -2.0])
    F.sum(F.mul(x, x)).backward()  # d(x*x)/dx = 2x
    np.testing.assert_array_equal(x.grad, [3.0, -4.0])


def test_tied_weight_gets_the_sum_of_both_uses():
    x = rng().standard_normal((4, 3))
    w = leaf(rng(1).standard_normal((3, 3)))
    h = F.linear(Tensor(x), w)          # h = x W^T
    y = F.linear(h, w)                  # y = h W^T
    g = rng(2).standard_normal((4, 3))
    y.backward(g)
    W = w.data
    # dL/dW = g^T h (second use) + (g W)^T x (first use)
    np.testing.assert_allclose(w.grad, g.T @ (x @ W.T) + (g @ W).T @ x, rtol=1e-12)


def test_leaf_that_does_not_reach_the_loss_gets_no_grad_and_no_hook():
    x, unused = leaf([1.0, 2.0]), leaf([3.0])
    fired = []
    unused.register_post_accumulate_grad_hook(fired.append)
    F.mul(unused, 2.0)  # recorded, but not part of the loss's graph
    F.sum(x).backward()
    assert unused.grad is None and fired == []


def test_detach_cuts_the_graph():
    x = leaf([2.0])
    y = F.mul(x.detach(), x)  # only the second factor is differentiated
    y.backward(np.ones(1))
    np.testing.assert_array_equal(x.grad, [2.0])


# ------------------------------------------------------------------------------------------ no_grad
def test_no_grad_records_nothing_and_nests():
    x = leaf([1.0, 2.0])
    assert is_grad_enabled()
    with no_grad():
        y = F.mul(x, x)
        with no_grad():
            assert not is_grad_enabled()
        assert not is_grad_enabled()  # leaving the inner block keeps the outer one in force
        z = F.sum(y)
    assert is_grad_enabled()
    for t in (y, z):
        assert not t.requires_grad and t.creator is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        z.backward()


def test_no_grad_is_restored_after_an_exception():
    with pytest.raises(KeyError):
        with no_grad():
            raise KeyError("boom")
    assert is_grad_enabled()


def test_no_grad_is_thread_local():
    """Simulated ranks run in threads: one rank's no_grad must not switch off another's tape."""
    x = leaf([3.0])
    seen = {}

    def worker():
        seen["enabled"] = is_grad_enabled()
        y = F.mul(x, x)
        seen["recorded"] = y.requires_grad and y.creator is not None

    with no_grad():
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert not is_grad_enabled()
    assert seen == {"enabled": True, "recorded": True}


def test_no_grad_in_another_thread_does_not_leak_here():
    inside, release = threading.Event(), threading.Event()

    def worker():
        with no_grad():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    try:
        assert is_grad_enabled()
        assert F.mul(leaf([1.0]), 2.0).requires_grad
    finally:
        release.set()
        t.join()


# ---------------------------------------------------------------------------------- backward errors
def test_backward_on_non_scalar_without_grad_errors():
    y = F.mul(leaf([1.0, 2.0]), 3.0)
    with pytest.raises(RuntimeError, match=r"non-scalar.*\(2,\)"):
        y.backward()


def test_backward_twice_through_a_freed_graph_errors_clearly():
    x = leaf([1.0, 2.0])
    loss = F.sum(F.mul(x, x))
    loss.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_backward_twice_with_retain_graph_accumulates():
    x = leaf([1.0, 2.0])
    loss = F.sum(F.mul(x, x))
    loss.backward(retain_graph=True)
    loss.backward()
    np.testing.assert_array_equal(x.grad, [4.0, 8.0])  # 2 * (2x)


def test_backward_into_a_freed_shared_trunk_errors_clearly():
    """Two losses on one trunk, the first without retain_graph: the second must say what happened
    (PyTorch: "Trying to backward through the graph a second time"), not fail with an IndexError."""
    x = leaf([1.0, 2.0])
    trunk = F.mul(x, x)
    F.sum(trunk).backward()
    second = F.sum(F.mul(trunk, 3.0))
    with pytest.raises(RuntimeError, match="retain_graph"):
        second.backward()


# ------------------------------------------------------------------------------------- tensor hooks
def test_leaf_hook_sees_the_complete_grad_and_can_replace_it():
    x = leaf([1.0, 2.0])
    seen = []

    def hook(g):
        seen.append(np.array(g))
        return 10 * g

    handle = x.register_hook(hook)
    F.sum(F.add(F.mul(x, 2.0), F.mul(x, 3.0))).backward()  # two uses: the hook sees 2 + 3 once
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], [5.0, 5.0])
    np.testing.assert_array_equal(x.grad, [50.0, 50.0])
    handle.remove()
    x.grad = None
    F.sum(x).backward()
    assert len(seen) == 1
    np.testing.assert_array_equal(x.grad, [1.0, 1.0])


def test_non_leaf_hook_can_replace_the_grad_flowing_upstream():
    x = leaf([1.0, -1.0])
    y = F.mul(x, 3.0)
    seen = []
    y.register_hook(lambda g: seen.append(np.array(g)))          # returns None: grad unchanged
    y.register_hook(lambda g: g * np.array([0.0, 2.0]))          # hooks run in registration order
    F.sum(F.mul(y, y)).backward()                                # dL/dy = 2y = [6, -6]
    np.testing.assert_array_equal(seen[0], [6.0, -6.0])
    np.testing.assert_array_equal(x.grad, [0.0, -36.0])          # 3 * [0, -12]


def test_non_leaf_hook_remove():
    x = leaf([1.0])
    y = F.mul(x, 2.0)
    h = y.register_hook(lambda g: g * 100)
    h.remove()
    h.remove()  # idempotent
    F.sum(y).backward()
    np.testing.assert_array_equal(x.grad, [2.0])


# ------------------------------------------------------------------------- post-accumulate-grad hooks
def test_post_accumulate_hook_only_on_leaves():
    with pytest.raises(RuntimeError, match="leaf"):
        F.mul(leaf([1.0]), 2.0).register_post_accumulate_grad_hook(lambda t: None)


def test_post_accumulate_hook_fires_once_after_the_grad_is_complete_last_used_first():
    """w1 is used by the first and the third op, w2 by the second: backward completes w2 first (at op 2),
    w1 last (at op 1), and each hook sees its final gradient exactly once, per backward call."""
    w1, w2, x = leaf([2.0, 3.0]), leaf([5.0, 7.0]), np.array([1.0, -1.0])
    events = []
    for name, w in (("w1", w1), ("w2", w2)):
        w.register_post_accumulate_grad_hook(lambda t, name=name: events.append((name, np.array(t.grad))))

    def loss():
        h = F.mul(w1, Tensor(x))             # op 1: w1
        h = F.mul(h, w2)                     # op 2: w2
        return F.sum(F.mul(h, w1))           # op 3: w1 again;  L = sum(x * w1^2 * w2)

    g1, g2 = 2 * x * w1.data * w2.data, x * w1.data ** 2
    loss().backward()
    assert [e[0] for e in events] == ["w2", "w1"]
    np.testing.assert_array_equal(events[0][1], g2)
    np.testing.assert_array_equal(events[1][1], g1)
    loss().backward()  # second backward: once more each, seeing the accumulated .grad
    assert [e[0] for e in events] == ["w2", "w1", "w2", "w1"]
    np.testing.assert_array_equal(events[3][1], 2 * g1)


def test_post_accumulate_hooks_over_a_transformer_fire_in_reverse_order_of_first_use():
    """The ZeRO-2 property: every parameter's hook fires once, with its final grad, in the reverse of the
    order the leaf modules first ran in forward (parameters of one op in argument order: weight, bias)."""
    cfg = ModelConfig(vocab_size=9, n_layers=2, n_heads=2, d_model=8, max_seq_len=8, tie_embeddings=True)
    model = Transformer(cfg, seed=0)
    names = {id(p): n for n, p in model.named_parameters()}
    order, at_hook = [], {}
    for n, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda t: (order.append(names[id(t)]),
                                                        at_hook.__setitem__(names[id(t)], t.grad.copy())))
    leaf_order = []
    for mname, m in model.named_modules():
        if not m._modules:
            m.register_forward_pre_hook(lambda mod, args, mname=mname: leaf_order.append(mname))
    ids = rng().integers(0, 9, (2, 6))
    logits = model(ids)
    F.cross_entropy(logits.reshape(12, 9), ids.reshape(-1)).backward()

    first_use = list(dict.fromkeys(leaf_order))
    expected = []
    for mname in reversed(first_use):
        expected += [f"{mname}.{p}" for p in model_module(model, mname)._parameters
                     if f"{mname}.{p}" not in expected]
    # tok_emb.weight is tied to the LM head (used first and last): complete only at the embedding's backward
    assert order == expected
    assert order[-1] == "tok_emb.weight"
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(at_hook[n], p.grad)


def model_module(model, dotted):
    return dict(model.named_modules())[dotted]


# ------------------------------------------------------------------------------------- module hooks
class Affine(Module):
    def __init__(self):
        super().__init__()
        self.lin = Linear(3, 2, rng=rng(), std=1.0, dtype=np.float64)

    def forward(self, x, scale):
        return F.mul(self.lin(x), scale)


def test_forward_pre_hook_replaces_args_and_forward_hook_replaces_output():
    m = Affine()
    x = Tensor(rng(1).standard_normal((4, 3)))
    base = m(x, 1.0).numpy()
    h1 = m.register_forward_pre_hook(lambda mod, args: (args[0], 3.0))           # tuple: all new args
    h2 = m.register_forward_hook(lambda mod, args, out: F.add(out, Tensor(np.ones(2))))
    np.testing.assert_allclose(m(x, 1.0).numpy(), 3.0 * base + 1.0, rtol=1e-14)
    h1.remove()
    h2.remove()
    np.testing.assert_array_equal(m(x, 1.0).numpy(), base)
    lin = Linear(3, 2, rng=rng(), std=1.0, dtype=np.float64)
    lin.register_forward_pre_hook(lambda mod, args: F.mul(args[0], 2.0))        # not a tuple: the only arg
    W, b = lin.weight.data, lin.bias.data
    np.testing.assert_allclose(lin(x).numpy(), (2.0 * x.data) @ W.T + b, rtol=1e-14)


def _watch_backward(module, log, label):
    """Record, at each backward hook, which of the module's parameters already have a gradient."""
    params = module.parameters()

    def pre(mod, grad_output):
        log.append((label, "pre", [None if p.grad is None else p.grad.copy() for p in params], grad_output))

    def post(mod, grad_input, grad_output):
        log.append((label, "post", [None if p.grad is None else p.grad.copy() for p in params], grad_input))

    return module.register_full_backward_pre_hook(pre), module.register_full_backward_hook(post)


def _check_pre_then_post(log, label, params):
    events = [e for e in log if e[0] == label]
    assert [e[1] for e in events] == ["pre", "post"], f"{label}: hooks fired {[e[1] for e in events]}"
    assert all(g is None for g in events[0][2]), f"{label}: a parameter had a gradient before the pre-hook"
    for g, p in zip(events[1][2], params):
        assert g is not None, f"{label}: a parameter had no gradient yet at the post-hook"
        np.testing.assert_array_equal(g, p.grad)


def test_backward_hooks_bracket_the_parameter_gradients():
    """pre fires before any parameter of the module has a gradient, post after all have their final one;
    the parameters of an MLP are also used by nothing else, so the bracket is exact."""
    r = rng(3)
    ln = LayerNorm(4, dtype=np.float64)
    mlp = MLP(4, 6, rng=r, std=0.5, out_std=0.5, dtype=np.float64)
    head = Linear(4, 2, rng=r, std=0.5, dtype=np.float64)
    log = []
    for mod, label in ((ln, "ln"), (mlp, "mlp"), (mlp.fc1, "fc1"), (head, "head")):
        _watch_backward(mod, log, label)
    x = leaf(r.standard_normal((3, 4)))
    out = head(F.add(mlp(ln(x)), x))
    g = r.standard_normal((3, 2))
    out.backward(g)
    for mod, label in ((ln, "ln"), (mlp, "mlp"), (mlp.fc1, "fc1"), (head, "head")):
        _check_pre_then_post(log, label, mod.parameters())
    # the modules' hooks come in the mirror order of forward: head, mlp(fc2, fc1), ln
    assert [(e[0], e[1]) for e in log] == [("head", "pre"), ("head", "post"), ("mlp", "pre"), ("fc1", "pre"),
                                           ("fc1", "post"), ("mlp", "post"), ("ln", "pre"), ("ln", "post")]
    # grad_output of the head is what we passed in; grad_input of the head is g W
    np.testing.assert_array_equal(log[0][3][0], g)
    np.testing.assert_allclose(log[1][3][0], g @ head.weight.data, rtol=1e-14)


def test_backward_hooks_fire_for_embedding_with_tensor_ids():
    emb = Embedding(5, 3, rng=rng(), dtype=np.float64)
    log = []
    _watch_backward(emb, log, "emb")
    ids = Tensor(np.array([[1, 4, 1]]))   # integer ids: need no gradient
    F.sum(emb(ids)).backward()
    _check_pre_then_post(log, "emb", emb.parameters())
    np.testing.assert_array_equal(emb.weight.grad[1], [2, 2, 2])


def test_backward_hooks_fire_for_embedding_with_array_ids():
    """Transformer.forward passes token ids as a plain backend array, so this is the case ZeRO-3 meets:
    the post-backward hook (release of the embedding's gathered weight) must still fire."""
    emb = Embedding(5, 3, rng=rng(), dtype=np.float64)
    log = []
    _watch_backward(emb, log, "emb")
    F.sum(emb(np.array([[1, 4, 1]]))).backward()
    _check_pre_then_post(log, "emb", emb.parameters())


def test_module_hook_handles_remove():
    lin = Linear(2, 2, rng=rng(), dtype=np.float64)
    calls = []
    handles = [lin.register_forward_pre_hook(lambda *a: calls.append("fpre")),
               lin.register_forward_hook(lambda *a: calls.append("fpost")),
               lin.register_full_backward_pre_hook(lambda *a: calls.append("bpre")),
               lin.register_full_backward_hook(lambda *a: calls.append("bpost"))]
    x = leaf(np.ones((1, 2)))
    F.sum(lin(x)).backward()
    assert calls == ["fpre", "fpost", "bpre", "bpost"]
    for h in handles:
        h.remove()
    F.sum(lin(x)).backward()
    assert calls == ["fpre", "fpost", "bpre", "bpost"]


def test_no_backward_hook_nodes_under_no_grad():
    lin = Linear(2, 2, rng=rng(), dtype=np.float64)
    lin.register_full_backward_pre_hook(lambda *a: None)
    lin.register_full_backward_hook(lambda *a: None)
    with no_grad():
        y = lin(leaf(np.ones((1, 2))))
    assert not y.requires_grad and y.creator is None  # no identity node was recorded around the module


# ------------------------------------------------------------------------------- transformer trace
def _layer_names(i):
    p = f"blocks.{i}"
    return [p, f"{p}.ln_1", f"{p}.attn", f"{p}.attn.q_proj", f"{p}.attn.k_proj", f"{p}.attn.v_proj",
            f"{p}.attn.out_proj", f"{p}.ln_2", f"{p}.mlp", f"{p}.mlp.fc1", f"{p}.mlp.fc2"]


def _traced_step(task):
    cfg = ModelConfig(vocab_size=9, task=task, n_classes=3, n_layers=2, n_heads=2, d_model=8, max_seq_len=8)
    model = Transformer(cfg, seed=0)
    trace = []
    for name, mod in model.named_modules():
        mod.register_forward_pre_hook(lambda m, a, name=name: trace.append(("fwd_pre", name)))
        mod.register_forward_hook(lambda m, a, o, name=name: trace.append(("fwd_post", name)))
        mod.register_full_backward_pre_hook(lambda m, g, name=name: trace.append(("bwd_pre", name)))
        mod.register_full_backward_hook(lambda m, gi, go, name=name: trace.append(("bwd_post", name)))
    ids = rng().integers(0, 9, (2, 6))
    kpm = None if task == "lm" else np.array([[False] * 6, [False] * 4 + [True] * 2])  # (B, T) True = pad
    logits = model(ids, kpm)
    n_forward = len(trace)
    if task == "lm":
        loss = F.cross_entropy(logits.reshape(12, 9), ids.reshape(-1))
    else:
        loss = F.cross_entropy(logits, np.array([0, 2]))
    loss.backward()
    return trace[:n_forward], trace[n_forward:], model


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_forward_trace_is_the_module_call_order(task):
    fwd, _, _ = _traced_step(task)
    head = "lm_head" if task == "lm" else "head"
    expected = ["", "tok_emb", "pos_emb", *_layer_names(0), *_layer_names(1), "ln_f", head]
    assert [n for kind, n in fwd if kind == "fwd_pre"] == expected  # ModuleList itself is never called


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_backward_prefetch_trace_is_the_exact_reverse_for_parameter_modules(task):
    """What the ZeRO-3 prefetcher replays: the modules owning parameters, gathered at bwd_pre, come in
    exactly the reverse of their forward (fwd_pre) order."""
    fwd, bwd, model = _traced_step(task)
    owners = {n for n, m in model.named_modules() if m._parameters}
    fwd_order = [n for kind, n in fwd if kind == "fwd_pre" and n in owners]
    bwd_order = [n for kind, n in bwd if kind == "bwd_pre" and n in owners]
    assert bwd_order == fwd_order[::-1]


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_backward_trace_is_the_mirror_of_the_forward_trace(task):
    """Every forward event has its backward twin, in exactly reversed order: fwd_post(M) <-> bwd_pre(M)
    (gradient reached M's outputs) and fwd_pre(M) <-> bwd_post(M) (M's inputs' gradients are done),
    including the embeddings and the whole model, whose inputs are integer ids."""
    fwd, bwd, _ = _traced_step(task)
    twin = {"fwd_pre": "bwd_post", "fwd_post": "bwd_pre"}
    assert bwd == [(twin[kind], n) for kind, n in reversed(fwd)]

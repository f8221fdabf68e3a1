"""Memory-centric tiling (ZeRO-Infinity §5.1.3; DeepSpeed's deepspeed/runtime/zero/tiling.py).

A TiledLinear must be the same function as the Linear it tiles (forward and every gradient), checked against
x W^T + b and its gradients written out in NumPy here, and by float64 central differences. Under ZeRO stage 3
it must also deliver what tiling is for: while its tiles run, only one tile's parameters are gathered (plus
those of the enclosing modules that are running), never the whole layer, and training gives the same numbers
as the untiled model.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import functional as F
from refimpl.autodiff import Tensor
from refimpl.backend import get_backend, use_backend
from refimpl.comm.local import run_ranks
from refimpl.config import load_config
from refimpl.engine import Engine
from refimpl.nn import Linear, Module, Parameter
from refimpl.tiling import TiledLinear, concat_last_dim, split_last_dim
from refimpl.zero import ZeroParamStatus
from tests.conftest import TINY_MODEL

from gradcheck import gradcheck


def split_sizes(n, k):
    """numpy.array_split's piece sizes, written out: the first n % k pieces are one longer."""
    return [n // k + (1 if j < n % k else 0) for j in range(k)]


def assemble(tiled, attr):
    """The tiles' `attr` ("data" or "grad") of weights and biases put back into one (out, in) and (out,) array."""
    rows = [[np.asarray(getattr(t.weight, attr)) for t in row] for row in tiled.linears]
    weight = np.block(rows)
    bias = None
    if tiled.use_bias:
        bias = np.concatenate([np.asarray(getattr(row[len(row) - 1].bias, attr)) for row in tiled.linears])
    return weight, bias


# ------------------------------------------------------------------------------------ 1. same function
@st.composite
def layer_cases(draw):
    in_f, out_f = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    return dict(in_f=in_f, out_f=out_f,
                in_splits=draw(st.integers(1, min(4, in_f))), out_splits=draw(st.integers(1, min(4, out_f))),
                batch=tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))),
                bias=draw(st.booleans()), dtype=draw(st.sampled_from([np.float32, np.float64])),
                seed=draw(st.integers(0, 2**16)))


@given(layer_cases())
def test_tiled_linear_equals_linear_forward_and_backward(case):
    rng = np.random.default_rng(case["seed"])
    dtype, in_f, out_f, batch = case["dtype"], case["in_f"], case["out_f"], case["batch"]
    lin = Linear(in_f, out_f, case["bias"], rng=rng, std=0.5, dtype=dtype)
    if case["bias"]:
        lin.bias.data[...] = rng.standard_normal(out_f)         # Linear starts at zero bias: make it count
    tiled = TiledLinear.from_linear(lin, case["in_splits"], case["out_splits"])
    W = lin.weight.data.astype(np.float64)
    b = lin.bias.data.astype(np.float64) if case["bias"] else np.zeros(out_f)
    x_host = rng.standard_normal((*batch, in_f))
    R = rng.standard_normal((*batch, out_f))                     # the cotangent of y

    x = Tensor(x_host.astype(dtype), requires_grad=True)
    y = tiled(x)
    y.backward(R.astype(dtype))
    dW, db = assemble(tiled, "grad")

    # references, in float64: y = x W^T + b; dx = R W; dW = R^T x (over all batch rows); db = sum of R
    x2, R2 = x_host.astype(dtype).astype(np.float64).reshape(-1, in_f), R.reshape(-1, out_f)
    want = {"y": x_host.astype(dtype).astype(np.float64) @ W.T + b, "dx": R @ W, "dW": R2.T @ x2, "db": R2.sum(0)}
    got = {"y": y.numpy(), "dx": x.grad, "dW": dW, "db": db}
    tol = 1e-12 if dtype == np.float64 else 2e-6
    assert y.shape == (*batch, out_f) and y.dtype == dtype and x.grad.dtype == dtype and dW.dtype == dtype
    for key in ("y", "dx", "dW") + (("db",) if case["bias"] else ()):
        scale = max(1.0, np.abs(want[key]).max())
        np.testing.assert_allclose(got[key], want[key], rtol=tol, atol=tol * scale, err_msg=key)

    # and the same as the untiled Linear run through refimpl's own op, to fp32 reduction-order rounding
    lx = Tensor(x_host.astype(dtype), requires_grad=True)
    ly = lin(lx)
    ly.backward(R.astype(dtype))
    np.testing.assert_allclose(y.numpy(), ly.numpy(), rtol=tol, atol=tol * max(1.0, np.abs(ly.numpy()).max()))
    np.testing.assert_allclose(x.grad, lx.grad, rtol=tol, atol=tol * max(1.0, np.abs(lx.grad).max()))


@given(in_f=st.integers(1, 13), out_f=st.integers(1, 13), data=st.data())
def test_tiles_follow_array_split_and_only_the_last_in_split_has_a_bias(in_f, out_f, data):
    in_splits, out_splits = data.draw(st.integers(1, min(4, in_f))), data.draw(st.integers(1, min(4, out_f)))
    tiled = TiledLinear(in_f, out_f, True, in_splits=in_splits, out_splits=out_splits,
                        rng=np.random.default_rng(0))
    ins, outs = split_sizes(in_f, in_splits), split_sizes(out_f, out_splits)
    assert len(tiled.linears) == out_splits and all(len(row) == in_splits for row in tiled.linears)
    for o, row in enumerate(tiled.linears):
        for i, tile in enumerate(row):
            assert tile.weight.shape == (outs[o], ins[i])
            assert (tile.bias is not None) == (i == in_splits - 1)
    # the tiles hold exactly the layer's parameters: nothing duplicated, nothing lost
    assert sum(p.size for p in tiled.parameters()) == in_f * out_f + out_f
    assert len(tiled.parameters()) == in_splits * out_splits + out_splits


def test_same_rng_gives_the_same_weights_and_leaves_the_rng_where_linear_does():
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    lin = Linear(9, 7, rng=r1, std=0.3)
    tiled = TiledLinear(9, 7, in_splits=2, out_splits=3, rng=r2, std=0.3)
    weight, bias = assemble(tiled, "data")
    np.testing.assert_array_equal(weight, lin.weight.data)
    np.testing.assert_array_equal(bias, lin.bias.data)
    assert r1.standard_normal() == r2.standard_normal()   # a model's later layers get the same draws
    back = tiled.to_linear()
    np.testing.assert_array_equal(back.weight.data, lin.weight.data)
    np.testing.assert_array_equal(back.bias.data, lin.bias.data)


def test_already_split_input_and_uncombined_output_as_in_deepspeed():
    rng = np.random.default_rng(3)
    lin = Linear(7, 5, rng=rng, std=0.5)
    lin.bias.data[...] = rng.standard_normal(5)
    tiled = TiledLinear.from_linear(lin, 2, 2, input_is_already_split=True, combine_out_splits=False)
    x = rng.standard_normal((4, 7)).astype(np.float32)
    outs = tiled([x[:, :4], x[:, 4:]])                                   # array_split(7, 2) = 4, 3
    want = x.astype(np.float64) @ lin.weight.data.T.astype(np.float64) + lin.bias.data
    assert [o.shape for o in outs] == [(4, 3), (4, 2)]                   # array_split(5, 2) = 3, 2
    np.testing.assert_allclose(np.concatenate([o.numpy() for o in outs], -1), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ 2. float64 gradchecks
@given(n=st.integers(2, 9), data=st.data())
def test_split_and_concat_gradcheck(n, data):
    k = data.draw(st.integers(2, min(4, n)))
    sizes = split_sizes(n, k)
    rng = np.random.default_rng(n * 10 + k)
    x = rng.standard_normal((2, 3, n))
    # split, then concatenate in another order with one piece scaled: every piece's gradient path is used
    gradcheck(lambda t: concat_last_dim([p * (j + 1.0) for j, p in enumerate(split_last_dim(t[0], sizes))][::-1]),
              [x])
    # a piece that nothing uses gets zero gradient (SplitLastDim's None-gradient path)
    gradcheck(lambda t: split_last_dim(t[0], sizes)[k - 1] * 2.0, [x])
    pieces = [rng.standard_normal((3, s)) for s in sizes]
    gradcheck(lambda t: concat_last_dim(t), pieces)


def test_tiled_linear_gradcheck_float64():
    rng = np.random.default_rng(5)
    tiled = TiledLinear(7, 5, in_splits=3, out_splits=2, rng=rng, std=0.5, dtype=np.float64)
    for p in tiled.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    x = rng.standard_normal((2, 3, 7))
    gradcheck(lambda t: tiled(t[0]), [x, *tiled.parameters()])


# ------------------------------------------------------------------------------------------- 3. errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(in_splits=0), "in_splits must be an integer in \\[1, 6\\].*got 0"),
    (dict(in_splits=7), "in_splits .* got 7"),
    (dict(out_splits=5), "out_splits must be an integer in \\[1, 4\\].*got 5"),
    (dict(out_splits=2.0), "out_splits .* got 2.0"),
])
def test_bad_splits_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TiledLinear(6, 4, rng=np.random.default_rng(0), **kwargs)


def test_bad_inputs_and_mismatched_layers_are_rejected():
    tiled = TiledLinear(6, 4, in_splits=2, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="last dim 5.*in_features=6"):
        tiled(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="shape \\(4, 5\\)"):
        tiled.copy_params_from(Linear(5, 4, rng=np.random.default_rng(0)))
    with pytest.raises(ValueError, match="bias mismatch"):
        tiled.copy_params_from(Linear(6, 4, bias=False, rng=np.random.default_rng(0)))
    with pytest.raises(ValueError, match="rng=None.*std=0.02"):
        TiledLinear(6, 4, rng=None)
    split = TiledLinear(6, 4, in_splits=2, rng=np.random.default_rng(0), input_is_already_split=True)
    with pytest.raises(ValueError, match="2 input pieces"):
        split([np.zeros((1, 6), np.float32)])


# ------------------------------------------------------------------------------------------- 4. ZeRO-3
D_IN, D_HIDDEN, N_CLASSES = 10, 14, 5
SPLITS = (3, 4)                          # in_splits, out_splits: neither divides its features
B, T = 8, 3                              # global batch rows (2 ranks x 4) and one extra batch dim
STEPS = 2                                # pass 1 records the stage-3 trace, pass 2 replays it
STAGE3 = ("zero_optimization.stage=3", "world_size=2", f"train_micro_batch_size_per_gpu={B // 2}",
          "scheduler=null", "optimizer.params.lr=0.01",
          # every parameter partitioned, no prefetch, nothing kept whole after its module: what is gathered
          # at a moment is exactly the parameters of the modules running at that moment
          "zero_optimization.stage3_param_persistence_threshold=0",
          "zero_optimization.stage3_prefetch_bucket_size=0",
          "zero_optimization.stage3_max_reuse_distance=0")


class Net(Module):
    """logits = fc2(gelu(gain * fc1(x))). `gain` is the net's own parameter: ZeRO-3 gathers it in the net's
    pre-hook, so it stays whole while fc1 (and its tiles) run inside the net's forward and backward."""

    def __init__(self, tiled: bool, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.gain = Parameter((1.0 + 0.1 * rng.standard_normal(D_HIDDEN)).astype(np.float32))
        fc1 = Linear(D_IN, D_HIDDEN, rng=rng, std=0.3)
        fc1.bias.data[...] = 0.1 * rng.standard_normal(D_HIDDEN)
        self.fc1 = TiledLinear.from_linear(fc1, *SPLITS) if tiled else fc1
        self.fc2 = Linear(D_HIDDEN, N_CLASSES, rng=rng, std=0.3)

    def forward(self, x):
        return self.fc2(F.gelu(F.mul(self.fc1(x), self.gain)))         # (..., N_CLASSES)


def _batch(step):
    rng = np.random.default_rng(100 + step)
    return rng.standard_normal((B, T, D_IN)).astype(np.float32), rng.integers(0, N_CLASSES, (B, T))


def _gathered(model):
    """Elements of the parameters that are whole right now (status other than NOT_AVAILABLE)."""
    return sum(p.ds_numel for p in model.parameters() if p.ds_status is not ZeroParamStatus.NOT_AVAILABLE)


def _stage3_rank(comm, tiled):
    cfg = load_config(None, list(STAGE3))
    be = get_backend()
    model = Net(tiled)
    out = {"losses": [], "grads": [], "during": [], "after": []}
    with use_backend(be):
        engine = Engine(model, cfg, be, comm)
        # registered after the engine's hooks: a pre-hook sees the module's parameters gathered, a forward hook
        # sees them released again
        fc1_modules = [m for m in model.fc1.modules() if m._parameters]  # the tiles, or the one Linear
        for m in fc1_modules:
            m.register_forward_pre_hook(lambda m, args: out["during"].append((id(m), _gathered(model))))
            m.register_full_backward_pre_hook(lambda m, g: out["during"].append((id(m), _gathered(model))))
            m.register_forward_hook(lambda m, args, y: out["after"].append(_gathered(model)))
        out["ids"] = {id(m): m for m in fc1_modules}
        for step in range(STEPS):
            x, y = _batch(step)
            lo, hi = comm.rank * B // 2, (comm.rank + 1) * B // 2
            logits = model(be.asarray(x[lo:hi]))
            loss = F.cross_entropy(logits.reshape(-1, N_CLASSES), be.asarray(y[lo:hi].reshape(-1)))
            engine.backward(loss)
            full = engine.comm.all_gather(engine.zero.reduce_gradients())       # every rank's partition
            out["grads"].append(engine.zero.layout.unpartition(full))
            out["losses"].append(float(comm.all_reduce(np.array([loss.item()]))[0]) / comm.world_size)
            assert engine.step()
        out["numel"] = {id(m): sum(p.ds_numel for p in m.parameters()) for m in fc1_modules}
    return out


@pytest.fixture(scope="module")
def stage3_runs():
    return {tiled: run_ranks(2, _stage3_rank, tiled) for tiled in (False, True)}


def test_stage3_gathers_one_tile_at_a_time(stage3_runs):
    gain = D_HIDDEN                                    # the net's own parameter, whole while fc1 runs
    ins, outs = split_sizes(D_IN, SPLITS[0]), split_sizes(D_HIDDEN, SPLITS[1])
    tile_numel = {(o, i): outs[o] * ins[i] + (outs[o] if i == SPLITS[0] - 1 else 0)
                  for o in range(SPLITS[1]) for i in range(SPLITS[0])}
    untiled_numel = D_IN * D_HIDDEN + D_HIDDEN
    largest_tile = max(tile_numel.values())
    assert largest_tile < untiled_numel
    for rank, run in enumerate(stage3_runs[True]):
        # every tile ran (forward and backward, each step) with exactly its own parameters gathered next to gain
        assert len(run["during"]) == 2 * STEPS * len(tile_numel)
        for module_id, gathered in run["during"]:
            assert gathered == run["numel"][module_id] + gain, (rank, gathered)
        assert sorted(run["numel"].values()) == sorted(tile_numel.values())
        # and a tile's parameters are released as soon as it has run
        assert run["after"] == [gain] * (STEPS * len(tile_numel))
        peak = max(g for _, g in run["during"])
        assert peak == largest_tile + gain < untiled_numel + gain
    for run in stage3_runs[False]:                     # untiled, the whole layer is gathered at once
        assert max(g for _, g in run["during"]) == untiled_numel + gain


def test_stage3_tiled_model_trains_like_the_untiled_one(stage3_runs):
    plain, tiled = stage3_runs[False][0], stage3_runs[True][0]
    np.testing.assert_allclose(tiled["losses"], plain["losses"], rtol=1e-6)
    probe = Net(tiled=True)                             # only for the tiles' parameter names
    names = dict((id(p), n) for n, p in probe.named_parameters())
    for step in range(STEPS):
        got, want = tiled["grads"][step], plain["grads"][step]
        # reassemble fc1's gradient from the tiles' gradients, by name
        for t in probe.fc1.parameters():
            t.grad = got[names[id(t)]]
        dW, db = assemble(probe.fc1, "grad")
        pairs = [(dW, want["fc1.weight"]), (db, want["fc1.bias"])]
        pairs += [(got[n], want[n]) for n in ("gain", "fc2.weight", "fc2.bias")]
        for a, b in pairs:
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
        assert np.abs(want["fc1.weight"]).max() > 1e-3       # the gradients compared are not all zero


def test_model_mlp_tiles_config_trains_like_the_untiled_model(tmp_path):
    """model.mlp_tiles swaps the MLP's linears for TiledLinear grids with the same weights: same losses."""
    import json as _json

    from refimpl.config import load_config
    from refimpl.train import train
    tiny = [*TINY_MODEL, "model.d_ff=1024",  # the MLP holds the largest parameters, so its tiles set the peak
            "run.eval_batches=1", "run.steps=3", "train_micro_batch_size_per_gpu=4",
            "scheduler.params.warmup_num_steps=2", "zero_optimization.stage=3", "world_size=2",
            "zero_optimization.stage3_param_persistence_threshold=0",
            # gather only what runs: no parameters kept for reuse or fetched ahead
            "zero_optimization.stage3_max_reuse_distance=0", "zero_optimization.stage3_prefetch_bucket_size=0"]
    runs = {}
    for tiles in (1, 3):
        out = tmp_path / f"t{tiles}"
        summary = train(load_config(None, [*tiny, f"model.mlp_tiles={tiles}"]), out, progress=False)
        runs[tiles] = ([_json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
                        if "overflow" in x], summary)
    np.testing.assert_allclose(runs[3][0], runs[1][0], rtol=1e-5)
    # the tiled model gathers smaller pieces: its peak of whole parameters on the device is lower
    assert runs[3][1]["peak device bytes"] < runs[1][1]["peak device bytes"]

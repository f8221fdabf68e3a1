"""Cross-check of the Transformer against PyTorch: the same Block / model written with torch.nn
(nn.Linear, nn.LayerNorm, F.gelu(approximate="tanh"), F.scaled_dot_product_attention), our weights copied
in by name, then forward outputs, every parameter's gradient and the input's gradient compared in float64
(to ~1e-10) and float32 (~1e-5), for plain and tiled attention, causal LM and padded classifier.
Then 20 AdamW steps of the tiny LM with refimpl.optim.AdamW on a flat fp32 master vs torch.optim.AdamW.

The torch twin (refimpl/interop/torch.py) is the independent spec of the architecture in refimpl/model.py's
docstring.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import refimpl.interop.torch as tt  # noqa: E402

from refimpl.autodiff import Tensor  # noqa: E402
from refimpl.backend import get_backend  # noqa: E402
from refimpl.data import Batch  # noqa: E402
from refimpl.model import Block, ModelConfig, Transformer  # noqa: E402
from refimpl.optim import AdamW  # noqa: E402

pytestmark = pytest.mark.crosscheck


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """These problems are tiny: torch's intra-op thread pool only adds spin-waiting (seconds per test on
    a loaded 2-core CI machine), so run torch single-threaded here and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
# (rtol, atol relative to the largest value of the compared tensor)
TOL = {np.float64: (1e-10, 1e-12), np.float32: (1e-5, 1e-6)}


def TorchTransformer(cfg):   # noqa: N802  (the twin, with the loss method these tests call)
    twin = tt.TorchTransformer(cfg)
    twin.loss = lambda batch: tt.torch_loss(twin, batch)
    return twin


def copy_into_torch(ours, theirs, dtype):
    """Load our parameters by name; strict: any name that does not match fails."""
    theirs.to(TORCH_DTYPE[dtype])
    return tt.load_weights(theirs, ours.state_dict())


# ---------------------------------------------------------------------------------------- helpers
def config(**kw):
    base = dict(vocab_size=13, n_layers=2, n_heads=2, d_model=12, d_head=5, d_ff=20, max_seq_len=10,
                n_classes=3, attention_block_size=3)
    return ModelConfig(**{**base, **kw})


def randomize(module, seed):
    """Move all parameters (LayerNorms and biases included) away from their constant inits."""
    r = np.random.default_rng(seed)
    for name, p in module.named_parameters():
        base = 1.0 if ".ln_" in f".{name}" and name.endswith("weight") else 0.0
        p.data[...] = (base + 0.3 * r.standard_normal(p.shape)).astype(p.dtype)


def assert_close(actual, desired, dtype, what):
    rtol, atol_rel = TOL[dtype]
    desired = np.asarray(desired, dtype=np.float64)
    scale = max(float(np.abs(desired).max()), 1e-30)
    np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol, atol=atol_rel * scale,
                               err_msg=what)


def padding(B, T):
    kpm = np.zeros((B, T), bool)
    kpm[0, T - 3:] = True
    kpm[-1, 2:] = True  # a row with only two real tokens
    return kpm


def lm_batch(seed, B=3, T=9, V=13):
    ids = np.random.default_rng(seed).integers(0, V, (B, T + 1))
    return Batch(ids=ids[:, :-1], targets=ids[:, 1:], labels=None, key_padding_mask=None)


def classify_batch(seed, B=3, T=9, V=13):
    r = np.random.default_rng(seed)
    kpm = padding(B, T)
    ids = np.where(kpm, 0, r.integers(1, V, (B, T)))
    return Batch(ids=ids, targets=None, labels=r.integers(0, 3, B), key_padding_mask=kpm)


DTYPES = [pytest.param(np.float64, id="float64"), pytest.param(np.float32, id="float32")]


# ------------------------------------------------------------------------------------------- Block
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("attention", ["plain", "tiled"])
@pytest.mark.parametrize("task", ["lm", "classify"])
def test_block_forward_and_grads_match_torch(task, attention, dtype):
    cfg = config(task=task, attention=attention)
    ours = Block(cfg, rng=np.random.default_rng(0), dtype=dtype)
    randomize(ours, 1)
    theirs = copy_into_torch(ours, tt.Block(cfg), dtype)
    r = np.random.default_rng(2)
    B, T = 3, 8  # 8 is not a multiple of the block size 3
    x = r.standard_normal((B, T, cfg.d_model)).astype(dtype)
    dy = r.standard_normal((B, T, cfg.d_model)).astype(dtype)
    kpm = padding(B, T) if task == "classify" else None

    x_ours = Tensor(x.copy(), requires_grad=True)
    y = ours(x_ours, kpm)
    y.backward(dy)
    x_theirs = torch.from_numpy(x.copy()).requires_grad_()
    y_t = theirs(x_theirs, None if kpm is None else torch.from_numpy(kpm))
    y_t.backward(torch.from_numpy(dy))

    assert y.dtype == dtype
    assert_close(y.numpy(), y_t.detach().numpy(), dtype, "output")
    assert_close(x_ours.grad, x_theirs.grad.numpy(), dtype, "input grad")
    torch_grads = {n: p.grad.numpy() for n, p in theirs.named_parameters()}
    for n, p in ours.named_parameters():
        # the key bias's true gradient is 0: compare it against the scale of the other gradients
        ref = torch_grads[n]
        if n.endswith("k_proj.bias"):
            np.testing.assert_allclose(p.grad, ref, atol=TOL[dtype][1] * np.abs(x_theirs.grad.numpy()).max(),
                                       err_msg=n)
        else:
            assert_close(p.grad, ref, dtype, n)


# ------------------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("task,attention", [("lm", "plain"), ("lm", "tiled"), ("classify", "plain"),
                                            ("classify", "tiled")])
def test_transformer_loss_logits_and_grads_match_torch(task, attention, dtype):
    cfg = config(task=task, attention=attention)
    ours = Transformer(cfg, seed=0, dtype=dtype)
    randomize(ours, 4)
    theirs = copy_into_torch(ours, TorchTransformer(cfg), dtype)
    batch = lm_batch(5) if task == "lm" else classify_batch(5)
    loss, logits = ours.loss(batch)
    loss.backward()
    loss_t = theirs.loss(batch)
    loss_t.backward()
    assert loss.item() == pytest.approx(loss_t.item(), rel=TOL[dtype][0])
    kpm = None if batch.key_padding_mask is None else torch.from_numpy(batch.key_padding_mask)
    with torch.no_grad():
        logits_t = theirs(torch.from_numpy(batch.ids), kpm)
    assert_close(logits.numpy(), logits_t.numpy(), dtype, "logits")
    torch_grads = {n: p.grad.numpy() for n, p in theirs.named_parameters()}
    g_scale = max(float(np.abs(g).max()) for g in torch_grads.values())
    for n, p in ours.named_parameters():
        rtol, atol_rel = TOL[dtype]
        np.testing.assert_allclose(p.grad, torch_grads[n], rtol=rtol, atol=atol_rel * g_scale, err_msg=n)


# ---------------------------------------------------------------------------------------- training
def flatten_into_master(model):
    """One flat fp32 buffer holding every parameter; the parameters become views into it, so the
    optimizer's in-place update of the master is what the model runs with next step."""
    params = model.parameters()
    master = np.concatenate([p.data.ravel() for p in params]).astype(np.float32)
    offset = 0
    for p in params:
        p.data = master[offset:offset + p.size].reshape(p.shape)  # a view
        offset += p.size
    return master


def train_batch(step, B=4, T=8, V=13):
    """A learnable stream: each sequence counts up by a fixed stride mod V from a random start."""
    r = np.random.default_rng(100 + step)
    start, stride = r.integers(0, V, (B, 1)), r.integers(1, 3, (B, 1))
    ids = (start + stride * np.arange(T + 1)) % V
    return Batch(ids=ids[:, :-1], targets=ids[:, 1:], labels=None, key_padding_mask=None)


def test_twenty_adamw_steps_match_torch():
    cfg = config(init_std=0.2)
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = Transformer(cfg, seed=7)
    theirs = copy_into_torch(ours, TorchTransformer(cfg), np.float32)
    master = flatten_into_master(ours)
    opt = AdamW(master, backend=get_backend(), **hp)
    opt_t = torch.optim.AdamW(theirs.parameters(), foreach=False, **hp)
    losses, losses_t = [], []
    for step in range(20):
        batch = train_batch(step)
        ours.zero_grad()
        loss, _ = ours.loss(batch)
        loss.backward()
        opt.step(np.concatenate([p.grad.ravel() for p in ours.parameters()]), lr=hp["lr"])
        losses.append(loss.item())

        opt_t.zero_grad()
        loss_t = theirs.loss(batch)
        loss_t.backward()
        opt_t.step()
        losses_t.append(loss_t.item())

    np.testing.assert_allclose(losses, losses_t, rtol=1e-4)
    assert losses[-1] < losses[0] - 0.1  # it did learn something: the comparison is not of a flat line
    params = dict(ours.named_parameters())
    for n, p in theirs.named_parameters():
        ref = p.detach().numpy()
        if n.endswith("k_proj.bias"):
            # Its true gradient is 0 (softmax ignores a per-row shift of the scores), so both sides feed
            # Adam pure float32 rounding noise, which Adam normalises into steps of up to ~lr in random
            # directions: only "both stayed within the 20 steps' reach" can be compared.
            np.testing.assert_allclose(params[n].data, ref, atol=2 * 20 * hp["lr"], err_msg=n)
            continue
        np.testing.assert_allclose(params[n].data, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=n)

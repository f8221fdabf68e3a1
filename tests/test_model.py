"""Tests of the pre-LN Transformer (refimpl/model.py): shapes, masking invariances, plain vs tiled attention,
seeded init, low-precision runs, configuration and parameter naming.

Independent checks: causality and padding are tested as invariances (change an input the output must not
depend on); the loss is recomputed from the logits with a numpy cross-entropy; low precision is compared
with the float32 model built from the same seed.
"""
import ml_dtypes
import numpy as np
import pytest

from refimpl.model import ModelConfig, Transformer

from batches import N_CLASSES, V, classify_batch, lm_batch



def config(**kw):
    base = dict(vocab_size=V, n_layers=2, n_heads=2, d_model=16, max_seq_len=12, n_classes=N_CLASSES,
                attention_block_size=3)
    return ModelConfig(**{**base, **kw})


def numpy_cross_entropy(logits, targets):
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return float(np.mean(lse - z[np.arange(len(targets)), targets]))


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lm_logits_shape_dtype_and_loss(dtype):
    model = Transformer(config(), seed=0, dtype=dtype)
    batch = lm_batch()
    loss, logits = model.loss(batch)
    assert logits.shape == (2, 7, V) and logits.dtype == dtype
    assert loss.shape == () and loss.dtype == dtype
    expected = numpy_cross_entropy(logits.numpy().reshape(-1, V), batch.targets.reshape(-1))
    assert loss.item() == pytest.approx(expected, rel=1e-6 if dtype == np.float32 else 1e-13)


def test_classifier_logits_shape_dtype_and_loss():
    model = Transformer(config(task="classify"), seed=0)
    batch = classify_batch()
    loss, logits = model.loss(batch)
    assert logits.shape == (3, N_CLASSES) and logits.dtype == np.float32
    assert loss.item() == pytest.approx(numpy_cross_entropy(logits.numpy(), batch.labels), rel=1e-6)


def test_tied_embeddings_use_the_token_embedding_as_lm_head():
    model = Transformer(config(tie_embeddings=True), seed=0, dtype=np.float64)
    assert "lm_head.weight" not in dict(model.named_parameters())
    captured = {}
    model.ln_f.register_forward_hook(lambda m, args, out: captured.setdefault("h", out.numpy()))
    logits = model(lm_batch().ids)
    np.testing.assert_allclose(logits.numpy(), captured["h"] @ model.tok_emb.weight.data.T, rtol=1e-12)


# -------------------------------------------------------------------------------- masking invariances
@pytest.mark.parametrize("attention", ["plain", "tiled"])
def test_causal_lm_earlier_logits_do_not_see_future_tokens(attention):
    model = Transformer(config(attention=attention), seed=1)
    ids = lm_batch().ids
    base = model(ids).numpy()
    for t in (2, 5):
        changed = ids.copy()
        changed[:, t] = (changed[:, t] + 1) % V
        out = model(changed).numpy()
        np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=1e-6, atol=1e-7)
        assert not np.allclose(out[:, t], base[:, t], rtol=1e-6, atol=1e-7)  # the changed position did move


@pytest.mark.parametrize("attention", ["plain", "tiled"])
def test_classifier_ignores_padded_tokens(attention):
    model = Transformer(config(task="classify", attention=attention, init_std=0.2), seed=1)
    batch = classify_batch()
    base = model(batch.ids, batch.key_padding_mask).numpy()
    changed = batch.ids.copy()
    changed[batch.key_padding_mask] = np.random.default_rng(9).integers(1, V, batch.key_padding_mask.sum())
    np.testing.assert_allclose(model(changed, batch.key_padding_mask).numpy(), base, rtol=1e-6, atol=1e-7)
    # a real (unpadded) token does matter, and so does the mask
    changed = batch.ids.copy()
    changed[1, 1] = (changed[1, 1] + 1) % V
    assert not np.allclose(model(changed, batch.key_padding_mask).numpy()[1], base[1], rtol=1e-6, atol=1e-7)
    assert not np.allclose(model(batch.ids).numpy()[1], base[1], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------- plain vs tiled
@pytest.mark.parametrize("task", ["lm", "classify"])
def test_plain_and_tiled_attention_give_the_same_loss_and_grads(task):
    batch = lm_batch(T=7) if task == "lm" else classify_batch(T=7)  # 7 is not a multiple of the block, 3
    results = []
    for attention in ("plain", "tiled"):
        model = Transformer(config(task=task, attention=attention, init_std=0.2), seed=2)
        loss, _ = model.loss(batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (l_plain, g_plain), (l_tiled, g_tiled) = results
    assert l_tiled == pytest.approx(l_plain, rel=1e-6)
    # atol from the largest gradient anywhere: the key bias's true gradient is 0 (softmax ignores a per-row
    # shift), so both sides are float32 rounding noise there
    scale = max(float(np.abs(g).max()) for g in g_plain.values())
    for name, g in g_plain.items():
        np.testing.assert_allclose(g_tiled[name], g, rtol=1e-4, atol=1e-6 * scale, err_msg=name)


# ------------------------------------------------------------------------------------------- init
def test_same_seed_same_weights_different_seed_different_weights():
    a, b, c = (Transformer(config(), seed=s) for s in (3, 3, 4))
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=na)
        if np.unique(pa.data).size > 1:  # LayerNorm and bias inits are constants, the same for every seed
            assert not np.array_equal(pa.data, pc.data), na


def test_init_statistics_follow_gpt2():
    """N(0, init_std) weights, residual projections N(0, init_std / sqrt(2 n_layers)), zero biases,
    LayerNorm at (1, 0)."""
    cfg = config(d_model=64, n_layers=4, init_std=0.05, vocab_size=300)
    params = dict(Transformer(cfg, seed=0).named_parameters())
    assert np.std(params["tok_emb.weight"].data) == pytest.approx(0.05, rel=0.03)
    assert np.std(params["blocks.0.mlp.fc1.weight"].data) == pytest.approx(0.05, rel=0.03)
    for name in ("blocks.2.attn.out_proj.weight", "blocks.3.mlp.fc2.weight"):
        assert np.std(params[name].data) == pytest.approx(0.05 / np.sqrt(8), rel=0.03), name
    assert not params["blocks.1.mlp.fc1.bias"].data.any()
    np.testing.assert_array_equal(params["ln_f.weight"].data, 1.0)
    np.testing.assert_array_equal(params["ln_f.bias"].data, 0.0)


def test_weights_are_the_same_in_every_dtype():
    """Params are drawn in float32 and cast: the float64 model is the float32 one, exactly widened."""
    m32, m64 = Transformer(config(), seed=5), Transformer(config(), seed=5, dtype=np.float64)
    for (n, p32), (_, p64) in zip(m32.named_parameters(), m64.named_parameters()):
        assert p64.dtype == np.float64
        np.testing.assert_array_equal(p64.data, p32.data.astype(np.float64), err_msg=n)


# -------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("task", ["lm", "classify"])
def test_low_precision_model_runs_and_stays_close_to_float32(dtype, task):
    cfg = config(task=task, init_std=0.2)  # not the near-uniform logits of a tiny init: a real comparison
    batch = lm_batch() if task == "lm" else classify_batch()
    ref = Transformer(cfg, seed=0)
    ref_loss, _ = ref.loss(batch)
    ref_loss.backward()
    model = Transformer(cfg, seed=0, dtype=dtype)
    loss, logits = model.loss(batch)
    loss.backward()
    assert logits.dtype == dtype
    assert np.isfinite(loss.item())
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    g = np.concatenate([p.grad.astype(np.float64).ravel() for p in model.parameters()])
    g_ref = np.concatenate([p.grad.astype(np.float64).ravel() for p in ref.parameters()])
    assert all(p.grad.dtype == dtype for p in model.parameters())
    assert np.isfinite(g).all()
    assert np.linalg.norm(g - g_ref) <= 5e-2 * np.linalg.norm(g_ref)


# ----------------------------------------------------------------------------------------- config
def test_attention_width_need_not_equal_d_model():
    cfg = config(d_model=12, n_heads=3, d_head=5, d_ff=20, n_layers=3)  # 3 * 5 = 15 != 12
    model = Transformer(cfg, seed=0)
    params = dict(model.named_parameters())
    assert params["blocks.0.attn.q_proj.weight"].shape == (15, 12)
    assert params["blocks.0.attn.out_proj.weight"].shape == (12, 15)
    assert params["blocks.2.mlp.fc1.weight"].shape == (20, 12)
    C, A, Fd, L = 12, 15, 20, 3
    per_block = 2 * 2 * C + 3 * (A * C + A) + (C * A + C) + (Fd * C + Fd) + (C * Fd + C)
    assert model.num_parameters() == V * C + 12 * C + L * per_block + 2 * C + V * C
    loss, logits = model.loss(lm_batch())
    loss.backward()
    assert logits.shape == (2, 7, V) and np.isfinite(loss.item())


def test_default_head_dim_and_ff_dim():
    cfg = config(d_model=16, n_heads=4)
    assert cfg.head_dim == 4 and cfg.ff_dim == 64


def test_sequence_longer_than_max_seq_len_raises_naming_both_numbers():
    model = Transformer(config(max_seq_len=6), seed=0)
    with pytest.raises(ValueError, match=r"(?s)(?=.*\b7\b)(?=.*\b6\b)"):
        model(np.zeros((1, 7), dtype=np.int64))
    assert model(np.zeros((1, 6), dtype=np.int64)).shape == (1, 6, V)


def test_bad_task_and_missing_n_classes_raise():
    with pytest.raises(ValueError, match="'regress'"):
        Transformer(config(task="regress"))
    with pytest.raises(ValueError, match="n_classes"):
        Transformer(config(task="classify", n_classes=None))


def test_parameter_names_are_dotted_in_registration_order():
    names = [n for n, _ in Transformer(config(n_layers=2, task="classify"), seed=0).named_parameters()]
    block = ["ln_1.weight", "ln_1.bias",
             "attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight", "attn.k_proj.bias",
             "attn.v_proj.weight", "attn.v_proj.bias", "attn.out_proj.weight", "attn.out_proj.bias",
             "ln_2.weight", "ln_2.bias",
             "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    assert names == (["tok_emb.weight", "pos_emb.weight"]
                     + [f"blocks.{i}.{n}" for i in range(2) for n in block]
                     + ["ln_f.weight", "ln_f.bias", "head.weight", "head.bias"])


def test_state_dict_round_trip_and_mismatch_errors():
    a, b = Transformer(config(), seed=0), Transformer(config(), seed=1)
    b.load_state_dict(a.state_dict())
    ids = lm_batch().ids
    np.testing.assert_array_equal(a(ids).numpy(), b(ids).numpy())
    state = a.state_dict()
    state.pop("ln_f.bias")
    with pytest.raises(ValueError, match="ln_f.bias"):
        b.load_state_dict(state)
    state = a.state_dict()
    state["ln_f.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"ln_f\.bias.*\(3,\)"):
        b.load_state_dict(state)


def test_backward_fills_every_parameter_gradient_with_its_shape():
    model = Transformer(config(task="classify"), seed=0)
    loss, _ = model.loss(classify_batch())
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype, n

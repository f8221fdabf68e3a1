"""NumbaBackend.warmup: call every kernel once per signature its wrapper can produce.

numba compiles one specialisation per argument types. The wrappers hand kernels C-contiguous float32 or
float64 arrays of fixed ndim (float16/bfloat16 arrive upcast, or as uint16 bits where a kernel reads them
directly), intp ids and targets, so these calls cover every specialisation used later.
"""
import ml_dtypes
import numpy as np


def warmup(be) -> None:
    rng = np.random.default_rng(0)
    ids = np.array([[0, 1], [1, 0]])
    for dt in (np.float32, np.float64):
        x = rng.standard_normal((2, 3)).astype(dt)
        w, b = np.ones(3, dt), np.zeros(3, dt)
        be.softmax_backward(x, be.softmax(x))
        y, mean, rstd = be.layernorm(x, w, b)
        be.layernorm_backward(x, x, w, mean, rstd)
        be.gelu_backward(x, be.gelu(x))
        be.embedding(x, ids)
        be.embedding_backward(be.embedding(x, ids), ids, 3)
        t = np.array([1, -100])
        loss, lse = be.cross_entropy(x, t)
        be.cross_entropy_backward(loss, x, t, lse)
        q = rng.standard_normal((1, 2, 3, 2)).astype(dt)
        qt = rng.standard_normal((1, 3, 2, 2)).astype(dt).transpose(0, 2, 1, 3)   # the model's head views
        for block in (None, 2):
            for a in (q, qt):
                out, lse = be.attention(a, a, a, causal=True, block_size=block)
                be.attention_backward(a, a, a, a, out, lse, causal=True, block_size=block)
        be.sum_squares(x)
        be.has_inf_or_nan(x)
        big = np.ones(1 << 16, dt)                    # the sizes matmul and add run on numba's threads
        be.add(big, big)
        be.matmul(big.reshape(-1, 64)[:64], big.reshape(64, -1)[:, :8])
    for lowp in (np.float16, ml_dtypes.bfloat16):  # uint16-bit paths: fp16/bf16 grads, copies, reductions
        x = np.ones(4, lowp)
        be.embedding(x.reshape(2, 2), ids)
        be.sum_squares(x)
        be.has_inf_or_nan(x)
    for grad_dtype in (np.float32, np.float16, ml_dtypes.bfloat16):  # one Adam kernel per copy-out and mode
        for copy in (None, np.float16, ml_dtypes.bfloat16):
            for adamw_mode in (True, False):
                p, m, v = np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32)
                be.adam_step(p, np.ones(4, grad_dtype), m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                             weight_decay=0.01, step=1, adamw_mode=adamw_mode,
                             out_lowp=None if copy is None else np.empty(4, copy))
        for copy in (None, np.float32, np.float16, ml_dtypes.bfloat16):   # the lanes: a float32 copy too
            for adamw_mode in (True, False):
                p, m, v = np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32)
                be.adam_lanes(p, np.ones(4, grad_dtype), m, v, bounds=[0, 4], first=0, work=be.new_work(1),
                              lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1,
                              adamw_mode=adamw_mode, out_lowp=None if copy is None else np.empty(4, copy))()
    be.pieces_done(be.new_work(1))
    be.cast(be.cast(np.ones(4, np.float32), ml_dtypes.bfloat16), np.float32)

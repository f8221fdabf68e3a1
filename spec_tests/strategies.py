"""Hypothesis strategies for the spec tests: shapes, dtypes, and whole kernel problems.

Arrays are not drawn element by element (slow, and shrinking ten thousand floats teaches nothing): a
strategy draws the *structure* of a problem (shapes, flags, a seed) and the values come from
np.random.default_rng(seed). A failing example therefore prints as a short, replayable line of shapes
and a seed. Values are bounded (|x| <= offset + 6 * scale), finite and free of subnormals, which GPUs
may flush to zero (FTZ/DAZ) while NumPy does not; that difference is not what these tests are about.

Sizes favour the edges of typical tiles (16/32/64, the block sizes of numba/CuPy kernels and of
FlashAttention): 1, a tile +- 1, and odd primes, so that short last tiles and size-1 dims are common.
"""
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

bfloat16 = ml_dtypes.bfloat16

FLOAT_DTYPES = (np.float64, np.float32, np.float16, bfloat16)
LOW_PRECISION = (np.float16, bfloat16)
TILE_EDGE_SIZES = (1, 2, 3, 5, 7, 15, 16, 17, 31, 33, 63, 64, 65)

seeds = st.integers(0, 2**32 - 1)


def dtype_id(dtype) -> str:
    """A readable pytest id for a dtype ("float32", "bfloat16")."""
    return np.dtype(dtype).name


def float_dtypes(low_precision=True):
    """float64, float32 and (unless low_precision=False) float16 and bfloat16."""
    return st.sampled_from(FLOAT_DTYPES if low_precision else FLOAT_DTYPES[:2])


def sizes(max_size=65, min_size=1):
    """One dimension: often a tile edge, otherwise any size in [min_size, max_size]."""
    edges = [s for s in TILE_EDGE_SIZES if min_size <= s <= max_size]
    return st.one_of(st.sampled_from(edges), st.integers(min_size, max_size)) if edges \
        else st.integers(min_size, max_size)


def shapes(min_dims=1, max_dims=3, max_size=33):
    """Array shapes with min_dims..max_dims dims of sizes(max_size) (size-1 dims included)."""
    return st.lists(sizes(max_size), min_size=min_dims, max_size=max_dims).map(tuple)


def random_array(seed, shape, dtype, *, scale=1.0, offset=0.0, bound=6.0):
    """A finite, bounded, subnormal-free array of `dtype`: offset + scale * clip(N(0, 1), +-bound).

    seed: an int or a np.random.Generator. Values are generated in float64 and rounded once to dtype,
    so the same seed gives "the same" values in every dtype.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    info = ml_dtypes.finfo(dtype)
    if abs(offset) + scale * bound > float(info.max):
        raise ValueError(f"offset {offset} + {bound} * scale {scale} overflows {np.dtype(dtype).name}")
    x = offset + scale * np.clip(rng.standard_normal(shape), -bound, bound)
    x = x.astype(dtype).astype(np.float64)
    x = np.where(np.abs(x) < float(info.smallest_normal), 0.0, x)  # flush subnormals to zero
    return x.astype(dtype)


# -------------------------------------------------------------------------------------------- matmul
@st.composite
def matmul_shapes(draw, max_size=65, max_batch_dims=2):
    """(a_shape, b_shape, transpose_a, transpose_b) for a batched matmul whose leading (batch) dims
    broadcast: each operand may drop leading batch dims or hold 1 where the other has n."""
    batch = draw(st.lists(st.integers(1, 3), max_size=max_batch_dims))
    m, k = draw(sizes(max_size)), draw(sizes(max_size))
    n = k if draw(st.booleans()) else draw(sizes(max_size))  # square b half the time: a transpose shows
    ta, tb = draw(st.booleans()), draw(st.booleans())

    def operand_batch():
        keep = draw(st.integers(0, len(batch)))  # trailing batch dims this operand has
        dims = batch[len(batch) - keep:]
        return tuple(1 if draw(st.booleans()) else d for d in dims)

    a_shape = operand_batch() + ((k, m) if ta else (m, k))
    b_shape = operand_batch() + ((n, k) if tb else (k, n))
    return a_shape, b_shape, ta, tb


# ----------------------------------------------------------------------------------------- attention
@dataclass(frozen=True)
class AttentionProblem:
    """One attention call: q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv), a key padding mask.

    mask_kind: "none", "random" (30 % of keys are padding) or "full" (as random, and one batch element
    is all padding, so its query rows see no key). causal with Tq > Tk also leaves rows with no key.
    """
    B: int
    H: int
    Tq: int
    Tk: int
    D: int
    Dv: int
    causal: bool
    mask_kind: str
    scale: float | None
    block_size: int
    seed: int

    def key_padding_mask(self):
        """(B, Tk) bool, True = padding, or None."""
        if self.mask_kind == "none":
            return None
        rng = np.random.default_rng([self.seed, 1])
        mask = rng.random((self.B, self.Tk)) < 0.3
        if self.mask_kind == "full":
            mask[rng.integers(self.B)] = True
        return mask

    def inputs(self, dtype):
        """q, k, v and an upstream gradient dout (B, H, Tq, Dv), all of `dtype`."""
        rng = np.random.default_rng(self.seed)
        q = random_array(rng, (self.B, self.H, self.Tq, self.D), dtype)
        k = random_array(rng, (self.B, self.H, self.Tk, self.D), dtype)
        v = random_array(rng, (self.B, self.H, self.Tk, self.Dv), dtype)
        dout = random_array(rng, (self.B, self.H, self.Tq, self.Dv), dtype)
        return q, k, v, dout

    @property
    def kw(self):
        return dict(causal=self.causal, key_padding_mask=self.key_padding_mask(), scale=self.scale)


@st.composite
def attention_problems(draw, max_t=65, max_d=33, max_b=2, max_h=3, max_blocks=8):
    """AttentionProblems with tile-edge lengths (Dv == D or not), causal or not, padding masks (fully
    masked rows included), an explicit or default softmax scale, and a block size for the tiled form
    chosen so that neither sequence is cut into more than max_blocks blocks (short Python loops)."""
    tq = draw(sizes(max_t))
    tk = tq if draw(st.booleans()) else draw(sizes(max_t))
    block = draw(st.sampled_from([1, 2, 3, 5, 8, 16, 17, 32, 64]))
    block = max(block, -(-max(tq, tk) // max_blocks))
    d = draw(sizes(max_d))
    dv = d if draw(st.booleans()) else draw(sizes(max_d))  # the value head dim may differ (usually not)
    return AttentionProblem(
        B=draw(st.integers(1, max_b)), H=draw(st.integers(1, max_h)), Tq=tq, Tk=tk,
        D=d, Dv=dv, causal=draw(st.booleans()),
        mask_kind=draw(st.sampled_from(["none", "random", "full"])),
        scale=draw(st.sampled_from([None, 0.125, 1.0])), block_size=block, seed=draw(seeds))


# ----------------------------------------------------------------------------------------- embedding
@dataclass(frozen=True)
class EmbeddingProblem:
    """A (V, D) table read at `ids` of shape ids_shape drawn from n_distinct rows, with repeats."""
    V: int
    D: int
    ids_shape: tuple
    n_distinct: int
    id_dtype: str
    seed: int

    def ids(self):
        rng = np.random.default_rng([self.seed, 2])
        rows = rng.choice(self.V, size=self.n_distinct, replace=False)
        ids = rng.choice(rows, size=self.ids_shape).astype(self.id_dtype)
        if ids.size >= 2:
            ids.flat[-1] = ids.flat[0]  # at least one row is read twice
        return ids

    def weight(self, dtype):
        return random_array(self.seed, (self.V, self.D), dtype)

    def dout(self, dtype):
        return random_array([self.seed, 3], self.ids_shape + (self.D,), dtype)


@st.composite
def embedding_problems(draw, max_v=50, max_d=33):
    v = draw(st.integers(1, max_v))
    ids_shape = tuple(draw(st.lists(sizes(17), min_size=1, max_size=2)))
    return EmbeddingProblem(V=v, D=draw(sizes(max_d)), ids_shape=ids_shape,
                            n_distinct=draw(st.integers(1, v)),
                            id_dtype=draw(st.sampled_from(["int32", "int64"])), seed=draw(seeds))


# ------------------------------------------------------------------------------------- cross-entropy
@dataclass(frozen=True)
class CrossEntropyProblem:
    """logits (N, C) = offset + logit_scale * N(0, 1); targets (N,) with a fraction ignored."""
    N: int
    C: int
    ignore_index: int
    ignore_frac: float
    logit_scale: float
    offset: float
    seed: int

    def logits(self, dtype):
        return random_array(self.seed, (self.N, self.C), dtype, scale=self.logit_scale, offset=self.offset)

    def targets(self):
        rng = np.random.default_rng([self.seed, 4])
        t = rng.integers(0, self.C, size=self.N)
        t[rng.random(self.N) < self.ignore_frac] = self.ignore_index
        return t

    def dloss(self):
        return float(np.random.default_rng([self.seed, 5]).uniform(0.5, 2.0))


@st.composite
def cross_entropy_problems(draw, max_n=33, max_c=65):
    """Includes all-ignored batches (ignore_frac 1) and large logits (scale 8, offset 1000)."""
    return CrossEntropyProblem(
        N=draw(sizes(max_n)), C=draw(sizes(max_c)),
        ignore_index=draw(st.sampled_from([-100, -1])),
        ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])),
        logit_scale=draw(st.sampled_from([1.0, 8.0])),
        offset=draw(st.sampled_from([0.0, 1000.0])), seed=draw(seeds))


# ---------------------------------------------------------------------------------------------- adam
def adam_hyperparams():
    """Keyword arguments of adam_step: both weight-decay modes, a loss-scale divisor (grad_scale) that
    is exact (1024) or not (0.37), step counts where bias correction matters (1, 2) or not, and bias
    correction on or off (DeepSpeed's ``bias_correction``)."""
    return st.fixed_dictionaries(dict(
        lr=st.sampled_from([1e-4, 1e-3, 3e-2]),
        beta1=st.sampled_from([0.0, 0.9]),
        beta2=st.sampled_from([0.95, 0.999]),
        eps=st.sampled_from([1e-8, 1e-6]),
        weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
        step=st.one_of(st.sampled_from([1, 2]), st.integers(1, 1000)),
        grad_scale=st.sampled_from([1.0, 0.37, 1024.0]),
        adamw_mode=st.booleans(),
        bias_correction=st.booleans(),
    ))

"""The CUDA C++ of the CuPy backend: one NVRTC module, every kernel a template over the storage type.

Storage types (what an array holds) and the compute type each is read into (DESIGN.md, Numerics: fp16/bf16
are computed in fp32 and rounded once; float64 stays float64):

    double -> double     float -> float     f16_t -> float     bf16_t -> float

f16_t and bf16_t are 16-bit patterns (CuPy passes float16 and bfloat16 arrays to these kernels as uint16
views). Conversions round to nearest even and overflow to +-inf as numpy/ml_dtypes do (cvt.rn.f16.f32 for
float16); widening is exact. float64 ->
bfloat16 goes through float32 as ml_dtypes does. float32 -> bfloat16 is integer round-to-nearest-even
(cvt.rn.bf16.f32 flushed float32 subnormals to zero on the H200 run).

Reductions are tree reductions in a fixed order (deterministic run to run); nothing uses floating-point
atomics. The AdamW kernel uses the __f*_rn intrinsics so nvcc never contracts a*b+c into an FMA: its
arithmetic is then the reference's, operation for operation.
"""

SOURCE = r"""
typedef long long i64;
typedef unsigned short u16;
struct f16_t { u16 b; };
struct bf16_t { u16 b; };
struct none_t { u16 b; };  // "no output" for adam's optional low-precision copy

// ------------------------------------------------------------------------------- conversions
__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ u16 d2h(double d) { u16 h; asm("cvt.rn.f16.f64 %0, %1;" : "=h"(h) : "d"(d)); return h; }
__device__ __forceinline__ float b2f(u16 b) { return __uint_as_float(((unsigned)b) << 16); }
// float -> bfloat16 by integer rounding (exact for subnormals, which the device run showed cvt.rn.bf16.f32
// flushing to zero): add 0x7FFF plus the lowest kept bit, drop 16 bits; NaN stays a quiet NaN.
__device__ __forceinline__ u16 f2b(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ double get(const double* p, i64 i) { return p[i]; }
__device__ __forceinline__ float get(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float get(const f16_t* p, i64 i) { return h2f(p[i].b); }
__device__ __forceinline__ float get(const bf16_t* p, i64 i) { return b2f(p[i].b); }

__device__ __forceinline__ void put(double* p, i64 i, double v) { p[i] = v; }
__device__ __forceinline__ void put(float* p, i64 i, double v) { p[i] = (float)v; }
__device__ __forceinline__ void put(f16_t* p, i64 i, double v) { p[i].b = d2h(v); }
__device__ __forceinline__ void put(bf16_t* p, i64 i, double v) { p[i].b = f2b((float)v); }
__device__ __forceinline__ void put(none_t*, i64, double) {}
__device__ __forceinline__ void put(double* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void put(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void put(f16_t* p, i64 i, float v) { p[i].b = f2h(v); }
__device__ __forceinline__ void put(bf16_t* p, i64 i, float v) { p[i].b = f2b(v); }
__device__ __forceinline__ void put(none_t*, i64, float) {}

template <typename T> struct Acc { typedef float C; };
template <> struct Acc<double> { typedef double C; };

__device__ __forceinline__ float xexp(float x) { return expf(x); }
__device__ __forceinline__ double xexp(double x) { return exp(x); }
__device__ __forceinline__ float xlog(float x) { return logf(x); }
__device__ __forceinline__ double xlog(double x) { return log(x); }
__device__ __forceinline__ float xsqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double xsqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float xtanh(float x) { return tanhf(x); }
__device__ __forceinline__ double xtanh(double x) { return tanh(x); }
__device__ __forceinline__ bool xfinite(float x) { return isfinite(x); }
__device__ __forceinline__ bool xfinite(double x) { return isfinite(x); }
template <typename C> __device__ __forceinline__ C neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000LL); }
template <typename C> __device__ __forceinline__ C quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }

// ------------------------------------------------------------------------------- reductions
template <typename C> __device__ __forceinline__ C warp_sum(C v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <typename C> __device__ __forceinline__ C warp_max(C v) {
    for (int o = 16; o > 0; o >>= 1) { C w = __shfl_xor_sync(0xffffffffu, v, o); v = w > v ? w : v; }
    return v;
}
// Sum or max over the block (blockDim.x a multiple of 32); `red` is __shared__ C[32]; every thread gets it.
template <typename C, bool MAX> __device__ C block_reduce(C v, C* red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();  // red may still be read by a previous call
    if (lane == 0) red[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? red[lane] : (MAX ? neg_inf<C>() : (C)0);
        v = MAX ? warp_max(v) : warp_sum(v);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    return red[0];
}

// ------------------------------------------------------------------------------- elementwise
template <typename S, typename D> __global__ void cast_k(const S* x, D* y, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        put(y, i, get(x, i));
}

// GELU, tanh form, term for term as refimpl/kernels/dense.py
template <typename T> __global__ void gelu_fwd(const T* x, T* y, i64 n) {
    typedef typename Acc<T>::C C;
    const C k = (C)0.7978845608028654, c = (C)0.044715;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        C v = get(x, i);
        C inner = k * (v + c * (v * v * v));
        put(y, i, (C)0.5 * v * ((C)1 + xtanh(inner)));
    }
}
template <typename T> __global__ void gelu_bwd(const T* dy, const T* x, T* dx, i64 n) {
    typedef typename Acc<T>::C C;
    const C k = (C)0.7978845608028654, c = (C)0.044715, c3 = (C)0.134145;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        C v = get(x, i);
        C t = xtanh(k * (v + c * (v * v * v)));
        C dinner = k * ((C)1 + c3 * (v * v));
        C dg = (C)0.5 * ((C)1 + t) + (C)0.5 * v * ((C)1 - t * t) * dinner;
        put(dx, i, get(dy, i) * dg);
    }
}

// IEEE float32 arithmetic that keeps subnormals. cp.RawModule appends -ftz=true to the caller's options, so every
// compiler-emitted float instruction (even __fadd_rn) flushes subnormals to zero; explicit PTX without .ftz does not.
// The AdamW step must equal the reference bit for bit, subnormal master weights included.
__device__ __forceinline__ float add_rn(float a, float b) { float r; asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float sub_rn(float a, float b) { float r; asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float mul_rn(float a, float b) { float r; asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float div_rn(float a, float b) { float r; asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float sqrt_rn(float a) { float r; asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a)); return r; }

// One fused AdamW step (refimpl/kernels/optim.py::adam_step, operation for operation, no FMA contraction).
template <typename G, typename O>
__global__ void adam_k(float* p, const G* g, float* m, float* v, O* out, i64 n, float grad_scale, int has_scale,
                       int has_wd, int adamw, float decay, float wd, float b1, float omb1, float b2, float omb2,
                       float bc2_sqrt, float eps, float step_size) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float gi = (float)get(g, i);
        if (has_scale) gi = div_rn(gi, grad_scale);
        float pi = p[i];
        if (has_wd) {
            if (adamw) pi = mul_rn(pi, decay);
            else gi = add_rn(gi, mul_rn(wd, pi));
        }
        float mi = add_rn(mul_rn(m[i], b1), mul_rn(omb1, gi));
        float vi = add_rn(mul_rn(v[i], b2), mul_rn(mul_rn(omb2, gi), gi));
        float denom = add_rn(div_rn(sqrt_rn(vi), bc2_sqrt), eps);
        pi = sub_rn(pi, div_rn(mul_rn(step_size, mi), denom));
        p[i] = pi; m[i] = mi; v[i] = vi;
        put(out, i, pi);
    }
}

// sum of squares in float64: one partial per block, summed by the caller (fixed order: deterministic)
template <typename T> __global__ void sumsq_k(const T* x, double* partial, i64 n) {
    __shared__ double red[32];
    double acc = 0;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        double v = (double)get(x, i);
        acc += v * v;
    }
    acc = block_reduce<double, false>(acc, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <typename T> __global__ void nonfinite_k(const T* x, int* flag, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        if (!xfinite(get(x, i))) { *flag = 1; return; }  // every writer writes 1: no race on the value
}

// ------------------------------------------------------------------------------- row kernels
// One block per row (grid-stride over rows); rows are contiguous, length D.
template <typename T> __global__ void softmax_fwd(const T* x, T* y, i64 rows, int D) {
    typedef typename Acc<T>::C C;
    __shared__ C red[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * D; T* yr = y + r * D;
        C mx = neg_inf<C>();
        for (int j = threadIdx.x; j < D; j += blockDim.x) { C v = get(xr, j); mx = v > mx ? v : mx; }
        mx = block_reduce<C, true>(mx, red);
        C s = 0;
        for (int j = threadIdx.x; j < D; j += blockDim.x) s += xexp(get(xr, j) - mx);
        s = block_reduce<C, false>(s, red);
        for (int j = threadIdx.x; j < D; j += blockDim.x) put(yr, j, xexp(get(xr, j) - mx) / s);
    }
}

template <typename T> __global__ void softmax_bwd(const T* dy, const T* y, T* dx, i64 rows, int D) {
    typedef typename Acc<T>::C C;
    __shared__ C red[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        i64 o = r * D;
        C s = 0;
        for (int j = threadIdx.x; j < D; j += blockDim.x) s += get(dy, o + j) * get(y, o + j);
        s = block_reduce<C, false>(s, red);
        for (int j = threadIdx.x; j < D; j += blockDim.x) put(dx, o + j, get(y, o + j) * (get(dy, o + j) - s));
    }
}

// LayerNorm: two-pass mean and (biased) variance; w, b already in the compute type.
template <typename T>
__global__ void layernorm_fwd(const T* x, const typename Acc<T>::C* w, const typename Acc<T>::C* b, T* y,
                              typename Acc<T>::C* mean, typename Acc<T>::C* rstd, i64 rows, int D,
                              typename Acc<T>::C eps) {
    typedef typename Acc<T>::C C;
    __shared__ C red[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        i64 o = r * D;
        C s = 0;
        for (int j = threadIdx.x; j < D; j += blockDim.x) s += get(x, o + j);
        C mu = block_reduce<C, false>(s, red) / (C)D;
        C q = 0;
        for (int j = threadIdx.x; j < D; j += blockDim.x) { C d = get(x, o + j) - mu; q += d * d; }
        C var = block_reduce<C, false>(q, red) / (C)D;
        C rs = (C)1 / xsqrt(var + eps);
        for (int j = threadIdx.x; j < D; j += blockDim.x) put(y, o + j, (get(x, o + j) - mu) * rs * w[j] + b[j]);
        if (threadIdx.x == 0) { mean[r] = mu; rstd[r] = rs; }
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w
template <typename T>
__global__ void layernorm_bwd_dx(const T* dy, const T* x, const typename Acc<T>::C* w,
                                 const typename Acc<T>::C* mean, const typename Acc<T>::C* rstd, T* dx,
                                 i64 rows, int D) {
    typedef typename Acc<T>::C C;
    __shared__ C red[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        i64 o = r * D;
        C mu = mean[r], rs = rstd[r];
        C sg = 0, sgx = 0;
        for (int j = threadIdx.x; j < D; j += blockDim.x) {
            C g = get(dy, o + j) * w[j], xh = (get(x, o + j) - mu) * rs;
            sg += g; sgx += g * xh;
        }
        C mg = block_reduce<C, false>(sg, red) / (C)D;
        C mgx = block_reduce<C, false>(sgx, red) / (C)D;
        for (int j = threadIdx.x; j < D; j += blockDim.x) {
            C g = get(dy, o + j) * w[j], xh = (get(x, o + j) - mu) * rs;
            put(dx, o + j, rs * (g - mg - xh * mgx));
        }
    }
}

// dweight, dbias: per (row chunk, column) partial sums, summed over chunks by the caller (deterministic).
template <typename T>
__global__ void layernorm_bwd_dwdb(const T* dy, const T* x, const typename Acc<T>::C* mean,
                                   const typename Acc<T>::C* rstd, typename Acc<T>::C* pw,
                                   typename Acc<T>::C* pb, i64 rows, int D, i64 rows_per_chunk) {
    typedef typename Acc<T>::C C;
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= D) return;
    i64 r0 = blockIdx.y * rows_per_chunk, r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    C aw = 0, ab = 0;
    for (i64 r = r0; r < r1; ++r) {
        C d = get(dy, r * D + j);
        aw += d * ((get(x, r * D + j) - mean[r]) * rstd[r]);
        ab += d;
    }
    pw[(i64)blockIdx.y * D + j] = aw;
    pb[(i64)blockIdx.y * D + j] = ab;
}

// Cross-entropy: per-row log-sum-exp and NLL (0 on ignored rows, NaN for a target outside [0, C)).
template <typename T>
__global__ void xent_fwd(const T* z, const i64* t, typename Acc<T>::C* lse, typename Acc<T>::C* nll, i64 rows,
                         int nc, i64 ignore) {
    typedef typename Acc<T>::C C;
    __shared__ C red[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* zr = z + r * nc;
        C mx = neg_inf<C>();
        for (int j = threadIdx.x; j < nc; j += blockDim.x) { C v = get(zr, j); mx = v > mx ? v : mx; }
        mx = block_reduce<C, true>(mx, red);
        C s = 0;
        for (int j = threadIdx.x; j < nc; j += blockDim.x) s += xexp(get(zr, j) - mx);
        s = block_reduce<C, false>(s, red);
        if (threadIdx.x == 0) {
            C l = mx + xlog(s);
            lse[r] = l;
            i64 ti = t[r];
            nll[r] = ti == ignore ? (C)0 : (ti < 0 || ti >= nc) ? quiet_nan<C>() : l - get(zr, ti);
        }
    }
}

// dz = (exp(z - lse) - onehot(t)) * coef on valid rows, 0 on ignored ones; coef = dloss / count (device)
template <typename T>
__global__ void xent_bwd(const T* z, const i64* t, const typename Acc<T>::C* lse,
                         const typename Acc<T>::C* coef, T* dz, i64 rows, int nc, i64 ignore) {
    typedef typename Acc<T>::C C;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        i64 ti = t[r];
        C c = ti == ignore ? (C)0 : *coef, l = lse[r];
        for (int j = threadIdx.x; j < nc; j += blockDim.x) {
            C p = xexp(get(z, r * nc + j) - l);
            if (j == ti) p -= (C)1;
            put(dz, r * nc + j, p * c);
        }
    }
}

// Embedding backward, sort-based (deterministic, no atomics): rows of dout sorted by id; one block row per
// run of equal ids sums its rows in position order and writes the table row once.
template <typename T>
__global__ void embedding_bwd(const T* dout, const i64* order, const i64* sorted_ids, const i64* seg_start,
                              i64 nseg, i64 n, int D, typename Acc<T>::C* dw) {
    typedef typename Acc<T>::C C;
    i64 s = blockIdx.x;
    int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (s >= nseg || j >= D) return;
    i64 a = seg_start[s], e = s + 1 < nseg ? seg_start[s + 1] : n;
    C acc = 0;
    for (i64 k = a; k < e; ++k) acc += get(dout, order[k] * D + j);
    dw[sorted_ids[a] * D + j] = acc;
}

// ------------------------------------------------------------------------------- FlashAttention-2
// Layout (B, H, T, D) contiguous. Key j is visible to query i iff j < Tk, it is not padding, and (causal)
// j <= i + (Tk - Tq). A row with no visible key: out = 0, lse = -inf (refimpl/kernels/attention.py).
// Threads: 4 warps. Forward and dQ: each warp owns RPW query rows, a key tile holds 32 keys (one per lane)
// in shared memory; scores are lane-parallel over keys, P @ V lane-parallel over the head dim.
#define FA_NW 4
#define FA_RPW 4
#define FA_BQ (FA_NW * FA_RPW)
#define FA_BK 32
#define FA_MAXD 128
#define FA_DPL (FA_MAXD / 32)

__device__ __forceinline__ bool fa_visible(int qi, int kj, int Tq, int Tk, int causal, const unsigned char* kpm,
                                           int has_mask, int b) {
    if (kj >= Tk || qi >= Tq) return false;
    if (causal && kj > qi + (Tk - Tq)) return false;
    if (has_mask && kpm[(i64)b * Tk + kj]) return false;
    return true;
}

template <typename T, typename C>
__device__ __forceinline__ void fa_load_tile(C* dst, int ld, const T* src, int row0, int nrows, int T_, int D) {
    // dst[r * ld + d] = src[(row0 + r) * D + d], zero past T_
    for (int idx = threadIdx.x; idx < nrows * D; idx += blockDim.x) {
        int r = idx / D, d = idx - r * D, gr = row0 + r;
        dst[r * ld + d] = gr < T_ ? (C)get(src, (i64)gr * D + d) : (C)0;
    }
}

template <typename T>
__global__ void flash_fwd(const T* q, const T* k, const T* v, T* out, typename Acc<T>::C* lse,
                          const unsigned char* kpm, int has_mask, int causal, int H, int Tq, int Tk, int D, int Dv,
                          typename Acc<T>::C scale) {
    typedef typename Acc<T>::C C;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    C* sK = (C*)smem_raw;              // FA_BK x (D + 1)
    C* sV = sK + FA_BK * (D + 1);      // FA_BK x (Dv + 1)
    C* sQ = sV + FA_BK * (Dv + 1);     // FA_BQ x D
    C* sP = sQ + FA_BQ * D;            // FA_BQ x FA_BK
    const int bh = blockIdx.y, b = bh / H, q0 = blockIdx.x * FA_BQ;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const T* qb = q + (i64)bh * Tq * D;
    const T* kb = k + (i64)bh * Tk * D;
    const T* vb = v + (i64)bh * Tk * Dv;
    fa_load_tile(sQ, D, qb, q0, FA_BQ, Tq, D);

    C m[FA_RPW], l[FA_RPW], acc[FA_RPW][FA_DPL];
    _Pragma("unroll") for (int rr = 0; rr < FA_RPW; ++rr) {
        m[rr] = neg_inf<C>(); l[rr] = 0;
        _Pragma("unroll") for (int c = 0; c < FA_DPL; ++c) acc[rr][c] = 0;
    }
    const int q1 = min(q0 + FA_BQ, Tq);
    // key tiles past the causal diagonal of the block's last query are invisible to the whole block
    const int kend = causal ? min(Tk, (q1 - 1) + (Tk - Tq) + 1) : Tk;
    for (int k0 = 0; k0 < kend; k0 += FA_BK) {
        __syncthreads();  // everyone is done with the previous tile
        fa_load_tile(sK, D + 1, kb, k0, FA_BK, Tk, D);
        fa_load_tile(sV, Dv + 1, vb, k0, FA_BK, Tk, Dv);
        __syncthreads();
        const int kj = k0 + lane;
        _Pragma("unroll") for (int rr = 0; rr < FA_RPW; ++rr) {
            const int r = w * FA_RPW + rr, qi = q0 + r;
            const bool ok = fa_visible(qi, kj, Tq, Tk, causal, kpm, has_mask, b);
            C s = neg_inf<C>();
            if (ok) {
                C dot = 0;
                for (int d = 0; d < D; ++d) dot += sQ[r * D + d] * sK[lane * (D + 1) + d];
                s = scale * dot;
            }
            const C m_new = max(m[rr], warp_max(s));
            const C m_safe = xfinite(m_new) ? m_new : (C)0;    // no key yet: shift by 0, exp(-inf) = 0
            const C p = ok ? xexp(s - m_safe) : (C)0;
            const C alpha = xexp(m[rr] - m_safe);               // 0 while m was -inf
            l[rr] = alpha * l[rr] + warp_sum(p);
            sP[r * FA_BK + lane] = p;
            __syncwarp();
            _Pragma("unroll") for (int c = 0; c < FA_DPL; ++c) {
                const int d = lane + 32 * c;
                if (d < Dv) {
                    C a = alpha * acc[rr][c];
                    for (int j = 0; j < FA_BK; ++j) a += sP[r * FA_BK + j] * sV[j * (Dv + 1) + d];
                    acc[rr][c] = a;
                }
            }
            __syncwarp();
            m[rr] = m_new;
        }
    }
    _Pragma("unroll") for (int rr = 0; rr < FA_RPW; ++rr) {
        const int qi = q0 + w * FA_RPW + rr;
        if (qi >= Tq) continue;
        const bool has = l[rr] > (C)0;
        const C ls = has ? l[rr] : (C)1;
        _Pragma("unroll") for (int c = 0; c < FA_DPL; ++c) {
            const int d = lane + 32 * c;
            if (d < Dv) put(out, ((i64)bh * Tq + qi) * Dv + d, acc[rr][c] / ls);
        }
        if (lane == 0) lse[(i64)bh * Tq + qi] = has ? m[rr] + xlog(ls) : neg_inf<C>();
    }
}

// Backward, dK and dV (FlashAttention-2 Algorithm 2's outer loop over key blocks): a block owns 32 keys
// (8 per warp), walks the query tiles (32 queries, one per lane) that can see them, recomputing
// P = exp(S - L) and dS = P (dP - Di). L is the lse with -inf replaced by 0; Di = rowsum(dO * O).
#define FA_KPW 8
template <typename T>
__global__ void flash_bwd_dkdv(const T* q, const T* k, const T* v, const T* dout, const typename Acc<T>::C* L,
                               const typename Acc<T>::C* Di, T* dk, T* dv, const unsigned char* kpm, int has_mask,
                               int causal, int H, int Tq, int Tk, int D, int Dv, typename Acc<T>::C scale) {
    typedef typename Acc<T>::C C;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    C* sK = (C*)smem_raw;                 // 32 x (D + 1)
    C* sV = sK + 32 * (D + 1);            // 32 x (Dv + 1)
    C* sQ = sV + 32 * (Dv + 1);           // 32 x (D + 1)
    C* sO = sQ + 32 * (D + 1);            // 32 x (Dv + 1)   dO
    C* sL = sO + 32 * (Dv + 1);           // 32
    C* sD = sL + 32;                      // 32
    C* sP = sD + 32;                      // FA_NW x 32
    C* sS = sP + FA_NW * 32;              // FA_NW x 32
    const int bh = blockIdx.y, b = bh / H, k0 = blockIdx.x * 32;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const T* qb = q + (i64)bh * Tq * D;
    const T* ob = dout + (i64)bh * Tq * Dv;
    fa_load_tile(sK, D + 1, k + (i64)bh * Tk * D, k0, 32, Tk, D);
    fa_load_tile(sV, Dv + 1, v + (i64)bh * Tk * Dv, k0, 32, Tk, Dv);

    C gk[FA_KPW][FA_DPL], gv[FA_KPW][FA_DPL];
    _Pragma("unroll") for (int kk = 0; kk < FA_KPW; ++kk)
        _Pragma("unroll") for (int c = 0; c < FA_DPL; ++c) { gk[kk][c] = 0; gv[kk][c] = 0; }
    // queries before this one see none of the block's keys (causal)
    int qstart = causal ? max(0, k0 - (Tk - Tq)) : 0;
    for (int q0 = qstart; q0 < Tq; q0 += 32) {
        __syncthreads();
        fa_load_tile(sQ, D + 1, qb, q0, 32, Tq, D);
        fa_load_tile(sO, Dv + 1, ob, q0, 32, Tq, Dv);
        if (threadIdx.x < 32) {
            int qi = q0 + threadIdx.x;
            sL[threadIdx.x] = qi < Tq ? L[(i64)bh * Tq + qi] : (C)0;
            sD[threadIdx.x] = qi < Tq ? Di[(i64)bh * Tq + qi] : (C)0;
        }
        __syncthreads();
        const int qi = q0 + lane;
        _Pragma("unroll") for (int kk = 0; kk < FA_KPW; ++kk) {
            const int jl = w * FA_KPW + kk, kj = k0 + jl;
            C p = 0, ds = 0;
            if (fa_visible(qi, kj, Tq, Tk, causal, kpm, has_mask, b)) {
                C s = 0, dp = 0;
                for (int d = 0; d < D; ++d) s += sQ[lane * (D + 1) + d] * sK[jl * (D + 1) + d];
                p = xexp(scale * s - sL[lane]);
                for (int d = 0; d < Dv; ++d) dp += sO[lane * (Dv + 1) + d] * sV[jl * (Dv + 1) + d];
                ds = p * (dp - sD[lane]);
            }
            sP[w * 32 + lane] = p;
            sS[w * 32 + lane] = ds;
            __syncwarp();
            _Pragma("unroll") for (int c = 0; c < FA_DPL; ++c) {
                const int d = lane + 32 * c;
                if (d < Dv) { C a = gv[kk][c]; for (int i = 0; i < 32; ++i) a += sP[w * 32 + i] * sO[i * (Dv + 1) + d]; gv[kk][c] = a; }
                if (d < D)  { C a = gk[kk][c]; for (int i = 0; i < 32; ++i) a += sS[w * 32 + i] * sQ[i * (D + 1) + d]; gk[kk][c] = a; }
            }
            __syncwarp();
        }
    }
    _Pragma("unroll") for (int kk = 0; kk < FA_KPW; ++kk) {
        const int kj = k0 + w * FA_KPW + kk;
        if (kj >= Tk) continue;
        _Pragma("unroll") for (int c = 0; c < FA_DPL; ++c) {
            const int d = lane + 32 * c;
            if (d < D) put(dk, ((i64)bh * Tk + kj) * D + d, scale * gk[kk][c]);
            if (d < Dv) put(dv, ((i64)bh * Tk + kj) * Dv + d, gv[kk][c]);
        }
    }
}

// Backward, dQ: a second pass over key tiles per query block, so dQ needs no atomics (deterministic).
template <typename T>
__global__ void flash_bwd_dq(const T* q, const T* k, const T* v, const T* dout, const typename Acc<T>::C* L,
                             const typename Acc<T>::C* Di, T* dq, const unsigned char* kpm, int has_mask,
                             int causal, int H, int Tq, int Tk, int D, int Dv, typename Acc<T>::C scale) {
    typedef typename Acc<T>::C C;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    C* sK = (C*)smem_raw;              // FA_BK x (D + 1)
    C* sV = sK + FA_BK * (D + 1);      // FA_BK x (Dv + 1)
    C* sQ = sV + FA_BK * (Dv + 1);     // FA_BQ x D
    C* sO = sQ + FA_BQ * D;            // FA_BQ x Dv  dO
    C* sS = sO + FA_BQ * Dv;           // FA_BQ x FA_BK
    const int bh = blockIdx.y, b = bh / H, q0 = blockIdx.x * FA_BQ;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    fa_load_tile(sQ, D, q + (i64)bh * Tq * D, q0, FA_BQ, Tq, D);
    fa_load_tile(sO, Dv, dout + (i64)bh * Tq * Dv, q0, FA_BQ, Tq, Dv);
    const T* kb = k + (i64)bh * Tk * D;
    const T* vb = v + (i64)bh * Tk * Dv;
    C gq[FA_RPW][FA_DPL], Lr[FA_RPW], Dr[FA_RPW];
    _Pragma("unroll") for (int rr = 0; rr < FA_RPW; ++rr) {
        const int qi = q0 + w * FA_RPW + rr;
        Lr[rr] = qi < Tq ? L[(i64)bh * Tq + qi] : (C)0;
        Dr[rr] = qi < Tq ? Di[(i64)bh * Tq + qi] : (C)0;
        _Pragma("unroll") for (int c = 0; c < FA_DPL; ++c) gq[rr][c] = 0;
    }
    const int q1 = min(q0 + FA_BQ, Tq);
    const int kend = causal ? min(Tk, (q1 - 1) + (Tk - Tq) + 1) : Tk;
    for (int k0 = 0; k0 < kend; k0 += FA_BK) {
        __syncthreads();
        fa_load_tile(sK, D + 1, kb, k0, FA_BK, Tk, D);
        fa_load_tile(sV, Dv + 1, vb, k0, FA_BK, Tk, Dv);
        __syncthreads();
        const int kj = k0 + lane;
        _Pragma("unroll") for (int rr = 0; rr < FA_RPW; ++rr) {
            const int r = w * FA_RPW + rr, qi = q0 + r;
            C ds = 0;
            if (fa_visible(qi, kj, Tq, Tk, causal, kpm, has_mask, b)) {
                C s = 0, dp = 0;
                for (int d = 0; d < D; ++d) s += sQ[r * D + d] * sK[lane * (D + 1) + d];
                const C p = xexp(scale * s - Lr[rr]);
                for (int d = 0; d < Dv; ++d) dp += sO[r * Dv + d] * sV[lane * (Dv + 1) + d];
                ds = p * (dp - Dr[rr]);
            }
            sS[r * FA_BK + lane] = ds;
            __syncwarp();
            _Pragma("unroll") for (int c = 0; c < FA_DPL; ++c) {
                const int d = lane + 32 * c;
                if (d < D) {
                    C a = gq[rr][c];
                    for (int j = 0; j < FA_BK; ++j) a += sS[r * FA_BK + j] * sK[j * (D + 1) + d];
                    gq[rr][c] = a;
                }
            }
            __syncwarp();
        }
    }
    _Pragma("unroll") for (int rr = 0; rr < FA_RPW; ++rr) {
        const int qi = q0 + w * FA_RPW + rr;
        if (qi >= Tq) continue;
        _Pragma("unroll") for (int c = 0; c < FA_DPL; ++c) {
            const int d = lane + 32 * c;
            if (d < D) put(dq, ((i64)bh * Tq + qi) * D + d, scale * gq[rr][c]);
        }
    }
}
// ------------------------------------------------------------------------------- FlashAttention-2, tensor cores
// bf16 / fp16 inputs (all of q, k, v, dO in one of them): the same algorithm and masks as above, with every
// matrix product on tensor cores (mma.sync m16n8k16, fp32 accumulators; fragments from shared memory by
// ldmatrix). Softmax statistics, P and dS are fp32 in registers. P and dS enter their products as a bf16/fp16
// pair hi + lo (hi = round(x), lo = round(x - hi)), which keeps ~16 (bf16) / ~22 (fp16) bits of the fp32
// value: rounding them once to the input dtype would be the low-precision accumulation the tolerance table
// rejects. fp16's P is scaled by 2^15 (P <= 1) so that lo stays a normal number; accumulators are unscaled
// at the end. Tiles: MAXD (64 or 128) head-dim columns, zero past D, rows strided MAXD + 8 halves (16 bytes
// of padding: ldmatrix's eight row addresses then fall in distinct banks). 4 warps, 16 rows of 16 each.
#define TC_BQ 64    // forward, dQ: queries per block (16 per warp)
#define TC_BK 64    // forward: keys per tile
#define TC_BKQ 32   // dQ: keys per tile
#define TC_BKK 64   // dK/dV: keys per block (16 per warp)
#define TC_BQK 32   // dK/dV: queries per tile

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
// four 8x8 b16 matrices; lanes 8i..8i+7 give matrix i's row addresses (16 bytes each)
__device__ __forceinline__ void ldsm_x4(unsigned* r, const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)) : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(unsigned* r, const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)) : "memory");
}
// A (16x16, row-major) = M[r0.., k0..]
__device__ __forceinline__ void frag_a(unsigned* a, const u16* M, int ld, int r0, int k0) {
    const int l = threadIdx.x & 31;
    ldsm_x4(a, M + (r0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + k0 + (l >> 4) * 8);
}
// B (16x8) for n-tiles n0 (b[0], b[1]) and n0 + 8 (b[2], b[3]), with B[k][n] = M[n][k] (M's rows are n)
__device__ __forceinline__ void frag_b_rows(unsigned* b, const u16* M, int ld, int n0, int k0) {
    const int l = threadIdx.x & 31;
    ldsm_x4(b, M + (n0 + (l & 7) + (l >> 4) * 8) * ld + k0 + ((l >> 3) & 1) * 8);
}
// the same with B[k][n] = M[k][n] (M's rows are k): transposed load
__device__ __forceinline__ void frag_b_cols(unsigned* b, const u16* M, int ld, int k0, int n0) {
    const int l = threadIdx.x & 31;
    ldsm_x4_t(b, M + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + n0 + (l >> 4) * 8);
}

__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1, bf16_t) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1, f16_t) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// c += (hi + lo) b: the fp32 operand's two halves
__device__ __forceinline__ void mma_pair(float* c, const unsigned* hi, const unsigned* lo, unsigned b0, unsigned b1,
                                         bf16_t t) { mma16816(c, hi, b0, b1, t); mma16816(c, lo, b0, b1, t); }
__device__ __forceinline__ void mma_pair(float* c, const unsigned* hi, const unsigned* lo, unsigned b0, unsigned b1,
                                         f16_t t) { mma16816(c, hi, b0, b1, t); mma16816(c, lo, b0, b1, t); }

// (x0, x1) -> packed pair, x0 in the low half (the lower column of a fragment)
__device__ __forceinline__ unsigned pack2(float x0, float x1, bf16_t) {
    unsigned r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x1), "f"(x0)); return r;
}
__device__ __forceinline__ unsigned pack2(float x0, float x1, f16_t) {
    unsigned r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x1), "f"(x0)); return r;
}
__device__ __forceinline__ float unpack_lo(unsigned r, bf16_t) { return __uint_as_float(r << 16); }
__device__ __forceinline__ float unpack_hi(unsigned r, bf16_t) { return __uint_as_float(r & 0xffff0000u); }
__device__ __forceinline__ float unpack_lo(unsigned r, f16_t) { return h2f((u16)(r & 0xffffu)); }
__device__ __forceinline__ float unpack_hi(unsigned r, f16_t) { return h2f((u16)(r >> 16)); }
__device__ __forceinline__ float pscale(bf16_t) { return 1.f; }
__device__ __forceinline__ float pscale(f16_t) { return 32768.f; }
template <typename T> __device__ __forceinline__ void split2(float x0, float x1, unsigned& hi, unsigned& lo) {
    hi = pack2(x0, x1, T());
    lo = pack2(x0 - unpack_lo(hi, T()), x1 - unpack_hi(hi, T()), T());
}
// A fragments (hi, lo) of a 16x16 slice of a 16 x n accumulator tile: n-tiles c0 and c0 + 1, times f
template <typename T> __device__ __forceinline__ void acc_to_a(const float (*c)[4], int c0, float f, unsigned* hi,
                                                              unsigned* lo) {
    split2<T>(c[c0][0] * f, c[c0][1] * f, hi[0], lo[0]);
    split2<T>(c[c0][2] * f, c[c0][3] * f, hi[1], lo[1]);
    split2<T>(c[c0 + 1][0] * f, c[c0 + 1][1] * f, hi[2], lo[2]);
    split2<T>(c[c0 + 1][2] * f, c[c0 + 1][3] * f, hi[3], lo[3]);
}
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// dst[r * (MAXD + 8) + c] = src[(row0 + r) * D + c] for c < D and row0 + r < nvalid, else 0 (c < MAXD)
template <typename T, int MAXD>
__device__ __forceinline__ void tc_load(u16* dst, const T* src, int row0, int nrows, int nvalid, int D) {
    const int LD = MAXD + 8;
    const u16* s = (const u16*)src;
    if ((D & 7) == 0 && (((unsigned long long)s) & 15) == 0) {  // 16-byte vectors
        const int CPR = MAXD / 8;
        for (int idx = threadIdx.x; idx < nrows * CPR; idx += blockDim.x) {
            const int r = idx / CPR, c = (idx - r * CPR) * 8, gr = row0 + r;
            uint4 val = make_uint4(0u, 0u, 0u, 0u);
            if (gr < nvalid && c < D) val = *(const uint4*)(s + (i64)gr * D + c);
            *(uint4*)(dst + r * LD + c) = val;
        }
    } else {
        for (int idx = threadIdx.x; idx < nrows * MAXD; idx += blockDim.x) {
            const int r = idx / MAXD, c = idx - r * MAXD, gr = row0 + r;
            dst[r * LD + c] = (gr < nvalid && c < D) ? s[(i64)gr * D + c] : (u16)0;
        }
    }
}

template <typename T, int MAXD>
__global__ void __launch_bounds__(128) flash_fwd_tc(const T* q, const T* k, const T* v, T* out, float* lse,
                                                    const unsigned char* kpm, int has_mask, int causal, int H,
                                                    int Tq, int Tk, int D, int Dv, float scale) {
    constexpr int LD = MAXD + 8, NKD = MAXD / 16, NT = MAXD / 8, NS = TC_BK / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* sQ = (u16*)smem_raw;                                  // TC_BQ x LD
    u16* sK = sQ + TC_BQ * LD;                                 // TC_BK x LD
    u16* sV = sK + TC_BK * LD;                                 // TC_BK x LD
    unsigned char* sM = (unsigned char*)(sV + TC_BK * LD);     // TC_BK: key exists and is not padding
    const int bh = blockIdx.y, b = bh / H, q0 = blockIdx.x * TC_BQ, shift = Tk - Tq;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, t = lane & 3;
    const int qa = q0 + w * 16 + (lane >> 2), qb = qa + 8;    // this thread's two rows
    const T* kb = k + (i64)bh * Tk * D;
    const T* vb = v + (i64)bh * Tk * Dv;
    tc_load<T, MAXD>(sQ, q + (i64)bh * Tq * D, q0, TC_BQ, Tq, D);
    __syncthreads();
    unsigned qf[NKD][4];
    _Pragma("unroll") for (int kc = 0; kc < NKD; ++kc) frag_a(qf[kc], sQ, LD, w * 16, kc * 16);
    float acc[NT][4];
    _Pragma("unroll") for (int n = 0; n < NT; ++n) { acc[n][0] = 0.f; acc[n][1] = 0.f; acc[n][2] = 0.f; acc[n][3] = 0.f; }
    float m_a = neg_inf<float>(), m_b = neg_inf<float>(), l_a = 0.f, l_b = 0.f;  // l: this lane's columns
    const float ps = pscale(T());
    const int q1 = min(q0 + TC_BQ, Tq), wlast = min(q0 + w * 16 + 15, Tq - 1);
    const int kend = causal ? min(Tk, (q1 - 1) + shift + 1) : Tk;
    for (int k0 = 0; k0 < kend; k0 += TC_BK) {
        __syncthreads();  // everyone is done with the previous tile
        tc_load<T, MAXD>(sK, kb, k0, TC_BK, Tk, D);
        tc_load<T, MAXD>(sV, vb, k0, TC_BK, Tk, Dv);
        if (threadIdx.x < TC_BK) {
            const int kj = k0 + threadIdx.x;
            sM[threadIdx.x] = kj < Tk && !(has_mask && kpm[(i64)b * Tk + kj]);
        }
        __syncthreads();
        if (q0 + w * 16 >= Tq || (causal && k0 > wlast + shift)) continue;  // nothing visible to this warp
        float s[NS][4];
        _Pragma("unroll") for (int n = 0; n < NS; ++n) { s[n][0] = 0.f; s[n][1] = 0.f; s[n][2] = 0.f; s[n][3] = 0.f; }
        _Pragma("unroll") for (int kc = 0; kc < NKD; ++kc)
            _Pragma("unroll") for (int np = 0; np < NS / 2; ++np) {
                unsigned bf[4];
                frag_b_rows(bf, sK, LD, np * 16, kc * 16);
                mma16816(s[2 * np], qf[kc], bf[0], bf[1], T());
                mma16816(s[2 * np + 1], qf[kc], bf[2], bf[3], T());
            }
        float mx_a = neg_inf<float>(), mx_b = neg_inf<float>();
        _Pragma("unroll") for (int n = 0; n < NS; ++n)
            _Pragma("unroll") for (int e = 0; e < 4; ++e) {
                const int jl = n * 8 + 2 * t + (e & 1), kj = k0 + jl, qi = e < 2 ? qa : qb;
                const bool ok = sM[jl] && qi < Tq && (!causal || kj <= qi + shift);
                const float x = ok ? scale * s[n][e] : neg_inf<float>();
                s[n][e] = x;
                if (e < 2) mx_a = fmaxf(mx_a, x); else mx_b = fmaxf(mx_b, x);
            }
        const float mn_a = fmaxf(m_a, quad_max(mx_a)), mn_b = fmaxf(m_b, quad_max(mx_b));
        const float ms_a = isfinite(mn_a) ? mn_a : 0.f, ms_b = isfinite(mn_b) ? mn_b : 0.f;  // no key yet: 0
        const float al_a = expf(m_a - ms_a), al_b = expf(m_b - ms_b);                      // 0 while m = -inf
        m_a = mn_a; m_b = mn_b;
        l_a *= al_a; l_b *= al_b;
        _Pragma("unroll") for (int n = 0; n < NT; ++n) { acc[n][0] *= al_a; acc[n][1] *= al_a; acc[n][2] *= al_b; acc[n][3] *= al_b; }
        _Pragma("unroll") for (int n = 0; n < NS; ++n)
            _Pragma("unroll") for (int e = 0; e < 4; ++e) {
                const float p = expf(s[n][e] - (e < 2 ? ms_a : ms_b));  // masked: exp(-inf) = 0
                s[n][e] = p;
                if (e < 2) l_a += p; else l_b += p;
            }
        _Pragma("unroll") for (int kc = 0; kc < TC_BK / 16; ++kc) {
            unsigned ph[4], pl[4];
            acc_to_a<T>(s, 2 * kc, ps, ph, pl);
            _Pragma("unroll") for (int dp = 0; dp < NKD; ++dp) {
                unsigned bf[4];
                frag_b_cols(bf, sV, LD, kc * 16, dp * 16);
                mma_pair(acc[2 * dp], ph, pl, bf[0], bf[1], T());
                mma_pair(acc[2 * dp + 1], ph, pl, bf[2], bf[3], T());
            }
        }
    }
    l_a = quad_sum(l_a); l_b = quad_sum(l_b);
    const float inv = 1.f / ps;
    _Pragma("unroll") for (int h = 0; h < 2; ++h) {
        const int qi = h ? qb : qa;
        const float l = h ? l_b : l_a, m = h ? m_b : m_a;
        if (qi >= Tq) continue;
        const bool has = l > 0.f;
        const float ls = has ? l : 1.f;
        _Pragma("unroll") for (int n = 0; n < NT; ++n)
            _Pragma("unroll") for (int e = 0; e < 2; ++e) {
                const int d = n * 8 + 2 * t + e;
                if (d < Dv) put(out, ((i64)bh * Tq + qi) * Dv + d, acc[n][2 * h + e] * inv / ls);
            }
        if (t == 0) lse[(i64)bh * Tq + qi] = has ? m + logf(ls) : neg_inf<float>();
    }
}

// dQ = scale dS K, dS = P (dP - Di), P = exp(scale S - L), dP = dO V^T; per block 64 queries, key tiles of 32.
template <typename T, int MAXD>
__global__ void __launch_bounds__(128) flash_bwd_dq_tc(const T* q, const T* k, const T* v, const T* dout,
                                                       const float* L, const float* Di, T* dq,
                                                       const unsigned char* kpm, int has_mask, int causal, int H,
                                                       int Tq, int Tk, int D, int Dv, float scale) {
    constexpr int LD = MAXD + 8, NKD = MAXD / 16, NT = MAXD / 8, NS = TC_BKQ / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* sQ = (u16*)smem_raw;                                  // TC_BQ x LD
    u16* sO = sQ + TC_BQ * LD;                                 // TC_BQ x LD   dO
    u16* sK = sO + TC_BQ * LD;                                 // TC_BKQ x LD
    u16* sV = sK + TC_BKQ * LD;                                // TC_BKQ x LD
    unsigned char* sM = (unsigned char*)(sV + TC_BKQ * LD);    // TC_BKQ
    const int bh = blockIdx.y, b = bh / H, q0 = blockIdx.x * TC_BQ, shift = Tk - Tq;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, t = lane & 3;
    const int qa = q0 + w * 16 + (lane >> 2), qb = qa + 8;
    const T* kb = k + (i64)bh * Tk * D;
    const T* vb = v + (i64)bh * Tk * Dv;
    tc_load<T, MAXD>(sQ, q + (i64)bh * Tq * D, q0, TC_BQ, Tq, D);
    tc_load<T, MAXD>(sO, dout + (i64)bh * Tq * Dv, q0, TC_BQ, Tq, Dv);
    __syncthreads();
    unsigned qf[NKD][4], of[NKD][4];
    _Pragma("unroll") for (int kc = 0; kc < NKD; ++kc) {
        frag_a(qf[kc], sQ, LD, w * 16, kc * 16);
        frag_a(of[kc], sO, LD, w * 16, kc * 16);
    }
    const float L_a = qa < Tq ? L[(i64)bh * Tq + qa] : 0.f, L_b = qb < Tq ? L[(i64)bh * Tq + qb] : 0.f;
    const float D_a = qa < Tq ? Di[(i64)bh * Tq + qa] : 0.f, D_b = qb < Tq ? Di[(i64)bh * Tq + qb] : 0.f;
    float acc[NT][4];
    _Pragma("unroll") for (int n = 0; n < NT; ++n) { acc[n][0] = 0.f; acc[n][1] = 0.f; acc[n][2] = 0.f; acc[n][3] = 0.f; }
    const int q1 = min(q0 + TC_BQ, Tq), wlast = min(q0 + w * 16 + 15, Tq - 1);
    const int kend = causal ? min(Tk, (q1 - 1) + shift + 1) : Tk;
    for (int k0 = 0; k0 < kend; k0 += TC_BKQ) {
        __syncthreads();
        tc_load<T, MAXD>(sK, kb, k0, TC_BKQ, Tk, D);
        tc_load<T, MAXD>(sV, vb, k0, TC_BKQ, Tk, Dv);
        if (threadIdx.x < TC_BKQ) {
            const int kj = k0 + threadIdx.x;
            sM[threadIdx.x] = kj < Tk && !(has_mask && kpm[(i64)b * Tk + kj]);
        }
        __syncthreads();
        if (q0 + w * 16 >= Tq || (causal && k0 > wlast + shift)) continue;
        float s[NS][4], dp[NS][4];
        _Pragma("unroll") for (int n = 0; n < NS; ++n)
            _Pragma("unroll") for (int e = 0; e < 4; ++e) { s[n][e] = 0.f; dp[n][e] = 0.f; }
        _Pragma("unroll") for (int kc = 0; kc < NKD; ++kc)
            _Pragma("unroll") for (int np = 0; np < NS / 2; ++np) {
                unsigned bk[4], bv[4];
                frag_b_rows(bk, sK, LD, np * 16, kc * 16);
                mma16816(s[2 * np], qf[kc], bk[0], bk[1], T());
                mma16816(s[2 * np + 1], qf[kc], bk[2], bk[3], T());
                frag_b_rows(bv, sV, LD, np * 16, kc * 16);
                mma16816(dp[2 * np], of[kc], bv[0], bv[1], T());
                mma16816(dp[2 * np + 1], of[kc], bv[2], bv[3], T());
            }
        _Pragma("unroll") for (int n = 0; n < NS; ++n)
            _Pragma("unroll") for (int e = 0; e < 4; ++e) {
                const int jl = n * 8 + 2 * t + (e & 1), kj = k0 + jl, qi = e < 2 ? qa : qb;
                float ds = 0.f;
                if (sM[jl] && qi < Tq && (!causal || kj <= qi + shift)) {
                    const float p = expf(scale * s[n][e] - (e < 2 ? L_a : L_b));
                    ds = p * (dp[n][e] - (e < 2 ? D_a : D_b));
                }
                s[n][e] = ds;
            }
        _Pragma("unroll") for (int kc = 0; kc < TC_BKQ / 16; ++kc) {
            unsigned dh[4], dl[4];
            acc_to_a<T>(s, 2 * kc, 1.f, dh, dl);
            _Pragma("unroll") for (int dd = 0; dd < NKD; ++dd) {
                unsigned bk[4];
                frag_b_cols(bk, sK, LD, kc * 16, dd * 16);
                mma_pair(acc[2 * dd], dh, dl, bk[0], bk[1], T());
                mma_pair(acc[2 * dd + 1], dh, dl, bk[2], bk[3], T());
            }
        }
    }
    _Pragma("unroll") for (int h = 0; h < 2; ++h) {
        const int qi = h ? qb : qa;
        if (qi >= Tq) continue;
        _Pragma("unroll") for (int n = 0; n < NT; ++n)
            _Pragma("unroll") for (int e = 0; e < 2; ++e) {
                const int d = n * 8 + 2 * t + e;
                if (d < D) put(dq, ((i64)bh * Tq + qi) * D + d, scale * acc[n][2 * h + e]);
            }
    }
}

// dK = scale dS^T Q, dV = P^T dO; per block 64 keys (16 per warp), query tiles of 32; S^T = K Q^T, dP^T = V dO^T.
template <typename T, int MAXD>
__global__ void __launch_bounds__(128) flash_bwd_dkdv_tc(const T* q, const T* k, const T* v, const T* dout,
                                                         const float* L, const float* Di, T* dk, T* dv,
                                                         const unsigned char* kpm, int has_mask, int causal,
                                                         int H, int Tq, int Tk, int D, int Dv, float scale) {
    constexpr int LD = MAXD + 8, NKD = MAXD / 16, NT = MAXD / 8, NS = TC_BQK / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* sL = (float*)smem_raw;                              // TC_BQK
    float* sD = sL + TC_BQK;                                   // TC_BQK
    u16* sK = (u16*)(sD + TC_BQK);                             // TC_BKK x LD
    u16* sV = sK + TC_BKK * LD;                                // TC_BKK x LD
    u16* sQ = sV + TC_BKK * LD;                                // TC_BQK x LD
    u16* sO = sQ + TC_BQK * LD;                                // TC_BQK x LD   dO
    const int bh = blockIdx.y, b = bh / H, k0 = blockIdx.x * TC_BKK, shift = Tk - Tq;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, t = lane & 3;
    const int ka = k0 + w * 16 + (lane >> 2), kb2 = ka + 8;   // this thread's two keys
    const bool ok_a = ka < Tk && !(has_mask && kpm[(i64)b * Tk + ka]);
    const bool ok_b = kb2 < Tk && !(has_mask && kpm[(i64)b * Tk + kb2]);
    const T* qb = q + (i64)bh * Tq * D;
    const T* ob = dout + (i64)bh * Tq * Dv;
    tc_load<T, MAXD>(sK, k + (i64)bh * Tk * D, k0, TC_BKK, Tk, D);
    tc_load<T, MAXD>(sV, v + (i64)bh * Tk * Dv, k0, TC_BKK, Tk, Dv);
    float ak[NT][4], av[NT][4];
    _Pragma("unroll") for (int n = 0; n < NT; ++n)
        _Pragma("unroll") for (int e = 0; e < 4; ++e) { ak[n][e] = 0.f; av[n][e] = 0.f; }
    const float ps = pscale(T());
    const int wfirst = k0 + w * 16;                            // the warp's first key
    const int qstart = causal ? max(0, k0 - shift) : 0;        // earlier queries see none of the block's keys
    for (int q0 = qstart; q0 < Tq; q0 += TC_BQK) {
        __syncthreads();
        tc_load<T, MAXD>(sQ, qb, q0, TC_BQK, Tq, D);
        tc_load<T, MAXD>(sO, ob, q0, TC_BQK, Tq, Dv);
        if (threadIdx.x < TC_BQK) {
            const int qi = q0 + threadIdx.x;
            sL[threadIdx.x] = qi < Tq ? L[(i64)bh * Tq + qi] : 0.f;
            sD[threadIdx.x] = qi < Tq ? Di[(i64)bh * Tq + qi] : 0.f;
        }
        __syncthreads();
        const int qlast = min(q0 + TC_BQK - 1, Tq - 1);
        if (wfirst >= Tk || (causal && wfirst > qlast + shift)) continue;  // nothing visible to this warp
        float st[NS][4], dpt[NS][4];
        _Pragma("unroll") for (int n = 0; n < NS; ++n)
            _Pragma("unroll") for (int e = 0; e < 4; ++e) { st[n][e] = 0.f; dpt[n][e] = 0.f; }
        _Pragma("unroll") for (int kc = 0; kc < NKD; ++kc) {
            unsigned kf[4], vf[4];
            frag_a(kf, sK, LD, w * 16, kc * 16);
            frag_a(vf, sV, LD, w * 16, kc * 16);
            _Pragma("unroll") for (int np = 0; np < NS / 2; ++np) {
                unsigned bq[4], bo[4];
                frag_b_rows(bq, sQ, LD, np * 16, kc * 16);
                mma16816(st[2 * np], kf, bq[0], bq[1], T());
                mma16816(st[2 * np + 1], kf, bq[2], bq[3], T());
                frag_b_rows(bo, sO, LD, np * 16, kc * 16);
                mma16816(dpt[2 * np], vf, bo[0], bo[1], T());
                mma16816(dpt[2 * np + 1], vf, bo[2], bo[3], T());
            }
        }
        _Pragma("unroll") for (int n = 0; n < NS; ++n)
            _Pragma("unroll") for (int e = 0; e < 4; ++e) {
                const int ql = n * 8 + 2 * t + (e & 1), qi = q0 + ql, kj = e < 2 ? ka : kb2;
                float p = 0.f, ds = 0.f;
                if ((e < 2 ? ok_a : ok_b) && qi < Tq && (!causal || kj <= qi + shift)) {
                    p = expf(scale * st[n][e] - sL[ql]);
                    ds = p * (dpt[n][e] - sD[ql]);
                }
                st[n][e] = p;
                dpt[n][e] = ds;
            }
        _Pragma("unroll") for (int kc = 0; kc < TC_BQK / 16; ++kc) {
            unsigned ph[4], pl[4], dh[4], dl[4];
            acc_to_a<T>(st, 2 * kc, ps, ph, pl);
            acc_to_a<T>(dpt, 2 * kc, 1.f, dh, dl);
            _Pragma("unroll") for (int dd = 0; dd < NKD; ++dd) {
                unsigned bo[4], bq[4];
                frag_b_cols(bo, sO, LD, kc * 16, dd * 16);
                mma_pair(av[2 * dd], ph, pl, bo[0], bo[1], T());
                mma_pair(av[2 * dd + 1], ph, pl, bo[2], bo[3], T());
                frag_b_cols(bq, sQ, LD, kc * 16, dd * 16);
                mma_pair(ak[2 * dd], dh, dl, bq[0], bq[1], T());
                mma_pair(ak[2 * dd + 1], dh, dl, bq[2], bq[3], T());
            }
        }
    }
    const float inv = 1.f / ps;
    _Pragma("unroll") for (int h = 0; h < 2; ++h) {
        const int kj = h ? kb2 : ka;
        if (kj >= Tk) continue;
        _Pragma("unroll") for (int n = 0; n < NT; ++n)
            _Pragma("unroll") for (int e = 0; e < 2; ++e) {
                const int d = n * 8 + 2 * t + e;
                if (d < D) put(dk, ((i64)bh * Tk + kj) * D + d, scale * ak[n][2 * h + e]);
                if (d < Dv) put(dv, ((i64)bh * Tk + kj) * Dv + d, av[n][2 * h + e] * inv);
            }
    }
}
"""

#: C++ storage type of each dtype name the kernels take
CTYPE = {"float64": "double", "float32": "float", "float16": "f16_t", "bfloat16": "bf16_t"}
FLOATS = tuple(CTYPE.values())
GRADS = ("double", "float", "f16_t", "bf16_t")
OUTS = ("none_t", "float", "f16_t", "bf16_t")

ONE_TYPE = ("gelu_fwd", "gelu_bwd", "sumsq_k", "nonfinite_k", "softmax_fwd", "softmax_bwd", "layernorm_fwd",
            "layernorm_bwd_dx", "layernorm_bwd_dwdb", "xent_fwd", "xent_bwd", "embedding_bwd", "flash_fwd",
            "flash_bwd_dkdv", "flash_bwd_dq")
#: tensor-core attention kernels: one per 16-bit storage type and padded head dim (MAXD)
TENSOR_CORE = ("flash_fwd_tc", "flash_bwd_dq_tc", "flash_bwd_dkdv_tc")
HALVES = ("f16_t", "bf16_t")
TC_HEAD_DIMS = (64, 128)


def name_expressions():
    """Every template instantiation the backend calls (NVRTC compiles exactly these)."""
    names = [f"{k}<{t}>" for k in ONE_TYPE for t in FLOATS]
    names += [f"cast_k<{s}, {d}>" for s in FLOATS for d in FLOATS]
    names += [f"adam_k<{g}, {o}>" for g in GRADS for o in OUTS]
    names += [f"{k}<{t}, {d}>" for k in TENSOR_CORE for t in HALVES for d in TC_HEAD_DIMS]
    return names

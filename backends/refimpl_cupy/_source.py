"""The CUDA C++ of the CuPy backend: one NVRTC module, every kernel a template over the storage type.

Storage types (what an array holds) and the compute type each is read into (docs/architecture.md, "Numerics": fp16/bf16
are computed in fp32 and rounded once; float64 stays float64):

    double -> double     float -> float     f16_t -> float     bf16_t -> float

f16_t and bf16_t are 16-bit patterns (CuPy passes float16 and bfloat16 arrays to these kernels as uint16
views). Conversions round to nearest even and overflow to +-inf as numpy/ml_dtypes do (cvt.rn.f16.f32 for
float16); widening is exact. float64 ->
bfloat16 goes through float32 as ml_dtypes does. float32 -> bfloat16 is integer round-to-nearest-even
(cvt.rn.bf16.f32 flushed float32 subnormals to zero on the H200 run).

Reductions are tree reductions in a fixed order (deterministic run to run); nothing uses floating-point
atomics. The AdamW kernel's arithmetic is explicit PTX (add.rn.f32, ...): never contracted into an FMA and never
flushing subnormals (CuPy compiles with -ftz=true), so it is the reference's, operation for operation.
The attention kernels are in _flash_source.py.
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
template <typename C> __device__ __forceinline__ C gelu_of(C v) {
    const C k = (C)0.7978845608028654, c = (C)0.044715;
    C inner = k * (v + c * (v * v * v));
    return (C)0.5 * v * ((C)1 + xtanh(inner));
}
template <typename C> __device__ __forceinline__ C gelu_grad_of(C v) {
    const C k = (C)0.7978845608028654, c = (C)0.044715, c3 = (C)0.134145;
    C t = xtanh(k * (v + c * (v * v * v)));
    C dinner = k * ((C)1 + c3 * (v * v));
    return (C)0.5 * ((C)1 + t) + (C)0.5 * v * ((C)1 - t * t) * dinner;
}
template <typename T> __global__ void gelu_fwd(const T* x, T* y, i64 n) {
    typedef typename Acc<T>::C C;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        put(y, i, gelu_of<C>(get(x, i)));
}
template <typename T> __global__ void gelu_bwd(const T* dy, const T* x, T* dx, i64 n) {
    typedef typename Acc<T>::C C;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        put(dx, i, get(dy, i) * gelu_grad_of<C>(get(x, i)));
}

// IEEE float32 arithmetic that keeps subnormals. cp.RawModule appends -ftz=true to the caller's options, so every
// compiler-emitted float instruction (even __fadd_rn) flushes subnormals to zero; explicit PTX without .ftz does not.
// The AdamW step must equal the reference bit for bit, subnormal master weights included.
__device__ __forceinline__ float add_rn(float a, float b) { float r; asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float sub_rn(float a, float b) { float r; asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float mul_rn(float a, float b) { float r; asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float div_rn(float a, float b) { float r; asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float sqrt_rn(float a) { float r; asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a)); return r; }

// ------------------------------------------------------------------------ 16-bit elementwise, 8 values a load
// fp16/bf16 arrays are read and written 8 values per 16-byte access (uint4): these kernels are bound by memory,
// and 2-byte accesses used about a third of the H200's bandwidth. The arithmetic per value is the scalar kernels'.
template <typename T> __device__ __forceinline__ float h16_get(u16 b);
template <> __device__ __forceinline__ float h16_get<bf16_t>(u16 b) { return b2f(b); }
template <> __device__ __forceinline__ float h16_get<f16_t>(u16 b) { return h2f(b); }
template <typename T> __device__ __forceinline__ u16 h16_put(float f);
template <> __device__ __forceinline__ u16 h16_put<bf16_t>(float f) { return f2b(f); }
template <> __device__ __forceinline__ u16 h16_put<f16_t>(float f) { return f2h(f); }

template <typename T> __global__ void gelu_fwd8(const uint4* x, uint4* y, i64 n8) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n8; i += (i64)gridDim.x * blockDim.x) {
        uint4 vx = x[i], r;
        const u16* hx = reinterpret_cast<const u16*>(&vx);
        u16* hr = reinterpret_cast<u16*>(&r);
#pragma unroll
        for (int k = 0; k < 8; ++k) hr[k] = h16_put<T>(gelu_of<float>(h16_get<T>(hx[k])));
        y[i] = r;
    }
}
template <typename T> __global__ void gelu_bwd8(const uint4* dy, const uint4* x, uint4* dx, i64 n8) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n8; i += (i64)gridDim.x * blockDim.x) {
        uint4 vd = dy[i], vx = x[i], r;
        const u16 *hd = reinterpret_cast<const u16*>(&vd), *hx = reinterpret_cast<const u16*>(&vx);
        u16* hr = reinterpret_cast<u16*>(&r);
#pragma unroll
        for (int k = 0; k < 8; ++k) hr[k] = h16_put<T>(h16_get<T>(hd[k]) * gelu_grad_of<float>(h16_get<T>(hx[k])));
        dx[i] = r;
    }
}

// dst (R x C, contiguous) = src (r x c, element strides sr, sc) and zeros beyond it: 16-bit values as bits. The
// padded, aligned operands of the 16-bit GEMMs (dense.py's _gemm_2d); also their strided copies.
__global__ void pad2d_u16(const u16* src, i64 r, i64 c, i64 sr, i64 sc, u16* dst, i64 R, i64 C) {
    for (i64 y = blockIdx.y; y < R; y += gridDim.y)
        for (i64 x = blockIdx.x * (i64)blockDim.x + threadIdx.x; x < C; x += (i64)gridDim.x * blockDim.x)
            dst[y * C + x] = (y < r && x < c) ? src[y * sr + x * sc] : (u16)0;
}

// y = a + b, b repeating every nb values (nb = n: same shape; a bias over a's trailing dims: its size). An fp32
// add that keeps subnormals (add_rn), rounded once to the storage type: NumPy's and ml_dtypes' a + b, bit for bit.
template <typename T> __global__ void add_k(const T* a, const T* b, T* y, i64 n, i64 nb) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        put(y, i, add_rn(get(a, i), get(b, nb == n ? i : i % nb)));
}
template <typename T> __global__ void add8(const uint4* a, const uint4* b, uint4* y, i64 n8, i64 nb8) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n8; i += (i64)gridDim.x * blockDim.x) {
        uint4 va = a[i], vb = b[nb8 == n8 ? i : i % nb8], r;
        const u16 *ha = reinterpret_cast<const u16*>(&va), *hb = reinterpret_cast<const u16*>(&vb);
        u16* hr = reinterpret_cast<u16*>(&r);
#pragma unroll
        for (int k = 0; k < 8; ++k) hr[k] = h16_put<T>(add_rn(h16_get<T>(ha[k]), h16_get<T>(hb[k])));
        y[i] = r;
    }
}

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

// LayerNorm: two-pass mean and (biased) variance. w, b are stored as W: x's type (read as they are) or the
// compute type (a weight of another dtype, upcast by the caller).
template <typename T, typename W>
__global__ void layernorm_fwd(const T* x, const W* w, const W* b, T* y,
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
        for (int j = threadIdx.x; j < D; j += blockDim.x)
            put(y, o + j, (get(x, o + j) - mu) * rs * (C)get(w, j) + (C)get(b, j));
        if (threadIdx.x == 0) { mean[r] = mu; rstd[r] = rs; }
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w
template <typename T, typename W>
__global__ void layernorm_bwd_dx(const T* dy, const T* x, const W* w,
                                 const typename Acc<T>::C* mean, const typename Acc<T>::C* rstd, T* dx,
                                 i64 rows, int D) {
    typedef typename Acc<T>::C C;
    __shared__ C red[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        i64 o = r * D;
        C mu = mean[r], rs = rstd[r];
        C sg = 0, sgx = 0;
        for (int j = threadIdx.x; j < D; j += blockDim.x) {
            C g = get(dy, o + j) * (C)get(w, j), xh = (get(x, o + j) - mu) * rs;
            sg += g; sgx += g * xh;
        }
        C mg = block_reduce<C, false>(sg, red) / (C)D;
        C mgx = block_reduce<C, false>(sgx, red) / (C)D;
        for (int j = threadIdx.x; j < D; j += blockDim.x) {
            C g = get(dy, o + j) * (C)get(w, j), xh = (get(x, o + j) - mu) * rs;
            put(dx, o + j, rs * (g - mg - xh * mgx));
        }
    }
}

// dweight, dbias: per (row chunk, column) partial sums, then layernorm_bwd_dwdb_sum adds the chunks in order
// (deterministic) and rounds once to the weight's type.
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

template <typename C, typename W>
__global__ void layernorm_bwd_dwdb_sum(const C* pw, const C* pb, W* dw, W* db, int chunks, int D) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= D) return;
    C aw = 0, ab = 0;
    for (int c = 0; c < chunks; ++c) { aw += pw[(i64)c * D + j]; ab += pb[(i64)c * D + j]; }
    put(dw, j, aw);
    put(db, j, ab);
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

// Embedding backward, sort-based (deterministic, no atomics): rows of dout sorted by (id, position); the block
// row at the first position of each run of equal ids sums the run's rows in position order and writes the table
// row once. One block row per position (the others return at once), so the host never needs the run count
// (which would wait for the GPU).
template <typename T>
__global__ void embedding_bwd(const T* dout, const i64* order, const i64* sorted_ids, i64 n, int D,
                              typename Acc<T>::C* dw) {
    typedef typename Acc<T>::C C;
    i64 a = blockIdx.x;
    int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (a >= n || j >= D) return;
    i64 id = sorted_ids[a];
    if (a > 0 && sorted_ids[a - 1] == id) return;   // not the first of its run
    i64 lo = a + 1, hi = n;                         // the run's end: binary search, ids are sorted
    while (lo < hi) { i64 mid = (lo + hi) >> 1; if (sorted_ids[mid] == id) lo = mid + 1; else hi = mid; }
    C acc = 0;
    for (i64 k = a; k < lo; ++k) acc += get(dout, order[k] * D + j);
    dw[id * D + j] = acc;
}

"""

from ._flash_source import SOURCE as _FLASH

SOURCE += _FLASH   # one module: the attention kernels use the helpers above


#: C++ storage type of each dtype name the kernels take
CTYPE = {"float64": "double", "float32": "float", "float16": "f16_t", "bfloat16": "bf16_t"}
FLOATS = tuple(CTYPE.values())
GRADS = ("double", "float", "f16_t", "bf16_t")
OUTS = ("none_t", "float", "f16_t", "bf16_t")

ONE_TYPE = ("gelu_fwd", "gelu_bwd", "sumsq_k", "nonfinite_k", "softmax_fwd", "softmax_bwd", "layernorm_bwd_dwdb", "xent_fwd", "xent_bwd", "embedding_bwd", "flash_fwd",
            "flash_bwd_dkdv", "flash_bwd_dq")
HALVES = ("f16_t", "bf16_t")
#: tensor-core attention tiles per padded head dim (MAXD): forward and dQ (m-tiles of 16 queries per warp, keys
#: per tile), dK/dV (m-tiles of 16 keys per warp, queries per tile); 4 warps a block (_flash_source.py)
TC_TILES = {64: {"flash_fwd_tc": (2, 64), "flash_bwd_dq_tc": (1, 64), "flash_bwd_dkdv_tc": (1, 64)},
            128: {"flash_fwd_tc": (2, 48), "flash_bwd_dq_tc": (1, 64), "flash_bwd_dkdv_tc": (1, 32)}}
#: other tiles compiled for bfloat16 only, for benchmarks/gpu.py to compare (attention.py's `tiles` argument)
TC_VARIANTS = {64: {"flash_fwd_tc": [(1, 64)], "flash_bwd_dkdv_tc": [(2, 32)]},
               128: {"flash_fwd_tc": [(2, 32)], "flash_bwd_dkdv_tc": [(1, 64)]}}


def tc_name(kernel, ctype, maxd, tiles):
    return f"{kernel}<{ctype}, {maxd}, {tiles[0]}, {tiles[1]}>"


def name_expressions():
    """Every template instantiation the backend calls (NVRTC compiles exactly these)."""
    names = [f"{k}<{t}>" for k in ONE_TYPE for t in FLOATS]
    names += [f"cast_k<{s}, {d}>" for s in FLOATS for d in FLOATS]
    # layernorm's weight: stored as x (W = T) or in the compute type (W = C)
    names += [f"{k}<{t}, {w}>" for k in ("layernorm_fwd", "layernorm_bwd_dx") for t in FLOATS
              for w in dict.fromkeys((t, "double" if t == "double" else "float"))]
    names += [f"layernorm_bwd_dwdb_sum<{c}, {w}>" for c in ("float", "double") for w in FLOATS]
    names += [f"adam_k<{g}, {o}>" for g in GRADS for o in OUTS]
    names += [tc_name(k, t, d, tiles) for d, kt in TC_TILES.items() for k, tiles in kt.items() for t in HALVES]
    names += [tc_name(k, "bf16_t", d, tiles) for d, kt in TC_VARIANTS.items() for k, v in kt.items() for tiles in v]
    names += [f"flash_bwd_pre_tc<{t}>" for t in HALVES]
    names += [f"{k}<{t}>" for k in ("add_k", "add8", "gelu_fwd8", "gelu_bwd8") for t in HALVES] + ["pad2d_u16"]
    return names

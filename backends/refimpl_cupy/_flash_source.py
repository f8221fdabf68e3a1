"""The CUDA C++ of the CuPy backend's attention: FlashAttention-2 forward and backward (Dao 2023, arXiv 2307.08691,
Algorithms 1 and 2), appended to the kernels of _source.py in the same NVRTC module (it uses their type helpers).

- flash_fwd / flash_bwd_*: CUDA cores, every storage type (float64/float32 inputs, and the readable version).
- flash_*_tc: tensor cores (mma.sync.m16n8k16, fp32 accumulation) for float16/bfloat16 at head dims 64 and 128.
  P and dS enter their products as hi + lo 16-bit pairs, so the results stay within the fp32 tolerance table.
  Tiles are double-buffered through cp.async; tile shapes are template arguments (_source.TC_TILES);
  benchmarks/ATTENTION_NOTES.md has the measurements behind them.
"""

SOURCE = r"""
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
// at the end. Scores are kept in log2 units (scale log2(e) folded in once) so every exponential is one exp2.
//
// Tiles: MAXD (64 or 128) head-dim columns, zero past D, rows strided MAXD + 8 halves (16 bytes of padding:
// ldmatrix's eight row addresses then fall in distinct banks). 4 warps; a warp owns WM (forward, dQ) or WN
// (dK/dV) m-tiles of 16 consecutive rows, so each B fragment read from shared memory feeds WM products.
// The tiles the loop walks are double-buffered: cp.async fetches tile j + 1 while tile j is computed.
// Masks are applied only on tiles that need them (a causal diagonal, a sequence end, key padding).
//
// Layout: q, k, v, dO, out, dq, dk, dv are (B, H, T, D) arrays of any element strides along B, H and T (each
// pointer is followed by its three strides; D has stride 1), so (B, T, H, D)-contiguous arrays, the model's
// head transposes, are read and written in place. lse, Di, L2 are (B, H, Tq) contiguous. vec (the wrapper's
// check): D and Dv are multiples of 8 and every row of q, k, v (dO) starts on 16 bytes, so tiles come by cp.async.
// Grid: (blocks of rows, H, B).
#define TC_NW 4
#define TC_LOG2E 1.4426950408889634f
#define TC_LN2 0.6931471805599453f

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
template <typename T> __device__ __forceinline__ void mma_pair(float* c, const unsigned* hi, const unsigned* lo,
                                                              unsigned b0, unsigned b1) {
    mma16816(c, hi, b0, b1, T());
    mma16816(c, lo, b0, b1, T());
}

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

// Asynchronous copies global -> shared (sm_80+): src_size 0 fills the destination with zeros
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_u32(dst)), "l"(src), "r"(ok ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool ok) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(smem_u32(dst)), "l"(src), "r"(ok ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// wait until at most N of this thread's most recent groups are still in flight
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}
// dst[r * (MAXD + 8) + c] = src[(row0 + r) * ld + c] for c < D and row0 + r < nvalid, else 0 (c < MAXD,
// r < NROWS; ld: src's sequence stride): by cp.async when vec (complete at the matching cp_async_wait), else by
// plain loads and stores. A thread copies one 16-byte column chunk of every RPI-th row: one address, advanced
// RPI rows at a time (a 64-bit add; multiplying by the 64-bit stride for each row costs the loop instructions).
template <typename T, int MAXD, int NROWS>
__device__ __forceinline__ void tc_load(u16* dst, const T* src, i64 ld, int row0, int nvalid, int D, bool vec) {
    constexpr int LD = MAXD + 8, CPR = MAXD / 8, RPI = TC_NW * 32 / CPR;  // chunks per row, rows per pass
    const u16* s = (const u16*)src;
    if (vec) {
        const int r0 = threadIdx.x / CPR, c = (threadIdx.x % CPR) * 8;
        const u16* p = s + (row0 + r0) * ld + c;
        const i64 step = RPI * ld;
        u16* d = dst + r0 * LD + c;
        _Pragma("unroll") for (int j = 0; j < NROWS / RPI; ++j, p += step) {
            const bool ok = c < D && row0 + r0 + j * RPI < nvalid;
            cp_async16(d + j * RPI * LD, ok ? p : s, ok);
        }
    } else {
        for (int idx = threadIdx.x; idx < NROWS * MAXD; idx += TC_NW * 32) {
            const int r = idx / MAXD, c = idx - r * MAXD, gr = row0 + r;
            dst[r * LD + c] = (gr < nvalid && c < D) ? s[gr * ld + c] : (u16)0;
        }
    }
}

__device__ __forceinline__ unsigned tobits(float x, bf16_t) { return f2b(x); }
__device__ __forceinline__ unsigned tobits(float x, f16_t) { return f2h(x); }
// p[0] = x0 and, when both, p[1] = x1: one 4-byte store where the pair is aligned
template <typename T> __device__ __forceinline__ void put2(T* p, float x0, float x1, bool both) {
    if (both && (((unsigned long long)p) & 3) == 0) {
        *(unsigned*)p = tobits(x0, T()) | (tobits(x1, T()) << 16);
    } else {
        put(p, 0, x0);
        if (both) put(p, 1, x1);
    }
}

// Forward. Block: BQ = 64 WM queries (warp w: rows w 16 WM ..), key tiles of BK, double-buffered.
// Q's A fragments stay in registers when they fit (MAXD WM <= 128), else are re-read from shared memory.
template <typename T, int MAXD, int WM, int BK>
__global__ void __launch_bounds__(128) flash_fwd_tc(const T* q, i64 q_sb, i64 q_sh, i64 q_st,
                                                    const T* k, i64 k_sb, i64 k_sh, i64 k_st,
                                                    const T* v, i64 v_sb, i64 v_sh, i64 v_st,
                                                    T* out, i64 o_sb, i64 o_sh, i64 o_st, float* lse, int vec,
                                                    const unsigned char* kpm, int has_mask, int causal, int H,
                                                    int Tq, int Tk, int D, int Dv, float scale) {
    constexpr int LD = MAXD + 8, NKD = MAXD / 16, NT = MAXD / 8, NS = BK / 8, BQ = 16 * WM * TC_NW;
    constexpr bool QREG = MAXD * WM <= 128;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* sQ = (u16*)smem_raw;                                  // BQ x LD
    u16* sK = sQ + BQ * LD;                                    // 2 stages x BK x LD
    u16* sV = sK + 2 * BK * LD;                                // 2 stages x BK x LD
    unsigned char* sM = (unsigned char*)(sV + 2 * BK * LD);    // 2 stages x BK: key is not padding
    const int head = blockIdx.y, b = blockIdx.z, bh = b * H + head, shift = Tk - Tq;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;         // causal: the longest blocks start first
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, t = lane & 3, g = lane >> 2;
    const int wr = w * 16 * WM, wq0 = q0 + wr;                // the warp's first row in the tile / sequence
    const int wlast = min(wq0 + 16 * WM - 1, Tq - 1);
    const T* kb = k + b * k_sb + head * k_sh;                 // this (batch, head)'s keys, k_st apart
    const T* vb = v + b * v_sb + head * v_sh;
    const int kend = causal ? min(Tk, min(q0 + BQ, Tq) + shift) : Tk;  // keys past the last row's diagonal
    const int ntiles = kend > 0 ? (kend + BK - 1) / BK : 0;
    auto load_kv = [&](int tile, int st) {
        const int k0 = tile * BK;
        tc_load<T, MAXD, BK>(sK + st * BK * LD, kb, k_st, k0, Tk, D, vec);
        tc_load<T, MAXD, BK>(sV + st * BK * LD, vb, v_st, k0, Tk, Dv, vec);
        if (has_mask && threadIdx.x < BK) {
            const int kj = k0 + threadIdx.x;
            sM[st * BK + threadIdx.x] = kj < Tk && !kpm[(i64)b * Tk + kj];
        }
    };
    tc_load<T, MAXD, BQ>(sQ, q + b * q_sb + head * q_sh, q_st, q0, Tq, D, vec);
    cp_async_commit();
    if (ntiles > 0) load_kv(0, 0);
    cp_async_commit();
    unsigned qf[QREG ? WM : 1][QREG ? NKD : 1][4];
    if constexpr (QREG) {
        cp_async_wait<1>();
        __syncthreads();
        _Pragma("unroll") for (int i = 0; i < WM; ++i)
            _Pragma("unroll") for (int kc = 0; kc < NKD; ++kc) frag_a(qf[i][kc], sQ, LD, wr + 16 * i, kc * 16);
    }
    float acc[WM][NT][4], m2[WM][2], l[WM][2];  // m2: running row max in log2 units; l: this lane's columns
    _Pragma("unroll") for (int i = 0; i < WM; ++i) {
        _Pragma("unroll") for (int n = 0; n < NT; ++n) { acc[i][n][0] = 0.f; acc[i][n][1] = 0.f; acc[i][n][2] = 0.f; acc[i][n][3] = 0.f; }
        m2[i][0] = m2[i][1] = neg_inf<float>();
        l[i][0] = l[i][1] = 0.f;
    }
    const float sl2 = scale * TC_LOG2E, ps = pscale(T());
    for (int it = 0; it < ntiles; ++it) {
        const int k0 = it * BK, st = it & 1;
        if (it + 1 < ntiles) load_kv(it + 1, st ^ 1);
        cp_async_commit();
        cp_async_wait<1>();  // tile it (and Q) have landed
        __syncthreads();
        const u16* cK = sK + st * BK * LD;
        const u16* cV = sV + st * BK * LD;
        const unsigned char* cM = sM + st * BK;
        if (wq0 < Tq && !(causal && k0 > wlast + shift)) {  // some key of the tile is visible to the warp
            float s[WM][NS][4];
            _Pragma("unroll") for (int i = 0; i < WM; ++i)
                _Pragma("unroll") for (int n = 0; n < NS; ++n) { s[i][n][0] = 0.f; s[i][n][1] = 0.f; s[i][n][2] = 0.f; s[i][n][3] = 0.f; }
            _Pragma("unroll") for (int kc = 0; kc < NKD; ++kc) {
                unsigned a[WM][4];
                _Pragma("unroll") for (int i = 0; i < WM; ++i) {
                    if constexpr (QREG) {
                        a[i][0] = qf[i][kc][0]; a[i][1] = qf[i][kc][1]; a[i][2] = qf[i][kc][2]; a[i][3] = qf[i][kc][3];
                    } else {
                        frag_a(a[i], sQ, LD, wr + 16 * i, kc * 16);
                    }
                }
                _Pragma("unroll") for (int np = 0; np < NS / 2; ++np) {
                    unsigned bf[4];
                    frag_b_rows(bf, cK, LD, np * 16, kc * 16);
                    _Pragma("unroll") for (int i = 0; i < WM; ++i) {
                        mma16816(s[i][2 * np], a[i], bf[0], bf[1], T());
                        mma16816(s[i][2 * np + 1], a[i], bf[2], bf[3], T());
                    }
                }
            }
            // log2-unit scores; -inf where invisible, on the tiles that have such keys
            const bool edge = has_mask || k0 + BK > Tk || (causal && k0 + BK - 1 > wq0 + shift);
            _Pragma("unroll") for (int i = 0; i < WM; ++i)
                _Pragma("unroll") for (int n = 0; n < NS; ++n)
                    _Pragma("unroll") for (int e = 0; e < 4; ++e) {
                        float x = s[i][n][e] * sl2;
                        if (edge) {
                            const int jl = n * 8 + 2 * t + (e & 1), kj = k0 + jl, qi = wq0 + 16 * i + g + 8 * (e >> 1);
                            if (kj >= Tk || (has_mask && !cM[jl]) || (causal && kj > qi + shift)) x = neg_inf<float>();
                        }
                        s[i][n][e] = x;
                    }
            // online softmax per row (h: the thread's rows g and g + 8 of m-tile i)
            float al[WM][2];
            bool moved = false;
            _Pragma("unroll") for (int i = 0; i < WM; ++i)
                _Pragma("unroll") for (int h = 0; h < 2; ++h) {
                    float mx = neg_inf<float>();
                    _Pragma("unroll") for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(s[i][n][2 * h], s[i][n][2 * h + 1]));
                    const float mn = fmaxf(m2[i][h], quad_max(mx));
                    const float ms = isfinite(mn) ? mn : 0.f;  // no visible key yet: shift by 0, exp2(-inf) = 0
                    al[i][h] = exp2f(m2[i][h] - ms);           // 0 while m was -inf
                    moved |= al[i][h] != 1.f;
                    m2[i][h] = mn;
                    float rs = 0.f;
                    _Pragma("unroll") for (int n = 0; n < NS; ++n)
                        _Pragma("unroll") for (int e = 2 * h; e < 2 * h + 2; ++e) {
                            const float p = exp2f(s[i][n][e] - ms);
                            s[i][n][e] = p;
                            rs += p;
                        }
                    l[i][h] = l[i][h] * al[i][h] + rs;
                }
            if (__any_sync(0xffffffffu, moved))  // rescale O only when some row's max moved (rarer as keys pass)
                _Pragma("unroll") for (int i = 0; i < WM; ++i)
                    _Pragma("unroll") for (int n = 0; n < NT; ++n) {
                        acc[i][n][0] *= al[i][0]; acc[i][n][1] *= al[i][0];
                        acc[i][n][2] *= al[i][1]; acc[i][n][3] *= al[i][1];
                    }
            // O += P V, P as hi + lo
            _Pragma("unroll") for (int kc = 0; kc < BK / 16; ++kc) {
                unsigned ph[WM][4], pl[WM][4];
                _Pragma("unroll") for (int i = 0; i < WM; ++i) acc_to_a<T>(s[i], 2 * kc, ps, ph[i], pl[i]);
                _Pragma("unroll") for (int dp = 0; dp < NKD; ++dp) {
                    unsigned bf[4];
                    frag_b_cols(bf, cV, LD, kc * 16, dp * 16);
                    _Pragma("unroll") for (int i = 0; i < WM; ++i) {
                        mma_pair<T>(acc[i][2 * dp], ph[i], pl[i], bf[0], bf[1]);
                        mma_pair<T>(acc[i][2 * dp + 1], ph[i], pl[i], bf[2], bf[3]);
                    }
                }
            }
        }
        __syncthreads();  // stage st is free for tile it + 2
    }
    cp_async_wait<0>();  // no copy outlives the block (with no tile at all, Q's)
    const float inv = 1.f / ps;
    _Pragma("unroll") for (int i = 0; i < WM; ++i)
        _Pragma("unroll") for (int h = 0; h < 2; ++h) {
            const float lsum = quad_sum(l[i][h]);  // every lane: a shuffle
            const int qi = wq0 + 16 * i + g + 8 * h;
            if (qi >= Tq) continue;
            const bool has = lsum > 0.f;
            const float f = inv / (has ? lsum : 1.f);
            T* orow = out + b * o_sb + head * o_sh + qi * o_st;
            _Pragma("unroll") for (int n = 0; n < NT; ++n) {
                const int d = n * 8 + 2 * t;
                if (d < Dv) put2(orow + d, acc[i][n][2 * h] * f, acc[i][n][2 * h + 1] * f, d + 1 < Dv);
            }
            if (t == 0) lse[(i64)bh * Tq + qi] = has ? m2[i][h] * TC_LN2 + logf(lsum) : neg_inf<float>();
        }
}

// Backward preprocessing, one warp per row: Di = rowsum(dO * O) in fp32, and L2 = lse log2(e), with the -inf
// of a row that sees no key replaced by 0 (the kernels below then shift its scores by 0). dO and O: strided as
// above. Warps take the rows in (b, qi, head) order, the storage order of the out flash_fwd_tc writes (and of
// the model's dO), so a block's warps read neighbouring rows; i is the row's index in lse, Di, L2.
template <typename T>
__global__ void flash_bwd_pre_tc(const T* dout, i64 do_sb, i64 do_sh, i64 do_st, const T* out, i64 o_sb,
                                 i64 o_sh, i64 o_st, const float* lse, float* Di, float* L2, i64 rows, int H,
                                 int Tq, int Dv) {
    const i64 r = blockIdx.x * (i64)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    const i64 bq = r / H;
    const int head = (int)(r - bq * H), b = (int)(bq / Tq), qi = (int)(bq - (i64)b * Tq);
    const i64 i = ((i64)b * H + head) * Tq + qi;
    const T* drow = dout + b * do_sb + head * do_sh + qi * do_st;
    const T* orow = out + b * o_sb + head * o_sh + qi * o_st;
    const int lane = threadIdx.x & 31;
    float s = 0.f;
    const u16* a = (const u16*)drow;
    const u16* o = (const u16*)orow;
    if (((((unsigned long long)a) | ((unsigned long long)o)) & 3) == 0) {  // pairs: 4-byte loads
        for (int d = 2 * lane; d + 1 < Dv; d += 64) {
            const unsigned x = *(const unsigned*)(a + d), y = *(const unsigned*)(o + d);
            s += unpack_lo(x, T()) * unpack_lo(y, T()) + unpack_hi(x, T()) * unpack_hi(y, T());
        }
        if ((Dv & 1) && lane == 0) s += get(drow, Dv - 1) * get(orow, Dv - 1);
    } else {
        for (int d = lane; d < Dv; d += 32) s += get(drow, d) * get(orow, d);
    }
    s = warp_sum(s);
    if (lane == 0) {
        const float x = lse[i];
        Di[i] = s;
        L2[i] = isfinite(x) ? x * TC_LOG2E : 0.f;
    }
}

// dQ = scale dS K, dS = P (dP - Di), P = exp2(S scale log2(e) - L2), dP = dO V^T. Block: BQ = 64 WM queries,
// key tiles of BK, double-buffered. Q's and dO's A fragments stay in registers when MAXD WM <= 128.
template <typename T, int MAXD, int WM, int BK>
__global__ void __launch_bounds__(128) flash_bwd_dq_tc(const T* q, i64 q_sb, i64 q_sh, i64 q_st,
                                                       const T* k, i64 k_sb, i64 k_sh, i64 k_st,
                                                       const T* v, i64 v_sb, i64 v_sh, i64 v_st,
                                                       const T* dout, i64 do_sb, i64 do_sh, i64 do_st,
                                                       const float* L2, const float* Di,
                                                       T* dq, i64 dq_sb, i64 dq_sh, i64 dq_st, int vec,
                                                       const unsigned char* kpm, int has_mask, int causal, int H,
                                                       int Tq, int Tk, int D, int Dv, float scale) {
    constexpr int LD = MAXD + 8, NKD = MAXD / 16, NT = MAXD / 8, NS = BK / 8, BQ = 16 * WM * TC_NW;
    constexpr bool QREG = MAXD * WM <= 128;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* sQ = (u16*)smem_raw;                                  // BQ x LD
    u16* sO = sQ + BQ * LD;                                    // BQ x LD   dO
    u16* sK = sO + BQ * LD;                                    // 2 stages x BK x LD
    u16* sV = sK + 2 * BK * LD;                                // 2 stages x BK x LD
    unsigned char* sM = (unsigned char*)(sV + 2 * BK * LD);    // 2 stages x BK
    const int head = blockIdx.y, b = blockIdx.z, bh = b * H + head, shift = Tk - Tq;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, t = lane & 3, g = lane >> 2;
    const int wr = w * 16 * WM, wq0 = q0 + wr;
    const int wlast = min(wq0 + 16 * WM - 1, Tq - 1);
    const T* kb = k + b * k_sb + head * k_sh;
    const T* vb = v + b * v_sb + head * v_sh;
    const int kend = causal ? min(Tk, min(q0 + BQ, Tq) + shift) : Tk;
    const int ntiles = kend > 0 ? (kend + BK - 1) / BK : 0;
    auto load_kv = [&](int tile, int st) {
        const int k0 = tile * BK;
        tc_load<T, MAXD, BK>(sK + st * BK * LD, kb, k_st, k0, Tk, D, vec);
        tc_load<T, MAXD, BK>(sV + st * BK * LD, vb, v_st, k0, Tk, Dv, vec);
        if (has_mask && threadIdx.x < BK) {
            const int kj = k0 + threadIdx.x;
            sM[st * BK + threadIdx.x] = kj < Tk && !kpm[(i64)b * Tk + kj];
        }
    };
    tc_load<T, MAXD, BQ>(sQ, q + b * q_sb + head * q_sh, q_st, q0, Tq, D, vec);
    tc_load<T, MAXD, BQ>(sO, dout + b * do_sb + head * do_sh, do_st, q0, Tq, Dv, vec);
    cp_async_commit();
    if (ntiles > 0) load_kv(0, 0);
    cp_async_commit();
    float Lr[WM][2], Dr[WM][2];
    _Pragma("unroll") for (int i = 0; i < WM; ++i)
        _Pragma("unroll") for (int h = 0; h < 2; ++h) {
            const int qi = wq0 + 16 * i + g + 8 * h;
            Lr[i][h] = qi < Tq ? L2[(i64)bh * Tq + qi] : 0.f;
            Dr[i][h] = qi < Tq ? Di[(i64)bh * Tq + qi] : 0.f;
        }
    unsigned qf[QREG ? WM : 1][QREG ? NKD : 1][4], of[QREG ? WM : 1][QREG ? NKD : 1][4];
    if constexpr (QREG) {
        cp_async_wait<1>();
        __syncthreads();
        _Pragma("unroll") for (int i = 0; i < WM; ++i)
            _Pragma("unroll") for (int kc = 0; kc < NKD; ++kc) {
                frag_a(qf[i][kc], sQ, LD, wr + 16 * i, kc * 16);
                frag_a(of[i][kc], sO, LD, wr + 16 * i, kc * 16);
            }
    }
    float acc[WM][NT][4];
    _Pragma("unroll") for (int i = 0; i < WM; ++i)
        _Pragma("unroll") for (int n = 0; n < NT; ++n) { acc[i][n][0] = 0.f; acc[i][n][1] = 0.f; acc[i][n][2] = 0.f; acc[i][n][3] = 0.f; }
    const float sl2 = scale * TC_LOG2E;
    for (int it = 0; it < ntiles; ++it) {
        const int k0 = it * BK, st = it & 1;
        if (it + 1 < ntiles) load_kv(it + 1, st ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const u16* cK = sK + st * BK * LD;
        const u16* cV = sV + st * BK * LD;
        const unsigned char* cM = sM + st * BK;
        if (wq0 < Tq && !(causal && k0 > wlast + shift)) {
            float s[WM][NS][4], dp[WM][NS][4];
            _Pragma("unroll") for (int i = 0; i < WM; ++i)
                _Pragma("unroll") for (int n = 0; n < NS; ++n)
                    _Pragma("unroll") for (int e = 0; e < 4; ++e) { s[i][n][e] = 0.f; dp[i][n][e] = 0.f; }
            _Pragma("unroll") for (int kc = 0; kc < NKD; ++kc) {
                unsigned aq[WM][4], ao[WM][4];
                _Pragma("unroll") for (int i = 0; i < WM; ++i) {
                    if constexpr (QREG) {
                        _Pragma("unroll") for (int j = 0; j < 4; ++j) { aq[i][j] = qf[i][kc][j]; ao[i][j] = of[i][kc][j]; }
                    } else {
                        frag_a(aq[i], sQ, LD, wr + 16 * i, kc * 16);
                        frag_a(ao[i], sO, LD, wr + 16 * i, kc * 16);
                    }
                }
                _Pragma("unroll") for (int np = 0; np < NS / 2; ++np) {
                    unsigned bk[4], bv[4];
                    frag_b_rows(bk, cK, LD, np * 16, kc * 16);
                    frag_b_rows(bv, cV, LD, np * 16, kc * 16);
                    _Pragma("unroll") for (int i = 0; i < WM; ++i) {
                        mma16816(s[i][2 * np], aq[i], bk[0], bk[1], T());
                        mma16816(s[i][2 * np + 1], aq[i], bk[2], bk[3], T());
                        mma16816(dp[i][2 * np], ao[i], bv[0], bv[1], T());
                        mma16816(dp[i][2 * np + 1], ao[i], bv[2], bv[3], T());
                    }
                }
            }
            const bool edge = has_mask || k0 + BK > Tk || (causal && k0 + BK - 1 > wq0 + shift);
            _Pragma("unroll") for (int i = 0; i < WM; ++i)
                _Pragma("unroll") for (int n = 0; n < NS; ++n)
                    _Pragma("unroll") for (int e = 0; e < 4; ++e) {
                        const int h = e >> 1;
                        const float p = exp2f(fmaf(s[i][n][e], sl2, -Lr[i][h]));
                        float ds = p * (dp[i][n][e] - Dr[i][h]);
                        if (edge) {
                            const int jl = n * 8 + 2 * t + (e & 1), kj = k0 + jl, qi = wq0 + 16 * i + g + 8 * h;
                            if (kj >= Tk || (has_mask && !cM[jl]) || (causal && kj > qi + shift)) ds = 0.f;
                        }
                        s[i][n][e] = ds;
                    }
            _Pragma("unroll") for (int kc = 0; kc < BK / 16; ++kc) {
                unsigned dh[WM][4], dl[WM][4];
                _Pragma("unroll") for (int i = 0; i < WM; ++i) acc_to_a<T>(s[i], 2 * kc, 1.f, dh[i], dl[i]);
                _Pragma("unroll") for (int dd = 0; dd < NKD; ++dd) {
                    unsigned bk[4];
                    frag_b_cols(bk, cK, LD, kc * 16, dd * 16);
                    _Pragma("unroll") for (int i = 0; i < WM; ++i) {
                        mma_pair<T>(acc[i][2 * dd], dh[i], dl[i], bk[0], bk[1]);
                        mma_pair<T>(acc[i][2 * dd + 1], dh[i], dl[i], bk[2], bk[3]);
                    }
                }
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    _Pragma("unroll") for (int i = 0; i < WM; ++i)
        _Pragma("unroll") for (int h = 0; h < 2; ++h) {
            const int qi = wq0 + 16 * i + g + 8 * h;
            if (qi >= Tq) continue;
            T* row = dq + b * dq_sb + head * dq_sh + qi * dq_st;
            _Pragma("unroll") for (int n = 0; n < NT; ++n) {
                const int d = n * 8 + 2 * t;
                if (d < D) put2(row + d, scale * acc[i][n][2 * h], scale * acc[i][n][2 * h + 1], d + 1 < D);
            }
        }
}

// dK = scale dS^T Q, dV = P^T dO. Block: 64 WN keys (warp w: keys w 16 WN ..), walking the query tiles of BQ
// that see them, double-buffered with their L2 and Di; S^T = K Q^T, dP^T = V dO^T (K's, V's A fragments stay
// in registers when MAXD WN <= 64, else are re-read from shared memory: the dK, dV accumulators fill the
// registers).
template <typename T, int MAXD, int WN, int BQ>
__global__ void __launch_bounds__(128) flash_bwd_dkdv_tc(const T* q, i64 q_sb, i64 q_sh, i64 q_st,
                                                         const T* k, i64 k_sb, i64 k_sh, i64 k_st,
                                                         const T* v, i64 v_sb, i64 v_sh, i64 v_st,
                                                         const T* dout, i64 do_sb, i64 do_sh, i64 do_st,
                                                         const float* L2, const float* Di,
                                                         T* dk, i64 dk_sb, i64 dk_sh, i64 dk_st,
                                                         T* dv, i64 dv_sb, i64 dv_sh, i64 dv_st, int vec,
                                                         const unsigned char* kpm, int has_mask, int causal,
                                                         int H, int Tq, int Tk, int D, int Dv, float scale) {
    constexpr int LD = MAXD + 8, NKD = MAXD / 16, NT = MAXD / 8, NS = BQ / 8, BKB = 16 * WN * TC_NW;
    constexpr bool KVREG = MAXD * WN <= 64;  // K's and V's A fragments stay in registers
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* sL = (float*)smem_raw;                              // 2 stages x BQ
    float* sD = sL + 2 * BQ;                                   // 2 stages x BQ
    u16* sK = (u16*)(sD + 2 * BQ);                             // BKB x LD
    u16* sV = sK + BKB * LD;                                   // BKB x LD
    u16* sQ = sV + BKB * LD;                                   // 2 stages x BQ x LD
    u16* sO = sQ + 2 * BQ * LD;                                // 2 stages x BQ x LD   dO
    const int head = blockIdx.y, b = blockIdx.z, bh = b * H + head, shift = Tk - Tq;
    const int k0 = blockIdx.x * BKB;                          // causal: longest first
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, t = lane & 3, g = lane >> 2;
    const int wr = w * 16 * WN, wk0 = k0 + wr;                // the warp's first key in the block / sequence
    bool kok[WN][2];                                           // key exists and is not padding
    _Pragma("unroll") for (int i = 0; i < WN; ++i)
        _Pragma("unroll") for (int h = 0; h < 2; ++h) {
            const int kj = wk0 + 16 * i + g + 8 * h;
            kok[i][h] = kj < Tk && !(has_mask && kpm[(i64)b * Tk + kj]);
        }
    const T* qb = q + b * q_sb + head * q_sh;
    const T* ob = dout + b * do_sb + head * do_sh;
    const float* Lb = L2 + (i64)bh * Tq;
    const float* Db = Di + (i64)bh * Tq;
    const int qstart = causal ? max(0, k0 - shift) : 0;      // earlier queries see none of the block's keys
    const int ntiles = qstart < Tq ? (Tq - qstart + BQ - 1) / BQ : 0;
    auto load_q = [&](int tile, int st) {
        const int q0 = qstart + tile * BQ;
        tc_load<T, MAXD, BQ>(sQ + st * BQ * LD, qb, q_st, q0, Tq, D, vec);
        tc_load<T, MAXD, BQ>(sO + st * BQ * LD, ob, do_st, q0, Tq, Dv, vec);
        const int x = threadIdx.x;
        if (x < 2 * BQ) {  // L2 and Di: one float a thread, zero past Tq
            const int r = x < BQ ? x : x - BQ, qi = q0 + r;
            const float* src = x < BQ ? Lb : Db;
            float* dst = (x < BQ ? sL : sD) + st * BQ + r;
            if (vec) cp_async4(dst, qi < Tq ? src + qi : src, qi < Tq);
            else *dst = qi < Tq ? src[qi] : 0.f;
        }
    };
    tc_load<T, MAXD, BKB>(sK, k + b * k_sb + head * k_sh, k_st, k0, Tk, D, vec);
    tc_load<T, MAXD, BKB>(sV, v + b * v_sb + head * v_sh, v_st, k0, Tk, Dv, vec);
    cp_async_commit();
    if (ntiles > 0) load_q(0, 0);
    cp_async_commit();
    unsigned kr[KVREG ? WN : 1][KVREG ? NKD : 1][4], vr[KVREG ? WN : 1][KVREG ? NKD : 1][4];
    if constexpr (KVREG) {
        cp_async_wait<1>();
        __syncthreads();
        _Pragma("unroll") for (int i = 0; i < WN; ++i)
            _Pragma("unroll") for (int kc = 0; kc < NKD; ++kc) {
                frag_a(kr[i][kc], sK, LD, wr + 16 * i, kc * 16);
                frag_a(vr[i][kc], sV, LD, wr + 16 * i, kc * 16);
            }
    }
    float ak[WN][NT][4], av[WN][NT][4];
    _Pragma("unroll") for (int i = 0; i < WN; ++i)
        _Pragma("unroll") for (int n = 0; n < NT; ++n)
            _Pragma("unroll") for (int e = 0; e < 4; ++e) { ak[i][n][e] = 0.f; av[i][n][e] = 0.f; }
    const float sl2 = scale * TC_LOG2E, ps = pscale(T());
    for (int it = 0; it < ntiles; ++it) {
        const int q0 = qstart + it * BQ, st = it & 1;
        if (it + 1 < ntiles) load_q(it + 1, st ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const u16* cQ = sQ + st * BQ * LD;
        const u16* cO = sO + st * BQ * LD;
        const float* cL = sL + st * BQ;
        const float* cD = sD + st * BQ;
        if (wk0 < Tk && !(causal && wk0 > q0 + BQ - 1 + shift)) {  // some query of the tile sees the warp's keys
            float sT[WN][NS][4], dpT[WN][NS][4];
            _Pragma("unroll") for (int i = 0; i < WN; ++i)
                _Pragma("unroll") for (int n = 0; n < NS; ++n)
                    _Pragma("unroll") for (int e = 0; e < 4; ++e) { sT[i][n][e] = 0.f; dpT[i][n][e] = 0.f; }
            _Pragma("unroll") for (int kc = 0; kc < NKD; ++kc) {
                unsigned kf[WN][4], vf[WN][4];
                _Pragma("unroll") for (int i = 0; i < WN; ++i) {
                    if constexpr (KVREG) {
                        _Pragma("unroll") for (int j = 0; j < 4; ++j) { kf[i][j] = kr[i][kc][j]; vf[i][j] = vr[i][kc][j]; }
                    } else {
                        frag_a(kf[i], sK, LD, wr + 16 * i, kc * 16);
                        frag_a(vf[i], sV, LD, wr + 16 * i, kc * 16);
                    }
                }
                _Pragma("unroll") for (int np = 0; np < NS / 2; ++np) {
                    unsigned bq[4], bo[4];
                    frag_b_rows(bq, cQ, LD, np * 16, kc * 16);
                    frag_b_rows(bo, cO, LD, np * 16, kc * 16);
                    _Pragma("unroll") for (int i = 0; i < WN; ++i) {
                        mma16816(sT[i][2 * np], kf[i], bq[0], bq[1], T());
                        mma16816(sT[i][2 * np + 1], kf[i], bq[2], bq[3], T());
                        mma16816(dpT[i][2 * np], vf[i], bo[0], bo[1], T());
                        mma16816(dpT[i][2 * np + 1], vf[i], bo[2], bo[3], T());
                    }
                }
            }
            const bool edge = has_mask || q0 + BQ > Tq || (causal && wk0 + 16 * WN - 1 > q0 + shift);
            _Pragma("unroll") for (int i = 0; i < WN; ++i)
                _Pragma("unroll") for (int n = 0; n < NS; ++n)
                    _Pragma("unroll") for (int e = 0; e < 4; ++e) {
                        const int ql = n * 8 + 2 * t + (e & 1);
                        float p = exp2f(fmaf(sT[i][n][e], sl2, -cL[ql]));
                        float ds = p * (dpT[i][n][e] - cD[ql]);
                        if (edge) {
                            const int qi = q0 + ql, kj = wk0 + 16 * i + g + 8 * (e >> 1);
                            if (!kok[i][e >> 1] || qi >= Tq || (causal && kj > qi + shift)) { p = 0.f; ds = 0.f; }
                        }
                        sT[i][n][e] = p;
                        dpT[i][n][e] = ds;
                    }
            _Pragma("unroll") for (int kc = 0; kc < BQ / 16; ++kc) {
                {   // dV += P^T dO
                    unsigned ph[WN][4], pl[WN][4];
                    _Pragma("unroll") for (int i = 0; i < WN; ++i) acc_to_a<T>(sT[i], 2 * kc, ps, ph[i], pl[i]);
                    _Pragma("unroll") for (int dd = 0; dd < NKD; ++dd) {
                        unsigned bo[4];
                        frag_b_cols(bo, cO, LD, kc * 16, dd * 16);
                        _Pragma("unroll") for (int i = 0; i < WN; ++i) {
                            mma_pair<T>(av[i][2 * dd], ph[i], pl[i], bo[0], bo[1]);
                            mma_pair<T>(av[i][2 * dd + 1], ph[i], pl[i], bo[2], bo[3]);
                        }
                    }
                }
                {   // dK += dS^T Q
                    unsigned dh[WN][4], dl[WN][4];
                    _Pragma("unroll") for (int i = 0; i < WN; ++i) acc_to_a<T>(dpT[i], 2 * kc, 1.f, dh[i], dl[i]);
                    _Pragma("unroll") for (int dd = 0; dd < NKD; ++dd) {
                        unsigned bq[4];
                        frag_b_cols(bq, cQ, LD, kc * 16, dd * 16);
                        _Pragma("unroll") for (int i = 0; i < WN; ++i) {
                            mma_pair<T>(ak[i][2 * dd], dh[i], dl[i], bq[0], bq[1]);
                            mma_pair<T>(ak[i][2 * dd + 1], dh[i], dl[i], bq[2], bq[3]);
                        }
                    }
                }
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    const float inv = 1.f / ps;
    _Pragma("unroll") for (int i = 0; i < WN; ++i)
        _Pragma("unroll") for (int h = 0; h < 2; ++h) {
            const int kj = wk0 + 16 * i + g + 8 * h;
            if (kj >= Tk) continue;
            T* krow = dk + b * dk_sb + head * dk_sh + kj * dk_st;
            T* vrow = dv + b * dv_sb + head * dv_sh + kj * dv_st;
            _Pragma("unroll") for (int n = 0; n < NT; ++n) {
                const int d = n * 8 + 2 * t;
                if (d < D) put2(krow + d, scale * ak[i][n][2 * h], scale * ak[i][n][2 * h + 1], d + 1 < D);
                if (d < Dv) put2(vrow + d, av[i][n][2 * h] * inv, av[i][n][2 * h + 1] * inv, d + 1 < Dv);
            }
        }
}
"""

"""The CUDA C++ of the CuPy backend's attention: FlashAttention-2 forward and backward (Dao 2023, arXiv 2307.08691,
Algorithms 1 and 2), appended to the kernels of _source.py in the same NVRTC module (it uses their type helpers).

- flash_fwd / flash_bwd_*: CUDA cores, every storage type (float64/float32 inputs, and the readable version).
- flash_*_tc: tensor cores (mma.sync.m16n8k16, fp32 accumulation) for float16/bfloat16 at head dims 64 and 128.
  P and dS enter their products as hi + lo 16-bit pairs, so the results stay within the fp32 tolerance table.
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

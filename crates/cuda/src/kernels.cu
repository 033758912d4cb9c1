// reel's own CUDA kernels, compiled at run time by NVRTC (see kernels.rs).
//
// Storage is f32 or bf16 (one extern "C" entry point per type, suffix _f32 / _bf16); all
// arithmetic is f32. Each kernel mirrors the CPU reference of the same name in reel-kernels
// (same argument order: outputs, saved values, inputs, weights, dimensions) and the same
// gradient rule: parameter gradients accumulate, activation gradients overwrite.
// Reductions are deterministic: fixed block shapes and fixed summation order, no atomics.

#include <cuda_bf16.h>

typedef unsigned int u32;
typedef long long i64;

__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, i64 i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, i64 i, float v) { p[i] = __float2bfloat16_rn(v); }

__device__ __forceinline__ float qnan() { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ float ninf() { return __int_as_float(0xff800000); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        float s = lane < warps ? partial[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: one block per row. out = weight · x · rstd, rstd = 1 / sqrt(mean(x²) + eps).
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void rmsnorm_fwd(T* out, float* rstd, const T* inp, const T* weight, int d, float eps) {
    const i64 row = blockIdx.x;
    const T* x = inp + row * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = ld(x, j);
        ss += v * v;
    }
    ss = block_sum(ss);
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    T* y = out + row * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) st(y, j, ld(weight, j) * (ld(x, j) * r));
}

// dinp = rstd · (g − x̂ · mean(g · x̂)), g = dout · weight, x̂ = x · rstd (overwrites).
template <typename T>
__device__ void rmsnorm_bwd_dinp(T* dinp, const T* dout, const T* inp, const T* weight,
                                 const float* rstd, int d) {
    const i64 row = blockIdx.x;
    const T* x = inp + row * d;
    const T* dy = dout + row * d;
    const float r = rstd[row];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) dot += ld(dy, j) * ld(weight, j) * ld(x, j) * r;
    const float mean = block_sum(dot) / (float)d;
    T* dx = dinp + row * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        const float xhat = ld(x, j) * r;
        st(dx, j, r * (ld(dy, j) * ld(weight, j) - xhat * mean));
    }
}

// Column sums over rows, stage 1: partial[chunk, col] = Σ_{rows of chunk} dout[row, col] · f,
// f = x[row, col] · rstd[row] when x is given (RMSNorm's dweight), else 1 (a bias gradient).
// Block (32, 8): 32 columns, 8 row lanes; grid (ceil(d / 32), chunks).
template <typename T>
__device__ void colsum_partial(float* partial, const T* dout, const T* x, const float* rstd, int n,
                               int d, int rows_per_chunk) {
    __shared__ float acc_s[8][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = min(n, r0 + rows_per_chunk);
    float acc = 0.0f;
    if (col < d) {
        for (int row = r0 + threadIdx.y; row < r1; row += 8) {
            const i64 i = (i64)row * d + col;
            float g = ld(dout, i);
            if (x != nullptr) g *= ld(x, i) * rstd[row];
            acc += g;
        }
    }
    acc_s[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < d) {
        float s = 0.0f;
        for (int k = 0; k < 8; k++) s += acc_s[k][threadIdx.x];
        partial[(i64)blockIdx.y * d + col] = s;
    }
}

// Stage 2: dst[col] += Σ_chunk partial[chunk, col] (in chunk order), rounded once.
template <typename T>
__device__ void colsum_finish(T* dst, const float* partial, int chunks, int d) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= d) return;
    float s = 0.0f;
    for (int c = 0; c < chunks; c++) s += partial[(i64)c * d + col];
    st(dst, col, ld(dst, col) + s);
}

// ---------------------------------------------------------------------------------------------
// SwiGLU on the fused gate/up projection: gate_up [N, 2I] → out [N, I], out = silu(g) · u.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__device__ void swiglu_fwd(T* out, const T* gate_up, i64 n, i64 i) {
    const i64 total = n * i;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (i64)gridDim.x * blockDim.x) {
        const i64 r = idx / i, j = idx - r * i;
        const float g = ld(gate_up, r * 2 * i + j);
        const float u = ld(gate_up, r * 2 * i + i + j);
        st(out, idx, g * sigmoidf(g) * u);
    }
}

// dgate = dout · u · σ(g) · (1 + g · (1 − σ(g))), dup = dout · silu(g) (overwrites).
template <typename T>
__device__ void swiglu_bwd(T* dgate_up, const T* dout, const T* gate_up, i64 n, i64 i) {
    const i64 total = n * i;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (i64)gridDim.x * blockDim.x) {
        const i64 r = idx / i, j = idx - r * i;
        const float g = ld(gate_up, r * 2 * i + j);
        const float u = ld(gate_up, r * 2 * i + i + j);
        const float dy = ld(dout, idx);
        const float s = sigmoidf(g);
        st(dgate_up, r * 2 * i + j, dy * u * s * (1.0f + g * (1.0f - s)));
        st(dgate_up, r * 2 * i + i + j, dy * g * s);
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding: out[t, :] = table[tokens[t], :]; an id outside the table gives a NaN row.
// One block per token.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void embedding_fwd(T* out, const u32* tokens, const T* table, int d, u32 vocab) {
    const i64 t = blockIdx.x;
    const u32 id = tokens[t];
    T* y = out + t * d;
    if (id >= vocab) {
        for (int j = threadIdx.x; j < d; j += blockDim.x) st(y, j, qnan());
        return;
    }
    const T* row = table + (i64)id * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) y[j] = row[j];
}

// dtable[v, :] += Σ dout[t, :] over the tokens t with id v, summed in f32 in token order and
// rounded once. The host groups tokens: uniq[u] is a distinct id, order[offsets[u]..offsets[u+1]]
// its token indices (ascending). One block per distinct id; no two blocks share a row.
template <typename T>
__device__ void embedding_bwd(T* dtable, const T* dout, const u32* order, const u32* uniq,
                              const u32* offsets, int d) {
    const int u = blockIdx.x;
    const u32 v = uniq[u], b = offsets[u], e = offsets[u + 1];
    T* drow = dtable + (i64)v * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float acc = ld(drow, j);
        for (u32 k = b; k < e; k++) acc += ld(dout, (i64)order[k] * d + j);
        st(drow, j, acc);
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE, HF "rotate_half" layout, in place on x [N, H, D]: element j < D/2 pairs with j + D/2;
// x1' = x1·cos − x2·sin, x2' = x2·cos + x1·sin; sign = −1 rotates back (the backward pass).
// cos/sin [P, D/2] f32; a position outside the table gives NaNs.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void rope(T* x, const u32* positions, const float* cos_t, const float* sin_t, i64 n,
                     int h, int d, u32 max_pos, float sign) {
    const int half = d / 2;
    const i64 total = n * h * half;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (i64)gridDim.x * blockDim.x) {
        const i64 th = idx / half;
        const int j = (int)(idx - th * half);
        const i64 t = th / h;
        const i64 base = th * d;
        const u32 pos = positions[t];
        if (pos >= max_pos) {
            st(x, base + j, qnan());
            st(x, base + half + j, qnan());
            continue;
        }
        const float c = cos_t[(i64)pos * half + j];
        const float s = sign * sin_t[(i64)pos * half + j];
        const float a = ld(x, base + j), b = ld(x, base + half + j);
        st(x, base + j, a * c - b * s);
        st(x, base + half + j, b * c + a * s);
    }
}

// ---------------------------------------------------------------------------------------------
// LM head + cross-entropy over vocabulary chunks (reel_kernels::cross_entropy). The host gathers the
// M labelled rows; cuBLASLt makes each chunk's logits [M, C] in f32; these kernels fold them.
// ---------------------------------------------------------------------------------------------

// dst[r, :] = src[idx[r], :] (rows of d elements).
template <typename T>
__device__ void gather_rows(T* dst, const T* src, const u32* idx, int d) {
    const i64 r = blockIdx.x;
    const T* s = src + (i64)idx[r] * d;
    T* o = dst + r * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = s[j];
}

// A shared prefill's gathered keys and values put at their cache slots: src holds parts of 2m
// rows (m of keys, then m of values); pair r = q·m + j (part q, row j) goes to slot idx[r] of k
// and v, pairs with idx[r] = 0xFFFFFFFF (this rank's own rows, padding) skipped. One block a pair.
template <typename T>
__device__ void put_kv_rows(T* k, T* v, const T* src, const u32* idx, int m, int d) {
    const i64 r = blockIdx.x;
    const u32 at = idx[r];
    if (at == 0xFFFFFFFFu) return;
    const i64 q = r / m, j = r % m;
    const T* ks = src + (q * 2 * m + j) * d;
    const T* vs = ks + (i64)m * d;
    T* ko = k + (i64)at * d;
    T* vo = v + (i64)at * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        ko[c] = ks[c];
        vo[c] = vs[c];
    }
}

// dst[idx[r], :] = src[r, :] (f32 source; dst rows not named keep their value).
template <typename T>
__device__ void scatter_rows(T* dst, const float* src, const u32* idx, int d) {
    const i64 r = blockIdx.x;
    T* o = dst + (i64)idx[r] * d;
    const float* s = src + r * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) st(o, j, s[j]);
}

// dz[r, j] = (e^{z − lse[r]} − 1[j + c0 = tgt[r]])·dloss[r] for one chunk [M, cw] (f32 logits in,
// the GEMMs' type out). One block per row.
template <typename T>
__device__ void ce_bwd_chunk(T* dz, const float* logits, const float* lse, const float* dloss,
                             const u32* tgt, int cw, u32 c0) {
    const i64 r = blockIdx.x;
    const float l = lse[r], gr = dloss[r];
    const u32 t = tgt[r];
    const float* z = logits + r * cw;
    T* o = dz + r * cw;
    for (int j = threadIdx.x; j < cw; j += blockDim.x) {
        float x = expf(z[j] - l) * gr;
        if (c0 + (u32)j == t) x -= gr;
        st(o, j, x);
    }
}


// ---------------------------------------------------------------------------------------------
// Training-step glue (the device-resident model, model.rs): q/k/v split and merge, residual add,
// fp32 master → storage cast, storage → fp32 gradient accumulation. Grid-stride, elementwise.
// ---------------------------------------------------------------------------------------------
#define GRID_STRIDE(i, total)                                                                     \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (total);                         \
         i += (i64)gridDim.x * blockDim.x)

// qkv [n, qw + 2·kvw] → q [n, qw], k, v [n, kvw].
template <typename T>
__device__ void split_qkv(T* q, T* k, T* v, const T* qkv, i64 n, int qw, int kvw) {
    const int w = qw + 2 * kvw;
    GRID_STRIDE(i, n * w) {
        const i64 r = i / w;
        const int c = (int)(i - r * w);
        if (c < qw) q[r * qw + c] = qkv[i];
        else if (c < qw + kvw) k[r * kvw + (c - qw)] = qkv[i];
        else v[r * kvw + (c - qw - kvw)] = qkv[i];
    }
}

// The transpose of split_qkv.
template <typename T>
__device__ void merge_qkv(T* qkv, const T* q, const T* k, const T* v, i64 n, int qw, int kvw) {
    const int w = qw + 2 * kvw;
    GRID_STRIDE(i, n * w) {
        const i64 r = i / w;
        const int c = (int)(i - r * w);
        if (c < qw) qkv[i] = q[r * qw + c];
        else if (c < qw + kvw) qkv[i] = k[r * kvw + (c - qw)];
        else qkv[i] = v[r * kvw + (c - qw - kvw)];
    }
}

template <typename T>
__device__ void add_inplace(T* dst, const T* src, i64 n) {
    GRID_STRIDE(i, n) st(dst, i, ld(dst, i) + ld(src, i));
}

template <typename T>
__device__ void scale_inplace(T* x, i64 n, float s) {
    GRID_STRIDE(i, n) st(x, i, ld(x, i) * s);
}

template <typename T>
__device__ void cast_from_f32(T* dst, const float* src, i64 n) {
    GRID_STRIDE(i, n) st(dst, i, src[i]);
}

template <typename T>
__device__ void accum_f32(float* dst, const T* src, i64 n) {
    GRID_STRIDE(i, n) dst[i] += ld(src, i);
}

template <typename T>
__device__ void to_f32(float* dst, const T* src, i64 n) {
    GRID_STRIDE(i, n) dst[i] = ld(src, i);
}

// ---------------------------------------------------------------------------------------------
// Entry points, one per storage type.
// ---------------------------------------------------------------------------------------------
#define REEL_ENTRY_POINTS(T, S)                                                                   \
    extern "C" __global__ void rmsnorm_fwd_##S(T* out, float* rstd, const T* inp, const T* w,     \
                                               int d, float eps) {                                \
        rmsnorm_fwd<T>(out, rstd, inp, w, d, eps);                                                \
    }                                                                                             \
    extern "C" __global__ void rmsnorm_bwd_dinp_##S(T* dinp, const T* dout, const T* inp,        \
                                                    const T* w, const float* rstd, int d) {       \
        rmsnorm_bwd_dinp<T>(dinp, dout, inp, w, rstd, d);                                         \
    }                                                                                             \
    extern "C" __global__ void colsum_partial_##S(float* partial, const T* dout, const T* x,      \
                                                  const float* rstd, int n, int d, int rpc) {     \
        colsum_partial<T>(partial, dout, x, rstd, n, d, rpc);                                     \
    }                                                                                             \
    extern "C" __global__ void colsum_finish_##S(T* dst, const float* partial, int chunks,        \
                                                 int d) {                                         \
        colsum_finish<T>(dst, partial, chunks, d);                                                \
    }                                                                                             \
    extern "C" __global__ void swiglu_fwd_##S(T* out, const T* gate_up, i64 n, i64 i) {          \
        swiglu_fwd<T>(out, gate_up, n, i);                                                        \
    }                                                                                             \
    extern "C" __global__ void swiglu_bwd_##S(T* dgu, const T* dout, const T* gate_up, i64 n,    \
                                              i64 i) {                                            \
        swiglu_bwd<T>(dgu, dout, gate_up, n, i);                                                  \
    }                                                                                             \
    extern "C" __global__ void embedding_fwd_##S(T* out, const u32* tokens, const T* table,      \
                                                 int d, u32 vocab) {                              \
        embedding_fwd<T>(out, tokens, table, d, vocab);                                           \
    }                                                                                             \
    extern "C" __global__ void embedding_bwd_##S(T* dtable, const T* dout, const u32* order,     \
                                                 const u32* uniq, const u32* offsets, int d) {    \
        embedding_bwd<T>(dtable, dout, order, uniq, offsets, d);                                  \
    }                                                                                             \
    extern "C" __global__ void rope_##S(T* x, const u32* positions, const float* cos_t,          \
                                        const float* sin_t, i64 n, int h, int d, u32 max_pos,     \
                                        float sign) {                                             \
        rope<T>(x, positions, cos_t, sin_t, n, h, d, max_pos, sign);                              \
    }                                                                                             \
    extern "C" __global__ void gather_rows_##S(T* dst, const T* src, const u32* idx, int d) {    \
        gather_rows<T>(dst, src, idx, d);                                                         \
    }                                                                                             \
    extern "C" __global__ void put_kv_rows_##S(T* k, T* v, const T* src, const u32* idx, int m,  \
                                               int d) {                                           \
        put_kv_rows<T>(k, v, src, idx, m, d);                                                     \
    }                                                                                             \
    extern "C" __global__ void scatter_rows_##S(T* dst, const float* src, const u32* idx,        \
                                                int d) {                                          \
        scatter_rows<T>(dst, src, idx, d);                                                        \
    }                                                                                             \
    extern "C" __global__ void ce_bwd_chunk_##S(T* dz, const float* logits, const float* lse,    \
                                                const float* dloss, const u32* tgt, int cw,       \
                                                u32 c0) {                                         \
        ce_bwd_chunk<T>(dz, logits, lse, dloss, tgt, cw, c0);                                     \
    }                                                                                             \
    extern "C" __global__ void split_qkv_##S(T* q, T* k, T* v, const T* qkv, i64 n, int qw,      \
                                             int kvw) {                                           \
        split_qkv<T>(q, k, v, qkv, n, qw, kvw);                                                   \
    }                                                                                             \
    extern "C" __global__ void merge_qkv_##S(T* qkv, const T* q, const T* k, const T* v, i64 n,  \
                                             int qw, int kvw) {                                   \
        merge_qkv<T>(qkv, q, k, v, n, qw, kvw);                                                   \
    }                                                                                             \
    extern "C" __global__ void add_inplace_##S(T* dst, const T* src, i64 n) {                    \
        add_inplace<T>(dst, src, n);                                                              \
    }                                                                                             \
    extern "C" __global__ void scale_inplace_##S(T* x, i64 n, float s) {                         \
        scale_inplace<T>(x, n, s);                                                                \
    }                                                                                             \
    extern "C" __global__ void cast_from_f32_##S(T* dst, const float* src, i64 n) {              \
        cast_from_f32<T>(dst, src, n);                                                            \
    }                                                                                             \
    extern "C" __global__ void accum_f32_##S(float* dst, const T* src, i64 n) {                  \
        accum_f32<T>(dst, src, n);                                                                \
    }                                                                                             \
    extern "C" __global__ void to_f32_##S(float* dst, const T* src, i64 n) {                     \
        to_f32<T>(dst, src, n);                                                                   \
    }

REEL_ENTRY_POINTS(float, f32)
REEL_ENTRY_POINTS(__nv_bfloat16, bf16)

// ---------------------------------------------------------------------------------------------
// Kernels with one storage type (f32).
// ---------------------------------------------------------------------------------------------

// Per-row softmax statistics of one logits chunk [M, cw] (f32), folded into the running
// (max, sum of e^{z - max}) of each row as an online log-sum-exp; the target's logit is recorded
// when it falls in the chunk [c0, c0 + cw). `row_ent` carries Σ e^{z - max}(z - max) relative to
// the same running max (the CPU kernel's entropy fold: entropy = ln sum − ent / sum, without
// cancellation); a null `row_ent` skips the fold (plain cross-entropy). One block per row;
// deterministic.
extern "C" __global__ void ce_fwd_chunk(float* row_max, float* row_sum, float* row_ent,
                                        float* target_logit, const float* logits, const u32* tgt,
                                        int cw, u32 c0) {
    __shared__ float s_max;
    const i64 r = blockIdx.x;
    const float* z = logits + r * cw;
    float m = ninf();
    for (int j = threadIdx.x; j < cw; j += blockDim.x) m = fmaxf(m, z[j]);
    // Block max through the same two-level shuffle as block_sum.
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    {
        __shared__ float partial[32];
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        if (lane == 0) partial[warp] = m;
        __syncthreads();
        if (warp == 0) {
            const int warps = blockDim.x >> 5;
            float x = lane < warps ? partial[lane] : ninf();
            for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
            if (lane == 0) s_max = x;
        }
        __syncthreads();
    }
    const float cm = s_max;
    // Uniform over the block, so block_sum's barriers stay matched.
    const bool fold_ent = row_ent != nullptr;
    float e = 0.0f, w = 0.0f;
    if (fold_ent) {
        for (int j = threadIdx.x; j < cw; j += blockDim.x) {
            const float p = expf(z[j] - cm);
            e += p;
            w += p * (z[j] - cm);
        }
    } else {
        for (int j = threadIdx.x; j < cw; j += blockDim.x) e += expf(z[j] - cm);
    }
    const float cs = block_sum(e);
    const float ce = fold_ent ? block_sum(w) : 0.0f;
    if (threadIdx.x == 0) {
        const float m0 = row_max[r], s0 = row_sum[r];
        const float m1 = fmaxf(m0, cm);
        if (m1 != ninf()) {
            if (fold_ent) {
                // Σ e^{z−m1}(z−m1) of a partial (m, s, e) = e^{m−m1}(e + (m − m1)s); 0 when s = 0.
                const float e0 = row_ent[r];
                const float a = s0 == 0.0f ? 0.0f : expf(m0 - m1) * (e0 + (m0 - m1) * s0);
                const float b = cs == 0.0f ? 0.0f : expf(cm - m1) * (ce + (cm - m1) * cs);
                row_ent[r] = a + b;
            }
            row_sum[r] = s0 * expf(m0 - m1) + cs * expf(cm - m1);
            row_max[r] = m1;
        }
        const u32 t = tgt[r];
        if (t >= c0 && t < c0 + (u32)cw) target_logit[r] = z[t - c0];
    }
}

// losses[idx[r]] = lse[idx[r]] - target_logit[r], lse = max + ln(sum), and
// entropy[idx[r]] = ln(sum) − ent / sum (skipped when `entropy` is null); M rows.
extern "C" __global__ void ce_fwd_finish(float* losses, float* lse, float* entropy, const u32* idx,
                                         const float* row_max, const float* row_sum,
                                         const float* row_ent, const float* target_logit, int m) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= m) return;
    const float ls = logf(row_sum[r]);
    const float l = row_max[r] + ls;
    lse[idx[r]] = l;
    losses[idx[r]] = l - target_logit[r];
    if (entropy != nullptr) entropy[idx[r]] = ls - row_ent[r] / row_sum[r];
}

// ---------------------------------------------------------------------------------------------
// Partial-attention merge (reel_kernels::attention::attention_merge), f32: o, o_b [rows, d];
// lse, lse_b [rows]. lse' = lse − logsigmoid(lse − lse_b); o' = o − sigmoid(lse_b − lse)·(o − o_b);
// a row with lse_b = −inf is left alone, a row with lse = −inf takes (o_b, lse_b). One warp a row.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float stable_sigmoid(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    const float e = expf(x);
    return e / (1.0f + e);
}

extern "C" __global__ void attention_merge(float* o, float* lse, const float* o_b, const float* lse_b,
                                           i64 rows, int d) {
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    for (i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows; r += warps) {
        const float lb = lse_b[r];
        if (lb == ninf()) continue;
        const float l = lse[r];
        float* orow = o + r * d;
        const float* brow = o_b + r * d;
        if (l == ninf()) {
            for (int j = lane; j < d; j += 32) orow[j] = brow[j];
        } else {
            const float x = l - lb;
            const float w = stable_sigmoid(-x);
            for (int j = lane; j < d; j += 32) {
                const float a = orow[j];
                orow[j] = a - w * (a - brow[j]);
            }
        }
        __syncwarp();
        if (lane == 0) {
            if (l == ninf()) {
                lse[r] = lb;
            } else {
                const float x = l - lb;
                // ln σ(x) = −(max(−x, 0) + ln(1 + e^{−|x|}))
                lse[r] = l + (fmaxf(-x, 0.0f) + log1pf(expf(-fabsf(x))));
            }
        }
    }
}

// lse [B, T, H] → [B, H, T] (what cuDNN's SDPA backward reads).
extern "C" __global__ void lse_bth_to_bht(float* dst, const float* src, i64 b, int t, int h) {
    const i64 total = b * t * h;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (i64)gridDim.x * blockDim.x) {
        const i64 bi = i / ((i64)t * h);
        const int rem = (int)(i - bi * t * h);
        const int ti = rem / h, hh = rem - ti * h;
        dst[(bi * h + hh) * t + ti] = src[i];
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW (reel_optim::AdamW::step, torch semantics), fp32 params, grads and moments. The scalars
// come from reel_optim::AdamWConfig::scalars, so the host computes them exactly as the CPU step
// does; every operation is spelled with an _rn intrinsic in the CPU's order (no FMA contraction
// except the lerp, which the CPU fuses too), so the result is the CPU's to the bit.
//   p *= decay_factor (when decay);  m = fma(1−β1, g − m, m);  v = v·β2 + (1−β2)·g·g
//   p += neg_step · (m / (sqrt(v) / bc2_sqrt + eps))
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v, i64 n,
                                      int decay, float decay_factor, float one_minus_beta1,
                                      float beta2, float one_minus_beta2, float bc2_sqrt,
                                      float neg_step, float eps) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (i64)gridDim.x * blockDim.x) {
        float pi = p[i];
        if (decay) pi = __fmul_rn(pi, decay_factor);
        const float gi = g[i];
        const float mi = __fmaf_rn(one_minus_beta1, __fsub_rn(gi, m[i]), m[i]);
        const float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(one_minus_beta2, gi), gi));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        pi = __fadd_rn(pi, __fmul_rn(neg_step, __fdiv_rn(mi, denom)));
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
    }
}

// Σ x² per block of a fixed grid (one partial per block, summed by the host in f64): the global
// gradient norm, deterministic for a given grid.
extern "C" __global__ void sumsq_partial(float* partial, const float* x, i64 n) {
    float acc = 0.0f;
    GRID_STRIDE(i, n) acc += x[i] * x[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// x *= s (gradient clipping).
extern "C" __global__ void scale_f32(float* x, i64 n, float s) {
    GRID_STRIDE(i, n) x[i] *= s;
}

// dst[i] = v for i < n.
extern "C" __global__ void fill_f32(float* dst, float v, i64 n) {
    GRID_STRIDE(i, n) dst[i] = v;
}

// ---------------------------------------------------------------------------------------------
// Paged decode attention (reel_rollout::paged_attention_forward): q [N, H, D], K/V caches
// [num_blocks, bs, H_kv, D] (T), query row r sees keys 0 .. row_keys[r] − 1 of its sequence, key p
// at slot p % bs of block tables[row_table[r] + p / bs]; query head hh reads KV head
// hh / (H / H_kv). Block (r, y, split) serves the gb query heads y·gb .. y·gb + gb − 1, which share
// one KV head (GQA: each K/V row is read once for all of them), over keys
// [split·split_keys, min(row_keys[r], (split + 1)·split_keys)) with an online softmax per head
// (split-K as flash-decoding); its normalised f32 (o, lse) goes to part_o [splits, N, H, D] /
// part_lse [splits, N, H] and paged_attn_combine merges the splits in f32 — or, with one split,
// straight to out / lse. Each lane holds 8 contiguous elements of a key row (one 16-byte load for
// bf16), D / 8 lanes share a key, each warp loads 2·32 / (D / 8) keys before using them, 4 warps.
// GB (a power of two ≥ gb, at most 8) sizes the per-head registers.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void load8(const float* p, float* x) {
    const float4* v = reinterpret_cast<const float4*>(p);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float4 a = __ldg(v + i);
        x[4 * i] = a.x;
        x[4 * i + 1] = a.y;
        x[4 * i + 2] = a.z;
        x[4 * i + 3] = a.w;
    }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* x) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
    const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&a);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(b[j]);
        x[2 * j] = f.x;
        x[2 * j + 1] = f.y;
    }
}

constexpr int PAGED_WARPS = 4;
constexpr int PAGED_EPL = 8;
constexpr int PAGED_UNROLL = 2;

template <typename T, int D, int GB>
__device__ void paged_attn(float* part_o, float* part_lse, T* out, float* lse_out, const T* q,
                           const T* kc, const T* vc, const u32* tables, const u32* row_table,
                           const u32* row_keys, int h, int h_kv, int gb, int bs, int split_keys,
                           float scale) {
    constexpr int TG = D / PAGED_EPL;  // lanes per key
    constexpr int TPW = 32 / TG;       // keys per warp per sub-step
    constexpr int STEP = PAGED_WARPS * TPW * PAGED_UNROLL;
    __shared__ float s_m[PAGED_WARPS][GB], s_l[PAGED_WARPS][GB];
    __shared__ float s_acc[PAGED_WARPS][GB][D];
    const i64 r = blockIdx.x, n_rows = gridDim.x;
    const int hb = blockIdx.y * gb;
    const int split = blockIdx.z, splits = gridDim.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane % TG, tok = lane / TG;
    const int kh = hb / (h / h_kv);
    const int keys = (int)row_keys[r];
    const int k0 = split * split_keys;
    const int k1 = min(keys, k0 + split_keys);
    float qv[GB][PAGED_EPL], acc[GB][PAGED_EPL], m[GB], l[GB];
#pragma unroll
    for (int j = 0; j < GB; ++j) {
        if (j < gb) {
            load8(q + (r * h + hb + j) * D + g * PAGED_EPL, qv[j]);
        } else {
#pragma unroll
            for (int i = 0; i < PAGED_EPL; ++i) qv[j][i] = 0.0f;
        }
#pragma unroll
        for (int i = 0; i < PAGED_EPL; ++i) {
            qv[j][i] *= scale;
            acc[j][i] = 0.0f;
        }
        m[j] = ninf();
        l[j] = 0.0f;
    }
    const u32* table = tables + row_table[r];
    const i64 kvw = (i64)h_kv * D;
    const i64 head = (i64)kh * D + g * PAGED_EPL;
    for (int p0 = k0 + warp * TPW * PAGED_UNROLL; p0 < k1; p0 += STEP) {
        float kx[PAGED_UNROLL][PAGED_EPL], vx[PAGED_UNROLL][PAGED_EPL];
        bool valid[PAGED_UNROLL];
#pragma unroll
        for (int u = 0; u < PAGED_UNROLL; ++u) {
            const int p = p0 + u * TPW + tok;
            valid[u] = p < k1;
            if (valid[u]) {
                const i64 at = ((i64)table[p / bs] * bs + p % bs) * kvw + head;
                load8(kc + at, kx[u]);
                load8(vc + at, vx[u]);
            } else {
#pragma unroll
                for (int i = 0; i < PAGED_EPL; ++i) kx[u][i] = vx[u][i] = 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < PAGED_UNROLL; ++u) {
#pragma unroll
            for (int j = 0; j < GB; ++j) {
                if (j >= gb) continue;  // uniform over the block
                float s = 0.0f;
#pragma unroll
                for (int i = 0; i < PAGED_EPL; ++i) s = fmaf(qv[j][i], kx[u][i], s);
#pragma unroll
                for (int o = TG / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                if (valid[u]) {
                    const float mn = fmaxf(m[j], s);
                    const float c = expf(m[j] - mn);
                    const float pw = expf(s - mn);
                    l[j] = l[j] * c + pw;
#pragma unroll
                    for (int i = 0; i < PAGED_EPL; ++i) acc[j][i] = fmaf(pw, vx[u][i], acc[j][i] * c);
                    m[j] = mn;
                }
            }
        }
    }
    // Merge the warp's key groups (lanes g, g + TG, …), then the warps.
#pragma unroll
    for (int j = 0; j < GB; ++j) {
        if (j >= gb) continue;
#pragma unroll
        for (int o = TG; o < 32; o <<= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m[j], o);
            const float l2 = __shfl_xor_sync(0xffffffffu, l[j], o);
            const float mn = fmaxf(m[j], m2);
            const float c1 = mn == ninf() ? 0.0f : expf(m[j] - mn);
            const float c2 = mn == ninf() ? 0.0f : expf(m2 - mn);
#pragma unroll
            for (int i = 0; i < PAGED_EPL; ++i) {
                const float a2 = __shfl_xor_sync(0xffffffffu, acc[j][i], o);
                acc[j][i] = acc[j][i] * c1 + a2 * c2;
            }
            l[j] = l[j] * c1 + l2 * c2;
            m[j] = mn;
        }
        if (tok == 0) {
#pragma unroll
            for (int i = 0; i < PAGED_EPL; ++i) s_acc[warp][j][g * PAGED_EPL + i] = acc[j][i];
            if (g == 0) {
                s_m[warp][j] = m[j];
                s_l[warp][j] = l[j];
            }
        }
    }
    __syncthreads();
    if (warp != 0 || tok != 0) return;
#pragma unroll
    for (int j = 0; j < GB; ++j) {
        if (j >= gb) continue;
        float mm = ninf();
#pragma unroll
        for (int w = 0; w < PAGED_WARPS; ++w) mm = fmaxf(mm, s_m[w][j]);
        float ll = 0.0f, o[PAGED_EPL];
#pragma unroll
        for (int i = 0; i < PAGED_EPL; ++i) o[i] = 0.0f;
        if (mm != ninf()) {
#pragma unroll
            for (int w = 0; w < PAGED_WARPS; ++w) {
                const float c = expf(s_m[w][j] - mm);
                ll += s_l[w][j] * c;
#pragma unroll
                for (int i = 0; i < PAGED_EPL; ++i) o[i] += s_acc[w][j][g * PAGED_EPL + i] * c;
            }
        }
        const float inv = ll > 0.0f ? 1.0f / ll : 0.0f;
        const float lse = ll > 0.0f ? mm + logf(ll) : ninf();
        const i64 row = r * h + hb + j;
        if (splits == 1) {
#pragma unroll
            for (int i = 0; i < PAGED_EPL; ++i) st(out, row * D + g * PAGED_EPL + i, o[i] * inv);
            if (g == 0) lse_out[row] = lse;
        } else {
            const i64 prow = (i64)split * n_rows * h + row;
#pragma unroll
            for (int i = 0; i < PAGED_EPL; ++i) part_o[prow * D + g * PAGED_EPL + i] = o[i] * inv;
            if (g == 0) part_lse[prow] = lse;
        }
    }
}

// The f32 merge of the splits: out = Σ_s w_s·o_s / Σ_s w_s, lse = M + ln Σ_s w_s with
// w_s = e^{lse_s − M}, M = max_s lse_s (0 and −inf where no split saw a key). One warp a row.
template <typename T>
__device__ void paged_attn_combine(T* out, float* lse, const float* part_o, const float* part_lse,
                                   i64 rows, int splits, int d) {
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    const int lane = threadIdx.x & 31;
    for (i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows; r += warps) {
        float mm = ninf();
        for (int s = 0; s < splits; ++s) mm = fmaxf(mm, part_lse[s * rows + r]);
        float sum = 0.0f;
        if (mm != ninf())
            for (int s = 0; s < splits; ++s) sum += expf(part_lse[s * rows + r] - mm);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        for (int j = lane; j < d; j += 32) {
            float a = 0.0f;
            if (mm != ninf())
                for (int s = 0; s < splits; ++s)
                    a += expf(part_lse[s * rows + r] - mm) * part_o[(s * rows + r) * d + j];
            st(out, r * d + j, a * inv);
        }
        if (lane == 0) lse[r] = sum > 0.0f ? mm + logf(sum) : ninf();
    }
}

#define REEL_PAGED_ENTRY(T, S, DD, GG)                                                            \
    extern "C" __global__ void __launch_bounds__(PAGED_WARPS * 32)                                \
        paged_attn_##S##_d##DD##_g##GG(float* part_o, float* part_lse, T* out, float* lse_out,    \
                                       const T* q, const T* kc, const T* vc, const u32* tables,   \
                                       const u32* row_table, const u32* row_keys, int h,          \
                                       int h_kv, int gb, int bs, int split_keys, float scale) {   \
        paged_attn<T, DD, GG>(part_o, part_lse, out, lse_out, q, kc, vc, tables, row_table,       \
                              row_keys, h, h_kv, gb, bs, split_keys, scale);                      \
    }
#define REEL_PAGED_ENTRIES_D(T, S, DD)                                                            \
    REEL_PAGED_ENTRY(T, S, DD, 1)                                                                 \
    REEL_PAGED_ENTRY(T, S, DD, 2)                                                                 \
    REEL_PAGED_ENTRY(T, S, DD, 4)                                                                 \
    REEL_PAGED_ENTRY(T, S, DD, 8)
#define REEL_PAGED_ENTRIES(T, S)                                                                  \
    REEL_PAGED_ENTRIES_D(T, S, 32)                                                                \
    REEL_PAGED_ENTRIES_D(T, S, 64)                                                                \
    REEL_PAGED_ENTRIES_D(T, S, 128)                                                               \
    REEL_PAGED_ENTRIES_D(T, S, 256)                                                               \
    extern "C" __global__ void paged_attn_combine_##S(T* out, float* lse, const float* part_o,    \
                                                      const float* part_lse, i64 rows,            \
                                                      int splits, int d) {                        \
        paged_attn_combine<T>(out, lse, part_o, part_lse, rows, splits, d);                       \
    }

REEL_PAGED_ENTRIES(float, f32)
REEL_PAGED_ENTRIES(__nv_bfloat16, bf16)

// ---------------------------------------------------------------------------------------------
// Decode step over a paged KV cache (decode.rs). decode_qkv_store: the fused q/k/v projection's
// output qkv [N, (H + 2·H_kv)·D] → q [N, H·D] rotated (RoPE, rotate_half as `rope`), and k
// rotated and v copied into one layer's caches [num_blocks·bs, H_kv·D] at each row's slot
// (block · bs + offset). One thread per rotation pair (j, j + D/2) of every head. A row's
// rotary row p < max_pos reads the 1-D table (cos_t/sin_t [max_pos, D/2]); p = max_pos + k reads
// row k of the step's own angles (xcos/xsin [n_extra, D/2]: M-RoPE rows); any other p gives NaN.
// kv_copy_blocks: copies on write of blocks; grid (copies, planes), plane p = one layer's K or V
// (`plane` elements); copy c moves the first elems[c] elements of block src[c] to block dst[c].
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void decode_qkv_store(T* q, T* kc, T* vc, const T* qkv, const u32* positions,
                                 const u32* slots, const float* cos_t, const float* sin_t,
                                 const float* xcos, const float* xsin, u32 n_extra, i64 n, int h,
                                 int h_kv, int d, u32 max_pos) {
    const int half = d / 2;
    const int heads = h + 2 * h_kv;
    const int pairs = heads * half;
    const i64 kvw = (i64)h_kv * d;
    GRID_STRIDE(idx, n * pairs) {
        const i64 r = idx / pairs;
        const int c = (int)(idx - r * pairs);
        const int head = c / half, j = c - head * half;
        const T* src = qkv + r * heads * d + (i64)head * d;
        const float x1 = ld(src, j), x2 = ld(src, j + half);
        if (head >= h + h_kv) {
            T* o = vc + (i64)slots[r] * kvw + (i64)(head - h - h_kv) * d;
            st(o, j, x1);
            st(o, j + half, x2);
            continue;
        }
        const u32 pos = positions[r];
        float cs = qnan(), sn = qnan();
        if (pos < max_pos) {
            cs = cos_t[(i64)pos * half + j];
            sn = sin_t[(i64)pos * half + j];
        } else if (pos - max_pos < n_extra) {
            cs = xcos[(i64)(pos - max_pos) * half + j];
            sn = xsin[(i64)(pos - max_pos) * half + j];
        }
        T* o = head < h ? q + r * h * d + (i64)head * d
                        : kc + (i64)slots[r] * kvw + (i64)(head - h) * d;
        st(o, j, x1 * cs - x2 * sn);
        st(o, j + half, x2 * cs + x1 * sn);
    }
}

template <typename T>
__device__ void kv_copy_blocks(T* kv, const u32* src, const u32* dst, const u32* elems, i64 plane,
                               i64 block_elems) {
    const i64 c = blockIdx.x, p = blockIdx.y;
    const T* s = kv + p * plane + (i64)src[c] * block_elems;
    T* o = kv + p * plane + (i64)dst[c] * block_elems;
    const u32 e = elems[c];
    for (u32 i = threadIdx.x; i < e; i += blockDim.x) o[i] = s[i];
}

#define REEL_DECODE_ENTRIES(T, S)                                                                 \
    extern "C" __global__ void decode_qkv_store_##S(T* q, T* kc, T* vc, const T* qkv,            \
                                                    const u32* positions, const u32* slots,       \
                                                    const float* cos_t, const float* sin_t,       \
                                                    const float* xcos, const float* xsin,         \
                                                    u32 n_extra, i64 n, int h, int h_kv, int d,   \
                                                    u32 max_pos) {                                \
        decode_qkv_store<T>(q, kc, vc, qkv, positions, slots, cos_t, sin_t, xcos, xsin, n_extra,  \
                            n, h, h_kv, d, max_pos);                                              \
    }                                                                                             \
    extern "C" __global__ void kv_copy_blocks_##S(T* kv, const u32* src, const u32* dst,         \
                                                  const u32* elems, i64 plane, i64 block_elems) { \
        kv_copy_blocks<T>(kv, src, dst, elems, plane, block_elems);                               \
    }

REEL_DECODE_ENTRIES(float, f32)
REEL_DECODE_ENTRIES(__nv_bfloat16, bf16)

// ---------------------------------------------------------------------------------------------
// Vision tower (vision.rs): exact GELU, and bidirectional attention within segments.
// ---------------------------------------------------------------------------------------------

// out = x · Φ(x) = ½·x·(1 + erf(x/√2)) (torch's exact nn.GELU), elementwise, as ½·x·erfc(−x/√2):
// the same function without 1 + erf's cancellation for negative x (f32 erfc keeps the small
// values' relative accuracy).
template <typename T>
__device__ void gelu_fwd(T* out, const T* inp, i64 n) {
    GRID_STRIDE(i, n) {
        const float x = ld(inp, i);
        st(out, i, 0.5f * x * erfcf(-x * 0.70710678118654752f));
    }
}

// Bidirectional attention inside segments of rows (windows, frames): row i of segment [s, e)
// attends to rows s..e of every head; q, k, v, out [N, H, D], lse [N, H] (natural log), scale
// 1/√D. `tiles` [n_tiles, 3]: (first query row, segment start, segment end), each tile at most
// SEG_WARPS query rows of one segment; grid (n_tiles, H), one warp per query row. Keys go
// through shared memory SEG_KEYS at a time (f32); lane j scores key j of a chunk, the output
// dims are spread over the lanes (dim lane + 32·c), the softmax is online in f32.
#define SEG_WARPS 8
#define SEG_KEYS 32
#define SEG_MAX_D 128
template <typename T>
__device__ void seg_attn_fwd(T* out, float* lse, const T* q, const T* k, const T* v,
                             const u32* tiles, int h, int d, float scale) {
    __shared__ float ks[SEG_KEYS][SEG_MAX_D + 1];
    __shared__ float vs[SEG_KEYS][SEG_MAX_D + 1];
    __shared__ float qs[SEG_WARPS][SEG_MAX_D];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 q0 = tiles[3 * blockIdx.x], s = tiles[3 * blockIdx.x + 1], e = tiles[3 * blockIdx.x + 2];
    const int head = blockIdx.y;
    const i64 row = (i64)q0 + warp;
    const bool active = row < (i64)e;
    const i64 stride = (i64)h * d;
    if (active)
        for (int j = lane; j < d; j += 32) qs[warp][j] = ld(q, row * stride + (i64)head * d + j);
    float m = ninf(), l = 0.0f;
    float o[SEG_MAX_D / 32];
#pragma unroll
    for (int c = 0; c < SEG_MAX_D / 32; ++c) o[c] = 0.0f;
    for (u32 k0 = s; k0 < e; k0 += SEG_KEYS) {
        const int nk = min((u32)SEG_KEYS, e - k0);
        __syncthreads();
        for (int idx = threadIdx.x; idx < nk * d; idx += blockDim.x) {
            const int j = idx / d, c = idx - j * d;
            const i64 at = (i64)(k0 + j) * stride + (i64)head * d + c;
            ks[j][c] = ld(k, at);
            vs[j][c] = ld(v, at);
        }
        __syncthreads();
        if (!active) continue;
        float sc = ninf();
        if (lane < nk) {
            float acc = 0.0f;
            for (int c = 0; c < d; ++c) acc += qs[warp][c] * ks[lane][c];
            sc = acc * scale;
        }
        float mx = sc;
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float m_new = fmaxf(m, mx);
        const float p = lane < nk ? expf(sc - m_new) : 0.0f;
        float ps = p;
        for (int off = 16; off > 0; off >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, off);
        const float corr = expf(m - m_new);
        l = l * corr + ps;
        m = m_new;
#pragma unroll
        for (int c = 0; c < SEG_MAX_D / 32; ++c) o[c] *= corr;
        for (int j = 0; j < nk; ++j) {
            const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
            for (int c = 0; c < SEG_MAX_D / 32; ++c) {
                const int dd = lane + 32 * c;
                if (dd < d) o[c] += pj * vs[j][dd];
            }
        }
    }
    if (!active) return;
    const float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < SEG_MAX_D / 32; ++c) {
        const int dd = lane + 32 * c;
        if (dd < d) st(out, row * stride + (i64)head * d + dd, o[c] * inv);
    }
    if (lane == 0) lse[row * h + head] = m + logf(l);
}

#define REEL_VISION_ENTRIES(T, S)                                                                 \
    extern "C" __global__ void gelu_fwd_##S(T* out, const T* inp, i64 n) {                       \
        gelu_fwd<T>(out, inp, n);                                                                 \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(SEG_WARPS * 32)                                  \
        seg_attn_fwd_##S(T* out, float* lse, const T* q, const T* k, const T* v,                 \
                         const u32* tiles, int h, int d, float scale) {                           \
        seg_attn_fwd<T>(out, lse, q, k, v, tiles, h, d, scale);                                   \
    }

REEL_VISION_ENTRIES(float, f32)
REEL_VISION_ENTRIES(__nv_bfloat16, bf16)

// ---------------------------------------------------------------------------------------------
// Sampling candidates on the device (topk.rs). For each logits row z [V] at temperature τ: its
// k ≤ TOPK_CAP best entries in the sampler's order (larger first in the IEEE total order, equal
// values by the smaller id: reel_model::generate::rank_order), sorted, and the two parts of its
// log-sum-exp, m = max z (NaN ignored, as fmaxf) and Σ exp((z − m)/τ) in f32 (lse = m/τ + ln Σ).
// One block of TOPK_THREADS per row: radix select on 32-bit order keys (digits of 11, 11 and 10
// bits, a shared-memory histogram per pass, stopping early when a digit's bin is taken whole)
// down to the k-th key; one pass in id order collects the keys above it and, of the keys in its
// class, the smallest ids (a block scan ranks them); a bitonic sort of (key, ~id) orders them.
// Reads the row 3 to 4 times; the histogram counts are integer atomics (exact), the sum a fixed
// per-thread order and tree.
// ---------------------------------------------------------------------------------------------
#define TOPK_THREADS 1024
#define TOPK_CAP 1024
#define TOPK_BINS 2048

// An unsigned key whose order is the float's IEEE total order (−NaN < −inf < … < −0 < +0 < …).
__device__ __forceinline__ u32 topk_key(float x) {
    const u32 u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float topk_value(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Maximum over the block (NaN ignored); every thread gets the result.
__device__ float block_max(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        float s = lane < warps ? partial[lane] : ninf();
        for (int o = 16; o > 0; o >>= 1) s = fmaxf(s, __shfl_xor_sync(0xffffffffu, s, o));
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// Inclusive scan of v over the block of TOPK_THREADS (thread order); *total gets the block's sum.
__device__ int topk_scan(int v, int* total) {
    __shared__ int warp_tot[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += n;
    }
    if (lane == 31) warp_tot[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int w = warp_tot[lane];
        for (int o = 1; o < 32; o <<= 1) {
            const int n = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += n;
        }
        warp_tot[lane] = w;
    }
    __syncthreads();
    const int r = v + (warp > 0 ? warp_tot[warp - 1] : 0);
    *total = warp_tot[31];
    __syncthreads();  // every thread has read warp_tot before the next scan writes it
    return r;
}

// After a histogram of one digit (at `shift`, `bits` wide) of the keys in the current class:
// finds the bin holding the rem-th largest key, narrows the class to it and lowers rem by the
// keys above it. Returns whether the bin is taken whole (no narrower digit needed).
__device__ bool topk_select(const int* hist, int shift, int bits, u32* prefix, u32* mask, int* rem) {
    __shared__ int s_bin, s_above, s_count;
    const int hi = TOPK_BINS - 1 - 2 * (int)threadIdx.x;
    const int c0 = hist[hi], c1 = hist[hi - 1];
    int total;
    const int incl = topk_scan(c0 + c1, &total);
    const int excl = incl - c0 - c1;
    if (excl < *rem && *rem <= incl) {
        if (excl + c0 >= *rem) {
            s_bin = hi;
            s_above = excl;
            s_count = c0;
        } else {
            s_bin = hi - 1;
            s_above = excl + c0;
            s_count = c1;
        }
    }
    __syncthreads();
    *prefix |= (u32)s_bin << shift;
    *mask |= ((1u << bits) - 1u) << shift;
    *rem -= s_above;
    const bool whole = s_count == *rem;
    __syncthreads();  // s_* are read before the next selection writes them
    return whole;
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
topk_lse(u32* out_ids, float* out_f, const float* logits, const float* temps, i64 v, int k) {
    // out_f: the values [rows, k], then the max [rows], then the sum [rows].
    float* out_vals = out_f;
    float* out_max = out_f + (i64)gridDim.x * k;
    float* out_sum = out_max + gridDim.x;
    __shared__ int hist[TOPK_BINS];
    __shared__ unsigned long long cand[TOPK_CAP];
    const i64 row = blockIdx.x;
    const float* z = logits + row * v;
    const int tid = threadIdx.x;
    for (int b = tid; b < TOPK_BINS; b += TOPK_THREADS) hist[b] = 0;
    __syncthreads();
    // Pass 1: the max and the first digit's histogram.
    float m = ninf();
#pragma unroll 4
    for (i64 i = tid; i < v; i += TOPK_THREADS) {
        const float x = z[i];
        m = fmaxf(m, x);
        atomicAdd(&hist[topk_key(x) >> 21], 1);
    }
    m = block_max(m);
    u32 prefix = 0, mask = 0;
    int rem = k;
    bool whole = topk_select(hist, 21, 11, &prefix, &mask, &rem);
    for (int b = tid; b < TOPK_BINS; b += TOPK_THREADS) hist[b] = 0;
    __syncthreads();
    // Pass 2: Σ exp((z − m)/τ), and the second digit's histogram within the class.
    const float inv_t = 1.0f / temps[row];
    float s = 0.0f;
#pragma unroll 4
    for (i64 i = tid; i < v; i += TOPK_THREADS) {
        const float x = z[i];
        s += expf((x - m) * inv_t);
        if (!whole) {
            const u32 key = topk_key(x);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> 10) & 0x7ffu], 1);
        }
    }
    s = block_sum(s);
    if (!whole) {
        whole = topk_select(hist, 10, 11, &prefix, &mask, &rem);
        for (int b = tid; b < TOPK_BINS; b += TOPK_THREADS) hist[b] = 0;
        __syncthreads();
    }
    // Pass 3: the last digit; the class is then one key (ties) unless taken whole before.
    if (!whole) {
        for (i64 i = tid; i < v; i += TOPK_THREADS) {
            const u32 key = topk_key(z[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[key & 0x3ffu], 1);
        }
        __syncthreads();
        topk_select(hist, 0, 10, &prefix, &mask, &rem);
    }
    // Pass 4, in id order, 4 ids a thread per chunk: every key above the class, and the rem
    // smallest ids of the class. (key, ~id) so that a descending sort puts smaller ids first.
    const int above = k - rem;
    int above_seen = 0, class_seen = 0;
    for (i64 base = 0; base < v; base += 4 * TOPK_THREADS) {
        u32 key[4];
        int n_above = 0, n_class = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const i64 i = base + 4 * tid + j;
            key[j] = i < v ? topk_key(z[i]) : 0u;
            const u32 c = key[j] & mask;
            if (i < v && c > prefix) n_above++;
            if (i < v && c == prefix) n_class++;
        }
        // Counts per thread ≤ 4 and per chunk ≤ 4096: both fit in one int's halves.
        int total;
        const int packed = n_class | (n_above << 16);
        const int excl = topk_scan(packed, &total) - packed;
        int ra = above_seen + (excl >> 16), rc = class_seen + (excl & 0xffff);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const i64 i = base + 4 * tid + j;
            if (i >= v) continue;
            const u32 c = key[j] & mask;
            const unsigned long long e =
                ((unsigned long long)key[j] << 32) | (unsigned long long)(~(u32)i);
            if (c > prefix) {
                cand[ra++] = e;
            } else if (c == prefix) {
                if (rc < rem) cand[above + rc] = e;
                rc++;
            }
        }
        above_seen += total >> 16;
        class_seen += total & 0xffff;
        if (above_seen == above && class_seen >= rem) break;
    }
    // Bitonic sort, descending, of the k candidates padded with zeros to a power of two.
    int p = 1;
    while (p < k) p <<= 1;
    for (int i = k + tid; i < p; i += TOPK_THREADS) cand[i] = 0ull;
    for (int size = 2; size <= p; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            const int i = tid, j = tid ^ stride;
            if (i < p && j > i) {
                const unsigned long long a = cand[i], b = cand[j];
                const bool desc = (i & size) == 0;
                if (desc ? a < b : a > b) {
                    cand[i] = b;
                    cand[j] = a;
                }
            }
        }
    }
    __syncthreads();
    if (tid < k) {
        const unsigned long long e = cand[tid];
        out_ids[row * k + tid] = ~(u32)(e & 0xffffffffull);
        out_vals[row * k + tid] = topk_value((u32)(e >> 32));
    }
    if (tid == 0) {
        out_max[row] = m;
        out_sum[row] = s;
    }
}

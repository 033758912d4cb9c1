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
    }

REEL_ENTRY_POINTS(float, f32)
REEL_ENTRY_POINTS(__nv_bfloat16, bf16)

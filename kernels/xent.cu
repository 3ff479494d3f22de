// Fused cross-entropy over the vocabulary, an autograd op for fine-tuning (twin:
// `finetune::loss::nll_sum_slow`, log-softmax + gather from tensor ops):
//
//   xent_fwd_T   out[r] = (lse[r] − x[r, t[r]], lse[r]),  lse[r] = log Σ_j exp x[r, j]
//                                                         x (n, V) T, t (n) u32, out (n, 2) f32
//   xent_bwd_T   dx[r, j] = (exp(x[r, j] − lse[r]) − [j = t[r]]) · g[r, 0]
//                                                         g (n, 2) f32 (column 1 unused), dx (n, V) T
//
// One block per row. The forward reads the row once, keeping a running (max, Σ exp(x − max)) per
// thread that is rescaled whenever the max grows ("online softmax"), then merges the threads'
// pairs; the backward reads x once and writes dx once, using the forward's saved lse. Math in f32
// for every T; dx is rounded to T once. A target outside [0, V) gives a NaN loss and no one-hot
// term (the host checks the targets first and reports them; the kernel never reads past the row).
//
// `vec` = 1: rows are read (and dx written) as 16-byte vectors; the caller sets it only when V is
// a multiple of 16 / sizeof(T) and both pointers are 16-byte aligned.
#include "common.cuh"

// 16-byte vectors in flight per thread and loop turn.
#define XENT_BATCH 4

template <typename T> struct Vec16 {
    static constexpr int K = 16 / sizeof(T);
};

template <typename T> __device__ __forceinline__ void unpack(const uint4& u, float (&x)[Vec16<T>::K]) {
    const T* p = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < Vec16<T>::K; k++) x[k] = to_f(p[k]);
}

template <typename T> __device__ __forceinline__ uint4 pack(const float (&x)[Vec16<T>::K]) {
    uint4 u;
    T* p = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int k = 0; k < Vec16<T>::K; k++) p[k] = from_f<T>(x[k]);
    return u;
}

// Adds K values to a running (m = max, s = Σ exp(x − m)).
template <int K> __device__ __forceinline__ void online_add(float& m, float& s, const float (&x)[K]) {
    float mc = x[0];
#pragma unroll
    for (int k = 1; k < K; k++) mc = fmaxf(mc, x[k]);
    if (mc > m) {
        s *= expf(m - mc);  // 0 while m is still −∞
        m = mc;
    }
    if (m != -INFINITY) {
#pragma unroll
        for (int k = 0; k < K; k++) s += expf(x[k] - m);
    }
}

// (m, s) ⊕ (m2, s2): the pair of the union of both sets of values.
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    s = mm == -INFINITY ? 0.0f : s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// Merges every thread's (m, s); thread 0 gets the block's. sh_m, sh_s: 32 floats each.
__device__ __forceinline__ void block_max_sum(float& m, float& s, float* sh_m, float* sh_s) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge_max_sum(m, s, m2, s2);
    }
    if (lane == 0) {
        sh_m[w] = m;
        sh_s[w] = s;
    }
    __syncthreads();
    if (w == 0) {
        m = lane < nw ? sh_m[lane] : -INFINITY;
        s = lane < nw ? sh_s[lane] : 0.0f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            merge_max_sum(m, s, m2, s2);
        }
    }
}

template <typename T>
__device__ void xent_fwd(int v, int vec, const T* __restrict__ logits, const unsigned* __restrict__ targets,
                         float* __restrict__ out) {
    __shared__ float sh_m[32], sh_s[32];
    const int r = blockIdx.x;
    const T* row = logits + (long long)r * v;  // (V)
    float m = -INFINITY, s = 0.0f;
    if (vec) {
        constexpr int K = Vec16<T>::K;
        const uint4* rv = reinterpret_cast<const uint4*>(row);
        const int nv = v / K;
        for (int base = threadIdx.x; base < nv; base += XENT_BATCH * blockDim.x) {
            uint4 u[XENT_BATCH];
#pragma unroll
            for (int b = 0; b < XENT_BATCH; b++)
                if (base + b * (int)blockDim.x < nv) u[b] = ld_stream(rv + base + b * blockDim.x);
#pragma unroll
            for (int b = 0; b < XENT_BATCH; b++) {
                if (base + b * (int)blockDim.x < nv) {
                    float x[K];
                    unpack<T>(u[b], x);
                    online_add<K>(m, s, x);
                }
            }
        }
    } else {
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            const float x[1] = {to_f(row[j])};
            online_add<1>(m, s, x);
        }
    }
    block_max_sum(m, s, sh_m, sh_s);
    if (threadIdx.x == 0) {
        const float lse = m + logf(s);
        const unsigned t = targets[r];
        const float picked = t < (unsigned)v ? to_f(row[t]) : __int_as_float(0x7fc00000);  // NaN
        out[2 * r] = lse - picked;
        out[2 * r + 1] = lse;
    }
}

template <typename T>
__device__ void xent_bwd(int v, int vec, const T* __restrict__ logits, const unsigned* __restrict__ targets,
                         const float* __restrict__ res, const float* __restrict__ grad, T* __restrict__ dx) {
    const int r = blockIdx.x;
    const float lse = res[2 * r + 1], g = grad[2 * r];
    const long long t = targets[r];  // ≥ V: no one-hot term
    const T* row = logits + (long long)r * v;  // (V)
    T* drow = dx + (long long)r * v;           // (V)
    if (vec) {
        constexpr int K = Vec16<T>::K;
        const uint4* rv = reinterpret_cast<const uint4*>(row);
        uint4* dv = reinterpret_cast<uint4*>(drow);
        const int nv = v / K;
        for (int base = threadIdx.x; base < nv; base += XENT_BATCH * blockDim.x) {
            uint4 u[XENT_BATCH];
#pragma unroll
            for (int b = 0; b < XENT_BATCH; b++)
                if (base + b * (int)blockDim.x < nv) u[b] = ld_stream(rv + base + b * blockDim.x);
#pragma unroll
            for (int b = 0; b < XENT_BATCH; b++) {
                const int i = base + b * blockDim.x;
                if (i < nv) {
                    float x[K];
                    unpack<T>(u[b], x);
#pragma unroll
                    for (int k = 0; k < K; k++) {
                        const float p = expf(x[k] - lse);
                        x[k] = ((long long)i * K + k == t ? p - 1.0f : p) * g;
                    }
                    dv[i] = pack<T>(x);
                }
            }
        }
    } else {
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            const float p = expf(to_f(row[j]) - lse);
            drow[j] = from_f<T>((j == t ? p - 1.0f : p) * g);
        }
    }
}

#define XENT(T, S)                                                                                          \
    extern "C" __global__ void xent_fwd_##S(const XentFwdParams<T> p) {                                     \
        xent_fwd<T>(p.v, p.vec, p.logits, p.targets, p.out);                                                \
    }                                                                                                       \
    extern "C" __global__ void xent_bwd_##S(const XentBwdParams<T> p) {                                     \
        xent_bwd<T>(p.v, p.vec, p.logits, p.targets, p.res, p.grad, p.dx);                                  \
    }
INSTANTIATE_T(XENT)

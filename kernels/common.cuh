// Shared device helpers of the blackmamba kernels: dtype conversion, activations, warp and block
// reductions, 16-byte vector dot products. Every kernel file includes this header.
//
// Element types: `float` (f32), `bf16`, `f16`. Kernels are templates over the weight type and are
// exported with a dtype suffix (`_f32`, `_bf16`, `_f16`) through the INSTANTIATE macros.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __half f16;

#include "params.cuh"

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(f16 x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ f16 from_f<f16>(float x) { return __float2half_rn(x); }

// x rounded through T (what storing an f32 value as T and reading it back gives).
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_f(from_f<T>(x)); }

__device__ __forceinline__ float silu_f(float x) { return x / (1.0f + expf(-x)); }
// softplus(x) = max(x, 0) + log1p(exp(-|x|)): never overflows (as the tensor-op twin).
__device__ __forceinline__ float softplus_f(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }
__device__ __forceinline__ float gelu_erf_f(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }
// act: 0 = GELU (erf), 1 = SiLU
__device__ __forceinline__ float act_f(float x, int act) { return act == 0 ? gelu_erf_f(x) : silu_f(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// One step of warp_sum_transpose32: lanes with bit OFF clear keep entries [0, OFF) of the 2·OFF
// they hold, the others entries [OFF, 2·OFF), each adding its partner's copy of them.
template <int OFF, int SZ>
__device__ __forceinline__ void transpose_add_step(float (&v)[SZ], int lane) {
    const bool upper = (lane & OFF) != 0;
#pragma unroll
    for (int i = 0; i < OFF; i++) {
        const float send = upper ? v[i] : v[i + OFF];
        const float keep = upper ? v[i + OFF] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
    }
}

// Sums each of 16 values over each half of the warp: lane i returns Σ over the 16 lanes of its half
// of v[i & 15] (8 + 4 + 2 + 1 = 15 shuffles; v is consumed).
__device__ __forceinline__ float half_warp_sum_transpose16(float (&v)[16]) {
    const int lane = threadIdx.x & 31;
    transpose_add_step<8>(v, lane);
    transpose_add_step<4>(v, lane);
    transpose_add_step<2>(v, lane);
    transpose_add_step<1>(v, lane);
    return v[0];
}

// Sums each of 32 values over the warp: lane i returns Σ over the lanes of v[i] (v is consumed).
// The values are transposed across the lanes as they are added: 16 + 8 + 4 + 2 + 1 = 31
// independent shuffles, where 32 warp_sum calls take 160 in 32 dependent chains. After the first
// step each half of the warp holds its 16 entries in v[0..16).
__device__ __forceinline__ float warp_sum_transpose32(float (&v)[32]) {
    transpose_add_step<16>(v, threadIdx.x & 31);
    return half_warp_sum_transpose16(reinterpret_cast<float(&)[16]>(v));
}

// The scan backwards' per-token dB/dC: part[n] (n < 16) and part[16 + n] are this lane's terms of
// dB[n] and dC[n]; their sums over the warp are added into red[n] and red[N + n] (shared memory,
// N <= 16) by one transposing reduction and one atomic add per lane.
__device__ __forceinline__ void warp_add_dbc(float (&part)[32], int N, float* red) {
    const float sum = warp_sum_transpose32(part);
    const int lane = threadIdx.x & 31, n = lane & 15;
    if (n < N) atomicAdd(red + (lane < 16 ? n : N + n), sum);
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `sh` holds >= 33 floats. Safe to call back
// to back (the first barrier waits for readers of the previous result).
__device__ __forceinline__ float block_sum(float v, float* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float t = lane < nw ? sh[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) sh[32] = t;
    }
    __syncthreads();
    return sh[32];
}

// One row's RMSNorm by a block: y[k] = T(x[k] · rsqrt(mean(x²) + eps) · w[k]) for k < d; returns
// the row's rsqrt. `red` holds >= 33 floats.
template <typename T>
__device__ __forceinline__ float rms_norm_row(const float* __restrict__ x, const float* __restrict__ w, int d, float eps,
                                              T* y, float* red) {
    float ss = 0.0f;
    for (int k = threadIdx.x; k < d; k += blockDim.x) ss = fmaf(x[k], x[k], ss);
    ss = block_sum(ss, red);
    const float rstd = rsqrtf(ss / (float)d + eps);
    for (int k = threadIdx.x; k < d; k += blockDim.x) y[k] = from_f<T>(x[k] * rstd * w[k]);
    return rstd;
}

__device__ __forceinline__ double block_sum_d(double v, double* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        double t = lane < nw ? sh[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) sh[32] = t;
    }
    __syncthreads();
    return sh[32];
}

// (value, index) argmax with the lowest index winning ties; NaN never wins.
struct ArgMax {
    float v;
    int i;
};
__device__ __forceinline__ ArgMax argmax_pick(ArgMax a, ArgMax b) {
    if (b.v > a.v || (b.v == a.v && b.i < a.i) || (a.v != a.v && b.v == b.v)) return b;
    return a;
}
__device__ __forceinline__ ArgMax warp_argmax(ArgMax a) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        ArgMax b;
        b.v = __shfl_xor_sync(0xffffffffu, a.v, o);
        b.i = __shfl_xor_sync(0xffffffffu, a.i, o);
        a = argmax_pick(a, b);
    }
    return a;
}

// Dot product of 16 bytes of T with 16 bytes of T, in f32.
template <typename T> __device__ __forceinline__ float dot16(const uint4& a, const uint4& b);
template <> __device__ __forceinline__ float dot16<float>(const uint4& a, const uint4& b) {
    const float* x = reinterpret_cast<const float*>(&a);
    const float* y = reinterpret_cast<const float*>(&b);
    return x[0] * y[0] + x[1] * y[1] + x[2] * y[2] + x[3] * y[3];
}
template <> __device__ __forceinline__ float dot16<bf16>(const uint4& a, const uint4& b) {
    const __nv_bfloat162* x = reinterpret_cast<const __nv_bfloat162*>(&a);
    const __nv_bfloat162* y = reinterpret_cast<const __nv_bfloat162*>(&b);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 p = __bfloat1622float2(x[i]);
        float2 q = __bfloat1622float2(y[i]);
        s = fmaf(p.x, q.x, s);
        s = fmaf(p.y, q.y, s);
    }
    return s;
}
template <> __device__ __forceinline__ float dot16<f16>(const uint4& a, const uint4& b) {
    const __half2* x = reinterpret_cast<const __half2*>(&a);
    const __half2* y = reinterpret_cast<const __half2*>(&b);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 p = __half22float2(x[i]);
        float2 q = __half22float2(y[i]);
        s = fmaf(p.x, q.x, s);
        s = fmaf(p.y, q.y, s);
    }
    return s;
}

// Weights are read once per token: stream them past L1.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// Up to 8 independent 16-byte loads in flight per lane (a row of 1,472 bf16 is 5.75 per lane).
#define DOT_BATCH 8

// Partial dot of one lane over a row of W (type T) with x (type T, shared or global), elements
// [k0, k1). `vec`: the row and x are 16-byte aligned and k0, k1 are multiples of 16 / sizeof(T).
template <typename T>
__device__ __forceinline__ float lane_dot(const T* __restrict__ w, const T* __restrict__ x, int k0, int k1, bool vec) {
    const int lane = threadIdx.x & 31;
    float acc = 0.0f;
    if (vec) {
        constexpr int V = 16 / sizeof(T);
        const uint4* wv = reinterpret_cast<const uint4*>(w);
        const uint4* xv = reinterpret_cast<const uint4*>(x);
        const int e = k1 / V;
        for (int base = k0 / V + lane; base < e; base += 32 * DOT_BATCH) {
            uint4 a[DOT_BATCH];
#pragma unroll
            for (int u = 0; u < DOT_BATCH; u++)
                if (base + 32 * u < e) a[u] = ld_stream(wv + base + 32 * u);
#pragma unroll
            for (int u = 0; u < DOT_BATCH; u++)
                if (base + 32 * u < e) acc += dot16<T>(a[u], xv[base + 32 * u]);
        }
    } else {
        for (int k = k0 + lane; k < k1; k += 32) acc = fmaf(to_f(w[k]), to_f(x[k]), acc);
    }
    return acc;
}

// One row of W dotted with x by one warp; every lane gets the sum.
template <typename T>
__device__ __forceinline__ float warp_dot(const T* __restrict__ w, const T* __restrict__ x, int k0, int k1, bool vec) {
    return warp_sum(lane_dot<T>(w, x, k0, k1, vec));
}

// Two rows with the same x by one warp, their loads in flight together.
template <typename T>
__device__ __forceinline__ float2 warp_dot2(const T* __restrict__ w0, const T* __restrict__ w1, const T* __restrict__ x, int K,
                                            bool vec) {
    const int lane = threadIdx.x & 31;
    float a0 = 0.0f, a1 = 0.0f;
    if (vec) {
        constexpr int V = 16 / sizeof(T);
        const uint4* p0 = reinterpret_cast<const uint4*>(w0);
        const uint4* p1 = reinterpret_cast<const uint4*>(w1);
        const uint4* xv = reinterpret_cast<const uint4*>(x);
        const int e = K / V;
        for (int base = lane; base < e; base += 32 * DOT_BATCH) {
            uint4 r0[DOT_BATCH], r1[DOT_BATCH];
#pragma unroll
            for (int u = 0; u < DOT_BATCH; u++)
                if (base + 32 * u < e) {
                    r0[u] = ld_stream(p0 + base + 32 * u);
                    r1[u] = ld_stream(p1 + base + 32 * u);
                }
#pragma unroll
            for (int u = 0; u < DOT_BATCH; u++)
                if (base + 32 * u < e) {
                    const uint4 xx = xv[base + 32 * u];
                    a0 += dot16<T>(r0[u], xx);
                    a1 += dot16<T>(r1[u], xx);
                }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            const float xx = to_f(x[k]);
            a0 = fmaf(to_f(w0[k]), xx, a0);
            a1 = fmaf(to_f(w1[k]), xx, a1);
        }
    }
    return make_float2(warp_sum(a0), warp_sum(a1));
}

// Programmatic dependent launch (sm_90): wait for the previous kernel's results; let the next
// kernel start its launch. Both are no-ops for a kernel launched without the attribute. Code
// before pdl_wait() may read only weights and results of kernels at least two launches back.
// A file that defines BM_NO_PDL before including this header (the persistent decode kernel, one
// launch per token) compiles both to nothing, and so does every build for a card older than sm_90
// (the fat binary's sm_80/86/89 code; the host launches it without the attribute there).
#if defined(BM_NO_PDL) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900)
__device__ __forceinline__ void pdl_wait() {}
__device__ __forceinline__ void pdl_trigger() {}
#else
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
#endif

// Asks L2 to fetch [p, p + bytes): one bulk prefetch when 16-byte aligned, else one prefetch
// per 128-byte line spread over the warp's lanes (always the latter before sm_90, which has no
// bulk prefetch).
__device__ __forceinline__ void warp_prefetch(const void* p, size_t bytes) {
    const int lane = threadIdx.x & 31;
    const char* c = reinterpret_cast<const char*>(p);
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    if ((reinterpret_cast<size_t>(c) & 15) == 0 && (bytes & 15) == 0 && bytes < (1u << 30)) {
        if (lane == 0 && bytes > 0)
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(c), "r"((unsigned)bytes) : "memory");
        return;
    }
#endif
    for (size_t off = (size_t)lane * 128; off < bytes; off += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(c + off));
}

#define INSTANTIATE_T(MACRO) MACRO(float, f32) MACRO(bf16, bf16) MACRO(f16, f16)

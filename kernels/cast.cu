// Casts between f32 and bf16 / f16 for candle's `to_dtype` on CUDA (installed as its cast hook,
// src/ops/cast.rs; the twin is candle's own cast kernel, one element a thread):
//
//   cast_<S>_<T>   out[i] = T(in[i]) for a contiguous tensor of n elements, eight a thread with
//                  16-byte loads and stores (the caller checks both pointers are 16-byte aligned),
//                  grid-stride; the last n % 8 elements one a thread.
//
// f32 -> bf16 / f16 rounds to nearest even (as candle's kernel, __float2bfloat16 / __float2half);
// the other way is exact.
#include "common.cuh"

template <typename S, typename T, int VS, int VT>
__device__ void cast8(long long n, const S* __restrict__ in, T* __restrict__ out) {
    const long long groups = n / 8;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
        S v[8];
        T o[8];
        // 8 elements are VS 16-byte words of S and VT of T
#pragma unroll
        for (int k = 0; k < VS; k++) reinterpret_cast<uint4*>(v)[k] = reinterpret_cast<const uint4*>(in + g * 8)[k];
#pragma unroll
        for (int k = 0; k < 8; k++) o[k] = from_f<T>(to_f(v[k]));
#pragma unroll
        for (int k = 0; k < VT; k++) reinterpret_cast<uint4*>(out + g * 8)[k] = reinterpret_cast<const uint4*>(o)[k];
    }
    for (long long i = groups * 8 + (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = from_f<T>(to_f(in[i]));
}

extern "C" __global__ void cast_bf16_f32(const CastParams<bf16, float> p) { cast8<bf16, float, 1, 2>(p.n, p.src, p.dst); }
extern "C" __global__ void cast_f32_bf16(const CastParams<float, bf16> p) { cast8<float, bf16, 2, 1>(p.n, p.src, p.dst); }
extern "C" __global__ void cast_f16_f32(const CastParams<f16, float> p) { cast8<f16, float, 1, 2>(p.n, p.src, p.dst); }
extern "C" __global__ void cast_f32_f16(const CastParams<float, f16> p) { cast8<float, f16, 2, 1>(p.n, p.src, p.dst); }

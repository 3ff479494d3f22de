// Row gathers and scatters for fine-tuning (twins: candle's index_select and its backward,
// index_add, which loops over the rows one thread per column):
//
//   gather_rows_f32        out[i, k] = x[idx[i], k]                     x (R, d), out (n, d) f32
//   scatter_add_rows_T     dst[idx[i], k] += T-valued src[i, k]        dst (R, d) f32, src (n, d)
//                          (float atomics: repeated indices add up, in no fixed order)
//
// Grid-stride over the n·d elements, consecutive threads on consecutive columns.
#include "common.cuh"

extern "C" __global__ void gather_rows_f32(const GatherRowsParams p) {
    const long long n = p.n;
    const int d = p.d;
    const unsigned* __restrict__ idx = p.idx;
    const float* __restrict__ x = p.x;
    float* __restrict__ out = p.out;
    const long long total = n * d, stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const long long i = e / d, k = e - i * d;
        out[e] = x[(long long)idx[i] * d + k];
    }
}

template <typename T>
__device__ void scatter_add_rows(long long n, int d, const unsigned* __restrict__ idx, const T* __restrict__ src,
                                 float* __restrict__ dst) {
    const long long total = n * d, stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const long long i = e / d, k = e - i * d;
        atomicAdd(dst + (long long)idx[i] * d + k, to_f(src[e]));
    }
}

extern "C" __global__ void scatter_add_rows_f32(const ScatterAddRowsParams<float> p) {
    scatter_add_rows<float>(p.n, p.d, p.idx, p.src, p.dst);
}
extern "C" __global__ void scatter_add_rows_bf16(const ScatterAddRowsParams<bf16> p) {
    scatter_add_rows<bf16>(p.n, p.d, p.idx, p.src, p.dst);
}

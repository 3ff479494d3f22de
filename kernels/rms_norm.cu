// RMSNorm as an autograd op for fine-tuning (twin: `model::linear::rms_norm(.., true)` then
// `to_dtype`: sqr, mean, + eps, sqrt, broadcast div and mul, a cast):
//
//   rms_norm_fwd_T   y[r, k] = T(x[r, k] · rstd_r · w[k]),  rstd_r = rsqrt(Σ_k x[r, k]² / d + eps)
//                    x (rows, d) f32, w (d) f32, y (rows, d) T                 one block per row
//   rms_norm_bwd_T   with x̂ = x · rstd and gw = g · w (g the gradient of y, in T):
//                    dx = rstd · (gw − x̂ · mean(gw · x̂)) = rstd · (gw − x · rstd² · Σ(gw · x) / d)
//                    (f32), and, where part is not null, part[b, k] = Σ over block b's rows of
//                    g · x̂ (the block's share of dw)                 grid-stride over the rows
//   rms_norm_dw      dw[k] = Σ_b part[b, k], in a fixed order (no float atomics: deterministic)
//
// The backward recomputes rstd from x (one more sum in the pass that forms Σ gw · x anyway), so
// the forward stores nothing beside y. Math in f32; one rounding to T per stored y.
#include "common.cuh"

template <typename T>
__device__ void rms_norm_fwd(long long rows, int d, float eps, const float* __restrict__ x, const float* __restrict__ w,
                             T* __restrict__ y) {
    __shared__ float red[33];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) rms_norm_row(x + r * d, w, d, eps, y + r * d, red);
}

// Dynamic shared memory: d floats when smem_acc (the block's dw accumulator), else none and the
// block accumulates straight into its own row of part (each thread owns the columns it touches,
// so neither needs a barrier or an atomic).
template <typename T>
__device__ void rms_norm_bwd(long long rows, int d, float eps, int smem_acc, const float* __restrict__ x,
                             const float* __restrict__ w, const T* __restrict__ g, float* __restrict__ dx,
                             float* __restrict__ part) {
    extern __shared__ float smem[];
    __shared__ float red[33];
    float* acc = nullptr;
    if (part != nullptr) {
        acc = smem_acc ? smem : part + (long long)blockIdx.x * d;
        for (int k = threadIdx.x; k < d; k += blockDim.x) acc[k] = 0.0f;
    }
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * d;
        const T* gr = g + r * d;
        float ss = 0.0f, dot = 0.0f;
        for (int k = threadIdx.x; k < d; k += blockDim.x) {
            const float v = xr[k];
            ss = fmaf(v, v, ss);
            dot = fmaf(to_f(gr[k]) * w[k], v, dot);
        }
        ss = block_sum(ss, red);
        dot = block_sum(dot, red);
        const float rstd = rsqrtf(ss / (float)d + eps);
        const float c = rstd * rstd * dot / (float)d;
        float* dxr = dx + r * d;
        for (int k = threadIdx.x; k < d; k += blockDim.x) {
            const float v = xr[k], gv = to_f(gr[k]);
            dxr[k] = rstd * (gv * w[k] - v * c);
            if (acc != nullptr) acc[k] = fmaf(gv, v * rstd, acc[k]);
        }
    }
    if (part != nullptr && smem_acc) {
        float* pr = part + (long long)blockIdx.x * d;
        for (int k = threadIdx.x; k < d; k += blockDim.x) pr[k] = acc[k];
    }
}

// dw[k] = Σ_b part[b, k]. 256 threads a block, 32 columns: lane (threadIdx.x % 32) picks the
// column, warp j (of 8) sums partial rows j, j + 8, ..., then the 8 sums are added in order.
extern "C" __global__ void rms_norm_dw(const RmsNormDwParams p) {
    const int nb = p.nb, d = p.d;
    const float* __restrict__ part = p.part;
    float* __restrict__ dw = p.dw;
    __shared__ float s[8][33];
    const int lane = threadIdx.x & 31, j = threadIdx.x >> 5;
    const int k = blockIdx.x * 32 + lane;
    float t = 0.0f;
    if (k < d)
        for (int b = j; b < nb; b += 8) t += part[(long long)b * d + k];
    s[j][lane] = t;
    __syncthreads();
    if (j == 0 && k < d) {
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) sum += s[i][lane];
        dw[k] = sum;
    }
}

#define RMS_NORM(T, S)                                                                                                 \
    extern "C" __global__ void rms_norm_fwd_##S(const RmsNormFwdParams<T> p) {                                         \
        rms_norm_fwd<T>(p.rows, p.d, p.eps, p.x, p.w, p.y);                                                            \
    }                                                                                                                  \
    extern "C" __global__ void rms_norm_bwd_##S(const RmsNormBwdParams<T> p) {                                         \
        rms_norm_bwd<T>(p.rows, p.d, p.eps, p.smem_acc, p.x, p.w, p.g, p.dx, p.part);                                  \
    }
INSTANTIATE_T(RMS_NORM)

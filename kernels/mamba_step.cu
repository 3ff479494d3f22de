// The Mamba mixer's single-token step (SPEC §5 "Single-token step"; mamba_ssm
// `selective_state_update`), fused into two kernels around the x_proj product:
//
//   conv_xproj_*  window = [conv[1..K], u_t] (the shifted conv state), v = SiLU(b + Σ_k w_k·window_k)
//                 (eqs. 2-3), then [δ; B; C] = W_x · T(v) (eq. 4)     -- reads the state only
//   ssm_step_*    Δ = softplus(T(W_dt · δ) + b_dt) (eq. 5), h = exp(Δ·A)·h + (Δ·v)·B (eq. 7),
//                 y = (Σ_n h·C + D·v) · SiLU(z) (eqs. 8-9); writes the shifted conv state and h
//
// Both handle a batch (blockIdx.y / warp index). State update may be in place (conv_out ==
// conv_in, h_out == h_in): each warp reads its channel's state before writing it. Optional
// telemetry per batch row: Σ h², Σ window², Σ Δ over channels, added with one atomic per block.
#include "common.cuh"
#include "ssm_step.cuh"

// conv_xproj: blockIdx.y = batch row b; blocks loop over the R2 = R + 2N output rows.
//   xz: (B, xz_stride) T, u = xz[b, 0..di)      conv: (B, di, K) f32     cw: (di, K) f32, cb: (di) f32
//   Wx: (R2, di) T                              dbc: (B, R2) T
//   dynamic shared memory: di · sizeof(T) bytes
template <typename T>
__device__ void conv_xproj_impl(int di, int K, int R2, const T* __restrict__ xz, int xz_stride,
                                const float* __restrict__ conv, const float* __restrict__ cw, const float* __restrict__ cb,
                                const T* __restrict__ Wx, T* __restrict__ dbc, int vec) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* vs = reinterpret_cast<T*>(smem_raw);
    const int b = blockIdx.y;
    const T* u = xz + (size_t)b * xz_stride;
    const float* cs = conv + (size_t)b * di * K;
    for (int c = threadIdx.x; c < di; c += blockDim.x) {
        float acc = cb[c];
        for (int k = 0; k < K - 1; k++) acc += cs[(size_t)c * K + k + 1] * cw[(size_t)c * K + k];
        acc += to_f(u[c]) * cw[(size_t)c * K + K - 1];
        vs[c] = from_f<T>(silu_f(acc));
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int r = blockIdx.x * nwarps + warp; r < R2; r += gridDim.x * nwarps) {
        const float a = warp_dot<T>(Wx + (size_t)r * di, vs, 0, di, vec != 0);
        if (lane == 0) dbc[(size_t)b * R2 + r] = from_f<T>(a);
    }
}

#define STEP_KERNELS(T, S)                                                                                              \
    extern "C" __global__ void conv_xproj_##S(const ConvXprojParams<T> p) {                                           \
        conv_xproj_impl<T>(p.di, p.K, p.R2, p.xz, p.xz_stride, p.conv, p.cw, p.cb, p.Wx, p.dbc, p.vec);                 \
    }                                                                                                                   \
    extern "C" __global__ void ssm_step_##S(const SsmStepParams<T> p) {                                                 \
        ssm_step_impl<T>(p.Bn, p.di, p.R, p.N, p.K, p.xz, p.xz_stride, p.conv_in, p.conv_out, p.cw, p.cb, p.dbc, p.Wdt, \
                         p.dt_bias, p.A_log, p.Dp, p.h_in, p.h_out, p.y, p.telem, p.telem_mode, blockIdx.x);            \
    }

INSTANTIATE_T(STEP_KERNELS)

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
    extern "C" __global__ void conv_xproj_##S(int di, int K, int R2, const T* xz, int xz_stride, const float* conv,    \
                                              const float* cw, const float* cb, const T* Wx, T* dbc, int vec) {         \
        conv_xproj_impl<T>(di, K, R2, xz, xz_stride, conv, cw, cb, Wx, dbc, vec);                                       \
    }                                                                                                                   \
    extern "C" __global__ void ssm_step_##S(int Bn, int di, int R, int N, int K, const T* xz, int xz_stride,            \
                                            const float* conv_in, float* conv_out, const float* cw, const float* cb,    \
                                            const T* dbc, const T* Wdt, const float* dt_bias, const float* A_log,       \
                                            const float* Dp, const float* h_in, float* h_out, T* y, float* telem,       \
                                            int telem_mode) {                                                           \
        ssm_step_impl<T>(Bn, di, R, N, K, xz, xz_stride, conv_in, conv_out, cw, cb, dbc, Wdt, dt_bias, A_log, Dp,     \
                         h_in, h_out, y, telem, telem_mode, blockIdx.x);                                                            \
    }

INSTANTIATE_T(STEP_KERNELS)

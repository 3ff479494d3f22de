// The Mamba SSM decode step of one block: kernels/mamba_step.cu launches it as a kernel (the
// graph decoder's ssm_step launch).
#pragma once
#include "common.cuh"

// ssm_step: one warp per (b, c); lanes split the dt rank R and the N states (N <= 32), K <= 32.
//   xz: (B, xz_stride) T (u at 0, z at di)      conv_in/out: (B, di, K) f32    cw (di, K), cb (di) f32
//   dbc: (B, R + 2N) T = [δ; B; C]               Wdt: (di, R) T   dt_bias (di) f32
//   (dbc may be f32 sums, D = float: each value is rounded through T when read)
//   A_log: (di, N) f32, D: (di) f32              h_in/out: (B, di, N) f32       y: (B, di) T
//   telem: null, or telem_mode 0: (B, 3) f32 sums added with atomics; telem_mode 1 (B = 1): one
//   row of 3 partial sums per block, telem[bx·3 + q], summed later by sample_final;
//   bx: the block (blockIdx.x)
template <typename T, typename D>
__device__ void ssm_step_impl(int Bn, int di, int R, int N, int K, const T* __restrict__ xz, int xz_stride,
                              const float* conv_in, float* conv_out, const float* __restrict__ cw,
                              const float* __restrict__ cb, const D* __restrict__ dbc, const T* __restrict__ Wdt,
                              const float* __restrict__ dt_bias, const float* __restrict__ A_log,
                              const float* __restrict__ Dp, const float* h_in, float* h_out, T* __restrict__ y,
                              float* __restrict__ telem, int telem_mode, int bx) {
    __shared__ float part[3][32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int gw = bx * nwarps + warp;
    const int b = gw / di, c = gw - b * di;
    const bool live = b < Bn;
    if (live) warp_prefetch(Wdt + (size_t)c * R, (size_t)R * sizeof(T));
    pdl_wait();
    pdl_trigger();
    float hsq = 0.0f, wsq = 0.0f, dsum = 0.0f;
    if (live) {
        const T* xr = xz + (size_t)b * xz_stride;
        const float u = to_f(xr[c]);
        const float z = to_f(xr[di + c]);
        const size_t cbase = ((size_t)b * di + c) * K;
        // shifted window: lane k holds window[k]
        float wk = 0.0f;
        if (lane < K) wk = lane < K - 1 ? conv_in[cbase + lane + 1] : u;
        __syncwarp();
        if (lane < K) conv_out[cbase + lane] = wk;
        const float cv = warp_sum(lane < K ? wk * cw[(size_t)c * K + lane] : 0.0f) + cb[c];
        wsq = lane < K ? wk * wk : 0.0f;
        const float v = silu_f(cv);
        // Δ = softplus(T(W_dt[c] · δ) + b_dt[c])
        const int R2 = R + 2 * N;
        const D* dr = dbc + (size_t)b * R2;
        float acc = 0.0f;
        for (int r = lane; r < R; r += 32) acc = fmaf(to_f(Wdt[(size_t)c * R + r]), round_to<T>(to_f(dr[r])), acc);
        const float delta = softplus_f(round_to<T>(warp_sum(acc)) + dt_bias[c]);
        dsum = lane == 0 ? delta : 0.0f;
        // h = exp(Δ·A)·h + (Δ·v)·B ; y = Σ h·C
        const float dv = delta * v;
        float yp = 0.0f;
        const size_t hbase = ((size_t)b * di + c) * N;
        for (int n = lane; n < N; n += 32) {
            const float a = -expf(A_log[(size_t)c * N + n]);
            const float h = expf(delta * a) * h_in[hbase + n] + dv * round_to<T>(to_f(dr[R + n]));
            h_out[hbase + n] = h;
            yp = fmaf(h, round_to<T>(to_f(dr[R + N + n])), yp);
            hsq = fmaf(h, h, hsq);
        }
        const float ys = warp_sum(yp) + v * Dp[c];
        if (lane == 0) y[(size_t)b * di + c] = from_f<T>(ys * silu_f(z));
    }
    if (telem == nullptr) return;  // uniform over the grid
    hsq = warp_sum(hsq);
    wsq = warp_sum(wsq);
    dsum = warp_sum(dsum);
    // a block covers consecutive warps; sum them per batch row
    if (lane == 0) {
        part[0][warp] = live ? hsq : 0.0f;
        part[1][warp] = live ? wsq : 0.0f;
        part[2][warp] = live ? dsum : 0.0f;
    }
    __syncthreads();
    if (telem_mode == 1) {
        if (threadIdx.x < 3) {
            float s = 0.0f;
            for (int w = 0; w < nwarps; w++) s += part[threadIdx.x][w];
            telem[(size_t)bx * 3 + threadIdx.x] = s;
        }
        return;
    }
    if (threadIdx.x == 0) {
        int cur_b = -1;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f;
        for (int w = 0; w < nwarps; w++) {
            const int g = bx * nwarps + w;
            const int bb = g / di;
            if (bb >= Bn) break;
            if (bb != cur_b) {
                if (cur_b >= 0) {
                    atomicAdd(telem + cur_b * 3 + 0, s0);
                    atomicAdd(telem + cur_b * 3 + 1, s1);
                    atomicAdd(telem + cur_b * 3 + 2, s2);
                }
                cur_b = bb;
                s0 = s1 = s2 = 0.0f;
            }
            s0 += part[0][w];
            s1 += part[1][w];
            s2 += part[2][w];
        }
        if (cur_b >= 0) {
            atomicAdd(telem + cur_b * 3 + 0, s0);
            atomicAdd(telem + cur_b * 3 + 1, s1);
            atomicAdd(telem + cur_b * 3 + 2, s2);
        }
    }
}

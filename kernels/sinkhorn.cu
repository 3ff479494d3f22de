// Sinkhorn balancing of top-1 routes on the device (SPEC §3 "Training-time routing"), all the
// iterations in one launch of one block, in f64 as the host version:
//
//   K = exp(scale·C);  d1 = 1/(E·colsum K) (Zyphra) or 1 (standard);  repeat
//   d0 = 1/(T·(K d1 + ε)),  d1 = 1/(E·(Kᵀ d0 + ε)),  err = mean|d1 − d1_prev|  until err ≤ tol
//
// Each pass writes its trace row (abs change, relative change, row and column marginal errors).
// Output: plan (T, E) f32 = d0·K·d1, assignment (T) = row argmax (first on ties), and
// status[0] = passes run, status[1] = converged.
#include "common.cuh"

#define EMAX 32

// K: (T, E) f64 scratch, d0: (T) f64 scratch; trace: (max_iters, 4) f64.
extern "C" __global__ void sinkhorn_run(const SinkhornParams p) {
    const int T = p.T, E = p.E, zyphra = p.zyphra, max_iters = p.max_iters;
    const double scale = p.scale, tol = p.tol;
    const float* __restrict__ cost = p.cost;
    double* __restrict__ K = p.K;
    double* __restrict__ d0 = p.d0;
    float* __restrict__ plan = p.plan;
    unsigned int* __restrict__ assign = p.assign;
    double* __restrict__ trace = p.trace;
    int* __restrict__ status = p.status;
    __shared__ double sh[33];
    __shared__ double d1[EMAX], prev[EMAX];
    __shared__ int done;
    const double eps = 1e-8;
    const double tf = (double)T, ef = (double)E;
    for (int i = threadIdx.x; i < T * E; i += blockDim.x) K[i] = exp(scale * (double)cost[i]);
    for (int i = threadIdx.x; i < T; i += blockDim.x) d0[i] = 1.0;
    __syncthreads();
    for (int j = 0; j < E; j++) {
        double s = 0.0;
        if (zyphra)
            for (int i = threadIdx.x; i < T; i += blockDim.x) s += K[(size_t)i * E + j];
        s = block_sum_d(s, sh);
        if (threadIdx.x == 0) d1[j] = zyphra ? 1.0 / (ef * s) : 1.0;
    }
    if (threadIdx.x == 0) done = 0;
    __syncthreads();
    int it = 0;
    while (it < max_iters) {
        if (threadIdx.x < E) prev[threadIdx.x] = d1[threadIdx.x];
        for (int i = threadIdx.x; i < T; i += blockDim.x) {
            double s = 0.0;
            for (int j = 0; j < E; j++) s += K[(size_t)i * E + j] * d1[j];
            d0[i] = 1.0 / (tf * (s + eps));
        }
        __syncthreads();
        for (int j = 0; j < E; j++) {
            double s = 0.0;
            for (int i = threadIdx.x; i < T; i += blockDim.x) s += K[(size_t)i * E + j] * d0[i];
            s = block_sum_d(s, sh);
            if (threadIdx.x == 0) d1[j] = 1.0 / (ef * (s + eps));
        }
        __syncthreads();
        // marginals of the plan diag(d0)·K·diag(d1)
        double row_err = 0.0;
        for (int i = threadIdx.x; i < T; i += blockDim.x) {
            double r = 0.0;
            for (int j = 0; j < E; j++) r += d0[i] * K[(size_t)i * E + j] * d1[j];
            row_err = fmax(row_err, fabs(r - 1.0 / tf) * tf);
        }
        // block max through the sum helper's scratch: max of non-negatives via a second pass
        {
            __shared__ double mx[32];
            double m = row_err;
            for (int o = 16; o > 0; o >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
            if ((threadIdx.x & 31) == 0) mx[threadIdx.x >> 5] = m;
            __syncthreads();
            if (threadIdx.x == 0) {
                double r = 0.0;
                for (int w = 0; w < (int)((blockDim.x + 31) >> 5); w++) r = fmax(r, mx[w]);
                sh[32] = r;
            }
            __syncthreads();
            row_err = sh[32];
            __syncthreads();
        }
        double col_err = 0.0;
        for (int j = 0; j < E; j++) {
            double s = 0.0;
            for (int i = threadIdx.x; i < T; i += blockDim.x) s += d0[i] * K[(size_t)i * E + j] * d1[j];
            s = block_sum_d(s, sh);
            col_err = fmax(col_err, fabs(s - 1.0 / ef) * ef);
        }
        if (threadIdx.x == 0) {
            double ch = 0.0, m = 0.0;
            for (int j = 0; j < E; j++) {
                ch += fabs(d1[j] - prev[j]);
                m += fabs(d1[j]);
            }
            ch /= ef;
            m /= ef;
            trace[(size_t)it * 4 + 0] = ch;
            trace[(size_t)it * 4 + 1] = ch / fmax(m, 2.2250738585072014e-308);
            trace[(size_t)it * 4 + 2] = row_err;
            trace[(size_t)it * 4 + 3] = col_err;
            done = ch <= tol ? 1 : 0;
        }
        __syncthreads();
        it++;
        if (done) break;
    }
    for (int i = threadIdx.x; i < T; i += blockDim.x) {
        int best = 0;
        double bv = -INFINITY;
        for (int j = 0; j < E; j++) {
            const double p = d0[i] * K[(size_t)i * E + j] * d1[j];
            plan[(size_t)i * E + j] = (float)p;
            if (p > bv) {
                bv = p;
                best = j;
            }
        }
        assign[i] = (unsigned int)best;
    }
    if (threadIdx.x == 0) {
        status[0] = it;
        status[1] = done;
    }
}

// The selective scan of the full-sequence path (SPEC §5 eq. 7, §10), parallel over channels and
// over chunks of the sequence, state in f32:
//
//   h_t[c,n] = a_t·h_{t-1} + β_t,  a_t = exp(Δ_t[c]·A[c,n]),  β_t = (Δ_t[c]·v_t[c])·B_t[n]
//   y_t[c]   = Σ_n h_t[c,n]·C_t[n]
//
//   scan_chunk_sum_*  per chunk q and channel: ΣΔ over the chunk and the chunk's state from h = 0
//                     (a chunk's transfer is h -> exp(A·ΣΔ)·h + S)
//   scan_chunk_out_*  each chunk composes the transfers of the chunks before it onto h0, rescans
//                     its tokens and writes y (raw f32, and/or (y + D·v)·SiLU(z) in T), the last
//                     state, and optional telemetry Σ_{c,n} h² and Σ_c Δ per token
//   scan_bwd_f32      the backward pass (gradients of v, Δ, A, B, C from those of raw y), one
//                     thread per (b, c) walking the chunks in reverse, recomputing each chunk's
//                     states forward from its saved start state
//
// Threads: one per (b, c, chunk) (forward) with the N <= 16 states in registers. Inputs are read
// through (batch, time) strides, so Δ may be the raw dt_proj output (+ bias, softplus in here) and
// B/C may be column slices of x_proj's output.
#include "common.cuh"

#define NMAX 16
static_assert(2 * NMAX == 32, "scan_bwd_f32 sums its 2·NMAX dB/dC terms across the 32 lanes of a warp");


// ScanIn: kernels/params.cuh

// The forward kernels keep a[n] = A[c,n]·log2(e) and take exp2f (one MUFU.EX2) of Δ·a[n]: the
// decay exp(Δ·A) without expf's range reduction, once per (token, channel, state).
#define LOG2E_F 1.4426950408889634f

// Steps whose inputs are loaded together before any of them is computed (the per-step loads
// do not depend on the recurrence, so their latency is paid once per group).
#define SCAN_UNROLL 4


// The chunk kernels read their params struct in place (`pr`, the kernel's __grid_constant__
// argument), field by field where each is used: copying every field into a local up front made
// the compiler keep them all in registers (scan_chunk_out_bf16: 100 instead of 77).
template <typename TI>
__device__ void scan_chunk_sum_impl(const ScanChunkSumParams<TI>& pr) {
    extern __shared__ float sb[];  // (LC, N) B values of the chunk
    const int b = blockIdx.z, q = blockIdx.y;
    const int t0 = q * pr.s.LC, nt = min(pr.s.L, t0 + pr.s.LC) - t0;
    for (int i = threadIdx.x; i < nt * pr.s.N; i += blockDim.x)
        sb[i] = to_f(pr.Bm[(size_t)b * pr.bc_bs + (size_t)(t0 + i / pr.s.N) * pr.bc_ts + i % pr.s.N]);
    __syncthreads();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= pr.s.di) return;
    float a[NMAX], h[NMAX];
#pragma unroll
    for (int n = 0; n < NMAX; n++) {
        a[n] = 0.0f;
        h[n] = 0.0f;
        if (n < pr.s.N) a[n] = (pr.a_is_log ? -expf(pr.A[(size_t)c * pr.s.N + n]) : pr.A[(size_t)c * pr.s.N + n]) * LOG2E_F;
    }
    float sd = 0.0f;
    const float bias_c = pr.dt_bias != nullptr ? pr.dt_bias[c] : 0.0f;
    for (int t = 0; t < nt; t += SCAN_UNROLL) {
        float raw[SCAN_UNROLL], vv[SCAN_UNROLL];
#pragma unroll
        for (int u = 0; u < SCAN_UNROLL; u++)
            if (t + u < nt) {
                raw[u] = to_f(pr.dt[(size_t)b * pr.dt_bs + (size_t)(t0 + t + u) * pr.dt_ts + c]);
                vv[u] = pr.v[(size_t)b * pr.v_bs + (size_t)(t0 + t + u) * pr.v_ts + c];
            }
#pragma unroll
        for (int u = 0; u < SCAN_UNROLL; u++)
            if (t + u < nt) {
                const float delta = pr.dt_bias != nullptr ? softplus_f(raw[u] + bias_c) : raw[u];
                const float dv = delta * vv[u];
                sd += delta;
#pragma unroll
                for (int n = 0; n < NMAX; n++)
                    if (n < pr.s.N) h[n] = exp2f(delta * a[n]) * h[n] + dv * sb[(t + u) * pr.s.N + n];
            }
    }
    const size_t o = ((size_t)b * pr.s.Q + q) * pr.s.di + c;
    pr.sum_delta[o] = sd;
#pragma unroll
    for (int n = 0; n < NMAX; n++)
        if (n < pr.s.N) pr.Sst[o * pr.s.N + n] = h[n];
}

template <typename TI>
__device__ void scan_chunk_out_impl(const ScanChunkOutParams<TI>& pr) {
    extern __shared__ float sm[];  // B (LC, N), C (LC, N), then telemetry (LC) x 2
    float* sb = sm;
    float* sc = sm + pr.s.LC * pr.s.N;
    float* th = sc + pr.s.LC * pr.s.N;
    float* td = th + pr.s.LC;
    const int b = blockIdx.z, q = blockIdx.y;
    const int t0 = q * pr.s.LC, nt = min(pr.s.L, t0 + pr.s.LC) - t0;
    for (int i = threadIdx.x; i < nt * pr.s.N; i += blockDim.x) {
        const size_t off = (size_t)b * pr.bc_bs + (size_t)(t0 + i / pr.s.N) * pr.bc_ts + i % pr.s.N;
        sb[i] = to_f(pr.Bm[off]);
        sc[i] = to_f(pr.Cm[off]);
    }
    const bool telem = pr.hsq != nullptr;
    if (telem)
        for (int i = threadIdx.x; i < pr.s.LC; i += blockDim.x) th[i] = td[i] = 0.0f;
    __syncthreads();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const bool live = c < pr.s.di;
    const int cc = live ? c : 0;
    float a[NMAX], h[NMAX];
#pragma unroll
    for (int n = 0; n < NMAX; n++) {
        a[n] = 0.0f;
        h[n] = 0.0f;
        if (n < pr.s.N) {
            a[n] = (pr.a_is_log ? -expf(pr.A[(size_t)cc * pr.s.N + n]) : pr.A[(size_t)cc * pr.s.N + n]) * LOG2E_F;
            if (pr.h0 != nullptr) h[n] = pr.h0[((size_t)b * pr.s.di + cc) * pr.s.N + n];
        }
    }
    // compose the transfers of the chunks before this one
    for (int p = 0; p < q; p++) {
        const size_t o = ((size_t)b * pr.s.Q + p) * pr.s.di + cc;
        const float sdp = pr.sum_delta[o];
#pragma unroll
        for (int n = 0; n < NMAX; n++)
            if (n < pr.s.N) h[n] = exp2f(a[n] * sdp) * h[n] + pr.Sst[o * pr.s.N + n];
    }
    const float dc = pr.Dp != nullptr ? pr.Dp[cc] : 0.0f;
    const float bias_c = pr.dt_bias != nullptr ? pr.dt_bias[cc] : 0.0f;
    for (int t = 0; t < nt; t += SCAN_UNROLL) {
        float raw[SCAN_UNROLL], vv[SCAN_UNROLL], zz[SCAN_UNROLL];
#pragma unroll
        for (int u = 0; u < SCAN_UNROLL; u++)
            if (t + u < nt) {
                const int tt = t0 + t + u;
                raw[u] = to_f(pr.dt[(size_t)b * pr.dt_bs + (size_t)tt * pr.dt_ts + cc]);
                vv[u] = pr.v[(size_t)b * pr.v_bs + (size_t)tt * pr.v_ts + cc];
                zz[u] = pr.y_t != nullptr ? to_f(pr.z[(size_t)b * pr.z_bs + (size_t)tt * pr.z_ts + cc]) : 0.0f;
            }
#pragma unroll
        for (int u = 0; u < SCAN_UNROLL; u++) {
            if (t + u >= nt) break;
            const int tt = t0 + t + u;
            const float delta = pr.dt_bias != nullptr ? softplus_f(raw[u] + bias_c) : raw[u];
            const float dv = delta * vv[u];
            float y = 0.0f, hs = 0.0f;
#pragma unroll
            for (int n = 0; n < NMAX; n++)
                if (n < pr.s.N) {
                    h[n] = exp2f(delta * a[n]) * h[n] + dv * sb[(t + u) * pr.s.N + n];
                    y = fmaf(h[n], sc[(t + u) * pr.s.N + n], y);
                    hs = fmaf(h[n], h[n], hs);
                }
            if (live) {
                const size_t oi = ((size_t)b * pr.s.L + tt) * pr.s.di + c;
                if (pr.y_raw != nullptr) pr.y_raw[oi] = y;
                if (pr.y_t != nullptr) pr.y_t[oi] = from_f<TI>((y + vv[u] * dc) * silu_f(zz[u]));
            }
            if (telem) {
                hs = warp_sum(live ? hs : 0.0f);
                const float ds = warp_sum(live ? delta : 0.0f);
                if ((threadIdx.x & 31) == 0) {
                    atomicAdd(th + t + u, hs);
                    atomicAdd(td + t + u, ds);
                }
            }
        }
    }
    if (live && pr.h_last != nullptr && q == pr.s.Q - 1) {
#pragma unroll
        for (int n = 0; n < NMAX; n++)
            if (n < pr.s.N) pr.h_last[((size_t)b * pr.s.di + c) * pr.s.N + n] = h[n];
    }
    if (telem) {
        __syncthreads();
        for (int i = threadIdx.x; i < nt; i += blockDim.x) {
            atomicAdd(pr.hsq + (size_t)b * pr.s.L + t0 + i, th[i]);
            atomicAdd(pr.dsum + (size_t)b * pr.s.L + t0 + i, td[i]);
        }
    }
}

// Backward of the raw scan (f32 inputs, Δ given, A given, h0 = 0 or given, no gradient for h0).
// One thread per (b, c); blockIdx.x over channels, blockIdx.y = b. LC <= 32.
//   gy: (B, L, di) dL/dy_raw                       hs: (B, Q, di, N) scratch (chunk start states)
//   hist: (B, LC, N, di) scratch (one chunk of states per channel)
//   dv, dd: (B, L, di) outputs (row strides dv_ts / dd_ts, batch strides dv_bs / dd_bs)
//   dB, dC: (B, L, N) outputs (accumulated with atomics; zeroed by the caller)
//   dA: (di, N) output (accumulated with atomics; zeroed by the caller)
// dynamic shared memory: LC · 2N floats
extern "C" __global__ void scan_bwd_f32(const ScanBwdParams p) {
    const ScanIn s = p.s;
    const float* __restrict__ dt = p.dt;
    const float* __restrict__ A = p.A;
    const float* __restrict__ Bm = p.Bm;
    const float* __restrict__ Cm = p.Cm;
    const float* __restrict__ v = p.v;
    const float* __restrict__ h0 = p.h0;
    const float* __restrict__ gy = p.gy;
    float* __restrict__ hs = p.hs;
    float* __restrict__ hist = p.hist;
    float* __restrict__ dv = p.dv;
    float* __restrict__ dd = p.dd;
    float* __restrict__ dB = p.dB;
    float* __restrict__ dC = p.dC;
    float* __restrict__ dA = p.dA;
    const long long dt_bs = p.dt_bs, bc_bs = p.bc_bs, v_bs = p.v_bs, dv_bs = p.dv_bs, dd_bs = p.dd_bs, dbc_bs = p.dbc_bs;
    const int dt_ts = p.dt_ts, bc_ts = p.bc_ts, v_ts = p.v_ts, dv_ts = p.dv_ts, dd_ts = p.dd_ts, dbc_ts = p.dbc_ts;
    extern __shared__ float red[];  // (LC, 2N): block sums of dB, dC for the current chunk
    const int b = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const bool live = c < s.di;
    const int cc = live ? c : 0;
    const int N = s.N, LC = s.LC;
    float a[NMAX], h[NMAX], g[NMAX], gA[NMAX];
#pragma unroll
    for (int n = 0; n < NMAX; n++) {
        a[n] = h[n] = g[n] = gA[n] = 0.0f;
        if (n < N) {
            a[n] = A[(size_t)cc * N + n];
            if (h0 != nullptr) h[n] = h0[((size_t)b * s.di + cc) * N + n];
        }
    }
    // forward: the state at each chunk start
    for (int q = 0; q < s.Q; q++) {
        const int t0 = q * LC, nt = min(s.L, t0 + LC) - t0;
        const size_t o = (((size_t)b * s.Q + q) * s.di + cc) * N;
#pragma unroll
        for (int n = 0; n < NMAX; n++)
            if (n < N && live) hs[o + n] = h[n];
        for (int t = t0; t < t0 + nt; t++) {
            const float delta = dt[(size_t)b * dt_bs + (size_t)t * dt_ts + cc];
            const float dvv = delta * v[(size_t)b * v_bs + (size_t)t * v_ts + cc];
            const float* Bt = Bm + (size_t)b * bc_bs + (size_t)t * bc_ts;
#pragma unroll
            for (int n = 0; n < NMAX; n++)
                if (n < N) h[n] = expf(delta * a[n]) * h[n] + dvv * Bt[n];
        }
    }
    // hist layout (B, LC, N, di): channel fastest, so a warp's accesses coalesce
    const size_t hb = (size_t)b * LC * N * s.di;
#define HIST(t, n) hist[hb + ((size_t)(t) * N + (n)) * s.di + cc]
    // reverse over chunks; g holds a_{t+1}·dL/dh_{t+1} as it walks back
    for (int q = s.Q - 1; q >= 0; q--) {
        const int t0 = q * LC, nt = min(s.L, t0 + LC) - t0;
        for (int i = threadIdx.x; i < LC * 2 * N; i += blockDim.x) red[i] = 0.0f;
        const size_t o = (((size_t)b * s.Q + q) * s.di + cc) * N;
#pragma unroll
        for (int n = 0; n < NMAX; n++)
            if (n < N) h[n] = hs[o + n];
        for (int t = 0; t < nt; t++) {
            const int tt = t0 + t;
            const float delta = dt[(size_t)b * dt_bs + (size_t)tt * dt_ts + cc];
            const float dvv = delta * v[(size_t)b * v_bs + (size_t)tt * v_ts + cc];
            const float* Bt = Bm + (size_t)b * bc_bs + (size_t)tt * bc_ts;
#pragma unroll
            for (int n = 0; n < NMAX; n++)
                if (n < N) {
                    h[n] = expf(delta * a[n]) * h[n] + dvv * Bt[n];
                    if (live) HIST(t, n) = h[n];
                }
        }
        __syncthreads();  // red zeroed, hist written
        for (int t = nt - 1; t >= 0; t--) {
            const int tt = t0 + t;
            const float delta = dt[(size_t)b * dt_bs + (size_t)tt * dt_ts + cc];
            const float vv = v[(size_t)b * v_bs + (size_t)tt * v_ts + cc];
            const float* Bt = Bm + (size_t)b * bc_bs + (size_t)tt * bc_ts;
            const float* Ct = Cm + (size_t)b * bc_bs + (size_t)tt * bc_ts;
            const float gyt = live ? gy[((size_t)b * s.L + tt) * s.di + cc] : 0.0f;
            float gdelta = 0.0f, gv = 0.0f;
            float part[2 * NMAX];  // this channel's terms of dB_t[n] (n < NMAX) and dC_t[n] (NMAX + n)
#pragma unroll
            for (int n = 0; n < 2 * NMAX; n++) part[n] = 0.0f;
#pragma unroll
            for (int n = 0; n < NMAX; n++) {
                if (n >= N) break;
                const float hn = live ? HIST(t, n) : 0.0f;
                const float hp = live ? (t > 0 ? HIST(t - 1, n) : hs[o + n]) : 0.0f;
                const float an = expf(delta * a[n]);
                const float gn = fmaf(gyt, Ct[n], g[n]);  // dL/dh_t
                gdelta += gn * (vv * Bt[n] + hp * an * a[n]);
                gv += gn * delta * Bt[n];
                gA[n] += gn * hp * an * delta;
                g[n] = an * gn;
                part[n] = live ? gn * delta * vv : 0.0f;
                part[NMAX + n] = live ? gyt * hn : 0.0f;
            }
            warp_add_dbc(part, N, red + t * 2 * N);
            if (live) {
                dv[(size_t)b * dv_bs + (size_t)tt * dv_ts + c] = gv;
                dd[(size_t)b * dd_bs + (size_t)tt * dd_ts + c] = gdelta;
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < nt * 2 * N; i += blockDim.x) {
            const int t = i / (2 * N), j = i % (2 * N);
            float* dst = j < N ? dB : dC;
            atomicAdd(dst + (size_t)b * dbc_bs + (size_t)(t0 + t) * dbc_ts + (j % N), red[i]);
        }
        __syncthreads();
    }
#undef HIST
    if (live) {
#pragma unroll
        for (int n = 0; n < NMAX; n++)
            if (n < N) atomicAdd(dA + (size_t)c * N + n, gA[n]);
    }
}

#define SCAN_KERNELS(T, S)                                                                                              \
    extern "C" __global__ void scan_chunk_sum_##S(const __grid_constant__ ScanChunkSumParams<T> p) {                    \
        scan_chunk_sum_impl<T>(p);                                                     \
    }                                                                                                                   \
    extern "C" __global__ void scan_chunk_out_##S(const __grid_constant__ ScanChunkOutParams<T> p) {                    \
        scan_chunk_out_impl<T>(p);                                                       \
    }

INSTANTIATE_T(SCAN_KERNELS)

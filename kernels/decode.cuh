// Batch-1 decode kernels: the matrix-vector products of one token with their neighbours fused in.
//
//   embed_*         res = E[tok]
//   in_proj_conv_*  xz = W_in · rmsnorm(res), and v = SiLU(conv window) of the u half
//   gemv_rows_*     out = W · x, one block per row (x_proj: few rows, long ones)
//   moe_fc1_*       router (logits = Wr · rmsnorm(res) + br, top-1, σ gate) in every block, then
//                   the chosen expert's fc1 with the gated activation
//   gemv_resid_*    res += gate · (W · x)                (out_proj, expert fc2; split-K by gridDim.y)
//   head_*          logits = E · layernorm(res) (f32); per-block argmax of logits (+ Gumbel noise)
//   sample_final    argmax over the blocks' candidates -> the next token id (stays on device);
//                   sums the telemetry partials of the step
//
//   moe_router_*    (staged layout) the router alone, one block: publishes the expert early
//   moe_fc1_pre_*   (staged layout) the chosen expert's fc1, its rows staged as soon as the router
//                   has published the expert
//
// The residual stream `res` is f32 (d). Products round their output through the weight type T
// where the tensor-op twin stores a T tensor (the logits stay f32). One warp computes one output
// row (16-byte loads, up to 8 in flight per lane); blocks loop over rows (grid-stride).
//
// Launched with programmatic dependent launch: a kernel may start while the previous one runs; it
// waits for it (pdl_wait), then lets the next one launch. The `_pre_` variants ("staged") first
// copy each warp's first weight row (or row slice) into shared memory with cp.async, so the
// weights stream in while the previous kernel still works; with `pf` the others ask L2 for their
// rows. Dynamic shared memory of the staged variants: [xs, when the kernel has one: K elements,
// 16-byte aligned][one slice per warp].
#pragma once
#include "common.cuh"

__device__ __forceinline__ size_t align16(size_t b) { return (b + 15) & ~(size_t)15; }

// Longest wait (clock cycles, ~100 µs) of an fc1 block for the router's published expert before it
// gives up staging (it then reads the rows after pdl_wait, as the unstaged kernel).
#define ROUTE_SPIN_CYCLES 200000

// Normalised input of a block: xs[k] = T(norm(res)[k]) for k < K. norm_kind 0: RMSNorm with
// weight nw; 1: LayerNorm with weight nw and bias nb. `red` holds >= 33 floats.
template <typename T>
__device__ __forceinline__ void norm_prologue(const float* __restrict__ res, const float* __restrict__ nw,
                                              const float* __restrict__ nb, float eps, int norm_kind, int K, T* xs,
                                              float* red) {
    if (norm_kind == 0) {
        rms_norm_row(res, nw, K, eps, xs, red);
    } else {
        float s = 0.0f;
        for (int k = threadIdx.x; k < K; k += blockDim.x) s += res[k];
        const float mean = block_sum(s, red) / (float)K;
        float v = 0.0f;
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            const float c = res[k] - mean;
            v = fmaf(c, c, v);
        }
        const float inv = rsqrtf(block_sum(v, red) / (float)K + eps);
        for (int k = threadIdx.x; k < K; k += blockDim.x) xs[k] = from_f<T>((res[k] - mean) * inv * nw[k] + nb[k]);
    }
    __syncthreads();
}

// Asks L2 for the rows this warp will compute (row j of W from column k0 to k1).
template <typename T>
__device__ __forceinline__ void prefetch_rows(const T* W, int M, int K, int k0, int k1, int first_only) {
    const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int j = blockIdx.x * nwarps + warp; j < M; j += gridDim.x * nwarps) {
        warp_prefetch(W + (size_t)j * K + k0, (size_t)(k1 - k0) * sizeof(T));
        if (first_only) break;
    }
}

// res (d) = E[tok[0]] as f32.
template <typename T>
__device__ void embed_impl(const T* __restrict__ emb, const unsigned int* __restrict__ tok, int d, float* __restrict__ res) {
    pdl_wait();
    pdl_trigger();
    const size_t row = (size_t)tok[0] * (size_t)d;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < d; j += gridDim.x * blockDim.x) res[j] = to_f(emb[row + j]);
}

// Mamba in_proj with the block's RMSNorm and the conv step as epilogue:
//   xz[j] = T(T(w_j · T(rmsnorm(res))) + bias[j])        j < M = 2·di (u = xz[:di], z = xz[di:])
//   v[c]  = T(SiLU(cb[c] + Σ_k cw[c,k] · window_k))      c < di, window = [conv[c, 1..KC], u_c]
// The conv state is only read here (the SSM step shifts it). dynamic smem: K · sizeof(T).
template <typename T, bool STAGE>
__device__ void in_proj_conv_impl(const T* __restrict__ W, int M, int K, const float* __restrict__ res,
                                  const float* __restrict__ nw, float eps, const T* __restrict__ bias, T* __restrict__ xz,
                                  int di, int KC, const float* __restrict__ conv, const float* __restrict__ cw,
                                  const float* __restrict__ cb, T* __restrict__ vout, int vec, int pf) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* xs = reinterpret_cast<T*>(smem_raw);
    __shared__ float red[33];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int j0 = blockIdx.x * nwarps + warp;
    T* st = reinterpret_cast<T*>(smem_raw + align16((size_t)K * sizeof(T))) + (size_t)warp * K;
    const bool staged = STAGE && vec != 0 && j0 < M;
    if (staged) stage_slice<T>(st, W + (size_t)j0 * K, K);
    if (pf) prefetch_rows<T>(W, M, K, 0, K, 0);
    pdl_wait();
    pdl_trigger();
    norm_prologue<T>(res, nw, nullptr, eps, 0, K, xs, red);
    if (STAGE) cp_async_wait_all();
    for (int j = j0; j < M; j += gridDim.x * nwarps) {
        const float dot = staged && j == j0 ? warp_sum(lane_dot_staged<T>(st, xs, 0, K))
                                            : warp_dot<T>(W + (size_t)j * K, xs, 0, K, vec != 0);
        float a = round_to<T>(dot);
        if (bias != nullptr) a = round_to<T>(a + to_f(bias[j]));
        if (lane == 0) {
            xz[j] = from_f<T>(a);
            if (j < di) {
                float acc = cb[j];
                for (int k = 0; k < KC - 1; k++) acc += conv[(size_t)j * KC + k + 1] * cw[(size_t)j * KC + k];
                acc += a * cw[(size_t)j * KC + KC - 1];
                vout[j] = from_f<T>(silu_f(acc));
            }
        }
    }
}

// out[j] = T(w_j · x), one block per row j (blockIdx.x, grid-stride), its warps splitting K.
template <typename T, bool STAGE>
__device__ void gemv_rows_impl(const T* __restrict__ W, int M, int K, const T* __restrict__ x, T* __restrict__ out,
                               int vec, int pf) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ float part[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    constexpr int V = 16 / sizeof(T);
    int per = (K + nwarps - 1) / nwarps;
    per = (per + V - 1) / V * V;
    const int k0 = min(K, warp * per), k1 = min(K, k0 + per);
    T* st = reinterpret_cast<T*>(smem_raw) + (size_t)warp * per;
    const bool staged = STAGE && vec != 0 && (int)blockIdx.x < M && k1 > k0;
    if (staged) stage_slice<T>(st, W + (size_t)blockIdx.x * K + k0, k1 - k0);
    if (pf)
        for (int j = blockIdx.x; j < M; j += gridDim.x) warp_prefetch(W + (size_t)j * K + k0, (size_t)(k1 - k0) * sizeof(T));
    pdl_wait();
    pdl_trigger();
    if (STAGE) cp_async_wait_all();
    for (int j = blockIdx.x; j < M; j += gridDim.x) {
        const float a = staged && j == (int)blockIdx.x ? warp_sum(lane_dot_staged<T>(st, x, k0, k1))
                                                       : warp_dot<T>(W + (size_t)j * K, x, k0, k1, vec != 0);
        __syncthreads();  // part is free again
        if (lane == 0) part[warp] = a;
        __syncthreads();
        if (threadIdx.x == 0) {
            float s = 0.0f;
            for (int w = 0; w < nwarps; w++) s += part[w];
            out[j] = from_f<T>(s);
        }
    }
}

// The weight matrix of this launch: W itself, or wtab[route[0]] (the chosen expert's) when given.
template <typename T>
__device__ __forceinline__ const T* pick_weight(const T* W, const unsigned long long* wtab, const int* route) {
    return wtab != nullptr ? reinterpret_cast<const T*>(wtab[route[0]]) : W;
}

// The router of one MoE layer over the block's normalised input xs (K elements of T):
// logits[e] = Wr[e] · xs + br[e] (Wr (E, K) f32, E <= 32), warps splitting the experts and, with
// more warps than experts, slices of K. Returns e* = argmax (first on ties) to every thread.
template <typename T>
__device__ int router_top1(const float* __restrict__ Wr, const float* __restrict__ br, int E, int K, const T* xs,
                           float* part, float* logits, int* chosen) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int S = max(1, nwarps / E);
    for (int item = warp; item < E * S && item < 32; item += nwarps) {
        const int e = item % E, sl = item / E;
        const int k0 = (int)((long long)sl * K / S), k1 = (int)((long long)(sl + 1) * K / S);
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        int k = k0 + lane;
        for (; k + 96 < k1; k += 128) {
            a0 = fmaf(Wr[(size_t)e * K + k], to_f(xs[k]), a0);
            a1 = fmaf(Wr[(size_t)e * K + k + 32], to_f(xs[k + 32]), a1);
            a2 = fmaf(Wr[(size_t)e * K + k + 64], to_f(xs[k + 64]), a2);
            a3 = fmaf(Wr[(size_t)e * K + k + 96], to_f(xs[k + 96]), a3);
        }
        for (; k < k1; k += 32) a0 = fmaf(Wr[(size_t)e * K + k], to_f(xs[k]), a0);
        const float acc = warp_sum((a0 + a1) + (a2 + a3));
        if (lane == 0) part[item] = acc;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int best = 0;
        for (int e = 0; e < E && e < 32; e++) {
            float l = br[e];
            for (int sl = 0; sl < S; sl++) l += part[sl * E + e];
            logits[e] = l;
            if (l > logits[best]) best = e;
        }
        *chosen = best;
    }
    __syncthreads();
    return *chosen;
}

// One thread: route[0] = e*, route[1] = σ(logit e*) (f32 bits), the telemetry (E logits, then e*
// as a float) when telem is given; then, when flag != 0, route[2] = flag with release order: a
// block that reads flag (acquire) sees the route.
__device__ __forceinline__ void publish_route(int* route, float* telem, const float* logits, int E, int best,
                                              unsigned flag) {
    route[0] = best;
    reinterpret_cast<float*>(route)[1] = sigmoid_f(logits[best]);
    if (telem != nullptr) {
        for (int e = 0; e < E; e++) telem[e] = logits[e];
        telem[E] = (float)best;
    }
    if (flag != 0u)
        asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(reinterpret_cast<unsigned*>(route) + 2), "r"(flag)
                     : "memory");
}

// The router and the chosen expert's fc1 of one MoE layer, in every block:
//   logits = Wr · T(rmsnorm(res)) + br (Wr (E, K) f32, E <= 32), e* = argmax (first on ties);
//   block 0 writes route[0] = e*, route[1] = σ(logit e*) (f32 bits) and the telemetry (E logits,
//   then e* as a float) when telem is given; then with w = wtab[e*]:
//   epi 1: out[j] = T(T(act(T(w_j·x))) · T(w_{j+M}·x))        j < M, rows = 2M (gated MLP)
//   epi 2: out[j] = T(act(T(w_j·x)))                          j < M, rows = M
//   dynamic smem: K · sizeof(T). The expert is known only after the router, so its rows are
//   loaded after the norm; the router weights are asked of L2 before the wait. after_route(e*)
//   runs in every thread once the expert is known (the persistent kernel asks L2 for fc2 there).
template <typename T, typename AfterRoute>
__device__ void moe_fc1_impl(const float* __restrict__ Wr, const float* __restrict__ br, int E,
                             const unsigned long long* __restrict__ wtab, int* __restrict__ route, float* __restrict__ telem,
                             int M, int K, const float* __restrict__ res, const float* __restrict__ nw, float eps,
                             T* __restrict__ out, int epi, int act, int vec, AfterRoute after_route) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* xs = reinterpret_cast<T*>(smem_raw);
    __shared__ float red[33];
    __shared__ float part[32];
    __shared__ float logits[32];
    __shared__ int chosen;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    if (warp < E) warp_prefetch(Wr + (size_t)warp * K, (size_t)K * sizeof(float));
    pdl_wait();
    pdl_trigger();
    norm_prologue<T>(res, nw, nullptr, eps, 0, K, xs, red);
    const int best = router_top1<T>(Wr, br, E, K, xs, part, logits, &chosen);
    if (blockIdx.x == 0 && threadIdx.x == 0) publish_route(route, telem, logits, E, best, 0u);
    after_route(best);
    const T* w = reinterpret_cast<const T*>(wtab[chosen]);
    for (int j = blockIdx.x * nwarps + warp; j < M; j += gridDim.x * nwarps) {
        if (epi == 1) {
            const float2 gu = warp_dot2<T>(w + (size_t)j * K, w + (size_t)(j + M) * K, xs, K, vec != 0);
            if (lane == 0) out[j] = from_f<T>(round_to<T>(act_f(round_to<T>(gu.x), act)) * round_to<T>(gu.y));
        } else {
            const float a = round_to<T>(warp_dot<T>(w + (size_t)j * K, xs, 0, K, vec != 0));
            if (lane == 0) out[j] = from_f<T>(act_f(a, act));
        }
    }
}

// Staged layout, first kernel of a MoE layer: the router alone in one block (1,024 threads):
// logits = Wr · T(rmsnorm(res)) + br, then publish_route with flag step[0] + 1, which the fc1
// blocks (launched meanwhile) wait for to stage the chosen expert's rows. dynamic smem: K · sizeof(T).
template <typename T>
__device__ void moe_router_impl(const float* __restrict__ Wr, const float* __restrict__ br, int E, int* __restrict__ route,
                                float* __restrict__ telem, int K, const float* __restrict__ res, const float* __restrict__ nw,
                                float eps, const unsigned* __restrict__ step) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* xs = reinterpret_cast<T*>(smem_raw);
    __shared__ float red[33];
    __shared__ float part[32];
    __shared__ float logits[32];
    __shared__ int chosen;
    const int warp = threadIdx.x >> 5;
    if (warp < E) warp_prefetch(Wr + (size_t)warp * K, (size_t)K * sizeof(float));
    pdl_wait();
    pdl_trigger();
    norm_prologue<T>(res, nw, nullptr, eps, 0, K, xs, red);
    const int best = router_top1<T>(Wr, br, E, K, xs, part, logits, &chosen);
    if (threadIdx.x == 0) publish_route(route, telem, logits, E, best, step[0] + 1u);
}

// Staged layout: the chosen expert's fc1 (epilogues as moe_fc1_impl). Before waiting for the
// router, lane 0 of each warp polls route[2] for this step's flag (step[0] + 1, at most
// ROUTE_SPIN_CYCLES) and the warp stages its first row (epi 1: rows j0 and j0 + M) of that
// expert. After the wait the route is read again; rows staged for another expert (never
// expected) are not used. dynamic smem: [xs: K][per warp: 2 (epi 1) or 1 rows of K].
template <typename T>
__device__ void moe_fc1_staged_impl(const unsigned long long* __restrict__ wtab, const int* __restrict__ route,
                                    const unsigned* __restrict__ step, int M, int K, const float* __restrict__ res,
                                    const float* __restrict__ nw, float eps, T* __restrict__ out, int epi, int act, int vec) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* xs = reinterpret_cast<T*>(smem_raw);
    __shared__ float red[33];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int rows = epi == 1 ? 2 : 1;
    T* st = reinterpret_cast<T*>(smem_raw + align16((size_t)K * sizeof(T))) + (size_t)warp * rows * K;
    const int j0 = blockIdx.x * nwarps + warp;
    int e = -1;
    if (vec != 0 && j0 < M) {
        if (lane == 0) {
            const unsigned want = step[0] + 1u;
            const long long t0 = clock64();
            for (;;) {
                if (ld_acquire_u32(reinterpret_cast<const unsigned*>(route) + 2) == want) {
                    e = ld_relaxed_i32(route);
                    break;
                }
                if (clock64() - t0 > ROUTE_SPIN_CYCLES) break;
                __nanosleep(100);
            }
        }
        e = __shfl_sync(0xffffffffu, e, 0);
        if (e >= 0) {
            const T* we = reinterpret_cast<const T*>(wtab[e]);
            stage_slice<T>(st, we + (size_t)j0 * K, K);
            if (epi == 1) stage_slice<T>(st + K, we + (size_t)(j0 + M) * K, K);
        }
    }
    pdl_wait();
    pdl_trigger();
    norm_prologue<T>(res, nw, nullptr, eps, 0, K, xs, red);
    const int chosen = ld_relaxed_i32(route);
    cp_async_wait_all();
    const bool staged = e >= 0 && e == chosen;
    const T* w = reinterpret_cast<const T*>(wtab[chosen]);
    for (int j = j0; j < M; j += gridDim.x * nwarps) {
        const bool s = staged && j == j0;
        if (epi == 1) {
            const float2 gu = s ? make_float2(warp_sum(lane_dot_staged<T>(st, xs, 0, K)), warp_sum(lane_dot_staged<T>(st + K, xs, 0, K)))
                                : warp_dot2<T>(w + (size_t)j * K, w + (size_t)(j + M) * K, xs, K, vec != 0);
            if (lane == 0) out[j] = from_f<T>(round_to<T>(act_f(round_to<T>(gu.x), act)) * round_to<T>(gu.y));
        } else {
            const float a = round_to<T>(s ? warp_sum(lane_dot_staged<T>(st, xs, 0, K)) : warp_dot<T>(w + (size_t)j * K, xs, 0, K, vec != 0));
            if (lane == 0) out[j] = from_f<T>(act_f(a, act));
        }
    }
}

// res[j] += g · (w_j · x) for j < M; g = gate[0] or 1. W: (M, K) T, x: (K) T in global memory.
// Split-K: slice `split` of `nsplit` (blockIdx.y of gridDim.y) takes a slice of K and adds with atomics; with one slice the
// product is rounded through T first (as the twin's T output) and added without atomics.
// With wtab, the weight is the expert that route names: written by the previous kernel (the fused
// router + fc1), or, in the staged layout (STAGE), by the router two launches back, which has
// finished when this kernel starts (the fc1 kernel between waited for it), so the expert's slice
// is staged before the wait. dynamic smem (STAGE): one slice of `per` elements per warp.
template <typename T, bool STAGE>
__device__ void gemv_resid_impl(const T* W, const unsigned long long* wtab, const int* route, int M, int K,
                                const T* __restrict__ x, float* __restrict__ res, const float* __restrict__ gate,
                                const T* __restrict__ bias, int vec, int pf, int bx, int nbx, int split, int nsplit) {
    constexpr int V = 16 / sizeof(T);
    int per = (K + nsplit - 1) / nsplit;
    per = (per + V - 1) / V * V;
    const int k0 = min(K, split * per), k1 = min(K, k0 + per);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int j0 = bx * nwarps + warp;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* st = reinterpret_cast<T*>(smem_raw) + (size_t)warp * per;
    const T* w = W;
    bool staged = false;
    if (wtab == nullptr) {
        // a fixed matrix: stage before waiting for the previous kernel
        staged = STAGE && vec != 0 && j0 < M && k1 > k0;
        if (staged) stage_slice<T>(st, w + (size_t)j0 * K + k0, k1 - k0);
        if (pf)
            for (int j = j0; j < M; j += nbx * nwarps) warp_prefetch(w + (size_t)j * K + k0, (size_t)(k1 - k0) * sizeof(T));
        pdl_wait();
        pdl_trigger();
    } else if (STAGE) {
        // the expert the router (two launches back, finished) chose
        const int e = ld_relaxed_i32(route);
        w = reinterpret_cast<const T*>(wtab[e]);
        staged = vec != 0 && j0 < M && k1 > k0;
        if (staged) stage_slice<T>(st, w + (size_t)j0 * K + k0, k1 - k0);
        pdl_wait();
        pdl_trigger();
        if (ld_relaxed_i32(route) != e) {  // never expected: then read the rows of the route now named
            staged = false;
            w = pick_weight<T>(W, wtab, route);
        }
    } else {
        // the expert chosen by the previous kernel
        pdl_wait();
        pdl_trigger();
        w = pick_weight<T>(W, wtab, route);
    }
    if (STAGE) cp_async_wait_all();
    const float g = gate != nullptr ? gate[0] : 1.0f;
    for (int j = j0; j < M; j += nbx * nwarps) {
        float a = staged && j == j0 ? warp_sum(lane_dot_staged<T>(st, x, k0, k1)) : warp_dot<T>(w + (size_t)j * K, x, k0, k1, vec != 0);
        if (lane == 0) {
            if (nsplit == 1) {
                a = round_to<T>(a);
                if (bias != nullptr) a = round_to<T>(a + to_f(bias[j]));
                res[j] += a * g;
            } else {
                if (bias != nullptr && split == 0) a += to_f(bias[j]);
                atomicAdd(res + j, a * g);
            }
        }
    }
}

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// LM head: logits[j] = E_j · T(layernorm(res)) in f32 for j < V; each block leaves the argmax of
// its rows' scores in (pv, pi)[blockIdx.x]. score = logit, or logit / temp + Gumbel noise drawn
// from (seed, step[0], j) when temp > 0 (an exact sample of softmax(logit / temp) overall).
template <typename T, bool STAGE>
__device__ void head_impl(const T* __restrict__ E, int V, int K, const float* __restrict__ res,
                          const float* __restrict__ lw, const float* __restrict__ lb, float eps, float* __restrict__ logits,
                          float* __restrict__ pv, int* __restrict__ pi, float temp, unsigned long long seed,
                          const unsigned int* __restrict__ step, int vec, int pf) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* xs = reinterpret_cast<T*>(smem_raw);
    __shared__ float red[33];
    __shared__ float bv[32];
    __shared__ int bi[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int j0 = blockIdx.x * nwarps + warp;
    T* st = reinterpret_cast<T*>(smem_raw + align16((size_t)K * sizeof(T))) + (size_t)warp * K;
    const bool staged = STAGE && vec != 0 && j0 < V;
    if (staged) stage_slice<T>(st, E + (size_t)j0 * K, K);
    if (pf) prefetch_rows<T>(E, V, K, 0, K, 0);
    pdl_wait();
    pdl_trigger();
    norm_prologue<T>(res, lw, lb, eps, 1, K, xs, red);
    if (STAGE) cp_async_wait_all();
    const unsigned long long s0 = mix64(seed ^ ((unsigned long long)step[0] << 32));
    ArgMax best{-INFINITY, 0x7fffffff};
    for (int j = j0; j < V; j += gridDim.x * nwarps) {
        const float l = staged && j == j0 ? warp_sum(lane_dot_staged<T>(st, xs, 0, K)) : warp_dot<T>(E + (size_t)j * K, xs, 0, K, vec != 0);
        if (lane == 0) logits[j] = l;
        float score = l;
        if (temp > 0.0f) {
            const unsigned long long h = mix64(s0 ^ (unsigned long long)j);
            const float u = ((float)(h >> 40) + 0.5f) * (1.0f / 16777216.0f);  // (0, 1)
            score = l / temp - logf(-logf(u));
        }
        best = argmax_pick(best, ArgMax{score, j});
    }
    if (lane == 0) {
        bv[warp] = best.v;
        bi[warp] = best.i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        ArgMax b{bv[0], bi[0]};
        for (int w = 1; w < nwarps; w++) b = argmax_pick(b, ArgMax{bv[w], bi[w]});
        pv[blockIdx.x] = b.v;
        pi[blockIdx.x] = b.i;
    }
}

// One block: the winner of n candidates -> tok[0] (the next step's input) and out[0] (the word the
// host copies); step[0] += 1. Telemetry (parts != null): out[1 + 3·l + q] = Σ_b parts[(l·nblk + b)·3 + q]
// for the n_layers Mamba layers (the SSM step's per-block sums).
__device__ void sample_final_impl(const float* __restrict__ pv, const int* __restrict__ pi, int n,
                                        unsigned int* __restrict__ tok, unsigned int* __restrict__ step,
                                        unsigned int* __restrict__ out, const float* __restrict__ parts, int n_layers,
                                        int nblk) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    ArgMax best{-INFINITY, 0x7fffffff};
    for (int i = threadIdx.x; i < n; i += blockDim.x) best = argmax_pick(best, ArgMax{pv[i], pi[i]});
    best = warp_argmax(best);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    if (lane == 0) {
        bv[warp] = best.v;
        bi[warp] = best.i;
    }
    if (parts != nullptr) {
        float* tf = reinterpret_cast<float*>(out);
        for (int p = warp; p < 3 * n_layers; p += nwarps) {
            const int l = p / 3, q = p % 3;
            float s = 0.0f;
            for (int b = lane; b < nblk; b += 32) s += parts[((size_t)l * nblk + b) * 3 + q];
            s = warp_sum(s);
            if (lane == 0) tf[1 + p] = s;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        ArgMax b{bv[0], bi[0]};
        for (int w = 1; w < nwarps; w++) b = argmax_pick(b, ArgMax{bv[w], bi[w]});
        const unsigned int id = b.i == 0x7fffffff ? 0u : (unsigned int)b.i;
        tok[0] = id;
        out[0] = id;
        step[0] += 1u;
    }
}


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
// The residual stream `res` is f32 (d). Products round their output through the weight type T
// where the tensor-op twin stores a T tensor (the logits stay f32). One warp computes one output
// row (16-byte loads, up to 8 in flight per lane); blocks loop over rows (grid-stride).
//
// Launched with programmatic dependent launch: a kernel may start while the previous one runs; it
// waits for it (pdl_wait), then lets the next one launch.
//
// The weight matrices are "rows" of type WR: a dense `const T*` (row j at W + j·K, these kernels'
// own entry points in decode.cu) or a packed format's rows (`QRows` of kernels/qweight.cuh, the
// quantised entry points in qgemv.cu), read through `Rows<T, WR>`: one kernel body, one
// instantiation per weight format.
#pragma once
#include "common.cuh"

// What the kernel bodies ask of a weight matrix WR with activations of type T. The primary
// template delegates to a packed format's members (kernels/qweight.cuh); the dense `const T*`
// is the specialisation below.
template <typename T, typename WR>
struct Rows {
    // Elements per 16-byte load of a row (the unit the K slices are rounded to).
    static __device__ __forceinline__ int chunk(const WR& W) { return WR::C; }
    // One warp: row j (K elements) dotted with x over [k0, k1); every lane gets the sum.
    static __device__ __forceinline__ float dot(const WR& W, int j, int K, const T* x, int k0, int k1, bool vec) {
        return warp_sum(W.template lane_dot<T>(j, K, x, k0, k1, vec));
    }
    // One warp: rows j0 and j1 dotted with the same x (all K), their loads in flight together.
    static __device__ __forceinline__ float2 dot2(const WR& W, int j0, int j1, int K, const T* x, bool vec) {
        const float2 p = W.template lane_dot2<T>(j0, j1, K, x, vec);
        return make_float2(warp_sum(p.x), warp_sum(p.y));
    }
    // Element (j, k) as f32.
    static __device__ __forceinline__ float at(const WR& W, size_t j, int k, int K) { return W.at(j, k, K); }
    // The matrix of expert e of a pointer table (wtab[e], and the format's own tables).
    static __device__ __forceinline__ WR table(const WR& W, const unsigned long long* wtab, int e) {
        return W.from_table(wtab, e);
    }
};

template <typename T>
struct Rows<T, const T*> {
    static __device__ __forceinline__ int chunk(const T*) { return 16 / sizeof(T); }
    static __device__ __forceinline__ float dot(const T* W, int j, int K, const T* x, int k0, int k1, bool vec) {
        return warp_dot<T>(W + (size_t)j * K, x, k0, k1, vec);
    }
    static __device__ __forceinline__ float2 dot2(const T* W, int j0, int j1, int K, const T* x, bool vec) {
        return warp_dot2<T>(W + (size_t)j0 * K, W + (size_t)j1 * K, x, K, vec);
    }
    static __device__ __forceinline__ float at(const T* W, size_t j, int k, int K) { return to_f(W[j * (size_t)K + k]); }
    static __device__ __forceinline__ const T* table(const T*, const unsigned long long* wtab, int e) {
        return reinterpret_cast<const T*>(wtab[e]);
    }
};

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

// res (d) = E[tok[0]] as f32.
template <typename T, typename WR>
__device__ void embed_impl(WR emb, const unsigned int* __restrict__ tok, int d, float* __restrict__ res) {
    pdl_wait();
    pdl_trigger();
    const size_t row = tok[0];
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < d; j += gridDim.x * blockDim.x)
        res[j] = Rows<T, WR>::at(emb, row, j, d);
}

// Mamba in_proj with the block's RMSNorm and the conv step as epilogue:
//   xz[j] = T(T(w_j · T(rmsnorm(res))) + bias[j])        j < M = 2·di (u = xz[:di], z = xz[di:])
//   v[c]  = T(SiLU(cb[c] + Σ_k cw[c,k] · window_k))      c < di, window = [conv[c, 1..KC], u_c]
// The conv state is only read here (the SSM step shifts it). dynamic smem: K · sizeof(T).
template <typename T, typename WR>
__device__ void in_proj_conv_impl(WR W, int M, int K, const float* __restrict__ res,
                                  const float* __restrict__ nw, float eps, const T* __restrict__ bias, T* __restrict__ xz,
                                  int di, int KC, const float* __restrict__ conv, const float* __restrict__ cw,
                                  const float* __restrict__ cb, T* __restrict__ vout, int vec) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* xs = reinterpret_cast<T*>(smem_raw);
    __shared__ float red[33];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    pdl_wait();
    pdl_trigger();
    norm_prologue<T>(res, nw, nullptr, eps, 0, K, xs, red);
    for (int j = blockIdx.x * nwarps + warp; j < M; j += gridDim.x * nwarps) {
        const float dot = Rows<T, WR>::dot(W, j, K, xs, 0, K, vec != 0);
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
template <typename T, typename WR>
__device__ void gemv_rows_impl(WR W, int M, int K, const T* __restrict__ x, T* __restrict__ out, int vec) {
    __shared__ float part[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int V = Rows<T, WR>::chunk(W);
    int per = (K + nwarps - 1) / nwarps;
    per = (per + V - 1) / V * V;
    const int k0 = min(K, warp * per), k1 = min(K, k0 + per);
    pdl_wait();
    pdl_trigger();
    for (int j = blockIdx.x; j < M; j += gridDim.x) {
        const float a = Rows<T, WR>::dot(W, j, K, x, k0, k1, vec != 0);
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
// as a float) when telem is given.
__device__ __forceinline__ void publish_route(int* route, float* telem, const float* logits, int E, int best) {
    route[0] = best;
    reinterpret_cast<float*>(route)[1] = sigmoid_f(logits[best]);
    if (telem != nullptr) {
        for (int e = 0; e < E; e++) telem[e] = logits[e];
        telem[E] = (float)best;
    }
}

// The router and the chosen expert's fc1 of one MoE layer, in every block:
//   logits = Wr · T(rmsnorm(res)) + br (Wr (E, K) f32, E <= 32), e* = argmax (first on ties);
//   block 0 writes route[0] = e*, route[1] = σ(logit e*) (f32 bits) and the telemetry (E logits,
//   then e* as a float) when telem is given; then with w = wtab[e*]:
//   epi 1: out[j] = T(T(act(T(w_j·x))) · T(w_{j+M}·x))        j < M, rows = 2M (gated MLP)
//   epi 2: out[j] = T(act(T(w_j·x)))                          j < M, rows = M
//   dynamic smem: K · sizeof(T). The expert is known only after the router, so its rows are
//   loaded after the norm; the router weights are asked of L2 before the wait. `proto`: a packed
//   format's rows carrying its tables (wtab holds the codes); dense, wtab holds the rows.
template <typename T, typename WR = const T*>
__device__ void moe_fc1_impl(const float* __restrict__ Wr, const float* __restrict__ br, int E,
                             const unsigned long long* __restrict__ wtab, int* __restrict__ route, float* __restrict__ telem,
                             int M, int K, const float* __restrict__ res, const float* __restrict__ nw, float eps,
                             T* __restrict__ out, int epi, int act, int vec, WR proto = WR()) {
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
    if (blockIdx.x == 0 && threadIdx.x == 0) publish_route(route, telem, logits, E, best);
    const WR w = Rows<T, WR>::table(proto, wtab, chosen);
    for (int j = blockIdx.x * nwarps + warp; j < M; j += gridDim.x * nwarps) {
        if (epi == 1) {
            const float2 gu = Rows<T, WR>::dot2(w, j, j + M, K, xs, vec != 0);
            if (lane == 0) out[j] = from_f<T>(round_to<T>(act_f(round_to<T>(gu.x), act)) * round_to<T>(gu.y));
        } else {
            const float a = round_to<T>(Rows<T, WR>::dot(w, j, K, xs, 0, K, vec != 0));
            if (lane == 0) out[j] = from_f<T>(act_f(a, act));
        }
    }
}

// res[j] += g · (w_j · x) for j < M; g = gate[0] or 1. W: (M, K) T, x: (K) T in global memory.
// Split-K: slice `split` of `nsplit` (blockIdx.y of gridDim.y) takes a slice of K and adds with atomics; with one slice the
// product is rounded through T first (as the twin's T output) and added without atomics.
// With wtab, the weight is the expert that route names (written by the previous kernel, the fused
// router + fc1).
template <typename T, typename WR>
__device__ void gemv_resid_impl(WR W, const unsigned long long* wtab, const int* route, int M, int K,
                                const T* __restrict__ x, float* __restrict__ res, const float* __restrict__ gate,
                                const T* __restrict__ bias, int vec, int bx, int nbx, int split, int nsplit) {
    const int V = Rows<T, WR>::chunk(W);
    int per = (K + nsplit - 1) / nsplit;
    per = (per + V - 1) / V * V;
    const int k0 = min(K, split * per), k1 = min(K, k0 + per);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int j0 = bx * nwarps + warp;
    pdl_wait();
    pdl_trigger();
    const WR w = wtab != nullptr ? Rows<T, WR>::table(W, wtab, route[0]) : W;
    const float g = gate != nullptr ? gate[0] : 1.0f;
    for (int j = j0; j < M; j += nbx * nwarps) {
        float a = Rows<T, WR>::dot(w, j, K, x, k0, k1, vec != 0);
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

// LM head: logits[j] = E_j · T(layernorm(res)) in f32 for j < V; each block leaves the argmax of
// its rows' logits in (pv, pi)[blockIdx.x] (greedy decoding takes the winner in sample_final;
// sampling reads the logits in kernels/sample.cu).
template <typename T, typename WR>
__device__ void head_impl(WR E, int V, int K, const float* __restrict__ res,
                          const float* __restrict__ lw, const float* __restrict__ lb, float eps, float* __restrict__ logits,
                          float* __restrict__ pv, int* __restrict__ pi, int vec) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* xs = reinterpret_cast<T*>(smem_raw);
    __shared__ float red[33];
    __shared__ float bv[32];
    __shared__ int bi[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int j0 = blockIdx.x * nwarps + warp;
    pdl_wait();
    pdl_trigger();
    norm_prologue<T>(res, lw, lb, eps, 1, K, xs, red);
    ArgMax best{-INFINITY, 0x7fffffff};
    for (int j = j0; j < V; j += gridDim.x * nwarps) {
        const float l = Rows<T, WR>::dot(E, j, K, xs, 0, K, vec != 0);
        if (lane == 0) logits[j] = l;
        best = argmax_pick(best, ArgMax{l, j});
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

// Telemetry of a step (parts != null): out[1 + 3·l + q] = Σ_b parts[(l·nblk + b)·3 + q] for the
// n_layers Mamba layers (the SSM step's per-block sums), one warp per sum.
__device__ __forceinline__ void sum_telemetry(unsigned int* __restrict__ out, const float* __restrict__ parts, int n_layers,
                                              int nblk) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    float* tf = reinterpret_cast<float*>(out);
    for (int p = warp; p < 3 * n_layers; p += nwarps) {
        const int l = p / 3, q = p % 3;
        float s = 0.0f;
        for (int b = lane; b < nblk; b += 32) s += parts[((size_t)l * nblk + b) * 3 + q];
        s = warp_sum(s);
        if (lane == 0) tf[1 + p] = s;
    }
}

// One block: the winner of n candidates -> tok[0] (the next step's input) and out[0] (the word the
// host copies); step[0] += 1; the telemetry sums (sum_telemetry) when parts is given.
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
    if (parts != nullptr) sum_telemetry(out, parts, n_layers, nblk);
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

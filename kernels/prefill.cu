// Full-sequence (prefill) kernels around the cuBLAS products:
//
//   add_rmsnorm_*   res' = res + add (f32), out = T(RMSNorm(res')·w)       one block per token
//   conv1d_fwd_*    causal depthwise conv over the sequence, continuing the conv state, + SiLU
//                   (SPEC §5 eqs. 2-3); writes v in f32 (scan) and in T (x_proj), and the new state
//   router_top1_*   logits = Wr·x + br (f32), top-1 expert, σ gate         one warp per token
//   moe_group       tokens grouped per expert (stable), with the inverse permutation and counts
//   moe_pad_index   each token's row in the expert-major padded layout of the batched products
//   moe_act_*       the expert's gated activation on fc1's output
//   moe_unpermute_* y[t] = f32(ys[inverse[t]]) · gate[t]                     back to token order
#include "common.cuh"

// rows tokens of width d. add may be null (first layer). add is f32 (TA = float) or T.
template <typename T, typename TA>
__device__ void add_rmsnorm_impl(int d, const float* __restrict__ res, const TA* __restrict__ add,
                                 float* __restrict__ res_out, const float* __restrict__ w, float eps, T* __restrict__ out) {
    __shared__ float red[33];
    const size_t base = (size_t)blockIdx.x * d;
    float ss = 0.0f;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        float r = res[base + k];
        if (add != nullptr) r += to_f(add[base + k]);
        res_out[base + k] = r;
        ss = fmaf(r, r, ss);
    }
    ss = block_sum(ss, red);
    const float inv = rsqrtf(ss / (float)d + eps);
    for (int k = threadIdx.x; k < d; k += blockDim.x) out[base + k] = from_f<T>(res_out[base + k] * inv * w[k]);
}

// Threads over c (blockIdx.x), rows (b, t) over blockIdx.y (grid-stride). u_t = xz[b, t, c] (row
// stride xz_stride); u_{t<0} come from the previous window: u_{-j} = conv_in[b, c, K - j].
//   v[b, t, c] = SiLU(cb[c] + Σ_k cw[c, k] · u_{t-K+1+k});  conv_out[b, c, k] = u_{L-K+k}
template <typename T>
__device__ void conv1d_fwd_impl(int Bn, int L, int di, int K, const T* __restrict__ xz, int xz_stride,
                                const float* __restrict__ conv_in, const float* __restrict__ cw,
                                const float* __restrict__ cb, float* __restrict__ v, T* __restrict__ vt,
                                float* __restrict__ conv_out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= di) return;
    const int rows = Bn * L;
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        const int b = row / L, t = row - b * L;
        const T* ub = xz + (size_t)b * L * xz_stride;
        const float* cs = conv_in + ((size_t)b * di + c) * K;
        float acc = cb[c];
        for (int k = 0; k < K; k++) {
            const int src = t - (K - 1) + k;  // source position
            const float uu = src >= 0 ? to_f(ub[(size_t)src * xz_stride + c]) : cs[K + src];
            acc += uu * cw[(size_t)c * K + k];
        }
        const float sv = silu_f(acc);
        const size_t i = (size_t)row * di + c;
        v[i] = sv;
        vt[i] = from_f<T>(sv);
        if (t == L - 1) {
            for (int k = 0; k < K; k++) {
                const int src = L - K + k;
                conv_out[((size_t)b * di + c) * K + k] = src >= 0 ? to_f(ub[(size_t)src * xz_stride + c]) : cs[K + src];
            }
        }
    }
}

// One warp per token: x (Tn, d) T; Wr (E, d) f32 (E <= 16); br (E) f32 -> logits (Tn, E) f32,
// expert (Tn) int (first max on ties), gate (Tn) f32 = σ(logit of the expert). Each lane keeps
// the E partial sums, so the E products share every x load. in_smem: the block first copies Wr
// into its dynamic shared memory (E·d floats), so the warps' E loads per x load come from there
// instead of L1/L2 (2,048 tokens of the 2.8B shapes: 96 MB of L2 reads become 12 MB).
template <typename T>
__device__ void router_top1_impl(int Tn, int d, int E, const T* __restrict__ x, const float* __restrict__ Wg,
                                 const float* __restrict__ br, float* __restrict__ logits, int* __restrict__ expert,
                                 float* __restrict__ gate, int in_smem) {
    extern __shared__ float wsm[];
    const float* Wr = Wg;
    if (in_smem) {
        for (int i = threadIdx.x; i < E * d; i += blockDim.x) wsm[i] = Wg[i];
        __syncthreads();
        Wr = wsm;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int t = blockIdx.x * nwarps + warp; t < Tn; t += gridDim.x * nwarps) {
        const T* xr = x + (size_t)t * d;
        float acc[16];
#pragma unroll
        for (int e = 0; e < 16; e++) acc[e] = 0.0f;
#pragma unroll 4
        for (int k = lane; k < d; k += 32) {
            const float xk = to_f(xr[k]);
#pragma unroll
            for (int e = 0; e < 16; e++)
                if (e < E) acc[e] = fmaf(Wr[(size_t)e * d + k], xk, acc[e]);
        }
        float best = -INFINITY;
        int bi = 0;
#pragma unroll
        for (int e = 0; e < 16; e++) {
            if (e >= E) break;
            const float l = warp_sum(acc[e]) + br[e];
            if (lane == 0) logits[(size_t)t * E + e] = l;
            if (e == 0 || l > best) {
                best = l;
                bi = e;
            }
        }
        if (lane == 0) {
            expert[t] = bi;
            gate[t] = sigmoid_f(best);
        }
    }
}

// One block (blockDim.x threads, E <= 16): thread i takes tokens [i·seg, (i+1)·seg).
// order[pos] = token at sorted position pos (grouped by expert, token order within a group),
// inverse[t] = pos of token t, counts[e] = tokens of expert e.
// shared: E · blockDim.x ints (dynamic)
extern "C" __global__ void moe_group(const MoeGroupParams p) {
    const int Tn = p.Tn, E = p.E;
    const int* __restrict__ expert = p.expert;
    int* __restrict__ order = p.order;
    int* __restrict__ inverse = p.inverse;
    int* __restrict__ counts = p.counts;
    extern __shared__ int cnt[];  // [E][nthreads]
    __shared__ int base[17];
    const int nt = blockDim.x, tid = threadIdx.x;
    const int seg = (Tn + nt - 1) / nt;
    const int t0 = min(Tn, tid * seg), t1 = min(Tn, t0 + seg);
    for (int e = 0; e < E; e++) cnt[e * nt + tid] = 0;
    for (int t = t0; t < t1; t++) {
        const int e = expert[t];
        if (e >= 0 && e < E) cnt[e * nt + tid] += 1;
    }
    __syncthreads();
    // exclusive scan of each expert's row, one thread per expert
    if (tid < E) {
        int s = 0;
        for (int i = 0; i < nt; i++) {
            const int c = cnt[tid * nt + i];
            cnt[tid * nt + i] = s;
            s += c;
        }
        counts[tid] = s;
        base[tid] = s;
    }
    __syncthreads();
    if (tid == 0) {
        int s = 0;
        for (int e = 0; e < E; e++) {
            const int c = base[e];
            base[e] = s;
            s += c;
        }
    }
    __syncthreads();
    int next[16];
#pragma unroll
    for (int e = 0; e < 16; e++) next[e] = e < E ? base[e] + cnt[e * nt + tid] : 0;
    for (int t = t0; t < t1; t++) {
        const int e = expert[t];
        if (e < 0 || e >= E) continue;
        int pos = 0;
#pragma unroll
        for (int k = 0; k < 16; k++)
            if (k == e) pos = next[k]++;
        order[pos] = t;
        inverse[t] = pos;
    }
}

// Rows of the expert-major padded layout (E, stride, ·) of the batched expert products:
// padpos[t] = expert[t]·stride + inverse[t] − base[expert[t]] (base[e]: expert e's first position in
// moe_group's order) and order_pad[padpos[t]] = t; padding rows of order_pad keep the caller's value.
extern "C" __global__ void moe_pad_index(const MoePadIndexParams p) {
    const int Tn = p.Tn, E = p.E, stride = p.stride;
    const int* __restrict__ expert = p.expert;
    const int* __restrict__ inverse = p.inverse;
    const int* __restrict__ base = p.base;
    int* __restrict__ padpos = p.padpos;
    int* __restrict__ order_pad = p.order_pad;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < Tn; t += gridDim.x * blockDim.x) {
        const int e = expert[t];
        if (e < 0 || e >= E) {
            padpos[t] = 0;
            continue;
        }
        const int pos = e * stride + inverse[t] - base[e];
        padpos[t] = pos;
        order_pad[pos] = t;
    }
}

// y (Tn, d) f32 = ys[inverse[t]] · gate[t]; ys (Tn, d) T in grouped order. Threads over the
// columns (blockIdx.x), tokens over blockIdx.y (grid-stride).
template <typename T>
__device__ void moe_unpermute_impl(int Tn, int d, const T* __restrict__ ys, const int* __restrict__ inverse,
                                   const float* __restrict__ gate, float* __restrict__ y) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= d) return;
    for (int t = blockIdx.y; t < Tn; t += gridDim.y)
        y[(size_t)t * d + k] = to_f(ys[(size_t)inverse[t] * d + k]) * gate[t];
}

// The expert's activation on fc1's output a (n, 2f) T: h[i, j] = T(T(act(a[i, j])) · a[i, f + j])
// (gated), as the tensor-op twin rounds. Threads over j (blockIdx.x), rows over blockIdx.y.
template <typename T>
__device__ void moe_act_impl(int n, int f, const T* __restrict__ a, T* __restrict__ h, int act) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= f) return;
    for (int i = blockIdx.y; i < n; i += gridDim.y) {
        const T* r = a + (size_t)i * 2 * f;
        h[(size_t)i * f + j] = from_f<T>(round_to<T>(act_f(to_f(r[j]), act)) * to_f(r[f + j]));
    }
}

#define PREFILL_KERNELS(T, S)                                                                                           \
    extern "C" __global__ void add_rmsnorm_##S(const AddRmsnormParams<T, float> p) {                                    \
        add_rmsnorm_impl<T, float>(p.d, p.res, p.add, p.res_out, p.w, p.eps, p.out);                                    \
    }                                                                                                                   \
    extern "C" __global__ void add_rmsnorm_t_##S(const AddRmsnormParams<T, T> p) {                                      \
        add_rmsnorm_impl<T, T>(p.d, p.res, p.add, p.res_out, p.w, p.eps, p.out);                                        \
    }                                                                                                                   \
    extern "C" __global__ void conv1d_fwd_##S(const Conv1dFwdParams<T> p) {                                             \
        conv1d_fwd_impl<T>(p.Bn, p.L, p.di, p.K, p.xz, p.xz_stride, p.conv_in, p.cw, p.cb, p.v, p.vt, p.conv_out);      \
    }                                                                                                                   \
    extern "C" __global__ void router_top1_##S(const RouterTop1Params<T> p) {                                           \
        router_top1_impl<T>(p.Tn, p.d, p.E, p.x, p.Wr, p.br, p.logits, p.expert, p.gate, p.in_smem);                    \
    }                                                                                                                   \
    extern "C" __global__ void moe_unpermute_##S(const MoeUnpermuteParams<T> p) {                                       \
        moe_unpermute_impl<T>(p.Tn, p.d, p.ys, p.inverse, p.gate, p.y);                                                 \
    }                                                                                                                   \
    extern "C" __global__ void moe_act_##S(const MoeActParams<T> p) { moe_act_impl<T>(p.n, p.f, p.a, p.h, p.act); }

INSTANTIATE_T(PREFILL_KERNELS)

// The batch-1 decode megakernel (issue 17), first version: one persistent kernel per token,
// grid = the schedule's SM count, one block per SM, launched cooperatively (the driver refuses
// the launch unless every block is resident at once, so no block waits on one that never runs).
// Each block walks its own instruction list (src/runtime/megakernel/schedule.rs, encoded as in
// megakernel_isa.cuh): waits on dependency counters, runs its tile of one fused op with the
// arithmetic of the CPU interpreter (src/runtime/megakernel/interp.rs), adds its split-K
// partial sums into the shared f32 accumulators with atomicAdd, then signals its counter.
//
// Kept simple on purpose (correctness first): no loader warp, no TMA nor cp.async, weights read
// straight from global memory; bf16 and f32 weight tiles only (the host refuses other formats,
// the kernel reports them as error 2). See docs/decode.md "Megakernel design".
//
// Synchronisation. Counters are u32, monotonic across tokens: token `epoch` (tokens run since
// the buffers were made) waits until a counter reaches target * (epoch + 1) (wrapping compare).
// Producer: every thread __threadfence()s its stores and atomics, the block syncs, thread 0 does
// a release add of 1. Consumer: thread 0 polls with ld.acquire.gpu, a __threadfence, the block
// syncs, then the block reads. Buffers written inside the kernel are read with __ldcg (L2, never
// a stale L1 line). A wait that lasts more than `timeout` clock cycles writes an error record
// and every block returns (no hang); so does any block that sees another's error.
//
// Global buffers (f32 unless said; p = epoch % 2, L = layers, xr = dt_rank + 2N, E = experts):
//   res    [2][L + 1][d]   the residual entering each half-block, by parity (split-K adds);
//                          res[p][0] is unused: layer 0 reads the embedding row itself
//   xdbc   [2][L][xr]      x_proj sums of each Mamba layer, by parity (split-K adds)
//   v, z   [L][di]         conv+SiLU output and the gate of each Mamba layer (plain stores)
//   route  [L][1 + E_max]  word 0: the chosen expert (u32 bits), then sigma(router logits)
//   logits [V]
//   counters [n_counters] u32; err [8] u32: code, sm, instruction index, counter, seen, wanted
// Each adding tile zeroes its share of the same vector in the other parity set, which token
// epoch + 1 adds into (the host zeroes both sets once, at allocation).
#include "common.cuh"
#include "megakernel_isa.cuh"

// Every field is 8 bytes (the host writes an array of i64): pointers, then sizes.
struct MkParams {
    const uint64_t* layers;   // [L][MK_LT] per-layer pointer tables (see MK_LT_* below)
    const uint8_t* emb;       // (V, d) packed in head_fmt: the embedding and the tied head
    const float* final_w;     // (d) final LayerNorm
    const float* final_b;     // (d)
    float* res;
    float* xdbc;
    float* v;
    float* z;
    float* route;
    float* logits;
    uint32_t* counters;
    uint32_t* err;
    const MkInstr* instrs;    // every SM's list, back to back
    const uint32_t* list_off; // [sms + 1]: SM s runs instrs[list_off[s] .. list_off[s + 1])
    int64_t d, di, n, r, k, xr, f, vocab, n_layers, route_stride, gated, act, head_fmt, timeout;
    double eps;
};
// src/runtime/megakernel/cuda.rs writes exactly PARAMS_WORDS = 29 words: keep the two equal.
static_assert(sizeof(MkParams) == 29 * 8, "MkParams must be 29 eight-byte words (cuda.rs PARAMS_WORDS)");

// Per-layer table: 16 u64 each. Mamba layers:
#define MK_LT 16
#define MK_LT_NORM 0   // (d) f32
#define MK_LT_IN_W 1   // (2 di, d) packed: u rows then z rows
#define MK_LT_IN_B 2   // (2 di) f32 or 0
#define MK_LT_CONV_W 3 // (di, K) f32
#define MK_LT_CONV_B 4 // (di) f32
#define MK_LT_X_T 5    // (di, xr) packed: x_proj transposed
#define MK_LT_DT_W 6   // (di, r) packed
#define MK_LT_DT_B 7   // (di) f32
#define MK_LT_A 8      // (di, N) f32: A = -exp(A_log)
#define MK_LT_D 9      // (di) f32
#define MK_LT_OUT_T 10 // (di, d) packed: out_proj transposed
#define MK_LT_OUT_B 11 // (d) f32 or 0
#define MK_LT_CONV 12  // (di, K) f32 state: the conv window, oldest first
#define MK_LT_SSM 13   // (di, N) f32 state
// MoE and dense layers (MK_LT_NORM as above):
#define MK_LT_ROUTER_W 1 // (E, d) f32 (0 for a dense layer)
#define MK_LT_ROUTER_B 2 // (E) f32
#define MK_LT_EXPERTS 3  // (E, 4) u64: fc1 (fc1_rows, d) packed, fc1 bias (fc1_rows) f32 or 0,
                         // fc2 transposed (ffn, d) packed, fc2 bias (d) f32 or 0
#define MK_LT_N_EXPERTS 4

// Error codes (err[0]).
#define MK_ERR_TIMEOUT 1
#define MK_ERR_FORMAT 2
#define MK_ERR_OP 3

#define MK_THREADS 256

__device__ __forceinline__ uint32_t mk_ld_acquire(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void mk_red_release(uint32_t* p, uint32_t v) {
    asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Element i of a packed weight (f32 or bf16: read-only for the whole kernel, so __ldg).
__device__ __forceinline__ float mk_w(const uint8_t* base, size_t i, int fmt) {
    if (fmt == MK_FMT_BF16) return __bfloat162float(__ldg(reinterpret_cast<const bf16*>(base) + i));
    return __ldg(reinterpret_cast<const float*>(base) + i);
}

// A warp's dot product of packed row `row` (cols values) with x (shared memory); every lane gets it.
__device__ __forceinline__ float mk_dot(const uint8_t* w, size_t row, int cols, const float* x, int fmt) {
    const int lane = threadIdx.x & 31;
    float s = 0.0f;
    for (int c = lane; c < cols; c += 32) s = fmaf(mk_w(w, row * (size_t)cols + c, fmt), x[c], s);
    return warp_sum(s);
}
__device__ __forceinline__ float mk_dot_f32(const float* w, const float* x, int cols) {
    const int lane = threadIdx.x & 31;
    float s = 0.0f;
    for (int c = lane; c < cols; c += 32) s = fmaf(__ldg(w + c), x[c], s);
    return warp_sum(s);
}

// Tile `tile` of `tiles`'s share of an n-vector (interp.rs `share`).
__device__ __forceinline__ void mk_share(uint32_t tile, uint32_t tiles, int64_t n, int64_t* a, int64_t* b) {
    const int64_t k = tiles ? tiles : 1;
    *a = tile * n / k;
    *b = (tile + 1) * n / k;
}

// Element o of the residual entering layer l for parity p (layer 0: the token's embedding row).
__device__ __forceinline__ float mk_res_in(const MkParams& P, int l, int p, uint32_t token, int64_t o) {
    if (l == 0) return mk_w(P.emb, (size_t)token * P.d + o, (int)P.head_fmt);
    return __ldcg(P.res + ((size_t)p * (P.n_layers + 1) + l) * P.d + o);
}

// Zeroes [a, b) of `dst` (the other parity set).
__device__ __forceinline__ void mk_zero(float* dst, int64_t a, int64_t b) {
    for (int64_t i = a + threadIdx.x; i < b; i += blockDim.x) __stcg(dst + i, 0.0f);
}

// xs[0..d) = RMSNorm(residual) as interp.rs computes it: x / sqrt(mean(x^2) + eps) * w.
__device__ void mk_rms(const MkParams& P, int l, int p, uint32_t token, const float* w, float* xs, float* red) {
    const int d = (int)P.d;
    float ss = 0.0f;
    for (int o = threadIdx.x; o < d; o += blockDim.x) {
        const float x = mk_res_in(P, l, p, token, o);
        xs[o] = x;
        ss = fmaf(x, x, ss);
    }
    ss = block_sum(ss, red);
    const float m = sqrtf(ss / (float)d + (float)P.eps);
    for (int o = threadIdx.x; o < d; o += blockDim.x) xs[o] = xs[o] / m * __ldg(w + o);
    __syncthreads();
}

// The one lane-0 wait of a block; returns false when the block must stop (timeout or another
// block's error). All threads call it.
__device__ bool mk_wait(const MkParams& P, uint32_t counter, uint32_t target, uint32_t epoch, uint32_t at,
                        int* flag) {
    if (threadIdx.x == 0) {
        const uint32_t want = target * (epoch + 1u);
        const long long t0 = clock64();
        int ok = 1;
        volatile uint32_t* err = P.err;
        while ((int)(mk_ld_acquire(P.counters + counter) - want) < 0) {
            if (err[0] != 0) {
                ok = 0;
                break;
            }
            if (clock64() - t0 > P.timeout) {
                if (atomicCAS(P.err, 0u, (uint32_t)MK_ERR_TIMEOUT) == 0u) {
                    P.err[1] = blockIdx.x;
                    P.err[2] = at;
                    P.err[3] = counter;
                    P.err[4] = mk_ld_acquire(P.counters + counter);
                    P.err[5] = want;
                }
                ok = 0;
                break;
            }
            __nanosleep(64);
        }
        __threadfence();
        *flag = ok;
    }
    __syncthreads();
    return *flag != 0;
}

__device__ void mk_fail(const MkParams& P, uint32_t code, uint32_t at) {
    if (threadIdx.x == 0 && atomicCAS(P.err, 0u, code) == 0u) {
        P.err[1] = blockIdx.x;
        P.err[2] = at;
    }
}

// Mamba stage 1 over channels [c0, c1): norm, in_proj u/z, conv window + conv + SiLU, x_proj partials.
__device__ void mk_mamba_in(const MkParams& P, const uint64_t* T, int l, int p, uint32_t token, int c0, int c1,
                            int f_in, int f_x, float* xs, float* rows, float* red) {
    const int d = (int)P.d, di = (int)P.di, K = (int)P.k, xr = (int)P.xr;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    mk_rms(P, l, p, token, (const float*)T[MK_LT_NORM], xs, red);
    const uint8_t* in_w = (const uint8_t*)T[MK_LT_IN_W];
    const float* in_b = (const float*)T[MK_LT_IN_B];
    const float* conv_w = (const float*)T[MK_LT_CONV_W];
    const float* conv_b = (const float*)T[MK_LT_CONV_B];
    float* conv = (float*)T[MK_LT_CONV];
    float* vg = P.v + (size_t)l * di;
    float* zg = P.z + (size_t)l * di;
    for (int c = c0 + warp; c < c1; c += nw) {
        float u = mk_dot(in_w, c, d, xs, f_in);
        float z = mk_dot(in_w, (size_t)di + c, d, xs, f_in);
        if (lane == 0) {
            if (in_b) {
                u += in_b[c];
                z += in_b[di + c];
            }
            float* win = conv + (size_t)c * K;
            for (int j = 0; j + 1 < K; j++) win[j] = win[j + 1];
            win[K - 1] = u;
            float cv = 0.0f;
            for (int j = 0; j < K; j++) cv = fmaf(win[j], conv_w[(size_t)c * K + j], cv);
            const float v = silu_f(cv + conv_b[c]);
            vg[c] = v;
            zg[c] = z;
            rows[c - c0] = v;
        }
    }
    __syncthreads();
    const uint8_t* x_t = (const uint8_t*)T[MK_LT_X_T];
    float* acc = P.xdbc + ((size_t)p * P.n_layers + l) * xr;
    for (int j = threadIdx.x; j < xr; j += blockDim.x) {
        float s = 0.0f;
        for (int c = c0; c < c1; c++) s = fmaf(mk_w(x_t, (size_t)c * xr + j, f_x), rows[c - c0], s);
        atomicAdd(acc + j, s);
    }
}

// Mamba stage 2 over channels [c0, c1): dt_proj + softplus, state update, C, D skip, SiLU(z),
// out_proj partials into the next residual (the first tile adds the residual and the bias).
__device__ void mk_mamba_ssm(const MkParams& P, const uint64_t* T, int l, int p, uint32_t token, int c0, int c1,
                             bool first, int f_dt, int f_out, float* xd, float* rows) {
    const int d = (int)P.d, di = (int)P.di, N = (int)P.n, r = (int)P.r, xr = (int)P.xr;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const float* acc = P.xdbc + ((size_t)p * P.n_layers + l) * xr;
    for (int j = threadIdx.x; j < xr; j += blockDim.x) xd[j] = __ldcg(acc + j);
    __syncthreads();
    const float *B = xd + r, *C = xd + r + N;
    const uint8_t* dt_w = (const uint8_t*)T[MK_LT_DT_W];
    const float* dt_b = (const float*)T[MK_LT_DT_B];
    const float* A = (const float*)T[MK_LT_A];
    const float* D = (const float*)T[MK_LT_D];
    float* h = (float*)T[MK_LT_SSM];
    for (int c = c0 + warp; c < c1; c += nw) {
        const float delta = softplus_f(mk_dot(dt_w, c, r, xd, f_dt) + dt_b[c]);
        const float v = __ldcg(P.v + (size_t)l * di + c);
        float y = 0.0f;
        for (int s = lane; s < N; s += 32) {
            float* hs = h + (size_t)c * N + s;
            const float hn = expf(delta * A[(size_t)c * N + s]) * *hs + delta * v * B[s];
            *hs = hn;
            y = fmaf(hn, C[s], y);
        }
        y = warp_sum(y);
        if (lane == 0) rows[c - c0] = (y + v * D[c]) * silu_f(__ldcg(P.z + (size_t)l * di + c));
    }
    __syncthreads();
    const uint8_t* out_t = (const uint8_t*)T[MK_LT_OUT_T];
    const float* out_b = (const float*)T[MK_LT_OUT_B];
    float* dst = P.res + ((size_t)p * (P.n_layers + 1) + l + 1) * d;
    for (int o = threadIdx.x; o < d; o += blockDim.x) {
        float s = 0.0f;
        if (first) {
            s = mk_res_in(P, l, p, token, o);
            if (out_b) s += out_b[o];
        }
        for (int c = c0; c < c1; c++) s = fmaf(mk_w(out_t, (size_t)c * d + o, f_out), rows[c - c0], s);
        atomicAdd(dst + o, s);
    }
}

// A MoE (router != 0) or dense layer over hidden units [j0, j1).
__device__ void mk_ffn(const MkParams& P, const uint64_t* T, int l, int p, uint32_t token, int j0, int j1, bool first,
                       int f1, int f2, float* xs, float* aux, float* rows, float* red) {
    const int d = (int)P.d, F = (int)P.f;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    mk_rms(P, l, p, token, (const float*)T[MK_LT_NORM], xs, red);
    const float* rw = (const float*)T[MK_LT_ROUTER_W];
    const int E = (int)T[MK_LT_N_EXPERTS];
    __shared__ int best_sh;
    __shared__ float gate_sh;
    if (rw) {
        const float* rb = (const float*)T[MK_LT_ROUTER_B];
        for (int e = warp; e < E; e += nw) {
            const float s = mk_dot_f32(rw + (size_t)e * d, xs, d);
            if (lane == 0) aux[e] = s + rb[e];
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int best = 0;
            for (int e = 1; e < E; e++)
                if (aux[e] > aux[best]) best = e;
            best_sh = best;
            gate_sh = sigmoid_f(aux[best]);
        }
        __syncthreads();
        if (first) {
            float* route = P.route + (size_t)l * P.route_stride;
            if (threadIdx.x == 0) reinterpret_cast<uint32_t*>(route)[0] = (uint32_t)best_sh;
            for (int e = threadIdx.x; e < E; e += blockDim.x) route[1 + e] = sigmoid_f(aux[e]);
        }
    } else if (threadIdx.x == 0) {
        best_sh = 0;
        gate_sh = 1.0f;
    }
    __syncthreads();
    const uint64_t* ex = (const uint64_t*)T[MK_LT_EXPERTS] + 4 * (size_t)best_sh;
    const uint8_t* fc1 = (const uint8_t*)ex[0];
    const float* fc1_b = (const float*)ex[1];
    const uint8_t* fc2_t = (const uint8_t*)ex[2];
    const float* fc2_b = (const float*)ex[3];
    const float gate = gate_sh;
    for (int j = j0 + warp; j < j1; j += nw) {
        float g = mk_dot(fc1, j, d, xs, f1);
        float up = P.gated ? mk_dot(fc1, (size_t)F + j, d, xs, f1) : 0.0f;
        if (lane == 0) {
            if (fc1_b) {
                g += fc1_b[j];
                if (P.gated) up += fc1_b[F + j];
            }
            rows[j - j0] = P.gated ? act_f(g, (int)P.act) * up : act_f(g, (int)P.act);
        }
    }
    __syncthreads();
    float* dst = P.res + ((size_t)p * (P.n_layers + 1) + l + 1) * d;
    for (int o = threadIdx.x; o < d; o += blockDim.x) {
        float s = (first && fc2_b) ? fc2_b[o] : 0.0f;
        for (int j = j0; j < j1; j++) s = fmaf(mk_w(fc2_t, (size_t)j * d + o, f2), rows[j - j0], s);
        s *= gate;
        if (first) s += mk_res_in(P, l, p, token, o);
        atomicAdd(dst + o, s);
    }
}

// The final LayerNorm (interp.rs layer_norm) and LM-head rows [r0, r1).
__device__ void mk_head(const MkParams& P, int p, uint32_t token, int r0, int r1, int fmt, float* xs, float* red) {
    const int d = (int)P.d, L = (int)P.n_layers;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    float s = 0.0f, s2 = 0.0f;
    for (int o = threadIdx.x; o < d; o += blockDim.x) {
        const float x = mk_res_in(P, L, p, token, o);
        xs[o] = x;
        s += x;
        s2 = fmaf(x, x, s2);
    }
    s = block_sum(s, red);
    s2 = block_sum(s2, red);
    const float mean = s / (float)d;
    const float inv_std = 1.0f / sqrtf(s2 / (float)d - mean * mean + (float)P.eps);
    for (int o = threadIdx.x; o < d; o += blockDim.x) xs[o] = (xs[o] - mean) * inv_std * P.final_w[o] + P.final_b[o];
    __syncthreads();
    for (int r = r0 + warp; r < r1; r += nw) {
        const float v = mk_dot(P.emb, r, d, xs, fmt);
        if (lane == 0) __stcg(P.logits + r, v);
    }
}

__device__ __forceinline__ bool mk_fmt_ok(uint32_t fmts, int n) {
    for (int k = 0; k < n; k++) {
        const uint32_t f = (fmts >> (8 * k)) & 0xff;
        if (f != MK_FMT_F32 && f != MK_FMT_BF16) return false;
    }
    return true;
}

// One token. Dynamic shared memory (floats): xs[d] | aux[max(xr, E_max)] | rows[max tile rows] | red[40].
// The host passes the sizes of aux and rows in `aux_n` and `rows_n`.
extern "C" __global__ void __launch_bounds__(MK_THREADS, 1)
    megakernel(const MegakernelParams kp) {
    const MkParams* __restrict__ params = kp.params;
    const uint32_t token = kp.token, epoch = kp.epoch;
    const int aux_n = kp.aux_n, rows_n = kp.rows_n;
    extern __shared__ float smem[];
    __shared__ MkParams P;
    __shared__ MkInstr in;
    __shared__ int flag;
    if (threadIdx.x == 0) P = *params;
    __syncthreads();
    float* xs = smem;
    float* aux = xs + P.d;
    float* rows = aux + aux_n;
    float* red = rows + rows_n;
    const int p = (int)(epoch & 1u);
    const uint32_t i0 = P.list_off[blockIdx.x], i1 = P.list_off[blockIdx.x + 1];
    for (uint32_t at = i0; at < i1; at++) {
        __syncthreads(); // the previous instruction is done with `in` and the shared buffers
        if (threadIdx.x < MK_WORDS) in.w[threadIdx.x] = P.instrs[at].w[threadIdx.x];
        __syncthreads();
        const uint32_t head = in.w[MK_W_HEAD];
        const int op = head & 0xff;
        const bool first = ((head >> 8) & MK_FLAG_FIRST) != 0;
        const int n_waits = (head >> 16) & 0xf;
        const int l = (int)in.w[MK_W_LAYER];
        const int a = (int)in.w[MK_W_ROW0], b = (int)in.w[MK_W_ROW1];
        const uint32_t fmts = in.w[MK_W_FORMATS];
        const int fa = fmts & 0xff, fb = (fmts >> 8) & 0xff;
        if (!mk_fmt_ok(fmts, op == MK_OP_HEAD ? 1 : 2)) {
            mk_fail(P, MK_ERR_FORMAT, at);
            return;
        }
        // zero this tile's share of the other parity set (no wait needed: nothing of this token
        // touches it)
        int64_t za, zb;
        if (op == MK_OP_MAMBA_IN) {
            mk_share(in.w[MK_W_TILE], in.w[MK_W_TILES], P.xr, &za, &zb);
            mk_zero(P.xdbc + ((size_t)(1 - p) * P.n_layers + l) * P.xr, za, zb);
        } else if (op != MK_OP_HEAD) {
            mk_share(in.w[MK_W_TILE], in.w[MK_W_TILES], P.d, &za, &zb);
            mk_zero(P.res + ((size_t)(1 - p) * (P.n_layers + 1) + l + 1) * P.d, za, zb);
        }
        for (int k = 0; k < n_waits; k++) {
            if (!mk_wait(P, in.w[MK_W_WAIT0 + 2 * k], in.w[MK_W_WAIT0 + 2 * k + 1], epoch, at, &flag)) return;
        }
        const uint64_t* T = P.layers + (size_t)(l < P.n_layers ? l : 0) * MK_LT;
        switch (op) {
        case MK_OP_MAMBA_IN: mk_mamba_in(P, T, l, p, token, a, b, fa, fb, xs, rows, red); break;
        case MK_OP_MAMBA_SSM: mk_mamba_ssm(P, T, l, p, token, a, b, first, fa, fb, aux, rows); break;
        case MK_OP_MOE_FFN:
        case MK_OP_DENSE_FFN: mk_ffn(P, T, l, p, token, a, b, first, fa, fb, xs, aux, rows, red); break;
        case MK_OP_HEAD: mk_head(P, p, token, a, b, fa, xs, red); break;
        default: mk_fail(P, MK_ERR_OP, at); return;
        }
        // release: every thread's stores and atomics, then one add on the signal counter
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) mk_red_release(P.counters + in.w[MK_W_SIGNAL], 1u);
    }
}

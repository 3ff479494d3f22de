// Fused stages of the persistent decode kernel (kernels/persistent.cu, DecodeOpts::fuse): each
// product whose output feeds a grid-wide reduction is folded into the stage that produces its
// input, split over K by block, the blocks adding their partial sums with atomics:
//
//   IN_PROJ_X  in_proj + norm + conv (as in_proj_conv_impl), then x_proj's partial sums over the
//              block's channels into dbc (f32, zero at stage start)
//   SSM_OUT    the SSM step of the block's channels, then out_proj's partial sums over them
//              (W_out transposed, (di, d)) into both residual copies
//   FC12       router + the chosen expert's fc1 (+ act) of the block's rows, then fc2's partial
//              sums over them (W_fc2 transposed, (f, d)), times the gate, into the other residual
//
// With staging (sc.stg), the transposed rows a block adds come through shared memory: W_out's
// are copied before the barrier that opens SSM_OUT, fc2's right after the router, so they arrive
// while the SSM step / fc1 runs.
//
// The residual has two copies, cur and alt: IN_PROJ_X reads cur and copies it to alt; SSM_OUT adds
// to both; FC12 reads alt (nobody writes it in that stage) and adds to cur. So Mamba and MoE layers
// must alternate, starting with Mamba (the host checks). Sums land in any order (atomics).
#pragma once
#include "decode.cuh"
#include "ssm_step.cuh"

// Per-block scratch of the fused stages (dynamic shared memory): the block's list of (row, value)
// pairs (lmax of each) and, for rows_to_res, one row of partial sums per thread group.
struct Scratch {
    int* idx;
    float* val;
    float* red;
    int lmax;
    // staged rows of the transposed product (uint4 chunks, [list slot][chunk]), or null
    uint4* stg;
};

// The row of list slot q: the grid-stride row (b + (q / nw) · G) · nw + q % nw of warp q % nw in
// its (q / nw)-th pass, or -1 from m on. (SSM virtual blocks map channels the same way.)
__device__ __forceinline__ int slot_row(int q, int m) {
    const int nw = blockDim.x >> 5;
    const long long r = ((long long)(q / nw) * gridDim.x + blockIdx.x) * nw + q % nw;
    return r < m ? (int)r : -1;
}

// One vector reduction on sm_90+; four scalar atomics before (no `red` of vector types there).
__device__ __forceinline__ void red_add_v4(float* p, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
    atomicAdd(p + 2, c);
    atomicAdd(p + 3, d);
#else
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
#endif
}

// ra (and rb when given) (d) += g · Σ_{q < cnt} val[q] · Wt[idx[q], :] (+ bias, block 0), with one
// atomic per column (group of 4) per block. Wt: (rows, d) T. Threads take 16-byte column chunks;
// when the block has more threads than chunks, groups of threads split the list and their sums
// meet in sc.red first. vec: d · sizeof(T) is a multiple of 16 (else one column per chunk).
// Copies (cp.async) this thread's 16-byte chunks of the rows of list slots q < cnt (rows by
// slot_row(q, m), each d elements of Wt) into sc.stg[q · nch + c]: the (slot, chunk) pairs that
// rows_to_res reads in this same thread, so cp_async_wait_all suffices (no block barrier). Rows
// past m are zeros. Needs d · sizeof(T) a multiple of 16 and sc.stg.
template <typename T>
__device__ void stage_rows(const T* Wt, int d, int m, int cnt, const Scratch& sc) {
    constexpr int V = 16 / sizeof(T);
    const int nch = d / V, nt = blockDim.x, tid = threadIdx.x;
    const bool wide = nt >= nch;
    const int nsub = wide ? nt / nch : 1;
    const int sub = wide ? tid / nch : 0;
    if (sub < nsub)
        for (int c = wide ? tid % nch : tid; c < nch; c += wide ? nch : nt)
            for (int q = sub; q < cnt; q += nsub) {
                const int r = slot_row(q, m);
                uint4* dst = sc.stg + (size_t)q * nch + c;
                if (r >= 0)
                    cp_async16(dst, reinterpret_cast<const uint4*>(Wt) + (size_t)r * nch + c);
                else
                    *dst = make_uint4(0u, 0u, 0u, 0u);
            }
    asm volatile("cp.async.commit_group;" ::: "memory");
}

template <typename T>
__device__ void rows_to_res(const T* Wt, int d, const Scratch& sc, int cnt, float g, float* ra, float* rb, const T* bias,
                            int vec, bool staged) {
    if (cnt == 0 && (bias == nullptr || blockIdx.x != 0)) return;  // nothing to add (block-uniform)
    constexpr int V = 16 / sizeof(T);
    const int width = vec ? V : 1;
    const int nch = d / width, nt = blockDim.x, tid = threadIdx.x;
    const bool wide = nt >= nch;
    const int nsub = wide ? nt / nch : 1;
    const int sub = wide ? tid / nch : 0;
    if (staged) cp_async_wait_all();
    for (int c = wide ? tid % nch : tid; c < nch; c += wide ? nch : nt) {
        float acc[V];
#pragma unroll
        for (int k = 0; k < V; k++) acc[k] = 0.0f;
        if (sub < nsub) {
            if (staged) {
                for (int q = sub; q < cnt; q += nsub) {
                    const uint4 w = sc.stg[(size_t)q * nch + c];
                    const T* e = reinterpret_cast<const T*>(&w);
                    const float v = sc.val[q];
#pragma unroll
                    for (int k = 0; k < V; k++) acc[k] = fmaf(to_f(e[k]), v, acc[k]);
                }
            } else if (vec) {
                const uint4* base = reinterpret_cast<const uint4*>(Wt) + c;
                const size_t stride = (size_t)d / V;  // uint4 per row
                int q = sub;
                for (; q + 3 * nsub < cnt; q += 4 * nsub) {
                    uint4 w[4];
#pragma unroll
                    for (int u = 0; u < 4; u++) w[u] = ld_stream(base + (size_t)sc.idx[q + u * nsub] * stride);
#pragma unroll
                    for (int u = 0; u < 4; u++) {
                        const T* e = reinterpret_cast<const T*>(&w[u]);
                        const float v = sc.val[q + u * nsub];
#pragma unroll
                        for (int k = 0; k < V; k++) acc[k] = fmaf(to_f(e[k]), v, acc[k]);
                    }
                }
                for (; q < cnt; q += nsub) {
                    const uint4 w = ld_stream(base + (size_t)sc.idx[q] * stride);
                    const T* e = reinterpret_cast<const T*>(&w);
                    const float v = sc.val[q];
#pragma unroll
                    for (int k = 0; k < V; k++) acc[k] = fmaf(to_f(e[k]), v, acc[k]);
                }
            } else {
                for (int q = sub; q < cnt; q += nsub) acc[0] = fmaf(to_f(Wt[(size_t)sc.idx[q] * d + c]), sc.val[q], acc[0]);
            }
        }
        if (nsub > 1) {  // block-uniform: one pass of the loop per thread
            __syncthreads();
            if (sub > 0 && sub < nsub) {
#pragma unroll
                for (int k = 0; k < V; k++)
                    if (k < width) sc.red[((size_t)(sub - 1) * nch + c) * width + k] = acc[k];
            }
            __syncthreads();
            if (sub == 0)
                for (int s = 1; s < nsub; s++) {
#pragma unroll
                    for (int k = 0; k < V; k++)
                        if (k < width) acc[k] += sc.red[((size_t)(s - 1) * nch + c) * width + k];
                }
        }
        if (sub != 0) continue;
#pragma unroll
        for (int k = 0; k < V; k++) {
            acc[k] *= g;
            if (k < width && bias != nullptr && blockIdx.x == 0) acc[k] += to_f(bias[c * width + k]);
        }
        if (vec) {
#pragma unroll
            for (int k = 0; k < V; k += 4) {
                red_add_v4(ra + c * V + k, acc[k], acc[k + 1], acc[k + 2], acc[k + 3]);
                if (rb != nullptr) red_add_v4(rb + c * V + k, acc[k], acc[k + 1], acc[k + 2], acc[k + 3]);
            }
        } else {
            atomicAdd(ra + c, acc[0]);
            if (rb != nullptr) atomicAdd(rb + c, acc[0]);
        }
    }
}

// List slots of a block whose rows are blockIdx.x · nw + w + g · gridDim.x · nw (w < nw) for the g
// with a first row below m: nw per such g, capped at lmax (block-uniform).
__device__ __forceinline__ int list_len(int m, int lmax) {
    const int nwarps = blockDim.x >> 5;
    int groups = 0;
    for (long long r0 = (long long)blockIdx.x * nwarps; r0 < m; r0 += (long long)gridDim.x * nwarps) groups++;
    return min(groups * nwarps, lmax);
}

// Clears the block's (row, value) list (before a stage fills it; the stage's block barriers follow).
__device__ __forceinline__ void clear_list(const Scratch& sc) {
    for (int q = threadIdx.x; q < sc.lmax; q += blockDim.x) {
        sc.idx[q] = 0;
        sc.val[q] = 0.0f;
    }
}

// IN_PROJ_X. res: cur (read), alt (written: a copy of cur); Wx: (R2, di) T; dbcf: (R2) f32, zero.
template <typename T>
__device__ void in_proj_x_impl(const T* __restrict__ W, int M, int K, const float* res, const float* __restrict__ nw,
                               float eps, const T* __restrict__ bias, T* xz, int di, int KC, const float* conv,
                               const float* __restrict__ cw, const float* __restrict__ cb, T* vout, const T* __restrict__ Wx,
                               float* dbcf, float* alt, int R2, int vec, const Scratch& sc) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* xs = reinterpret_cast<T*>(smem_raw);
    __shared__ float red[33];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    clear_list(sc);
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < K; k += gridDim.x * blockDim.x) alt[k] = res[k];
    norm_prologue<T>(res, nw, nullptr, eps, 0, K, xs, red);
    int q = warp;
    for (int j = blockIdx.x * nwarps + warp; j < M; j += gridDim.x * nwarps, q += nwarps) {
        float a = round_to<T>(warp_dot<T>(W + (size_t)j * K, xs, 0, K, vec != 0));
        if (bias != nullptr) a = round_to<T>(a + to_f(bias[j]));
        if (lane == 0) {
            xz[j] = from_f<T>(a);
            if (j < di) {
                float acc = cb[j];
                for (int k = 0; k < KC - 1; k++) acc += conv[(size_t)j * KC + k + 1] * cw[(size_t)j * KC + k];
                acc += a * cw[(size_t)j * KC + KC - 1];
                const T v = from_f<T>(silu_f(acc));
                vout[j] = v;
                if (q < sc.lmax) {
                    sc.idx[q] = j;
                    sc.val[q] = to_f(v);
                }
            }
        }
    }
    __syncthreads();
    const int cnt = list_len(di, sc.lmax);
    // x_proj: dbcf[r] += Σ_{listed c} Wx[r, c] · v[c], 8 rows per warp in flight
    for (int r0 = warp; r0 < R2; r0 += 8 * nwarps) {
        float acc[8];
#pragma unroll
        for (int u = 0; u < 8; u++) acc[u] = 0.0f;
        for (int i = lane; i < cnt; i += 32) {
            const size_t col = (size_t)sc.idx[i];
            const float v = sc.val[i];
            T w[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int r = r0 + u * nwarps;
                w[u] = r < R2 ? Wx[(size_t)r * di + col] : from_f<T>(0.0f);
            }
#pragma unroll
            for (int u = 0; u < 8; u++) acc[u] = fmaf(to_f(w[u]), v, acc[u]);
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const float a = warp_sum(acc[u]);
            const int r = r0 + u * nwarps;
            if (lane == 0 && r < R2 && a != 0.0f) atomicAdd(dbcf + r, a);
        }
    }
}

// SSM_OUT: the SSM step of virtual blocks blockIdx.x, + gridDim.x, ... (nwarps channels each; dbc
// f32), then res_a and res_b += W_out · y over those channels (+ out bias, block 0).
template <typename T>
__device__ void ssm_out_impl(int di, int R, int N, int K, int nvb, const T* xz, float* conv, const float* cw,
                             const float* cb, const float* dbcf, const T* Wdt, const float* dt_bias, const float* A_log,
                             const float* Dp, float* h, T* y, float* telem, const T* Wout_t, float* ra, float* rb,
                             const T* out_b, int d, int vec, const Scratch& sc) {
    const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    clear_list(sc);
    int q = warp, cnt = 0;
    for (int vb = blockIdx.x; vb < nvb; vb += gridDim.x, q += nwarps, cnt += nwarps) {
        ssm_step_impl<T>(1, di, R, N, K, xz, 2 * di, conv, conv, cw, cb, dbcf, Wdt, dt_bias, A_log, Dp, h, h, y, telem, 1, vb);
        __syncthreads();  // y of this virtual block written (the block reads it back below)
        const int c = vb * nwarps + warp;
        if ((threadIdx.x & 31) == 0 && c < di && q < sc.lmax) {
            sc.idx[q] = c;
            sc.val[q] = to_f(y[c]);
        }
    }
    __syncthreads();
    // W_out's rows were staged before the barrier that opened this stage (persistent_impl)
    rows_to_res<T>(Wout_t, d, sc, min(cnt, sc.lmax), 1.0f, ra, rb, out_b, vec, sc.stg != nullptr && vec);
}

// FC12: router over norm(alt) (block 0 publishes the route and telemetry), the block's rows of the
// chosen expert's fc1 (+ act), then cur += σ(logit) · W_fc2 · h over those rows; block 0 also
// clears dbcf for the next Mamba layer.
template <typename T>
__device__ void fc12_impl(const float* __restrict__ Wr, const float* __restrict__ br, int E,
                          const unsigned long long* __restrict__ wtab, int* route, float* telem, int M, int K,
                          const float* alt, const float* __restrict__ nw, float eps, int epi, int act, int vec,
                          const unsigned long long* __restrict__ wtab2t, float* cur, float* dbcf, int R2, const Scratch& sc) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* xs = reinterpret_cast<T*>(smem_raw);
    __shared__ float red[33];
    __shared__ float part[32];
    __shared__ float logits[32];
    __shared__ int chosen;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    clear_list(sc);
    if (blockIdx.x == 0)
        for (int r = threadIdx.x; r < R2; r += blockDim.x) dbcf[r] = 0.0f;
    norm_prologue<T>(alt, nw, nullptr, eps, 0, K, xs, red);
    const int best = router_top1<T>(Wr, br, E, K, xs, part, logits, &chosen);
    if (blockIdx.x == 0 && threadIdx.x == 0) publish_route(route, telem, logits, E, best, 0u);
    const float gate = sigmoid_f(logits[best]);
    const T* w = reinterpret_cast<const T*>(wtab[best]);
    const bool staged = sc.stg != nullptr && vec;
    // fc2's rows for this block's fc1 rows stream into shared memory while fc1 runs
    if (staged) stage_rows<T>(reinterpret_cast<const T*>(wtab2t[best]), K, M, list_len(M, sc.lmax), sc);
    int q = warp;
    for (int j = blockIdx.x * nwarps + warp; j < M; j += gridDim.x * nwarps, q += nwarps) {
        float hv;
        if (epi == 1) {
            const float2 gu = warp_dot2<T>(w + (size_t)j * K, w + (size_t)(j + M) * K, xs, K, vec != 0);
            hv = round_to<T>(round_to<T>(act_f(round_to<T>(gu.x), act)) * round_to<T>(gu.y));
        } else {
            hv = round_to<T>(act_f(round_to<T>(warp_dot<T>(w + (size_t)j * K, xs, 0, K, vec != 0)), act));
        }
        if (lane == 0 && q < sc.lmax) {
            sc.idx[q] = j;
            sc.val[q] = hv;
        }
    }
    __syncthreads();
    rows_to_res<T>(reinterpret_cast<const T*>(wtab2t[best]), K, sc, list_len(M, sc.lmax), gate, cur, nullptr, nullptr, vec,
                   staged);
}

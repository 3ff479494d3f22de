// The whole batch-1 decode step as ONE persistent kernel per token: every block walks the same
// table of stages (built by src/ops/decode/persistent.rs) and runs each stage's share with the
// device functions of the multi-kernel decoder (decode.cuh, ssm_step.cuh; they loop over rows
// grid-stride), with a grid-wide barrier between dependent stages instead of a kernel boundary.
//
//   embed | per Mamba layer: in_proj+norm+conv | x_proj | SSM step | out_proj+residual
//         | per MoE layer: router+fc1+act | fc2+gate+residual | head+argmax candidates | final
//
// The grid must be co-resident (one cooperative launch, or a plain launch of at most the blocks
// the GPU holds at once). Between stage s and s+1 each block arrives at the barrier, then asks L2
// for its own rows of the static weights of the stages up to `pf_end` of stage s+1 (a window of
// bytes chosen on the host), then waits: HBM keeps streaming while the grid synchronises. The
// expert of a MoE layer is known only after its router, so fc2's rows are asked for right after
// the router, before fc1 runs. The stage table is copied into shared memory once per launch.
// With DecodeOpts::fuse the step has three stages per Mamba + MoE pair instead of six
// (persistent_fused.cuh).
#define BM_NO_PDL
#include "decode.cuh"
#include "persistent_fused.cuh"
#include "ssm_step.cuh"

enum StageOp {
    OP_EMBED = 0,
    OP_IN_PROJ = 1,
    OP_X_PROJ = 2,
    OP_SSM = 3,
    OP_RESID = 4,
    OP_FC1 = 5,
    OP_HEAD = 6,
    OP_FINAL = 7,
    OP_IN_PROJ_X = 8,
    OP_SSM_OUT = 9,
    OP_FC12 = 10
};

// One stage: pointers p, integers i, floats f (what each op reads is listed in run_stage), and
// pf_end: the L2 window when this stage starts (stages before pf_end have been asked for).
struct Stage {
    unsigned long long p[16];
    int i[10];
    float f[2];
    int op;
    int pf_end;
    int pad[2];
};
static_assert(sizeof(Stage) == 192, "Stage layout is shared with src/ops/decode/persistent.rs");

// Longest barrier wait (clock cycles, ~1 s) before the kernel traps instead of hanging.
#define BARRIER_TIMEOUT_CYCLES (1ll << 31)

// Grid barrier on a 64-bit arrival counter that only grows: the launch's blocks add 1 each, and
// a barrier is passed once the counter reaches the next multiple of gridDim.x. No reset, so the
// same counter serves every barrier, token and graph replay (every launch uses the same grid).
// Called by thread 0 after __syncthreads(): the fence releases the block's writes.
__device__ __forceinline__ unsigned long long bar_arrive(unsigned long long* count) {
    unsigned long long old;
    __threadfence();
    asm volatile("atom.add.release.gpu.global.u64 %0, [%1], 1;" : "=l"(old) : "l"(count) : "memory");
    return (old / gridDim.x + 1) * gridDim.x;
}

// Thread 0: waits until every block has arrived (relaxed polling); the acquire load and fence
// then order the block's later reads after the other blocks' writes (dropping stale L1 lines);
// __syncthreads() follows, so the whole block reads after them.
__device__ __forceinline__ void bar_wait(const unsigned long long* count, unsigned long long target) {
    const long long t0 = clock64();
    for (;;) {
        unsigned long long v;
        asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(count) : "memory");
        if (v >= target) break;
        if (clock64() - t0 > BARRIER_TIMEOUT_CYCLES) __trap();  // a grid that is not co-resident
    }
    asm volatile("{ .reg .u64 t; ld.acquire.gpu.global.u64 t, [%0]; }" ::"l"(count) : "memory");
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
}

// The K slice and virtual block of a split-K residual product: nbx = gridDim.x / nsplit blocks
// per slice; blocks past nbx · nsplit sit out. Returns false for those.
__device__ __forceinline__ bool resid_block(int nsplit, int& bx, int& nbx, int& split) {
    nbx = gridDim.x / nsplit;
    const int v = blockIdx.x;
    if (v >= nbx * nsplit) return false;
    bx = v % nbx;
    split = v / nbx;
    return true;
}

// Asks L2 for this block's rows of a residual product (as gemv_resid_impl splits it).
template <typename T>
__device__ void prefetch_resid(const T* W, int M, int K, int nsplit) {
    int bx, nbx, split;
    if (W == nullptr || !resid_block(nsplit, bx, nbx, split)) return;
    constexpr int V = 16 / sizeof(T);
    int per = (K + nsplit - 1) / nsplit;
    per = (per + V - 1) / V * V;
    const int k0 = min(K, split * per), k1 = min(K, k0 + per);
    const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int j = bx * nwarps + warp; j < M; j += nbx * nwarps) warp_prefetch(W + (size_t)j * K + k0, (size_t)(k1 - k0) * sizeof(T));
}

// Asks L2 for this block's rows of rows-per-warp product (in_proj, head): the block's warps take
// rows b·nw .. b·nw + nw - 1 of every group of gridDim.x · nw rows; `groups` of them (0: all).
template <typename T>
__device__ void prefetch_warp_rows(const T* W, int M, int K, int groups) {
    const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int g = warp; groups == 0 || g < groups; g += nwarps) {
        const long long r0 = ((long long)g * gridDim.x + blockIdx.x) * nwarps;
        if (r0 >= M) break;
        const int rows = min((long long)nwarps, M - r0);
        warp_prefetch(W + r0 * K, (size_t)rows * K * sizeof(T));
    }
}

// Asks L2 for this block's share of the static weights (and the state) of stage s.
template <typename T>
__device__ void prefetch_stage(const Stage& s) {
    const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    switch (s.op) {
    case OP_IN_PROJ:
    case OP_IN_PROJ_X:
        prefetch_warp_rows<T>(reinterpret_cast<const T*>(s.p[0]), s.i[0], s.i[1], 0);
        break;
    case OP_X_PROJ: {
        const T* W = reinterpret_cast<const T*>(s.p[0]);
        const int M = s.i[0], K = s.i[1];
        for (int j = blockIdx.x + warp * gridDim.x; j < M; j += nwarps * gridDim.x) warp_prefetch(W + (size_t)j * K, (size_t)K * sizeof(T));
        break;
    }
    case OP_SSM:
    case OP_SSM_OUT: {
        const int di = s.i[0], R = s.i[1], N = s.i[2], nvb = s.i[4];
        for (int vb = blockIdx.x; vb < nvb; vb += gridDim.x) {
            const int c0 = vb * nwarps, n = min(nwarps, di - c0);
            if (warp == 0) warp_prefetch(reinterpret_cast<const T*>(s.p[5]) + (size_t)c0 * R, (size_t)n * R * sizeof(T));
            if (warp == 1) warp_prefetch(reinterpret_cast<const float*>(s.p[7]) + (size_t)c0 * N, (size_t)n * N * 4);
            if (warp == min(2, nwarps - 1)) warp_prefetch(reinterpret_cast<const float*>(s.p[9]) + (size_t)c0 * N, (size_t)n * N * 4);
        }
        break;
    }
    case OP_RESID:
        prefetch_resid<T>(reinterpret_cast<const T*>(s.p[0]), s.i[0], s.i[1], s.i[3]);
        break;
    case OP_FC1:
    case OP_FC12:
        // the router's rows (f32); the expert is not known yet
        if (blockIdx.x == 0 && warp < s.i[0]) warp_prefetch(reinterpret_cast<const float*>(s.p[0]) + (size_t)warp * s.i[2], (size_t)s.i[2] * 4);
        break;
    case OP_HEAD:
        prefetch_warp_rows<T>(reinterpret_cast<const T*>(s.p[0]), s.i[0], s.i[1], 1);
        break;
    default:
        break;
    }
}

// Asks L2 for stages [from, to) (up to n); returns the new high-water mark.
template <typename T>
__device__ __forceinline__ int prefetch_window(const Stage* tab, int n, int from, int to) {
    to = min(to, n);
    for (int t = from; t < to; t++) prefetch_stage<T>(tab[t]);
    return max(from, to);
}

template <typename T>
__device__ void run_stage(const Stage& s, int prefetch, const Scratch& sc) {
    const unsigned long long* p = s.p;
    const int* i = s.i;
    switch (s.op) {
    case OP_EMBED:  // p: emb, tok, res, dbcf (fused: cleared by block 0); i: d, dbcf length
        embed_impl<T>(reinterpret_cast<const T*>(p[0]), reinterpret_cast<const unsigned*>(p[1]), i[0], reinterpret_cast<float*>(p[2]));
        if (p[3] != 0 && blockIdx.x == 0)
            for (int r = threadIdx.x; r < i[1]; r += blockDim.x) reinterpret_cast<float*>(p[3])[r] = 0.0f;
        break;
    case OP_IN_PROJ_X:  // p: W, res, norm, bias, xz, conv, cw, cb, v, Wx, dbcf, alt; i: M, K, di, KC, vec, R2; f: eps
        in_proj_x_impl<T>(reinterpret_cast<const T*>(p[0]), i[0], i[1], reinterpret_cast<const float*>(p[1]),
                          reinterpret_cast<const float*>(p[2]), s.f[0], reinterpret_cast<const T*>(p[3]),
                          reinterpret_cast<T*>(p[4]), i[2], i[3], reinterpret_cast<const float*>(p[5]),
                          reinterpret_cast<const float*>(p[6]), reinterpret_cast<const float*>(p[7]),
                          reinterpret_cast<T*>(p[8]), reinterpret_cast<const T*>(p[9]), reinterpret_cast<float*>(p[10]),
                          reinterpret_cast<float*>(p[11]), i[5], i[4], sc);
        break;
    case OP_SSM_OUT:  // p: xz, conv, cw, cb, dbcf, Wdt, dt_bias, A_log, D, h, y, telem, Wout_t, res a, res b, out bias;
                      // i: di, R, N, K, virtual blocks, d, vec (d)
        ssm_out_impl<T>(i[0], i[1], i[2], i[3], i[4], reinterpret_cast<const T*>(p[0]), reinterpret_cast<float*>(p[1]),
                        reinterpret_cast<const float*>(p[2]), reinterpret_cast<const float*>(p[3]),
                        reinterpret_cast<const float*>(p[4]), reinterpret_cast<const T*>(p[5]),
                        reinterpret_cast<const float*>(p[6]), reinterpret_cast<const float*>(p[7]),
                        reinterpret_cast<const float*>(p[8]), reinterpret_cast<float*>(p[9]), reinterpret_cast<T*>(p[10]),
                        reinterpret_cast<float*>(p[11]), reinterpret_cast<const T*>(p[12]), reinterpret_cast<float*>(p[13]),
                        reinterpret_cast<float*>(p[14]), reinterpret_cast<const T*>(p[15]), i[5], i[6], sc);
        break;
    case OP_FC12:  // p: Wr, br, fc1 wtab, route, telem, alt, norm, fc2ᵀ wtab, cur, dbcf; i: E, M, K, epi, act, vec, R2; f: eps
        fc12_impl<T>(reinterpret_cast<const float*>(p[0]), reinterpret_cast<const float*>(p[1]), i[0],
                     reinterpret_cast<const unsigned long long*>(p[2]), reinterpret_cast<int*>(p[3]),
                     reinterpret_cast<float*>(p[4]), i[1], i[2], reinterpret_cast<const float*>(p[5]),
                     reinterpret_cast<const float*>(p[6]), s.f[0], i[3], i[4], i[5],
                     reinterpret_cast<const unsigned long long*>(p[7]), reinterpret_cast<float*>(p[8]),
                     reinterpret_cast<float*>(p[9]), i[6], sc);
        break;
    case OP_IN_PROJ:  // p: W, res, norm, bias, xz, conv, cw, cb, v; i: M, K, di, KC, vec; f: eps
        in_proj_conv_impl<T, false>(reinterpret_cast<const T*>(p[0]), i[0], i[1], reinterpret_cast<const float*>(p[1]),
                                    reinterpret_cast<const float*>(p[2]), s.f[0], reinterpret_cast<const T*>(p[3]),
                                    reinterpret_cast<T*>(p[4]), i[2], i[3], reinterpret_cast<const float*>(p[5]),
                                    reinterpret_cast<const float*>(p[6]), reinterpret_cast<const float*>(p[7]),
                                    reinterpret_cast<T*>(p[8]), i[4], 0);
        break;
    case OP_X_PROJ:  // p: W, x, out; i: M, K, vec
        gemv_rows_impl<T, false>(reinterpret_cast<const T*>(p[0]), i[0], i[1], reinterpret_cast<const T*>(p[1]),
                                 reinterpret_cast<T*>(p[2]), i[2], 0);
        break;
    case OP_SSM:  // p: xz, conv, cw, cb, dbc, Wdt, dt_bias, A_log, D, h, y, telem; i: di, R, N, K, virtual blocks
        for (int vb = blockIdx.x; vb < i[4]; vb += gridDim.x) {
            float* conv = reinterpret_cast<float*>(p[1]);
            float* h = reinterpret_cast<float*>(p[9]);
            ssm_step_impl<T>(1, i[0], i[1], i[2], i[3], reinterpret_cast<const T*>(p[0]), 2 * i[0], conv, conv,
                             reinterpret_cast<const float*>(p[2]), reinterpret_cast<const float*>(p[3]),
                             reinterpret_cast<const T*>(p[4]), reinterpret_cast<const T*>(p[5]),
                             reinterpret_cast<const float*>(p[6]), reinterpret_cast<const float*>(p[7]),
                             reinterpret_cast<const float*>(p[8]), h, h, reinterpret_cast<T*>(p[10]),
                             reinterpret_cast<float*>(p[11]), 1, vb);
            __syncthreads();  // the telemetry partials in shared memory are free again
        }
        break;
    case OP_RESID: {  // p: W, wtab, route, x, res, gate, bias; i: M, K, vec, nsplit
        int bx, nbx, split;
        if (resid_block(i[3], bx, nbx, split))
            gemv_resid_impl<T, false>(reinterpret_cast<const T*>(p[0]), reinterpret_cast<const unsigned long long*>(p[1]),
                                      reinterpret_cast<const int*>(p[2]), i[0], i[1], reinterpret_cast<const T*>(p[3]),
                                      reinterpret_cast<float*>(p[4]), reinterpret_cast<const float*>(p[5]),
                                      reinterpret_cast<const T*>(p[6]), i[2], 0, bx, nbx, split, i[3]);
        break;
    }
    case OP_FC1: {  // p: Wr, br, wtab, route, telem, res, norm, out, fc2 wtab; i: E, M, K, epi, act, vec, fc2 M, fc2 K, fc2 nsplit; f: eps
        const unsigned long long* tab2 = reinterpret_cast<const unsigned long long*>(p[8]);
        const int m2 = i[6], k2 = i[7], s2 = i[8];
        moe_fc1_impl<T>(reinterpret_cast<const float*>(p[0]), reinterpret_cast<const float*>(p[1]), i[0],
                        reinterpret_cast<const unsigned long long*>(p[2]), reinterpret_cast<int*>(p[3]),
                        reinterpret_cast<float*>(p[4]), i[1], i[2], reinterpret_cast<const float*>(p[5]),
                        reinterpret_cast<const float*>(p[6]), s.f[0], reinterpret_cast<T*>(p[7]), i[3], i[4], i[5],
                        [&](int e) {
                            if (prefetch) prefetch_resid<T>(reinterpret_cast<const T*>(tab2[e]), m2, k2, s2);
                        });
        break;
    }
    case OP_HEAD:  // p: E, res, lw, lb, logits, pv, pi, step, seed; i: V, K, vec; f: eps, temperature
        head_impl<T, false>(reinterpret_cast<const T*>(p[0]), i[0], i[1], reinterpret_cast<const float*>(p[1]),
                            reinterpret_cast<const float*>(p[2]), reinterpret_cast<const float*>(p[3]), s.f[0],
                            reinterpret_cast<float*>(p[4]), reinterpret_cast<float*>(p[5]), reinterpret_cast<int*>(p[6]),
                            s.f[1], p[8], reinterpret_cast<const unsigned*>(p[7]), i[2], 0);
        break;
    case OP_FINAL:  // p: pv, pi, tok, step, out, parts; i: candidates, Mamba layers, SSM blocks
        if (blockIdx.x == 0)
            sample_final_impl(reinterpret_cast<const float*>(p[0]), reinterpret_cast<const int*>(p[1]), i[0],
                              reinterpret_cast<unsigned*>(p[2]), reinterpret_cast<unsigned*>(p[3]),
                              reinterpret_cast<unsigned*>(p[4]), reinterpret_cast<const float*>(p[5]), i[1], i[2]);
        break;
    default:
        break;
    }
}

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// stages: n stages (global memory, 16-byte aligned); bar: the arrival counter; table_off: where
// the stage table starts in dynamic shared memory (after the normalised-input buffer);
// prefetch: 0 turns the L2 requests off; scratch_off, lmax: the fused stages' scratch (after the
// table) and its list length; stage_off: where the fused stages stage rows (0: they do not); timing: null, or n + 1 words where block 0 writes the global time
// (ns) at which each stage starts and the step ends.
template <typename T>
__device__ void persistent_impl(const Stage* __restrict__ stages, int n, unsigned long long* bar, int table_off, int prefetch,
                                int scratch_off, int lmax, int stage_off, unsigned long long* timing) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    Stage* tab = reinterpret_cast<Stage*>(smem_raw + table_off);
    Scratch sc;
    sc.idx = reinterpret_cast<int*>(smem_raw + scratch_off);
    sc.val = reinterpret_cast<float*>(sc.idx + lmax);
    sc.red = sc.val + lmax;
    sc.lmax = lmax;
    sc.stg = stage_off != 0 ? reinterpret_cast<uint4*>(smem_raw + stage_off) : nullptr;
    const bool timed = timing != nullptr && blockIdx.x == 0 && threadIdx.x == 0;
    {
        const uint4* src = reinterpret_cast<const uint4*>(stages);
        uint4* dst = reinterpret_cast<uint4*>(tab);
        const int words = n * (int)(sizeof(Stage) / 16);
        for (int w = threadIdx.x; w < words; w += blockDim.x) dst[w] = src[w];
    }
    __syncthreads();
    int done = prefetch ? prefetch_window<T>(tab, n, 0, tab[0].pf_end) : 0;
    for (int s = 0; s < n; s++) {
        if (timed) timing[s] = global_ns();
        run_stage<T>(tab[s], prefetch, sc);
        if (s + 1 == n) {
            if (timed) timing[n] = global_ns();
            break;
        }
        const Stage& nx = tab[s + 1];
        if (sc.stg != nullptr && nx.op == OP_SSM_OUT && nx.i[6] != 0)  // W_out's rows: static, copy now
            stage_rows<T>(reinterpret_cast<const T*>(nx.p[12]), nx.i[5], nx.i[0],
                          min((nx.i[4] - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x, sc.lmax / ((int)blockDim.x >> 5)) *
                              ((int)blockDim.x >> 5),
                          sc);
        __syncthreads();
        unsigned long long target = 0;
        if (threadIdx.x == 0) target = bar_arrive(bar);
        if (prefetch) done = prefetch_window<T>(tab, n, done, tab[s + 1].pf_end);
        if (threadIdx.x == 0) bar_wait(bar, target);
        __syncthreads();
    }
}

#define PERSISTENT_KERNEL(T, S)                                                                                       \
    extern "C" __global__ void __launch_bounds__(512)                                                                 \
        persistent_##S(const Stage* stages, int n, unsigned long long* bar, int table_off, int prefetch, int scratch_off, \
                       int lmax, int stage_off, unsigned long long* timing) {                                           \
        persistent_impl<T>(stages, n, bar, table_off, prefetch, scratch_off, lmax, stage_off, timing);                \
    }

INSTANTIATE_T(PERSISTENT_KERNEL)

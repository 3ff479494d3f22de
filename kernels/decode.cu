// Batch-1 decode kernels: the extern entry points of the device functions in decode.cuh (what
// each computes is described there), launched one per grid-wide dependency by
// src/ops/decode/launches.rs, with programmatic dependent launch.
#include "decode.cuh"

extern "C" __global__ void sample_final(const float* __restrict__ pv, const int* __restrict__ pi, int n,
                                        unsigned int* __restrict__ tok, unsigned int* __restrict__ step,
                                        unsigned int* __restrict__ out, const float* __restrict__ parts, int n_layers,
                                        int nblk) {
    pdl_wait();
    pdl_trigger();
    sample_final_impl(pv, pi, n, tok, step, out, parts, n_layers, nblk);
}

// Writes a token id into the input slot (used to start a decode from a host-chosen token).
extern "C" __global__ void set_token(unsigned int* tok, unsigned int id) { tok[0] = id; }

#define DECODE_KERNELS(T, S)                                                                                            \
    extern "C" __global__ void embed_##S(const T* emb, const unsigned int* tok, int d, float* res) {                   \
        embed_impl<T>(emb, tok, d, res);                                                                                \
    }                                                                                                                   \
    extern "C" __global__ void in_proj_conv_##S(const T* W, int M, int K, const float* res, const float* nw, float eps, \
                                                const T* bias, T* xz, int di, int KC, const float* conv,                \
                                                const float* cw, const float* cb, T* vout, int vec) {                   \
        in_proj_conv_impl<T>(W, M, K, res, nw, eps, bias, xz, di, KC, conv, cw, cb, vout, vec);                         \
    }                                                                                                                   \
    extern "C" __global__ void gemv_rows_##S(const T* W, int M, int K, const T* x, T* out, int vec) {                   \
        gemv_rows_impl<T>(W, M, K, x, out, vec);                                                                        \
    }                                                                                                                   \
    extern "C" __global__ void moe_fc1_##S(const float* Wr, const float* br, int E, const unsigned long long* wtab,      \
                                           int* route, float* telem, int M, int K, const float* res, const float* nw,   \
                                           float eps, T* out, int epi, int act, int vec) {                              \
        moe_fc1_impl<T>(Wr, br, E, wtab, route, telem, M, K, res, nw, eps, out, epi, act, vec);                         \
    }                                                                                                                   \
    extern "C" __global__ void gemv_resid_##S(const T* W, const unsigned long long* wtab, const int* route, int M,      \
                                              int K, const T* x, float* res, const float* gate, const T* bias,          \
                                              int vec) {                                                                \
        gemv_resid_impl<T>(W, wtab, route, M, K, x, res, gate, bias, vec, blockIdx.x, gridDim.x, blockIdx.y,            \
                           gridDim.y);                                                                                  \
    }                                                                                                                   \
    extern "C" __global__ void head_##S(const T* E, int V, int K, const float* res, const float* lw, const float* lb,    \
                                        float eps, float* logits, float* pv, int* pi, int vec) {                        \
        head_impl<T>(E, V, K, res, lw, lb, eps, logits, pv, pi, vec);                                                   \
    }

INSTANTIATE_T(DECODE_KERNELS)

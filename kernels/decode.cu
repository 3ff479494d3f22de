// Batch-1 decode kernels: the extern entry points of the device functions in decode.cuh (what
// each computes is described there), launched one per grid-wide dependency by
// src/runtime/decode/launches.rs, with programmatic dependent launch. These read dense weights
// (`const T*`); the params structs' `q` (a packed matrix) is for the twins in qgemv.cu, null here.
#include "decode.cuh"

extern "C" __global__ void sample_final(const SampleFinalParams p) {
    pdl_wait();
    pdl_trigger();
    sample_final_impl(p.pv, p.pi, p.n, p.tok, p.step, p.out, p.parts, p.n_layers, p.nblk);
}

// Writes a token id into the input slot (used to start a decode from a host-chosen token).
extern "C" __global__ void set_token(const SetTokenParams p) { p.tok[0] = p.id; }

#define DECODE_KERNELS(T, S)                                                                                            \
    extern "C" __global__ void embed_##S(const EmbedParams<T> p) { embed_impl<T>(p.emb, p.tok, p.d, p.res); }          \
    extern "C" __global__ void in_proj_conv_##S(const InProjConvParams<T> p) {                                          \
        in_proj_conv_impl<T>(p.W, p.M, p.K, p.res, p.nw, p.eps, p.bias, p.xz, p.di, p.KC, p.conv, p.cw, p.cb, p.vout,   \
                             p.vec);                                                                                    \
    }                                                                                                                   \
    extern "C" __global__ void gemv_rows_##S(const GemvRowsParams<T> p) {                                               \
        gemv_rows_impl<T>(p.W, p.M, p.K, p.x, p.out, p.vec);                                                            \
    }                                                                                                                   \
    extern "C" __global__ void moe_fc1_##S(const MoeFc1Params<T> p) {                                                   \
        moe_fc1_impl<T>(p.Wr, p.br, p.E, p.wtab, p.route, p.telem, p.M, p.K, p.res, p.nw, p.eps, p.out, p.epi, p.act,   \
                        p.vec);                                                                                         \
    }                                                                                                                   \
    extern "C" __global__ void gemv_resid_##S(const GemvResidParams<T> p) {                                             \
        gemv_resid_impl<T>(p.W, p.wtab, p.route, p.M, p.K, p.x, p.res, p.gate, p.bias, p.vec, blockIdx.x, gridDim.x,    \
                           blockIdx.y, gridDim.y);                                                                      \
    }                                                                                                                   \
    extern "C" __global__ void head_##S(const HeadParams<T> p) {                                                        \
        head_impl<T>(p.E, p.V, p.K, p.res, p.lw, p.lb, p.eps, p.logits, p.pv, p.pi, p.vec);                             \
    }

INSTANTIATE_T(DECODE_KERNELS)

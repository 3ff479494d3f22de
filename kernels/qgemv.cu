// Batch-1 decode kernels over packed weights (`--quant`, kernels/qweight.cuh): the kernel bodies
// of decode.cuh instantiated with a packed format's rows instead of dense `const T*` ones, T being
// the model's dtype (activations, outputs). Entry points `{fmt}_{kernel}_{dtype}`, fmt one of
// int8, fp8, q4 (the q4 group is the runtime q.gshift: 6 or 7); each takes the params struct of
// its dense twin in decode.cu (kernels/params.cuh) and reads the matrix from its `q` (PackedRows:
// codes, f16 scales, for a table launch the experts' scales pointers beside wtab's codes
// pointers, the q4 group's log2) instead of the dense pointer, which is null.
// Launched by src/runtime/decode/launches.rs in place of the dense kernel of a quantised linear.
#include "decode.cuh"
#include "qweight.cuh"

// The matrix of a launch's `q` as format F's rows.
template <typename F>
__device__ __forceinline__ QRows<F> qrows(const PackedRows& q) {
    return QRows<F>{q.codes, q.scales, q.stab, q.gshift};
}

#define QDECODE_KERNELS(T, S, F, FN)                                                                                    \
    extern "C" __global__ void FN##_embed_##S(const EmbedParams<T> p) {                                                 \
        embed_impl<T>(qrows<F>(p.q), p.tok, p.d, p.res);                                                                \
    }                                                                                                                   \
    extern "C" __global__ void FN##_in_proj_conv_##S(const InProjConvParams<T> p) {                                     \
        in_proj_conv_impl<T>(qrows<F>(p.q), p.M, p.K, p.res, p.nw, p.eps, p.bias, p.xz, p.di, p.KC, p.conv, p.cw, p.cb, \
                             p.vout, p.vec);                                                                            \
    }                                                                                                                   \
    extern "C" __global__ void FN##_gemv_rows_##S(const GemvRowsParams<T> p) {                                          \
        gemv_rows_impl<T>(qrows<F>(p.q), p.M, p.K, p.x, p.out, p.vec);                                                  \
    }                                                                                                                   \
    extern "C" __global__ void FN##_moe_fc1_##S(const MoeFc1Params<T> p) {                                              \
        moe_fc1_impl<T, QRows<F>>(p.Wr, p.br, p.E, p.wtab, p.route, p.telem, p.M, p.K, p.res, p.nw, p.eps, p.out,       \
                                  p.epi, p.act, p.vec, qrows<F>(p.q));                                                  \
    }                                                                                                                   \
    extern "C" __global__ void FN##_gemv_resid_##S(const GemvResidParams<T> p) {                                        \
        gemv_resid_impl<T>(qrows<F>(p.q), p.wtab, p.route, p.M, p.K, p.x, p.res, p.gate, p.bias, p.vec, blockIdx.x,     \
                           gridDim.x, blockIdx.y, gridDim.y);                                                           \
    }                                                                                                                   \
    extern "C" __global__ void FN##_head_##S(const HeadParams<T> p) {                                                   \
        head_impl<T>(qrows<F>(p.q), p.V, p.K, p.res, p.lw, p.lb, p.eps, p.logits, p.pv, p.pi, p.vec);                   \
    }

#define QDECODE_FORMATS(T, S)                                                                                           \
    QDECODE_KERNELS(T, S, FmtInt8, int8) QDECODE_KERNELS(T, S, FmtFp8, fp8) QDECODE_KERNELS(T, S, FmtQ4, q4)

INSTANTIATE_T(QDECODE_FORMATS)

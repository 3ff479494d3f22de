// Batch-1 decode kernels over packed weights (`--quant`, kernels/qweight.cuh): the kernel bodies
// of decode.cuh instantiated with a packed format's rows instead of dense `const T*` ones, T being
// the model's dtype (activations, outputs). Entry points `{fmt}_{kernel}_{dtype}`, fmt one of
// int8, fp8, q4 (the q4 group is the runtime gshift: 6 or 7); each takes the arguments of its
// dense twin in decode.cu, with the codes where the dense one takes the weights (u8 rows) and
// three more at the end:
//   Ws     the matrix's f16 scales (null for a table launch)
//   stab   with wtab (expert tables): the scales pointers, laid out as wtab's codes pointers
//   gshift log2 of the q4 group (ignored by int8 and fp8)
// Launched by src/runtime/decode/launches.rs in place of the dense kernel of a quantised linear.
#include "decode.cuh"
#include "qweight.cuh"

#define QDECODE_KERNELS(T, S, F, FN)                                                                                    \
    extern "C" __global__ void FN##_embed_##S(const unsigned char* emb, const unsigned int* tok, int d, float* res,     \
                                              const f16* Ws, const unsigned long long* stab, int gshift) {              \
        embed_impl<T>(QRows<F>{emb, Ws, stab, gshift}, tok, d, res);                                                    \
    }                                                                                                                   \
    extern "C" __global__ void FN##_in_proj_conv_##S(const unsigned char* W, int M, int K, const float* res,            \
                                                     const float* nw, float eps, const T* bias, T* xz, int di, int KC,  \
                                                     const float* conv, const float* cw, const float* cb, T* vout,      \
                                                     int vec, const f16* Ws, const unsigned long long* stab,            \
                                                     int gshift) {                                                      \
        in_proj_conv_impl<T>(QRows<F>{W, Ws, stab, gshift}, M, K, res, nw, eps, bias, xz, di, KC, conv, cw, cb, vout,   \
                             vec);                                                                                      \
    }                                                                                                                   \
    extern "C" __global__ void FN##_gemv_rows_##S(const unsigned char* W, int M, int K, const T* x, T* out, int vec,    \
                                                  const f16* Ws, const unsigned long long* stab, int gshift) {          \
        gemv_rows_impl<T>(QRows<F>{W, Ws, stab, gshift}, M, K, x, out, vec);                                            \
    }                                                                                                                   \
    extern "C" __global__ void FN##_moe_fc1_##S(const float* Wr, const float* br, int E, const unsigned long long* wtab, \
                                                int* route, float* telem, int M, int K, const float* res,               \
                                                const float* nw, float eps, T* out, int epi, int act, int vec,          \
                                                const f16* Ws, const unsigned long long* stab, int gshift) {            \
        moe_fc1_impl<T, QRows<F>>(Wr, br, E, wtab, route, telem, M, K, res, nw, eps, out, epi, act, vec,               \
                                  QRows<F>{nullptr, Ws, stab, gshift});                                                 \
    }                                                                                                                   \
    extern "C" __global__ void FN##_gemv_resid_##S(const unsigned char* W, const unsigned long long* wtab,              \
                                                   const int* route, int M, int K, const T* x, float* res,              \
                                                   const float* gate, const T* bias, int vec, const f16* Ws,            \
                                                   const unsigned long long* stab, int gshift) {                        \
        gemv_resid_impl<T>(QRows<F>{W, Ws, stab, gshift}, wtab, route, M, K, x, res, gate, bias, vec, blockIdx.x,       \
                           gridDim.x, blockIdx.y, gridDim.y);                                                           \
    }                                                                                                                   \
    extern "C" __global__ void FN##_head_##S(const unsigned char* E, int V, int K, const float* res, const float* lw,   \
                                             const float* lb, float eps, float* logits, float* pv, int* pi, int vec,    \
                                             const f16* Ws, const unsigned long long* stab, int gshift) {               \
        head_impl<T>(QRows<F>{E, Ws, stab, gshift}, V, K, res, lw, lb, eps, logits, pv, pi, vec);                       \
    }

#define QDECODE_FORMATS(T, S)                                                                                           \
    QDECODE_KERNELS(T, S, FmtInt8, int8) QDECODE_KERNELS(T, S, FmtFp8, fp8) QDECODE_KERNELS(T, S, FmtQ4, q4)

INSTANTIATE_T(QDECODE_FORMATS)

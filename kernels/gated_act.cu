// The gated activation of an expert MLP as an autograd op (twin: `Mlp::forward`'s tensor ops,
// two narrows, gelu_erf or SiLU and a product):
//
//   gated_act_fwd_T   h[r, j] = act(a[r, j]) · a[r, f + j]                 a (n, 2f), h (n, f)
//   gated_act_bwd_T   da[r, j] = dh[r, j] · a[r, f + j] · act'(a[r, j]),
//                     da[r, f + j] = dh[r, j] · act(a[r, j])                dh (n, f), da (n, 2f)
//
// act: 0 = GELU (erf form), 1 = SiLU (as `act_f` in common.cuh). Math in f32, one rounding to T
// per stored value. Threads over the n·f gate positions, grid-stride.
#include "common.cuh"

// d/dx of act_f(x, act).
__device__ __forceinline__ float act_grad_f(float x, int act) {
    if (act == 0) {
        // ½(1 + erf(x/√2)) + x·φ(x), φ(x) = e^{−x²/2}/√(2π)
        return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) + x * 0.39894228040143268f * expf(-0.5f * x * x);
    }
    const float s = 1.0f / (1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
}

template <typename T>
__device__ void gated_act_fwd(long long n, int f, int act, const T* __restrict__ a, T* __restrict__ h) {
    const long long total = n * f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / f;
        const int j = (int)(i - r * f);
        const T* row = a + r * 2 * f;
        h[i] = from_f<T>(act_f(to_f(row[j]), act) * to_f(row[f + j]));
    }
}

template <typename T>
__device__ void gated_act_bwd(long long n, int f, int act, const T* __restrict__ a, const T* __restrict__ dh,
                              T* __restrict__ da) {
    const long long total = n * f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / f;
        const int j = (int)(i - r * f);
        const T* row = a + r * 2 * f;
        T* drow = da + r * 2 * f;
        const float g = to_f(row[j]), u = to_f(row[f + j]), d = to_f(dh[i]);
        drow[j] = from_f<T>(d * u * act_grad_f(g, act));
        drow[f + j] = from_f<T>(d * act_f(g, act));
    }
}

#define GATED_ACT(T, S)                                                                                            \
    extern "C" __global__ void gated_act_fwd_##S(const GatedActFwdParams<T> p) {                                   \
        gated_act_fwd<T>(p.n, p.f, p.act, p.a, p.h);                                                               \
    }                                                                                                              \
    extern "C" __global__ void gated_act_bwd_##S(const GatedActBwdParams<T> p) {                                   \
        gated_act_bwd<T>(p.n, p.f, p.act, p.a, p.dh, p.da);                                                        \
    }
INSTANTIATE_T(GATED_ACT)

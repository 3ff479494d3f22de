// The optimiser step of fine-tuning, fused: one pass over each parameter tensor instead of the ~14
// tensor ops (each a full read and write of the tensor) of the slow twin, `AdamW::step_ops`.
//
//   adamw_f32   g' = g · gscale; m ← β₁m + (1−β₁)g'; v ← β₂v + (1−β₂)g'²;
//               w ← w · decay − lr · (m / bc1) / (√(v / bc2) + ε)          in place, f32
//               and, with wc, the model's low-precision copy wc ← w (0 none, 1 bf16, 2 f16), in
//               place: the recast of a bf16 model's weights in the same pass
//   sumsq_f32   *acc += Σ g²  (f64 accumulator; one per step, summed over tensors)
#include "common.cuh"

extern "C" __global__ void adamw_f32(const AdamwParams p) {
    float* __restrict__ w = p.w;
    const float* __restrict__ g = p.g;
    float* __restrict__ m = p.m;
    float* __restrict__ v = p.v;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const float gi = g[i] * p.gscale;
        const float mi = p.b1 * m[i] + (1.0f - p.b1) * gi;
        const float vi = p.b2 * v[i] + (1.0f - p.b2) * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        const float upd = (mi / p.bc1) / (sqrtf(vi / p.bc2) + p.eps);
        const float wi = w[i] * p.decay - upd * p.lr;
        w[i] = wi;
        if (p.wc_kind == 1) static_cast<bf16*>(p.wc)[i] = from_f<bf16>(wi);
        else if (p.wc_kind == 2) static_cast<f16*>(p.wc)[i] = from_f<f16>(wi);
    }
}

extern "C" __global__ void sumsq_f32(const SumsqParams p) {
    const float* __restrict__ g = p.g;
    __shared__ float red[33];
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    float s = 0.0f;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride)
        s = fmaf(g[i], g[i], s);
    s = block_sum(s, red);
    if (threadIdx.x == 0) atomicAdd(p.acc, (double)s);
}

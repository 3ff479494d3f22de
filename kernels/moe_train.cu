// The MoE half-block's backward at the gate (src/ops/moe_block_grad.rs; twin: the tensor ops
// (g · y).sum over d and (g · gate) cast, which autograd of out = y · gate computes):
//
//   moe_gate_bwd_bf16   per token row r: dgate[r] = Σ_k g[r, k] · y[r, k] and
//                       dy[r, k] = bf16(g[r, k] · gate[r]);  g (n, d) f32, y (n, d) bf16,
//                       gate (n) f32 -> dgate (n) f32, dy (n, d) bf16. One block per row
//                       (grid-stride over the rows).
#include "common.cuh"

extern "C" __global__ void moe_gate_bwd_bf16(const MoeGateBwdParams p) {
    const long long n = p.n;
    const int d = p.d;
    const float* __restrict__ g = p.g;
    const bf16* __restrict__ y = p.y;
    const float* __restrict__ gate = p.gate;
    float* __restrict__ dgate = p.dgate;
    bf16* __restrict__ dy = p.dy;
    __shared__ float red[33];
    for (long long r = blockIdx.x; r < n; r += gridDim.x) {
        const float* gr = g + r * d;
        const bf16* yr = y + r * d;
        bf16* dr = dy + r * d;
        const float gt = gate[r];
        float acc = 0.0f;
        for (int k = threadIdx.x; k < d; k += blockDim.x) {
            const float gv = gr[k];
            acc = fmaf(gv, to_f(yr[k]), acc);
            dr[k] = from_f<bf16>(gv * gt);
        }
        acc = block_sum(acc, red);
        if (threadIdx.x == 0) dgate[r] = acc;
    }
}

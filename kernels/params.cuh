// Launch parameters of every kernel: one struct per kernel (or per family of kernels sharing a
// signature, templates over the element type T), taken by value (`__global__ void k(const
// KParams p)`). The Rust twins are in src/ops/params/ (same names, same field order); the test
// tests/kernel_params.rs parses this file and compares both layouts field by field, so a field
// added on one side only fails `cargo test`.
//
// Rules for this file (the test's parser reads only these forms): `struct NAME {` or
// `template <typename T> struct NAME {` on one line, one field a line as `TYPE NAME;` (an optional
// `__restrict__` after a pointer's `*`), `};` to close, `//` comments. Types: pointers,
// `int`, `unsigned int`, `float`, `double`, `long long`, `unsigned long long`, or a struct above.
// Fields go 8-byte ones first, so that no padding falls between fields.
//
// Shapes are row-major; (B, L, di) means B·L·di elements with di fastest.
#pragma once

// ---- selective scan (scan.cu, mamba_train.cu) ----

// The sizes of the selective-scan kernels: B sequences of L tokens, di channels, N states,
// chunks of LC tokens, Q chunks (Q = ceil(L / LC)).
struct ScanIn {
    int Bn;
    int L;
    int di;
    int N;
    int LC;
    int Q;
};

// ---- RMSNorm (rms_norm.cu) ----

// rms_norm_fwd_T: one block per row, grid-stride.
template <typename T> struct RmsNormFwdParams {
    const float* x;  // (rows, d) f32
    const float* w;  // (d) f32
    T* y;            // (rows, d)
    long long rows;
    int d;
    float eps;
};

// rms_norm_bwd_T: dx and, where part is not null, each block's share of dw.
template <typename T> struct RmsNormBwdParams {
    const float* x;  // (rows, d) f32
    const float* w;  // (d) f32
    const T* g;      // (rows, d) the gradient of y
    float* dx;       // (rows, d) f32
    float* part;     // (gridDim.x, d) f32 or null
    long long rows;
    int d;
    float eps;
    int smem_acc;  // 1: accumulate dw in d floats of dynamic shared memory
};

// rms_norm_dw: dw[k] = Σ_b part[b, k].
struct RmsNormDwParams {
    const float* part;  // (nb, d) f32
    float* dw;          // (d) f32
    int nb;
    int d;
};

// ---- row gathers and scatters (rows.cu) ----

// gather_rows_f32: out[i, k] = x[idx[i], k].
struct GatherRowsParams {
    const unsigned int* idx;  // (n) u32 < R
    const float* x;           // (R, d) f32
    float* out;               // (n, d) f32
    long long n;
    int d;
};

// scatter_add_rows_T: dst[idx[i], k] += src[i, k] (float atomics).
template <typename T> struct ScatterAddRowsParams {
    const unsigned int* idx;  // (n) u32 < R
    const T* src;             // (n, d)
    float* dst;               // (R, d) f32
    long long n;
    int d;
};

// ---- casts (cast.cu) ----

// cast_I_O: dst[i] = O(src[i]); src and dst 16-byte aligned.
template <typename I, typename O> struct CastParams {
    const I* src;  // (n)
    O* dst;        // (n)
    long long n;
};

// ---- cross-entropy (xent.cu) ----

// xent_fwd_T: out[r] = (loss, lse) of logits row r; one block per row.
template <typename T> struct XentFwdParams {
    const T* logits;              // (n, v)
    const unsigned int* targets;  // (n) u32
    float* out;                   // (n, 2) f32
    int v;
    int vec;  // 1: rows are 16-byte aligned and v a multiple of 16 bytes' elements
};

// xent_bwd_T: dx = (softmax(logits) − onehot(target)) · grad[r, 0].
template <typename T> struct XentBwdParams {
    const T* logits;              // (n, v)
    const unsigned int* targets;  // (n) u32
    const float* res;             // (n, 2) f32, the forward's (loss, lse)
    const float* grad;            // (n, 2) f32
    T* dx;                        // (n, v)
    int v;
    int vec;  // as XentFwdParams
};

// ---- the experts' gated activation (gated_act.cu; moe_act_T in prefill.cu) ----

// gated_act_fwd_T: h[r, j] = act(a[r, j]) · a[r, f + j].
template <typename T> struct GatedActFwdParams {
    const T* a;  // (n, 2f)
    T* h;        // (n, f)
    long long n;
    int f;
    int act;  // 0 = GELU (erf), 1 = SiLU
};

// gated_act_bwd_T: da (n, 2f) from dh (n, f).
template <typename T> struct GatedActBwdParams {
    const T* a;   // (n, 2f)
    const T* dh;  // (n, f)
    T* da;        // (n, 2f)
    long long n;
    int f;
    int act;  // as GatedActFwdParams
};

// moe_act_T: the inference twin of gated_act_fwd_T (grid (f / 256, rows)).
template <typename T> struct MoeActParams {
    const T* a;  // (n, 2f)
    T* h;        // (n, f)
    int n;
    int f;
    int act;  // as GatedActFwdParams
};

// ---- AdamW and the gradient norm (optim.cu) ----

// adamw_f32: one AdamW step over n f32 values, and where wc_kind != 0 a copy of the new weight.
struct AdamwParams {
    float* w;        // (n) f32 weight, updated
    const float* g;  // (n) f32 gradient
    float* m;        // (n) f32 first moment, updated
    float* v;        // (n) f32 second moment, updated
    void* wc;        // (n) bf16 or f16 copy of w, or null
    unsigned long long n;
    float lr;
    float b1;
    float b2;
    float bc1;     // 1 − b1^t
    float bc2;     // 1 − b2^t
    float eps;
    float decay;   // 1 − lr · weight decay
    float gscale;  // gradient scale (clipping)
    int wc_kind;   // 0: no copy, 1: bf16, 2: f16
};

// sumsq_f32: acc += Σ g² (one f64 atomic per block).
struct SumsqParams {
    const float* g;  // (n) f32
    double* acc;     // (1) f64
    unsigned long long n;
};

// ---- the MoE half-block's backward at the gate (moe_train.cu) ----

// moe_gate_bwd_bf16: dgate[r] = Σ_k g[r, k] · y[r, k], dy[r, k] = bf16(g[r, k] · gate[r]).
struct MoeGateBwdParams {
    const float* g;     // (n, d) f32
    const bf16* y;      // (n, d) bf16
    const float* gate;  // (n) f32
    float* dgate;       // (n) f32
    bf16* dy;           // (n, d) bf16
    long long n;
    int d;
};

// ---- Sinkhorn on the device (sinkhorn.cu) ----

// sinkhorn_run: one block, T tokens, E ≤ 32 experts.
struct SinkhornParams {
    const float* cost;     // (T, E) f32 router logits
    double* K;             // (T, E) f64 scratch
    double* d0;            // (T) f64 scratch
    float* plan;           // (T, E) f32
    unsigned int* assign;  // (T) u32
    double* trace;         // (max(max_iters, 1), 4) f64
    int* status;           // (2): iterations run, converged
    double scale;          // 2 (Zyphra) or 1
    double tol;
    int T;
    int E;
    int zyphra;  // 1: Zyphra's variant
    int max_iters;
};

// Launch parameters of every kernel: one struct per kernel (or per family of kernels sharing a
// signature, templates over the element type T), taken by value (`__global__ void k(const
// KParams p)`). The Rust twins are in src/ops/params/ (same names, same field order); the test
// tests/kernel_params.rs parses this file and compares both layouts field by field, so a field
// added on one side only fails `cargo test`.
//
// Rules for this file (the test's parser reads only these forms): `struct NAME {` or
// `template <typename T> struct NAME {` on one line, one field a line as `TYPE NAME;` (an optional
// `__restrict__` after a pointer's `*`), `};` to close, `//` comments. Types: pointers,
// `int`, `unsigned int`, `float`, `double`, `long long`, `unsigned long long`, or a struct above;
// `struct NAME;` declares a type that only pointers name.
// Fields go 8-byte ones first, so that no padding falls between fields.
//
// Shapes are row-major; (B, L, di) means B·L·di elements with di fastest.
//
// Over 600 lines on purpose: this is the one copy of every kernel's argument list, read whole by
// the layout test; sections follow the kernel files.
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

// ---- the chunked selective scan (scan.cu) ----
// Inputs are strided views: element (b, t, c) of dt is dt[b · dt_bs + t · dt_ts + c] (likewise
// v, z, and B / C with bc_bs / bc_ts over (b, t, n)); a null pointer is an absent input.

// scan_chunk_sum_T: each chunk's ΣΔ and own end state from a zero start (grid (di/128, Q, B)).
template <typename T> struct ScanChunkSumParams {
    const T* dt;             // (B, L, di) Δ before softplus when dt_bias is not null
    const float* dt_bias;    // (di) f32 or null
    const float* A;          // (di, N) f32: A, or A_log when a_is_log
    const T* Bm;             // (B, L, N)
    const float* v;          // (B, L, di) f32
    float* sum_delta;        // (B, Q, di) f32
    float* Sst;              // (B, Q, di, N) f32
    long long dt_bs;
    long long bc_bs;
    long long v_bs;
    ScanIn s;
    int dt_ts;
    int a_is_log;
    int bc_ts;
    int v_ts;
};

// scan_chunk_out_T: the outputs per chunk from the carried states (grid (di/128, Q, B)).
template <typename T> struct ScanChunkOutParams {
    const T* dt;             // as ScanChunkSumParams
    const float* dt_bias;    // as ScanChunkSumParams
    const float* A;          // as ScanChunkSumParams
    const T* Bm;             // (B, L, N)
    const T* Cm;             // (B, L, N)
    const float* v;          // (B, L, di) f32
    const T* z;              // (B, L, di) gate or null
    const float* Dp;         // (di) f32 skip or null
    const float* h0;         // (B, di, N) f32 or null (zeros)
    const float* sum_delta;  // (B, Q, di) f32 (Q > 1)
    const float* Sst;        // (B, Q, di, N) f32 (Q > 1)
    T* y_t;                  // (B, L, di) gated output or null
    float* y_raw;            // (B, L, di) f32 or null
    float* h_last;           // (B, di, N) f32 or null
    float* hsq;              // (B, L) f32 telemetry Σh² or null
    float* dsum;             // (B, L) f32 telemetry ΣΔ or null
    long long dt_bs;
    long long bc_bs;
    long long v_bs;
    long long z_bs;
    ScanIn s;
    int dt_ts;
    int a_is_log;
    int bc_ts;
    int v_ts;
    int z_ts;
};

// scan_bwd_f32: the scan's backward (grid (di/128, B); see the kernel's head for the layouts).
struct ScanBwdParams {
    const float* dt;  // (B, L, di)
    const float* A;   // (di, N)
    const float* Bm;  // (B, L, N)
    const float* Cm;  // (B, L, N)
    const float* v;   // (B, L, di)
    const float* h0;  // (B, di, N) or null
    const float* gy;  // (B, L, di)
    float* hs;        // (B, Q, di, N) scratch
    float* hist;      // (B, LC, N, di) scratch
    float* dv;        // (B, L, di)
    float* dd;        // (B, L, di)
    float* dB;        // (B, L, N), zeroed
    float* dC;        // (B, L, N), zeroed
    float* dA;        // (di, N), zeroed
    long long dt_bs;
    long long bc_bs;
    long long v_bs;
    long long dv_bs;
    long long dd_bs;
    long long dbc_bs;
    ScanIn s;
    int dt_ts;
    int bc_ts;
    int v_ts;
    int dv_ts;
    int dd_ts;
    int dbc_ts;
};

// ---- the Mamba mixer's fine-tuning kernels (mamba_train.cu) ----
// Row strides (su, sdu, sv, ...) are in elements, one row per (sequence, position).

// conv_silu_fwd_T: v = SiLU(conv(u) + cb) (grid (di/128, rows)).
template <typename T> struct ConvSiluFwdParams {
    const T* u;         // (B, L, ·) rows of stride su
    const float* st;    // (B, di, K) f32 conv state before, or null (zeros)
    const float* cw;    // (di, K) f32
    const float* cb;    // (di) f32
    float* v;           // (B, L, di) f32
    bf16* v16;          // (B, L, di) bf16 copy of v, or null
    float* st_out;      // (B, di, K) f32 conv state after, or null
    int Bn;
    int L;
    int di;
    int K;
    int su;
};

// conv_silu_bwd_T: du and each tile's partial dw / db (grid (di/128, tiles, B)).
template <typename T> struct ConvSiluBwdParams {
    const T* u;          // as ConvSiluFwdParams
    const float* st;     // as ConvSiluFwdParams
    const float* cw;     // (di, K) f32
    const float* cb;     // (di) f32
    const float* gv;     // (B, L, di) f32 gradient of v
    const bf16* gv2;     // (B, L, di) bf16 second gradient of v, or null
    T* du;               // (B, L, ·) rows of stride sdu
    float* part;         // (B · tiles, K + 1, di) f32
    int Bn;
    int L;
    int di;
    int K;
    int tile;  // steps per tile
    int su;
    int sdu;
};

// scan_tail_chunks_T: per (b, chunk, c) ΣΔ, the end state from 0 and the start carry from 0.
template <typename T> struct ScanTailChunksParams {
    const float* v;    // (B, L, ·) f32 rows of stride sv
    const T* dt;       // rows of stride sdt
    const T* z;        // rows of stride sz
    const T* go;       // (B, L, di) dL/dout
    const float* bc;   // (B, L, 2N) f32
    const float* P;    // [A_log (di, N); D (di); bias (di)] f32
    float* sum_delta;  // (B, Q, di) f32
    float* S_;         // (B, Q, di, N) f32
    float* Lq;         // (B, Q, di, N) f32
    ScanIn s;
    int sv;
    int sdt;
    int sz;
};

// scan_tail_carry_f32: composes the chunks' start states and incoming carries (in place).
struct ScanTailCarryParams {
    const float* P;          // as ScanTailChunksParams
    const float* h0;         // (B, di, N) f32 or null (zeros)
    const float* sum_delta;  // (B, Q, di) f32
    float* HS;               // (B, Q, di, N) f32
    float* LR;               // (B, Q, di, N) f32
    ScanIn s;
};

// scan_tail_bwd_T: the gradients, cpg chunks per block (grid (channel blocks, groups, B)).
template <typename T> struct ScanTailBwdParams {
    const float* v;     // as ScanTailChunksParams
    const T* dt;        // as ScanTailChunksParams
    const T* z;         // as ScanTailChunksParams
    const T* go;        // as ScanTailChunksParams
    const float* bc;    // as ScanTailChunksParams
    const float* P;     // as ScanTailChunksParams
    const float* H;     // (B, Q, di, N) f32 chunk start states
    const float* R;     // (B, Q, di, N) f32 incoming carries
    float* dv;          // rows of stride sdv, f32
    T* ddt;             // rows of stride sddt
    T* dz;              // rows of stride sdz
    T* yg;              // (B, L, di) the output itself, or null
    float* dbc_part;    // (B, channel blocks, L, 2N) f32
    float* dP;          // (di · N + 2 · di) f32, added to
    ScanIn s;
    int cpg;  // chunks per block
    int sv;
    int sdt;
    int sz;
    int sdv;
    int sddt;
    int sdz;
};

// scan_tail_dbc_f32: dbc (B, L2N) = Σ over the CB channel blocks of part (B, CB, L2N).
struct ScanTailDbcParams {
    const float* part;  // (B, CB, L2N) f32
    float* dbc;         // (B, L2N) f32
    int Bn;
    int CB;
    int L2N;
};

// ---- the single-token Mamba step (mamba_step.cu) ----

// conv_xproj_T: v = SiLU(conv window) of the u half, then dbc = W_x · v (grid (row blocks, B)).
template <typename T> struct ConvXprojParams {
    const T* xz;        // (B, ·) rows of stride xz_stride, u = the first di values
    const float* conv;  // (B, di, K) f32 conv state
    const float* cw;    // (di, K) f32
    const float* cb;    // (di) f32
    const T* Wx;        // (R2, di)
    T* dbc;             // (B, R2)
    int di;
    int K;
    int R2;
    int xz_stride;
    int vec;  // 1: rows of di values are 16-byte multiples
};

// ssm_step_T: dt_proj + softplus + the SSM update + D skip + gate; also the decode step's.
template <typename T> struct SsmStepParams {
    const T* xz;           // (B, ·) rows of stride xz_stride: [u (di); z (di)]
    const float* conv_in;  // (B, di, K) f32
    float* conv_out;       // (B, di, K) f32 (may be conv_in: updated in place)
    const float* cw;       // (di, K) f32
    const float* cb;       // (di) f32
    const T* dbc;          // (B, R + 2N): [δ; B; C]
    const T* Wdt;          // (di, R)
    const float* dt_bias;  // (di) f32
    const float* A_log;    // (di, N) f32
    const float* Dp;       // (di) f32
    const float* h_in;     // (B, di, N) f32
    float* h_out;          // (B, di, N) f32 (may be h_in)
    T* y;                  // (B, di)
    float* telem;          // telemetry sums or null (see telem_mode)
    int Bn;
    int di;
    int R;
    int N;
    int K;
    int xz_stride;
    int telem_mode;  // 0: (B, 3) sums; 1: per-block partials (the decode step's)
};

// ---- batch-1 decode (decode.cuh / decode.cu, qgemv.cu, sample.cu) ----
// res is the f32 residual stream (d); vec: 1 when the rows of K values (dense: K elements of T;
// packed: the row's codes) are 16-byte multiples. Each kernel reading a weight matrix has a dense
// entry point (decode.cu: the matrix is W / emb / E, or the rows wtab points to) and one per
// packed format (qgemv.cu, `--quant`: the matrix is q, the dense pointer is null); both take the
// same struct, each leaving the other's matrix unread.

// The packed form of a decode kernel's weight matrix (kernels/qweight.cuh's QRows), all zero for
// a dense launch.
struct PackedRows {
    const unsigned char* codes;      // (rows, row bytes) codes, or null where wtab holds them
    const f16* scales;               // the matrix's f16 scales, or null for a table launch
    const unsigned long long* stab;  // with wtab: the experts' scales pointers, laid out as wtab's
    int gshift;                      // log2 of the q4 group (6 or 7); 0 for int8 and fp8
};

// embed_T: res = E[tok[0]].
template <typename T> struct EmbedParams {
    const T* emb;               // (V, d)
    const unsigned int* tok;    // (1) u32
    float* res;                 // (d) f32
    PackedRows q;               // the packed embedding (qgemv.cu)
    int d;
};

// in_proj_conv_T: xz = W_in · T(rmsnorm(res)) (+ bias), v = SiLU(conv window) of the u half.
template <typename T> struct InProjConvParams {
    const T* W;          // (M, K), M = 2·di
    const float* res;    // (K) f32
    const float* nw;     // (K) f32 RMSNorm weight
    const T* bias;       // (M) or null
    T* xz;               // (M)
    const float* conv;   // (di, KC) f32 conv state
    const float* cw;     // (di, KC) f32
    const float* cb;     // (di) f32
    T* vout;             // (di)
    PackedRows q;        // the packed W (qgemv.cu)
    int M;
    int K;
    float eps;
    int di;
    int KC;
    int vec;
};

// gemv_rows_T: out = W · x, one block per row.
template <typename T> struct GemvRowsParams {
    const T* W;    // (M, K)
    const T* x;    // (K)
    T* out;        // (M)
    PackedRows q;  // the packed W (qgemv.cu)
    int M;
    int K;
    int vec;
};

// moe_fc1_T: router (top-1, σ gate) in every block, then the chosen expert's fc1 + activation.
template <typename T> struct MoeFc1Params {
    const float* Wr;                 // (E, K) f32 router
    const float* br;                 // (E) f32 or null
    const unsigned long long* wtab;  // (E) device addresses of the experts' fc1 (M, K)
    int* route;                      // (4 words) the chosen expert, then its gate (f32)
    float* telem;                    // (E + 1) telemetry words or null
    const float* res;                // (K) f32
    const float* nw;                 // (K) f32 RMSNorm weight
    T* out;                          // the activation (see moe_fc1_impl)
    PackedRows q;                    // packed experts (qgemv.cu): codes in wtab, scales in q.stab
    int E;
    int M;
    int K;
    float eps;
    int epi;  // 1: gated activation, 2: plain activation
    int act;  // 0 = GELU (erf), 1 = SiLU
    int vec;
};

// gemv_resid_T: res += gate · (W · x) (split-K over gridDim.y); W, or the routed expert's
// matrix from wtab.
template <typename T> struct GemvResidParams {
    const T* W;                      // (M, K) or null (then wtab[route[0]])
    const unsigned long long* wtab;  // (E) device addresses or null
    const int* route;                // the chosen expert or null
    const T* x;                      // (K)
    float* res;                      // (M) f32
    const float* gate;               // (1) f32 or null
    const T* bias;                   // (M) or null
    PackedRows q;                    // the packed W, or with wtab the experts' (as MoeFc1Params)
    int M;
    int K;
    int vec;
};

// head_T: logits = E · layernorm(res) (f32) and each block's argmax candidate.
template <typename T> struct HeadParams {
    const T* E;         // (V, K)
    const float* res;   // (K) f32
    const float* lw;    // (K) f32 LayerNorm weight
    const float* lb;    // (K) f32 LayerNorm bias
    float* logits;      // (V) f32
    float* pv;          // (gridDim.x) f32 candidates' values
    int* pi;            // (gridDim.x) candidates' ids
    PackedRows q;       // the packed E (qgemv.cu)
    int V;
    int K;
    float eps;
    int vec;
};

// sample_final: argmax over the blocks' candidates -> tok, out[0]; step += 1; the telemetry sums.
struct SampleFinalParams {
    const float* pv;     // (n) f32
    const int* pi;       // (n)
    unsigned int* tok;   // (1)
    unsigned int* step;  // (1)
    unsigned int* out;   // the step's output words
    const float* parts;  // (n_layers, nblk, 3) f32 telemetry partials or null
    int n;
    int n_layers;
    int nblk;
};

// set_token: tok[0] = id.
struct SetTokenParams {
    unsigned int* tok;  // (1)
    unsigned int id;
};

struct SampleState;

// sample_logits (sample.cu): the device sampler; as sample_final, over penalised logits.
struct SampleLogitsParams {
    float* logits;       // (V) f32, penalised in place
    SampleState* st;     // the sampler's state (sample.cu)
    unsigned int* hist;  // the sampler's token history
    unsigned int* tok;   // (1)
    unsigned int* step;  // (1)
    unsigned int* out;   // the step's output words
    const float* parts;  // as SampleFinalParams
    int V;
    int n_layers;
    int nblk;
};

// ---- prefill (prefill.cu; moe_act_T is with the gated activation above) ----

// add_rmsnorm_T (TA = float) and add_rmsnorm_t_T (TA = T): res_out = res + add (f32),
// out = T(RMSNorm(res_out) · w); one block per token row.
template <typename T, typename TA> struct AddRmsnormParams {
    const float* res;  // (rows, d) f32
    const TA* add;     // (rows, d) or null (first layer)
    float* res_out;    // (rows, d) f32
    const float* w;    // (d) f32
    T* out;            // (rows, d)
    int d;
    float eps;
};

// conv1d_fwd_T: causal depthwise conv over the sequence from the conv state, + SiLU.
template <typename T> struct Conv1dFwdParams {
    const T* xz;           // (B, L, ·) rows of stride xz_stride, u = the first di values
    const float* conv_in;  // (B, di, K) f32
    const float* cw;       // (di, K) f32
    const float* cb;       // (di) f32
    float* v;              // (B, L, di) f32
    T* vt;                 // (B, L, di)
    float* conv_out;       // (B, di, K) f32
    int Bn;
    int L;
    int di;
    int K;
    int xz_stride;
};

// router_top1_T: logits = Wr · x + br (f32), top-1 expert, σ gate; one warp per token.
template <typename T> struct RouterTop1Params {
    const T* x;        // (Tn, d)
    const float* Wr;   // (E, d) f32
    const float* br;   // (E) f32
    float* logits;     // (Tn, E) f32
    int* expert;       // (Tn)
    float* gate;       // (Tn) f32
    int Tn;
    int d;
    int E;
    int in_smem;  // 1: Wr is staged in E · d floats of dynamic shared memory
};

// moe_group: tokens grouped per expert (stable), the inverse permutation and counts; one block.
struct MoeGroupParams {
    const int* expert;  // (Tn)
    int* order;         // (Tn) token at each grouped position
    int* inverse;       // (Tn) grouped position of each token
    int* counts;        // (E)
    int Tn;
    int E;  // at most 16
};

// moe_pad_index: each token's row in the expert-major padded layout (E, stride, ·).
struct MoePadIndexParams {
    const int* expert;   // (Tn)
    const int* inverse;  // (Tn) from moe_group's order
    const int* base;     // (E) each expert's first grouped position
    int* padpos;         // (Tn)
    int* order_pad;      // (E · stride), padding rows keep the caller's value
    int Tn;
    int E;
    int stride;
};

// moe_unpermute_T: y[t] = f32(ys[inverse[t]]) · gate[t].
template <typename T> struct MoeUnpermuteParams {
    const T* ys;         // (rows, d) in grouped (or padded) order
    const int* inverse;  // (Tn) row of each token in ys
    const float* gate;   // (Tn) f32
    float* y;            // (Tn, d) f32
    int Tn;
    int d;
};

// ---- the decode megakernel (megakernel.cu; its instruction list and MkParams are its own) ----

struct MkParams;

// megakernel: one token; dynamic shared memory d + aux_n + rows_n + 40 floats.
struct MegakernelParams {
    const MkParams* params;  // the parameter block (megakernel.cu)
    unsigned int token;
    unsigned int epoch;  // tokens run since the buffers were made
    int aux_n;
    int rows_n;
};

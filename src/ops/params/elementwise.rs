//! Params of the row-wise and element-wise kernels: RMSNorm, row gathers, casts, cross-entropy,
//! the gated activation, AdamW, the MoE gate's backward and Sinkhorn.

use super::params;

params! {
    ELEMENTWISE;

    /// `rms_norm_fwd_T`: y = T(x · rsqrt(mean(x²) + eps) · w), one block per row (grid-stride).
    struct RmsNormFwdParams {
        /// (rows, d) f32
        x: "const float*" => u64,
        /// (d) f32
        w: "const float*" => u64,
        /// (rows, d) T
        y: "T*" => u64,
        rows: "long long" => i64,
        d: "int" => i32,
        eps: "float" => f32,
    }

    /// `rms_norm_bwd_T`: dx and, where `part` is not null, each block's share of dw.
    struct RmsNormBwdParams {
        /// (rows, d) f32
        x: "const float*" => u64,
        /// (d) f32
        w: "const float*" => u64,
        /// (rows, d) T, the gradient of y
        g: "const T*" => u64,
        /// (rows, d) f32
        dx: "float*" => u64,
        /// (blocks, d) f32 or 0
        part: "float*" => u64,
        rows: "long long" => i64,
        d: "int" => i32,
        eps: "float" => f32,
        /// 1: accumulate dw in d floats of dynamic shared memory
        smem_acc: "int" => i32,
    }

    /// `rms_norm_dw`: `dw[k] = Σ_b part[b, k]`.
    struct RmsNormDwParams {
        /// (nb, d) f32
        part: "const float*" => u64,
        /// (d) f32
        dw: "float*" => u64,
        nb: "int" => i32,
        d: "int" => i32,
    }

    /// `gather_rows_f32`: `out[i, k] = x[idx[i], k]`.
    struct GatherRowsParams {
        /// (n) u32 < R
        idx: "const unsigned int*" => u64,
        /// (R, d) f32
        x: "const float*" => u64,
        /// (n, d) f32
        out: "float*" => u64,
        n: "long long" => i64,
        d: "int" => i32,
    }

    /// `scatter_add_rows_T`: `dst[idx[i], k] += src[i, k]` (float atomics).
    struct ScatterAddRowsParams {
        /// (n) u32 < R
        idx: "const unsigned int*" => u64,
        /// (n, d) T
        src: "const T*" => u64,
        /// (R, d) f32
        dst: "float*" => u64,
        n: "long long" => i64,
        d: "int" => i32,
    }

    /// `cast_I_O`: `dst[i] = O(src[i])`; both 16-byte aligned.
    struct CastParams {
        /// (n) I
        src: "const I*" => u64,
        /// (n) O
        dst: "O*" => u64,
        n: "long long" => i64,
    }

    /// `xent_fwd_T`: `out[r]` = (loss, lse) of logits row r; one block per row.
    struct XentFwdParams {
        /// (n, v) T
        logits: "const T*" => u64,
        /// (n) u32
        targets: "const unsigned int*" => u64,
        /// (n, 2) f32
        out: "float*" => u64,
        v: "int" => i32,
        /// 1: rows are 16-byte aligned and v a multiple of 16 bytes' elements
        vec: "int" => i32,
    }

    /// `xent_bwd_T`: dx = (softmax(logits) − onehot(target)) · grad[r, 0].
    struct XentBwdParams {
        /// (n, v) T
        logits: "const T*" => u64,
        /// (n) u32
        targets: "const unsigned int*" => u64,
        /// (n, 2) f32, the forward's (loss, lse)
        res: "const float*" => u64,
        /// (n, 2) f32
        grad: "const float*" => u64,
        /// (n, v) T
        dx: "T*" => u64,
        v: "int" => i32,
        /// as in [`XentFwdParams`]
        vec: "int" => i32,
    }

    /// `gated_act_fwd_T`: h[r, j] = act(a[r, j]) · a[r, f + j].
    struct GatedActFwdParams {
        /// (n, 2f) T
        a: "const T*" => u64,
        /// (n, f) T
        h: "T*" => u64,
        n: "long long" => i64,
        f: "int" => i32,
        /// 0 = GELU (erf), 1 = SiLU
        act: "int" => i32,
    }

    /// `gated_act_bwd_T`: da (n, 2f) from dh (n, f).
    struct GatedActBwdParams {
        /// (n, 2f) T
        a: "const T*" => u64,
        /// (n, f) T
        dh: "const T*" => u64,
        /// (n, 2f) T
        da: "T*" => u64,
        n: "long long" => i64,
        f: "int" => i32,
        /// as in [`GatedActFwdParams`]
        act: "int" => i32,
    }

    /// `moe_act_T` (kernels/prefill.cu): the inference twin of `gated_act_fwd_T`.
    struct MoeActParams {
        /// (n, 2f) T
        a: "const T*" => u64,
        /// (n, f) T
        h: "T*" => u64,
        n: "int" => i32,
        f: "int" => i32,
        /// as in [`GatedActFwdParams`]
        act: "int" => i32,
    }

    /// `adamw_f32`: one AdamW step over n f32 values, and where `wc_kind` != 0 a copy of the
    /// new weight.
    struct AdamwParams {
        /// (n) f32 weight, updated
        w: "float*" => u64,
        /// (n) f32 gradient
        g: "const float*" => u64,
        /// (n) f32 first moment, updated
        m: "float*" => u64,
        /// (n) f32 second moment, updated
        v: "float*" => u64,
        /// (n) bf16 or f16 copy of w, or 0
        wc: "void*" => u64,
        n: "unsigned long long" => u64,
        lr: "float" => f32,
        b1: "float" => f32,
        b2: "float" => f32,
        /// 1 − b1^t
        bc1: "float" => f32,
        /// 1 − b2^t
        bc2: "float" => f32,
        eps: "float" => f32,
        /// 1 − lr · weight decay
        decay: "float" => f32,
        /// gradient scale (clipping)
        gscale: "float" => f32,
        /// 0: no copy, 1: bf16, 2: f16
        wc_kind: "int" => i32,
    }

    /// `sumsq_f32`: acc += Σ g² (one f64 atomic per block).
    struct SumsqParams {
        /// (n) f32
        g: "const float*" => u64,
        /// (1) f64
        acc: "double*" => u64,
        n: "unsigned long long" => u64,
    }

    /// `moe_gate_bwd_bf16` (kernels/moe_train.cu): `dgate[r] = Σ_k g[r, k] · y[r, k]`,
    /// `dy[r, k] = bf16(g[r, k] · gate[r])`.
    struct MoeGateBwdParams {
        /// (n, d) f32
        g: "const float*" => u64,
        /// (n, d) bf16
        y: "const bf16*" => u64,
        /// (n) f32
        gate: "const float*" => u64,
        /// (n) f32
        dgate: "float*" => u64,
        /// (n, d) bf16
        dy: "bf16*" => u64,
        n: "long long" => i64,
        d: "int" => i32,
    }

    /// `sinkhorn_run` (kernels/sinkhorn.cu): one block, T tokens, E ≤ 32 experts.
    struct SinkhornParams {
        /// (T, E) f32 router logits
        cost: "const float*" => u64,
        /// (T, E) f64 scratch
        K: "double*" => u64,
        /// (T) f64 scratch
        d0: "double*" => u64,
        /// (T, E) f32
        plan: "float*" => u64,
        /// (T) u32
        assign: "unsigned int*" => u64,
        /// (max(max_iters, 1), 4) f64
        trace: "double*" => u64,
        /// (2): iterations run, converged
        status: "int*" => u64,
        /// 2 (Zyphra) or 1
        scale: "double" => f64,
        tol: "double" => f64,
        T: "int" => i32,
        E: "int" => i32,
        /// 1: Zyphra's variant
        zyphra: "int" => i32,
        max_iters: "int" => i32,
    }
}

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

    /// `rms_norm_dw`: dw[k] = Σ_b part[b, k].
    struct RmsNormDwParams {
        /// (nb, d) f32
        part: "const float*" => u64,
        /// (d) f32
        dw: "float*" => u64,
        nb: "int" => i32,
        d: "int" => i32,
    }

    /// `gather_rows_f32`: out[i, k] = x[idx[i], k].
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

    /// `scatter_add_rows_T`: dst[idx[i], k] += src[i, k] (float atomics).
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

    /// `cast_I_O`: dst[i] = O(src[i]); both 16-byte aligned.
    struct CastParams {
        /// (n) I
        src: "const I*" => u64,
        /// (n) O
        dst: "O*" => u64,
        n: "long long" => i64,
    }
}

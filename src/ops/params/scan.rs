//! Params of the selective-scan kernels (kernels/scan.cu, kernels/mamba_train.cu) and of the
//! Mamba decode step (kernels/mamba_step.cu).

use super::{params, to_i32};
use crate::error::Result;

params! {
    SCAN;

    /// The sizes of the selective-scan kernels: B sequences of L tokens, di channels, N states,
    /// chunks of LC tokens, Q chunks (Q = ceil(L / LC)).
    struct ScanIn {
        Bn: "int" => i32,
        L: "int" => i32,
        di: "int" => i32,
        N: "int" => i32,
        LC: "int" => i32,
        Q: "int" => i32,
    }

    /// `scan_chunk_sum_T` (kernels/scan.cu): each chunk's ΣΔ and own end state from a zero start
    /// (grid (di/128, Q, B)). Inputs are strided views: element (b, t, c) of dt is
    /// dt[b · dt_bs + t · dt_ts + c] (likewise v, z, and B / C with bc_bs / bc_ts over (b, t, n)).
    struct ScanChunkSumParams {
        /// (B, L, di) T: Δ, before softplus when `dt_bias` is not 0
        dt: "const T*" => u64,
        /// (di) f32 or 0
        dt_bias: "const float*" => u64,
        /// (di, N) f32: A, or A_log when `a_is_log`
        A: "const float*" => u64,
        /// (B, L, N) T
        Bm: "const T*" => u64,
        /// (B, L, di) f32
        v: "const float*" => u64,
        /// (B, Q, di) f32
        sum_delta: "float*" => u64,
        /// (B, Q, di, N) f32
        Sst: "float*" => u64,
        dt_bs: "long long" => i64,
        bc_bs: "long long" => i64,
        v_bs: "long long" => i64,
        s: "ScanIn" => ScanIn,
        dt_ts: "int" => i32,
        a_is_log: "int" => i32,
        bc_ts: "int" => i32,
        v_ts: "int" => i32,
    }

    /// `scan_chunk_out_T` (kernels/scan.cu): the outputs per chunk from the carried states (grid
    /// (di/128, Q, B)); views as in [`ScanChunkSumParams`], 0 for an absent input or output.
    struct ScanChunkOutParams {
        dt: "const T*" => u64,
        dt_bias: "const float*" => u64,
        A: "const float*" => u64,
        /// (B, L, N) T
        Bm: "const T*" => u64,
        /// (B, L, N) T
        Cm: "const T*" => u64,
        /// (B, L, di) f32
        v: "const float*" => u64,
        /// (B, L, di) T gate or 0
        z: "const T*" => u64,
        /// (di) f32 skip or 0
        Dp: "const float*" => u64,
        /// (B, di, N) f32 or 0 (zeros)
        h0: "const float*" => u64,
        /// (B, Q, di) f32 (Q > 1)
        sum_delta: "const float*" => u64,
        /// (B, Q, di, N) f32 (Q > 1)
        Sst: "const float*" => u64,
        /// (B, L, di) T gated output or 0
        y_t: "T*" => u64,
        /// (B, L, di) f32 or 0
        y_raw: "float*" => u64,
        /// (B, di, N) f32 or 0
        h_last: "float*" => u64,
        /// (B, L) f32 telemetry Σh² or 0
        hsq: "float*" => u64,
        /// (B, L) f32 telemetry ΣΔ or 0
        dsum: "float*" => u64,
        dt_bs: "long long" => i64,
        bc_bs: "long long" => i64,
        v_bs: "long long" => i64,
        z_bs: "long long" => i64,
        s: "ScanIn" => ScanIn,
        dt_ts: "int" => i32,
        a_is_log: "int" => i32,
        bc_ts: "int" => i32,
        v_ts: "int" => i32,
        z_ts: "int" => i32,
    }

    /// `scan_bwd_f32` (kernels/scan.cu): the scan's backward (grid (di/128, B)); all f32.
    struct ScanBwdParams {
        /// (B, L, di)
        dt: "const float*" => u64,
        /// (di, N)
        A: "const float*" => u64,
        /// (B, L, N)
        Bm: "const float*" => u64,
        /// (B, L, N)
        Cm: "const float*" => u64,
        /// (B, L, di)
        v: "const float*" => u64,
        /// (B, di, N) or 0
        h0: "const float*" => u64,
        /// (B, L, di)
        gy: "const float*" => u64,
        /// (B, Q, di, N) scratch
        hs: "float*" => u64,
        /// (B, LC, N, di) scratch
        hist: "float*" => u64,
        /// (B, L, di)
        dv: "float*" => u64,
        /// (B, L, di)
        dd: "float*" => u64,
        /// (B, L, N), zeroed
        dB: "float*" => u64,
        /// (B, L, N), zeroed
        dC: "float*" => u64,
        /// (di, N), zeroed
        dA: "float*" => u64,
        dt_bs: "long long" => i64,
        bc_bs: "long long" => i64,
        v_bs: "long long" => i64,
        dv_bs: "long long" => i64,
        dd_bs: "long long" => i64,
        dbc_bs: "long long" => i64,
        s: "ScanIn" => ScanIn,
        dt_ts: "int" => i32,
        bc_ts: "int" => i32,
        v_ts: "int" => i32,
        dv_ts: "int" => i32,
        dd_ts: "int" => i32,
        dbc_ts: "int" => i32,
    }

    /// `conv_silu_fwd_T` (kernels/mamba_train.cu): v = SiLU(conv(u) + cb) (grid (di/128,
    /// rows)). Row strides are in elements, one row per (sequence, position).
    struct ConvSiluFwdParams {
        /// (B, L, ·) T rows of stride `su`
        u: "const T*" => u64,
        /// (B, di, K) f32 conv state before, or 0 (zeros)
        st: "const float*" => u64,
        /// (di, K) f32
        cw: "const float*" => u64,
        /// (di) f32
        cb: "const float*" => u64,
        /// (B, L, di) f32
        v: "float*" => u64,
        /// (B, L, di) bf16 copy of v, or 0
        v16: "bf16*" => u64,
        /// (B, di, K) f32 conv state after, or 0
        st_out: "float*" => u64,
        Bn: "int" => i32,
        L: "int" => i32,
        di: "int" => i32,
        K: "int" => i32,
        su: "int" => i32,
    }

    /// `conv_silu_bwd_T` (kernels/mamba_train.cu): du and each tile's partial dw / db (grid
    /// (di/128, tiles, B)).
    struct ConvSiluBwdParams {
        /// as in [`ConvSiluFwdParams`]
        u: "const T*" => u64,
        /// as in [`ConvSiluFwdParams`]
        st: "const float*" => u64,
        /// (di, K) f32
        cw: "const float*" => u64,
        /// (di) f32
        cb: "const float*" => u64,
        /// (B, L, di) f32 gradient of v
        gv: "const float*" => u64,
        /// (B, L, di) bf16 second gradient of v, or 0
        gv2: "const bf16*" => u64,
        /// (B, L, ·) T rows of stride `sdu`
        du: "T*" => u64,
        /// (B · tiles, K + 1, di) f32
        part: "float*" => u64,
        Bn: "int" => i32,
        L: "int" => i32,
        di: "int" => i32,
        K: "int" => i32,
        /// steps per tile
        tile: "int" => i32,
        su: "int" => i32,
        sdu: "int" => i32,
    }

    /// `scan_tail_chunks_T` (kernels/mamba_train.cu): per (b, chunk, c) ΣΔ, the end state from
    /// 0 and the start carry from 0.
    struct ScanTailChunksParams {
        /// (B, L, ·) f32 rows of stride `sv`
        v: "const float*" => u64,
        /// T rows of stride `sdt`
        dt: "const T*" => u64,
        /// T rows of stride `sz`
        z: "const T*" => u64,
        /// (B, L, di) T, dL/dout
        go: "const T*" => u64,
        /// (B, L, 2N) f32
        bc: "const float*" => u64,
        /// [A_log (di, N); D (di); bias (di)] f32
        P: "const float*" => u64,
        /// (B, Q, di) f32
        sum_delta: "float*" => u64,
        /// (B, Q, di, N) f32
        S_: "float*" => u64,
        /// (B, Q, di, N) f32
        Lq: "float*" => u64,
        s: "ScanIn" => ScanIn,
        sv: "int" => i32,
        sdt: "int" => i32,
        sz: "int" => i32,
    }

    /// `scan_tail_carry_f32` (kernels/mamba_train.cu): composes the chunks' start states and
    /// incoming carries (in place).
    struct ScanTailCarryParams {
        /// as in [`ScanTailChunksParams`]
        P: "const float*" => u64,
        /// (B, di, N) f32 or 0 (zeros)
        h0: "const float*" => u64,
        /// (B, Q, di) f32
        sum_delta: "const float*" => u64,
        /// (B, Q, di, N) f32
        HS: "float*" => u64,
        /// (B, Q, di, N) f32
        LR: "float*" => u64,
        s: "ScanIn" => ScanIn,
    }

    /// `scan_tail_bwd_T` (kernels/mamba_train.cu): the gradients, `cpg` chunks per block (grid
    /// (channel blocks, groups, B)).
    struct ScanTailBwdParams {
        /// as in [`ScanTailChunksParams`]
        v: "const float*" => u64,
        dt: "const T*" => u64,
        z: "const T*" => u64,
        go: "const T*" => u64,
        bc: "const float*" => u64,
        P: "const float*" => u64,
        /// (B, Q, di, N) f32 chunk start states
        H: "const float*" => u64,
        /// (B, Q, di, N) f32 incoming carries
        R: "const float*" => u64,
        /// f32 rows of stride `sdv`
        dv: "float*" => u64,
        /// T rows of stride `sddt`
        ddt: "T*" => u64,
        /// T rows of stride `sdz`
        dz: "T*" => u64,
        /// (B, L, di) T, the output itself, or 0
        yg: "T*" => u64,
        /// (B, channel blocks, L, 2N) f32
        dbc_part: "float*" => u64,
        /// (di · N + 2 · di) f32, added to
        dP: "float*" => u64,
        s: "ScanIn" => ScanIn,
        /// chunks per block
        cpg: "int" => i32,
        sv: "int" => i32,
        sdt: "int" => i32,
        sz: "int" => i32,
        sdv: "int" => i32,
        sddt: "int" => i32,
        sdz: "int" => i32,
    }

    /// `scan_tail_dbc_f32` (kernels/mamba_train.cu): dbc (B, L2N) = Σ over the CB channel
    /// blocks of part (B, CB, L2N).
    struct ScanTailDbcParams {
        /// (B, CB, L2N) f32
        part: "const float*" => u64,
        /// (B, L2N) f32
        dbc: "float*" => u64,
        Bn: "int" => i32,
        CB: "int" => i32,
        L2N: "int" => i32,
    }
}

impl ScanIn {
    /// The sizes from `usize` (B, L, di, N, LC, Q), each checked to fit an `int`.
    pub fn new(bn: usize, l: usize, di: usize, n: usize, lc: usize, q: usize) -> Result<Self> {
        Ok(Self {
            Bn: to_i32(bn, "scan: batch")?,
            L: to_i32(l, "scan: length")?,
            di: to_i32(di, "scan: channels")?,
            N: to_i32(n, "scan: states")?,
            LC: to_i32(lc, "scan: chunk length")?,
            Q: to_i32(q, "scan: chunks")?,
        })
    }
}

//! Params of the single-token Mamba step (kernels/mamba_step.cu), the batch-1 decode kernels
//! (kernels/decode.cuh, kernels/decode.cu, kernels/qgemv.cu, kernels/sample.cu) and the prefill
//! kernels (kernels/prefill.cu). `res` is the f32 residual stream (d); `vec` is 1 when the rows of
//! K values (dense: elements; packed: the row's codes) are 16-byte multiples (the 16-byte load
//! path). A decode kernel reading a weight matrix takes the same struct in its dense entry point
//! (decode.cu: the matrix is `W`, `emb` or `E`, or the rows `wtab` points to) and in its packed
//! ones (qgemv.cu, `--quant`: the matrix is `q`, a [`PackedRows`], and the dense pointer is 0).

use super::params;

params! {
    DECODE;

    /// `conv_xproj_T`: v = SiLU(conv window) of the u half, then dbc = W_x · v (grid (row
    /// blocks, B)).
    struct ConvXprojParams {
        /// (B, ·) T rows of stride `xz_stride`, u = the first di values
        xz: "const T*" => u64,
        /// (B, di, K) f32 conv state
        conv: "const float*" => u64,
        /// (di, K) f32
        cw: "const float*" => u64,
        /// (di) f32
        cb: "const float*" => u64,
        /// (R2, di) T
        Wx: "const T*" => u64,
        /// (B, R2) T
        dbc: "T*" => u64,
        di: "int" => i32,
        K: "int" => i32,
        R2: "int" => i32,
        xz_stride: "int" => i32,
        vec: "int" => i32,
    }

    /// `ssm_step_T`: dt_proj + softplus + the SSM update + D skip + gate (the decode step's too).
    struct SsmStepParams {
        /// (B, ·) T rows of stride `xz_stride`: [u (di); z (di)]
        xz: "const T*" => u64,
        /// (B, di, K) f32
        conv_in: "const float*" => u64,
        /// (B, di, K) f32 (may be `conv_in`: updated in place)
        conv_out: "float*" => u64,
        /// (di, K) f32
        cw: "const float*" => u64,
        /// (di) f32
        cb: "const float*" => u64,
        /// (B, R + 2N) T: [δ; B; C]
        dbc: "const T*" => u64,
        /// (di, R) T
        Wdt: "const T*" => u64,
        /// (di) f32
        dt_bias: "const float*" => u64,
        /// (di, N) f32
        A_log: "const float*" => u64,
        /// (di) f32
        Dp: "const float*" => u64,
        /// (B, di, N) f32
        h_in: "const float*" => u64,
        /// (B, di, N) f32 (may be `h_in`)
        h_out: "float*" => u64,
        /// (B, di) T
        y: "T*" => u64,
        /// telemetry sums or 0 (see `telem_mode`)
        telem: "float*" => u64,
        Bn: "int" => i32,
        di: "int" => i32,
        R: "int" => i32,
        N: "int" => i32,
        K: "int" => i32,
        xz_stride: "int" => i32,
        /// 0: (B, 3) sums; 1: per-block partials (the decode step's)
        telem_mode: "int" => i32,
    }

    /// The packed form of a decode kernel's weight matrix (`QRows` of kernels/qweight.cuh), all
    /// zero for a dense launch.
    struct PackedRows {
        /// (rows, row bytes) codes, or 0 where `wtab` holds them
        codes: "const unsigned char*" => u64,
        /// the matrix's f16 scales, or 0 for a table launch
        scales: "const f16*" => u64,
        /// with `wtab`: the experts' scales pointers, laid out as `wtab`'s codes pointers
        stab: "const unsigned long long*" => u64,
        /// log2 of the q4 group (6 or 7); 0 for int8 and fp8
        gshift: "int" => i32,
    }

    /// `embed_T`: `res = E[tok[0]]`.
    struct EmbedParams {
        /// (V, d) T
        emb: "const T*" => u64,
        /// (1) u32
        tok: "const unsigned int*" => u64,
        /// (d) f32
        res: "float*" => u64,
        /// the packed embedding (qgemv.cu)
        q: "PackedRows" => PackedRows,
        d: "int" => i32,
    }

    /// `in_proj_conv_T`: xz = W_in · T(rmsnorm(res)) (+ bias), v = SiLU(conv window) of the u
    /// half.
    struct InProjConvParams {
        /// (M, K) T, M = 2·di
        W: "const T*" => u64,
        /// (K) f32
        res: "const float*" => u64,
        /// (K) f32 RMSNorm weight
        nw: "const float*" => u64,
        /// (M) T or 0
        bias: "const T*" => u64,
        /// (M) T
        xz: "T*" => u64,
        /// (di, KC) f32 conv state
        conv: "const float*" => u64,
        /// (di, KC) f32
        cw: "const float*" => u64,
        /// (di) f32
        cb: "const float*" => u64,
        /// (di) T
        vout: "T*" => u64,
        /// the packed W (qgemv.cu)
        q: "PackedRows" => PackedRows,
        M: "int" => i32,
        K: "int" => i32,
        eps: "float" => f32,
        di: "int" => i32,
        KC: "int" => i32,
        vec: "int" => i32,
    }

    /// `gemv_rows_T`: out = W · x, one block per row.
    struct GemvRowsParams {
        /// (M, K) T
        W: "const T*" => u64,
        /// (K) T
        x: "const T*" => u64,
        /// (M) T
        out: "T*" => u64,
        /// the packed W (qgemv.cu)
        q: "PackedRows" => PackedRows,
        M: "int" => i32,
        K: "int" => i32,
        vec: "int" => i32,
    }

    /// `moe_fc1_T`: the router (top-1, σ gate) in every block, then the chosen expert's fc1 and
    /// activation.
    struct MoeFc1Params {
        /// (E, K) f32 router
        Wr: "const float*" => u64,
        /// (E) f32 or 0
        br: "const float*" => u64,
        /// (E) device addresses of the experts' fc1 (M, K)
        wtab: "const unsigned long long*" => u64,
        /// (4 words) the chosen expert, then its gate (f32)
        route: "int*" => u64,
        /// (E + 1) telemetry words or 0
        telem: "float*" => u64,
        /// (K) f32
        res: "const float*" => u64,
        /// (K) f32 RMSNorm weight
        nw: "const float*" => u64,
        /// the activation (see `moe_fc1_impl`)
        out: "T*" => u64,
        /// packed experts (qgemv.cu): codes in `wtab`, scales in `q.stab`
        q: "PackedRows" => PackedRows,
        E: "int" => i32,
        M: "int" => i32,
        K: "int" => i32,
        eps: "float" => f32,
        /// 1: gated activation, 2: plain activation
        epi: "int" => i32,
        /// 0 = GELU (erf), 1 = SiLU
        act: "int" => i32,
        vec: "int" => i32,
    }

    /// `gemv_resid_T`: res += gate · (W · x) (split-K over gridDim.y); W, or the routed expert's
    /// matrix from `wtab`.
    struct GemvResidParams {
        /// (M, K) T or 0 (then `wtab[route[0]]`)
        W: "const T*" => u64,
        /// (E) device addresses or 0
        wtab: "const unsigned long long*" => u64,
        /// the chosen expert or 0
        route: "const int*" => u64,
        /// (K) T
        x: "const T*" => u64,
        /// (M) f32
        res: "float*" => u64,
        /// (1) f32 or 0
        gate: "const float*" => u64,
        /// (M) T or 0
        bias: "const T*" => u64,
        /// the packed W, or with `wtab` the experts' (as in [`MoeFc1Params`])
        q: "PackedRows" => PackedRows,
        M: "int" => i32,
        K: "int" => i32,
        vec: "int" => i32,
    }

    /// `head_T`: logits = E · layernorm(res) (f32) and each block's argmax candidate.
    struct HeadParams {
        /// (V, K) T
        E: "const T*" => u64,
        /// (K) f32
        res: "const float*" => u64,
        /// (K) f32 LayerNorm weight
        lw: "const float*" => u64,
        /// (K) f32 LayerNorm bias
        lb: "const float*" => u64,
        /// (V) f32
        logits: "float*" => u64,
        /// (blocks) f32 candidates' values
        pv: "float*" => u64,
        /// (blocks) candidates' ids
        pi: "int*" => u64,
        /// the packed E (qgemv.cu)
        q: "PackedRows" => PackedRows,
        V: "int" => i32,
        K: "int" => i32,
        eps: "float" => f32,
        vec: "int" => i32,
    }

    /// `sample_final`: argmax over the blocks' candidates -> tok, `out[0]`; step += 1; the
    /// telemetry sums.
    struct SampleFinalParams {
        /// (n) f32
        pv: "const float*" => u64,
        /// (n)
        pi: "const int*" => u64,
        /// (1) u32
        tok: "unsigned int*" => u64,
        /// (1) u32
        step: "unsigned int*" => u64,
        /// the step's output words
        out: "unsigned int*" => u64,
        /// (n_layers, nblk, 3) f32 telemetry partials or 0
        parts: "const float*" => u64,
        n: "int" => i32,
        n_layers: "int" => i32,
        nblk: "int" => i32,
    }

    /// `set_token`: `tok[0] = id`.
    struct SetTokenParams {
        /// (1) u32
        tok: "unsigned int*" => u64,
        id: "unsigned int" => u32,
    }

    /// `sample_logits` (kernels/sample.cu): the device sampler; as `sample_final`, over
    /// penalised logits.
    struct SampleLogitsParams {
        /// (V) f32, penalised in place
        logits: "float*" => u64,
        /// the sampler's state (`SampleState` in kernels/sample.cu)
        st: "SampleState*" => u64,
        /// the sampler's token history
        hist: "unsigned int*" => u64,
        /// (1) u32
        tok: "unsigned int*" => u64,
        /// (1) u32
        step: "unsigned int*" => u64,
        /// the step's output words
        out: "unsigned int*" => u64,
        /// as in [`SampleFinalParams`]
        parts: "const float*" => u64,
        V: "int" => i32,
        n_layers: "int" => i32,
        nblk: "int" => i32,
    }

    /// `add_rmsnorm_T` (add f32) and `add_rmsnorm_t_T` (add in T) (kernels/prefill.cu):
    /// res_out = res + add (f32), out = T(RMSNorm(res_out) · w); one block per token row.
    struct AddRmsnormParams {
        /// (rows, d) f32
        res: "const float*" => u64,
        /// (rows, d) TA or 0 (the first layer)
        add: "const TA*" => u64,
        /// (rows, d) f32
        res_out: "float*" => u64,
        /// (d) f32
        w: "const float*" => u64,
        /// (rows, d) T
        out: "T*" => u64,
        d: "int" => i32,
        eps: "float" => f32,
    }

    /// `conv1d_fwd_T` (kernels/prefill.cu): the causal depthwise conv over the sequence from
    /// the conv state, + SiLU.
    struct Conv1dFwdParams {
        /// (B, L, ·) T rows of stride `xz_stride`, u = the first di values
        xz: "const T*" => u64,
        /// (B, di, K) f32
        conv_in: "const float*" => u64,
        /// (di, K) f32
        cw: "const float*" => u64,
        /// (di) f32
        cb: "const float*" => u64,
        /// (B, L, di) f32
        v: "float*" => u64,
        /// (B, L, di) T
        vt: "T*" => u64,
        /// (B, di, K) f32
        conv_out: "float*" => u64,
        Bn: "int" => i32,
        L: "int" => i32,
        di: "int" => i32,
        K: "int" => i32,
        xz_stride: "int" => i32,
    }

    /// `router_top1_T` (kernels/prefill.cu): logits = Wr · x + br (f32), the top-1 expert and
    /// its σ gate; one warp per token.
    struct RouterTop1Params {
        /// (Tn, d) T
        x: "const T*" => u64,
        /// (E, d) f32
        Wr: "const float*" => u64,
        /// (E) f32
        br: "const float*" => u64,
        /// (Tn, E) f32
        logits: "float*" => u64,
        /// (Tn)
        expert: "int*" => u64,
        /// (Tn) f32
        gate: "float*" => u64,
        Tn: "int" => i32,
        d: "int" => i32,
        E: "int" => i32,
        /// 1: Wr is staged in E · d floats of dynamic shared memory
        in_smem: "int" => i32,
    }

    /// `moe_group` (kernels/prefill.cu): tokens grouped per expert (stable), the inverse
    /// permutation and the counts; one block.
    struct MoeGroupParams {
        /// (Tn)
        expert: "const int*" => u64,
        /// (Tn) the token at each grouped position
        order: "int*" => u64,
        /// (Tn) the grouped position of each token
        inverse: "int*" => u64,
        /// (E)
        counts: "int*" => u64,
        Tn: "int" => i32,
        /// at most 16
        E: "int" => i32,
    }

    /// `moe_pad_index` (kernels/prefill.cu): each token's row in the expert-major padded layout
    /// (E, stride, ·).
    struct MoePadIndexParams {
        /// (Tn)
        expert: "const int*" => u64,
        /// (Tn) from `moe_group`'s order
        inverse: "const int*" => u64,
        /// (E) each expert's first grouped position
        base: "const int*" => u64,
        /// (Tn)
        padpos: "int*" => u64,
        /// (E · stride); padding rows keep the caller's value
        order_pad: "int*" => u64,
        Tn: "int" => i32,
        E: "int" => i32,
        stride: "int" => i32,
    }

    /// `moe_unpermute_T` (kernels/prefill.cu): `y[t] = f32(ys[inverse[t]]) · gate[t]`.
    struct MoeUnpermuteParams {
        /// (rows, d) T in grouped (or padded) order
        ys: "const T*" => u64,
        /// (Tn) the row of each token in ys
        inverse: "const int*" => u64,
        /// (Tn) f32
        gate: "const float*" => u64,
        /// (Tn, d) f32
        y: "float*" => u64,
        Tn: "int" => i32,
        d: "int" => i32,
    }

    /// `megakernel` (kernels/megakernel.cu): one token; dynamic shared memory d + aux_n +
    /// rows_n + 40 floats.
    struct MegakernelParams {
        /// the parameter block (`MkParams` in kernels/megakernel.cu)
        params: "const MkParams*" => u64,
        token: "unsigned int" => u32,
        /// tokens run since the buffers were made
        epoch: "unsigned int" => u32,
        aux_n: "int" => i32,
        rows_n: "int" => i32,
    }
}

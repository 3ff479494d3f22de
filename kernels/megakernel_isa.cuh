// The megakernel's instruction words (issue 17): what src/runtime/megakernel/isa.rs encodes and
// the future persistent kernel reads. Constants only, no kernel yet; tests/megakernel_sched.rs
// checks every MK_ value against the Rust encoder, so change both together.
// See docs/decode.md "Megakernel design".
#pragma once
#include <stdint.h>

// An instruction: 16 little-endian u32 words (64 bytes), one list per SM.
#define MK_WORDS 16
#define MK_MAX_WAITS 2
#define MK_MAX_OPERANDS 3

// Word indices.
#define MK_W_HEAD 0      // opcode (bits 0-7) | flags (8-15) | number of waits (16-19)
#define MK_W_LAYER 1
#define MK_W_ROW0 2      // the tile's output rows [ROW0, ROW1)
#define MK_W_ROW1 3
#define MK_W_TILE 4      // tile index within its op, and the op's tile count
#define MK_W_TILES 5
#define MK_W_WAIT0 6     // wait k: counter at WAIT0 + 2k, target per token at WAIT0 + 2k + 1
#define MK_W_SIGNAL 10   // the counter to add 1 to when the outputs are visible
#define MK_W_FORMATS 11  // one format byte per weight operand, operand k in bits 8k..8k+7
#define MK_W_BYTES_LO 12 // weight bytes of the tile
#define MK_W_BYTES_HI 13

// Flags (bits 8-15 of MK_W_HEAD).
#define MK_FLAG_FIRST 1  // first tile: adds the residual and the output bias, writes the route
#define MK_FLAG_EXPERT 2 // weights known only after the router: stream the next instruction's first

// Opcodes.
#define MK_OP_MAMBA_IN 1  // norm, in_proj u/z, conv + SiLU, x_proj partial sums -> XP[L]
#define MK_OP_MAMBA_SSM 2 // dt_proj + softplus, state update, C, D, SiLU(z), out_proj partials -> RES[L+1]
#define MK_OP_MOE_FFN 3   // norm, router + argmax, expert fc1 + act, fc2 partials x gate -> RES[L+1]
#define MK_OP_DENSE_FFN 4 // as MOE_FFN without the router
#define MK_OP_HEAD 5      // final LayerNorm, LM-head rows -> DONE

// Weight formats (low 4 bits; for Q4 the high 4 bits are log2 of the group size). Each stored row
// is its values then its scales: INT8 / FP8 one f32 scale per row, Q4 one f16 scale per group.
#define MK_FMT_F32 0
#define MK_FMT_BF16 1
#define MK_FMT_FP8_E4M3 2
#define MK_FMT_INT8 3
#define MK_FMT_Q4 4

struct MkInstr {
    uint32_t w[MK_WORDS];
};

//! The megakernel's instruction set: what one SM is told to do for one tile of one op, the
//! dependency counters it waits on and signals, the storage format of each weight it streams, and
//! the fixed-size `#[repr(C)]` words the CUDA kernel will read ([`Encoded`]).

use crate::error::{Error, Result};

/// What an instruction computes (one tile of a fused stage; see docs/decode.md "Megakernel design").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpKind {
    /// Mamba stage 1 over a range of d_inner channels: RMSNorm of the residual (redundant per
    /// tile), the in_proj rows u and z of those channels, the conv window shift + conv + SiLU in
    /// the epilogue, and the x_proj split-K partial sums `W_xᵀ[own] · v[own]` added into the
    /// layer's (dt_rank + 2N) vector.
    MambaIn = 1,
    /// Mamba stage 2 over the same channels: dt_proj + bias + softplus, the selective-state
    /// update, the C contraction, the D skip, the SiLU(z) gate, and the out_proj split-K partial
    /// sums added into the next residual (tile 0 also adds the residual itself and the bias).
    MambaSsm = 2,
    /// A MoE layer over a range of the expert's hidden units: RMSNorm + router + argmax
    /// (redundant per tile, on the consumer side of the previous layer's output), then the chosen
    /// expert's fc1 rows, the gated activation and the fc2 split-K partial sums, scaled by the
    /// gate, added into the next residual. Tile 0 also writes the route.
    MoeFfn = 3,
    /// A dense MLP layer: [`OpKind::MoeFfn`] without the router (gate 1).
    DenseFfn = 4,
    /// Final LayerNorm (redundant per tile) and a range of LM-head rows: the logits.
    Head = 5,
}

impl OpKind {
    /// Every op, in opcode order.
    pub const ALL: [Self; 5] = [Self::MambaIn, Self::MambaSsm, Self::MoeFfn, Self::DenseFfn, Self::Head];

    /// The opcode of [`Encoded`] word 0.
    pub fn code(self) -> u32 {
        self as u32
    }

    fn from_code(c: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.code() == c)
    }

    /// A short name for messages and tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::MambaIn => "mamba_in",
            Self::MambaSsm => "mamba_ssm",
            Self::MoeFfn => "moe_ffn",
            Self::DenseFfn => "dense_ffn",
            Self::Head => "head",
        }
    }

    /// The names of the weight operands whose formats [`Instr::formats`] holds, in slot order.
    pub fn operands(self) -> &'static [&'static str] {
        match self {
            Self::MambaIn => &["in_proj", "x_projᵀ"],
            Self::MambaSsm => &["dt_proj", "out_projᵀ"],
            Self::MoeFfn | Self::DenseFfn => &["fc1", "fc2ᵀ"],
            Self::Head => &["embedding"],
        }
    }
}

/// How a weight tile is stored (issue 22): the kernel dequantises per format. Scales are per
/// stored row of the tile (an output channel of a row-major matrix, an input channel of the
/// matrices stored transposed for split-K), so a tile carries its own scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WeightFormat {
    /// 4 bytes per value.
    F32,
    /// 2 bytes per value, as the checkpoints store them.
    #[default]
    Bf16,
    /// FP8 e4m3, 1 byte per value plus an f32 scale per row.
    Fp8E4m3,
    /// int8, 1 byte per value plus an f32 scale per row (per channel).
    Int8,
    /// 4-bit values, two per byte, plus an f16 scale per `group` values of a row.
    Q4 {
        /// Values per scale: a power of two in 2..=32768.
        group: u32,
    },
}

impl WeightFormat {
    /// Bytes of a `rows` × `cols` tile in this format (values, then scales).
    pub fn bytes(self, rows: usize, cols: usize) -> u64 {
        let (r, c) = (rows as u64, cols as u64);
        match self {
            Self::F32 => 4 * r * c,
            Self::Bf16 => 2 * r * c,
            Self::Fp8E4m3 | Self::Int8 => r * c + 4 * r,
            Self::Q4 { group } => r * c.div_ceil(2) + 2 * r * c.div_ceil(u64::from(group.max(1))),
        }
    }

    /// Checks the format's parameters (a Q4 group size).
    pub fn check(self) -> Result<()> {
        match self {
            Self::Q4 { group } if !(2..=32768).contains(&group) || !group.is_power_of_two() => Err(Error::Invalid(format!(
                "megakernel: Q4 group size {group} must be a power of two in 2..=32768"
            ))),
            _ => Ok(()),
        }
    }

    /// One byte: the kind in the low 4 bits, log2 of the Q4 group in the high 4.
    pub fn code(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::Bf16 => 1,
            Self::Fp8E4m3 => 2,
            Self::Int8 => 3,
            Self::Q4 { group } => 4 | ((group.max(1).trailing_zeros().min(15) as u8) << 4),
        }
    }

    /// The inverse of [`WeightFormat::code`].
    pub fn from_code(c: u8) -> Result<Self> {
        let f = match (c & 15, c >> 4) {
            (0, 0) => Self::F32,
            (1, 0) => Self::Bf16,
            (2, 0) => Self::Fp8E4m3,
            (3, 0) => Self::Int8,
            (4, g) if g >= 1 => Self::Q4 { group: 1 << g },
            _ => return Err(Error::Invalid(format!("megakernel: unknown weight format code {c:#04x}"))),
        };
        Ok(f)
    }
}

/// What a dependency counter counts; one per consumed stage output per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CounterKind {
    /// The residual entering half-block `l` is complete (its producers: the tiles of layer
    /// l−1's last stage). The residual entering layer 0 is the embedding row: no counter.
    Res(u32),
    /// The x_proj sums of Mamba layer `l` are complete (producers: its [`OpKind::MambaIn`] tiles).
    Xp(u32),
    /// The logits are complete (producers: the head tiles); what the sampler will wait on.
    Done,
}

impl std::fmt::Display for CounterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Res(l) => write!(f, "RES[{l}] (residual into layer {l})"),
            Self::Xp(l) => write!(f, "XP[{l}] (x_proj sums of layer {l})"),
            Self::Done => write!(f, "DONE (logits)"),
        }
    }
}

/// A counter in global memory: monotonic across tokens, so token t (from 0) waits until it
/// reaches `target · (t + 1)` and nothing is reset between tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub kind: CounterKind,
    /// Signals per token: the number of producer tiles.
    pub target: u32,
}

/// A wait before an instruction reads its inputs (its weights may already be streaming).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Index into [`super::Schedule::counters`].
    pub counter: u32,
    /// Signals per token the instruction waits for.
    pub target: u32,
}

/// The most waits one instruction may carry (the encoding's slots).
pub const MAX_WAITS: usize = 2;
/// The most weight operands one instruction may carry (the encoding's format slots).
pub const MAX_OPERANDS: usize = 3;

/// One tile of one op for one SM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instr {
    pub op: OpKind,
    /// Half-block index (the number of layers for the head).
    pub layer: u32,
    /// Rows of the op's output space this tile owns: d_inner channels (Mamba), hidden units
    /// (FFN), vocabulary rows (head).
    pub rows: (u32, u32),
    /// Index of the tile within its op and the op's tile count; tile 0 adds the residual and
    /// the output bias and writes the route.
    pub tile: u32,
    pub tiles: u32,
    pub waits: Vec<Wait>,
    /// The counter it adds 1 to when its outputs are visible.
    pub signal: u32,
    /// Format of each weight operand, in [`OpKind::operands`] order.
    pub formats: Vec<WeightFormat>,
    /// Bytes of weights this tile streams (of the chosen expert for a MoE tile).
    pub weight_bytes: u64,
}

impl Instr {
    /// Whether the weights depend on the router's choice (known only after its argmax): the
    /// loader streams the next instruction's weights meanwhile.
    pub fn expert_dependent(&self) -> bool {
        self.op == OpKind::MoeFfn
    }

    /// A one-line description for messages.
    pub fn describe(&self) -> String {
        format!(
            "{} layer {} rows {}..{} (tile {}/{})",
            self.op.name(),
            self.layer,
            self.rows.0,
            self.rows.1,
            self.tile,
            self.tiles
        )
    }
}

/// Words per encoded instruction.
pub const WORDS: usize = 16;
/// The signal word of an instruction that signals nothing (never built; rejected by decode).
const NO_COUNTER: u32 = u32::MAX;
/// Flag (word 0, bits 8-15): the op's first tile (adds the residual and the bias, writes the route).
pub const FLAG_FIRST: u32 = 1;
/// Flag: the weights depend on the router's choice (the loader streams the next instruction's first).
pub const FLAG_EXPERT: u32 = 2;

/// Word indices of [`Encoded`] (mirrored in `kernels/megakernel_isa.cuh`).
pub mod word {
    /// Opcode (bits 0-7), flags (8-15), number of waits (16-19).
    pub const HEAD: usize = 0;
    pub const LAYER: usize = 1;
    /// First and end row of the tile.
    pub const ROW0: usize = 2;
    pub const ROW1: usize = 3;
    pub const TILE: usize = 4;
    pub const TILES: usize = 5;
    /// Wait k: counter at `WAIT0 + 2k`, target per token at `WAIT0 + 2k + 1`.
    pub const WAIT0: usize = 6;
    pub const SIGNAL: usize = 10;
    /// One format byte per weight operand, operand k in bits 8k..8k+7.
    pub const FORMATS: usize = 11;
    pub const BYTES_LO: usize = 12;
    pub const BYTES_HI: usize = 13;
}

/// An instruction as the kernel reads it: 16 little-endian u32 words (64 bytes, one per
/// controller fetch).
///
/// | word | meaning |
/// |---|---|
/// | 0 | opcode (bits 0-7), flags (8-15: 1 first tile, 2 expert-dependent weights), waits (16-19) |
/// | 1 | layer |
/// | 2, 3 | first row, end row |
/// | 4, 5 | tile, tiles |
/// | 6, 7 / 8, 9 | wait 0 / 1: counter, target per token |
/// | 10 | counter to signal |
/// | 11 | weight formats, one byte per operand ([`WeightFormat::code`]) |
/// | 12, 13 | weight bytes, low and high word |
/// | 14, 15 | reserved, zero |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Encoded {
    pub words: [u32; WORDS],
}

impl Instr {
    /// The kernel's words for this instruction.
    pub fn encode(&self) -> Result<Encoded> {
        if self.waits.len() > MAX_WAITS || self.formats.len() > MAX_OPERANDS {
            return Err(Error::Invalid(format!(
                "megakernel: {} has {} waits and {} operands; the encoding holds {MAX_WAITS} and {MAX_OPERANDS}",
                self.describe(),
                self.waits.len(),
                self.formats.len()
            )));
        }
        let mut w = [0u32; WORDS];
        let flags = if self.tile == 0 { FLAG_FIRST } else { 0 } | if self.expert_dependent() { FLAG_EXPERT } else { 0 };
        w[word::HEAD] = self.op.code() | (flags << 8) | ((self.waits.len() as u32) << 16);
        w[word::LAYER] = self.layer;
        (w[word::ROW0], w[word::ROW1]) = self.rows;
        (w[word::TILE], w[word::TILES]) = (self.tile, self.tiles);
        for (k, wait) in self.waits.iter().enumerate() {
            w[word::WAIT0 + 2 * k] = wait.counter;
            w[word::WAIT0 + 2 * k + 1] = wait.target;
        }
        w[word::SIGNAL] = self.signal;
        for (k, f) in self.formats.iter().enumerate() {
            w[word::FORMATS] |= u32::from(f.code()) << (8 * k);
        }
        w[word::BYTES_LO] = self.weight_bytes as u32;
        w[word::BYTES_HI] = (self.weight_bytes >> 32) as u32;
        Ok(Encoded { words: w })
    }

    /// Reads an instruction back from its words, rejecting anything the encoder never writes.
    pub fn decode(e: &Encoded) -> Result<Self> {
        let w = &e.words;
        let bad = |why: String| Error::Invalid(format!("megakernel: bad encoded instruction {w:?}: {why}"));
        let head = w[word::HEAD];
        let op = OpKind::from_code(head & 0xff).ok_or_else(|| bad(format!("unknown opcode {}", head & 0xff)))?;
        let flags = (head >> 8) & 0xff;
        let n_waits = ((head >> 16) & 0xf) as usize;
        if head >> 20 != 0 || flags & !(FLAG_FIRST | FLAG_EXPERT) != 0 || n_waits > MAX_WAITS {
            return Err(bad("reserved bits of word 0 set or too many waits".into()));
        }
        if (n_waits..MAX_WAITS).any(|k| w[word::WAIT0 + 2 * k] != 0 || w[word::WAIT0 + 2 * k + 1] != 0) {
            return Err(bad("an unused wait slot is not zero".into()));
        }
        if w[word::BYTES_HI + 1..].iter().any(|&x| x != 0) || w[word::SIGNAL] == NO_COUNTER {
            return Err(bad("reserved words set or no counter to signal".into()));
        }
        let waits = (0..n_waits).map(|k| Wait {
            counter: w[word::WAIT0 + 2 * k],
            target: w[word::WAIT0 + 2 * k + 1],
        });
        let n_ops = op.operands().len();
        let formats = (0..n_ops)
            .map(|k| WeightFormat::from_code((w[word::FORMATS] >> (8 * k)) as u8))
            .collect::<Result<Vec<_>>>()?;
        if w[word::FORMATS] >> (8 * n_ops) != 0 {
            return Err(bad(format!("formats for more than the op's {n_ops} operands")));
        }
        let instr = Self {
            op,
            layer: w[word::LAYER],
            rows: (w[word::ROW0], w[word::ROW1]),
            tile: w[word::TILE],
            tiles: w[word::TILES],
            waits: waits.collect(),
            signal: w[word::SIGNAL],
            formats,
            weight_bytes: u64::from(w[word::BYTES_LO]) | (u64::from(w[word::BYTES_HI]) << 32),
        };
        let want = if instr.tile == 0 { FLAG_FIRST } else { 0 } | if instr.expert_dependent() { FLAG_EXPERT } else { 0 };
        if flags != want {
            return Err(bad(format!("flags {flags:#x} disagree with the op and tile (expected {want:#x})")));
        }
        Ok(instr)
    }
}

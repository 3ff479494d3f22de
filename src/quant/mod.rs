//! Weight-only quantisation (issue 22): the formats, which tensors take them, and the model's
//! linear layers running them.
//!
//! A quantised matrix W (rows = output channels, cols = inputs) is stored as codes and `f16`
//! scales ([`QWeight`]); every format is symmetric (no zero point), round-to-nearest at load:
//!
//! | format | bits | scale per | codes | value |
//! |---|---|---|---|---|
//! | `int8`  | 8 | output channel (row) | i8 in [-127, 127], one byte each | s·q |
//! | `fp8`   | 8 | output channel (row) | FP8 E4M3 (OCP "e4m3fn"), one byte each | s·e4m3(q) |
//! | `q4` (`q4g64`), `q4g128` | 4 | group of 64 / 128 inputs of a row | q+8 in [1, 15] per nibble, two per byte, low nibble first | s·q |
//!
//! The scale is chosen so that the largest |w| of its row or group maps to the largest code
//! (127, 448 or 7), then rounded to `f16` and, if that rounding made it smaller, raised by one
//! `f16` step: no code saturates, so every element is within half a step (s/2; for fp8 half the
//! E4M3 spacing at that value, times s) of its original. `docs/quantization.md` documents the
//! checkpoint layout. On the CPU, `int8` and `q4` run through candle's GGML matmuls (`Q8_0` and
//! `Q4_0` blocks hold exactly these codes and scales); the CUDA decoder reads the packed codes
//! through its quantised kernels (`kernels/qgemv.cu`); `fp8` on the CPU, the GPU's prefill and
//! `--no-kernels` run the dequantise-then-matmul twin (the dense copy every linear keeps, see
//! [`apply`]).

pub mod apply;
pub mod checkpoint;
pub mod compare;
pub mod fp8;
pub mod gptq;
pub mod qweight;

use crate::error::{Error, Result};

pub use apply::{quantize_model, QLinear};
pub use qweight::QWeight;

/// A weight-only format (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 8-bit integers, one scale per output channel.
    Int8,
    /// FP8 E4M3, one scale per output channel.
    Fp8,
    /// 4-bit integers, one scale per `group` inputs of a row (64 or 128).
    Q4 { group: usize },
}

impl QuantFormat {
    /// The group sizes `q4` takes.
    pub const Q4_GROUPS: [usize; 2] = [64, 128];

    /// Bits per stored weight (scales not counted).
    pub fn bits(self) -> usize {
        match self {
            Self::Int8 | Self::Fp8 => 8,
            Self::Q4 { .. } => 4,
        }
    }

    /// Inputs per scale: `None` is one scale per output channel (a whole row).
    pub fn group(self) -> Option<usize> {
        match self {
            Self::Q4 { group } => Some(group),
            _ => None,
        }
    }

    /// The largest code magnitude, which the largest |w| of a row or group maps to.
    pub fn qmax(self) -> f32 {
        match self {
            Self::Int8 => 127.0,
            Self::Fp8 => fp8::E4M3_MAX,
            Self::Q4 { .. } => 7.0,
        }
    }

    /// The name as on the command line and in `quantization.json`.
    pub fn name(self) -> String {
        match self {
            Self::Int8 => "int8".into(),
            Self::Fp8 => "fp8".into(),
            Self::Q4 { group } => format!("q4g{group}"),
        }
    }

    /// A q4 format of a group size, or the one-line error naming the sizes there are.
    pub fn q4(group: usize) -> Result<Self> {
        match Self::Q4_GROUPS.contains(&group) {
            true => Ok(Self::Q4 { group }),
            false => Err(Error::Invalid(format!(
                "q4 group size {group} is not supported: use q4g64 or q4g128"
            ))),
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::str::FromStr for QuantFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "int8" | "q8" => Ok(Self::Int8),
            "fp8" | "e4m3" => Ok(Self::Fp8),
            "q4" => Ok(Self::Q4 { group: 64 }),
            other => match other.strip_prefix("q4g").map(str::parse::<usize>) {
                Some(Ok(g)) => Self::q4(g),
                _ => Err(Error::Invalid(format!(
                    "--quant {s}: unknown format; use int8, fp8, q4 (= q4g64) or q4g128"
                ))),
            },
        }
    }
}

/// A family of tensors that `--quant-keep` / `--quant-also` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Part {
    /// Mamba `in_proj` (quantised by default).
    InProj,
    /// Mamba `x_proj` (quantised by default).
    XProj,
    /// Mamba `out_proj` (quantised by default).
    OutProj,
    /// The experts' and dense MLPs' `linear_fc1` (quantised by default).
    Fc1,
    /// The experts' and dense MLPs' `linear_fc2` (quantised by default).
    Fc2,
    /// The embedding, which is also the tied LM head (quantised by default).
    Embedding,
    /// The MoE router (kept by default).
    Router,
    /// Mamba `dt_proj` (kept by default).
    DtProj,
    /// Mamba `conv1d.weight`, per channel (kept by default; quantised and dequantised in place).
    Conv,
    /// Mamba `A_log`, per channel (kept by default; quantised and dequantised in place).
    ALog,
    /// Mamba `D`, one row (kept by default; quantised and dequantised in place).
    D,
    /// The RMSNorm and final LayerNorm weights, one row each (kept by default; in place).
    Norms,
}

impl Part {
    /// The parts quantised unless `--quant-keep` names them.
    pub const DEFAULT: [Part; 6] = [Part::InProj, Part::XProj, Part::OutProj, Part::Fc1, Part::Fc2, Part::Embedding];
}

/// What `--quant` asks for: a format, the parts it applies to, and whether the CPU may take
/// candle's GGML matmuls for it (off: the dequantise-then-matmul twin, `--no-kernels`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantSpec {
    pub format: QuantFormat,
    /// The parts quantised.
    pub parts: Vec<Part>,
    /// GGML matmuls on the CPU where the format maps onto one (int8 → Q8_0, q4 → Q4_0).
    pub ggml: bool,
}

impl QuantSpec {
    /// [`Part::DEFAULT`] minus `keep` plus `also`; a part named in both is an error.
    pub fn new(format: QuantFormat, keep: &[Part], also: &[Part], ggml: bool) -> Result<Self> {
        if let Some(p) = keep.iter().find(|p| also.contains(p)) {
            return Err(Error::Invalid(format!(
                "--quant-keep and --quant-also both name {p:?}: name each part in one of them"
            )));
        }
        let mut parts: Vec<Part> = Part::DEFAULT.iter().copied().filter(|p| !keep.contains(p)).collect();
        for p in also {
            if !parts.contains(p) {
                parts.push(*p);
            }
        }
        Ok(Self { format, parts, ggml })
    }

    /// Whether a part is quantised.
    pub fn has(&self, p: Part) -> bool {
        self.parts.contains(&p)
    }
}

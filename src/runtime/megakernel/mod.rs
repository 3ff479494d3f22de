//! Batch-1 decode as one persistent megakernel per token (issue 17): the host side, its CPU
//! twin and (feature `cuda`) the first CUDA kernel's runtime; see docs/decode.md "Megakernel
//! design".
//!
//! * [`isa`]: the instruction set (one tile of one fused op for one SM, the counters it waits on
//!   and signals, each weight operand's [`isa::WeightFormat`]) and its fixed-size `#[repr(C)]`
//!   encoding;
//! * [`schedule`]: the per-SM instruction lists built once per model from a
//!   [`crate::model::config::Config`], an SM count and tile sizes, balanced by weight bytes;
//! * [`mod@validate`]: the buffers each instruction touches, static checks and simulated
//!   interleavings that must never deadlock nor read a range before its writers finish;
//! * [`pack`]: a weight tile's bytes in its format (bf16, f32, fp8 e4m3, int8, 4-bit) and back;
//! * [`host`]: the weights in the layout the kernel streams (split-K matrices transposed) and
//!   the recurrent state, as f32 host vectors;
//! * [`interp`]: the lists executed on the CPU in a simulated interleaving, the same tile
//!   arithmetic the kernel will do, against [`crate::model::Model::step`] in the tests.
//!
//! * `cuda` (feature `cuda`): the kernel (`kernels/megakernel.cu`) on a GPU, one cooperative
//!   launch per token; not yet run on a GPU.
//!
//! Nothing on the user's path runs this unless asked (`--megakernel`): the graph decoder
//! (`runtime::decode`) stays the default.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host;
pub mod interp;
pub mod isa;
pub mod pack;
pub mod schedule;
pub mod validate;

pub use host::{HostState, HostWeights};
pub use interp::{Interpreter, RouteOut, TokenOut};
pub use isa::{Counter, CounterKind, Encoded, Instr, OpKind, Wait, WeightFormat};
pub use schedule::{FormatPlan, Schedule, ScheduleOpts, ScheduleStats, TileSizes};
pub use validate::{validate, Access, Buf, Mode};

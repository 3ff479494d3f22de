//! blackmamba: a terminal playground for BlackMamba, Zyphra's Mamba + mixture-of-experts language
//! model. The library holds the model (exact against the reference), its loaders, Sinkhorn
//! routing, sampling and generation; the binary adds the CLI and the TUI.

pub mod analysis;
pub mod bench;
pub mod catalog;
pub mod chat_template;
pub mod commands;
pub mod config_file;
pub mod embedded;
pub mod engine;
pub mod error;
pub mod eval;
pub mod finetune;
pub mod fsutil;
pub mod generate;
pub mod gpu_arch;
pub mod hub;
pub mod lm;
pub mod loader;
pub mod model;
pub mod moe_lm;
pub mod ops;
pub mod quant;
pub mod rng;
pub mod runtime;
pub mod sampling;
pub mod signals;
pub mod sinkhorn;
pub mod tokenizer;
pub mod tui;

pub use error::{Error, Result};

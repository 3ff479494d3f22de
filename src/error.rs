//! The crate's error type. Every variant renders as one line that names the thing that is wrong
//! and, where there is one, the fix.

use std::path::PathBuf;

/// Errors of the library. `main.rs` wraps them with `anyhow` context at the edge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `config.json` key is missing, has the wrong type or an impossible value.
    #[error("config.json: key '{key}' {problem}")]
    Config { key: String, problem: String },

    /// A tensor the config needs is not in the checkpoint.
    #[error("checkpoint is missing tensor '{name}' (expected shape {expected:?}); is this a BlackMamba checkpoint matching config.json?")]
    MissingTensor { name: String, expected: Vec<usize> },

    /// The checkpoint holds a tensor the config does not explain.
    #[error("checkpoint has unexpected tensor '{name}' (shape {found:?}); config.json does not describe it")]
    UnexpectedTensor { name: String, found: Vec<usize> },

    /// A tensor has the wrong shape for the config.
    #[error("tensor '{name}' has shape {found:?}, expected {expected:?} from config.json")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A checkpoint file that cannot be read as what it claims to be.
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },

    /// A file that cannot be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A token id outside the model's vocabulary.
    #[error("token id {id} is outside the model's vocabulary of {vocab} ids")]
    TokenOutOfVocab { id: u32, vocab: usize },

    /// A tokenizer problem (loading, encoding or decoding).
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A bad argument value (sampling parameters, sizes, ...).
    #[error("{0}")]
    Invalid(String),

    /// The tensor library failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for a [`Error::Config`] error.
    pub fn config(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Config {
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// Shorthand for a [`Error::BadFile`] error.
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::BadFile {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// Shorthand for an [`Error::Io`] error.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

//! `--prompt TEXT` / `--prompt-file PATH` (`-` reads standard input), shared by `generate`,
//! `logits` and `trace`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Where the prompt text comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptSource {
    /// `--prompt TEXT`.
    Text(String),
    /// `--prompt-file PATH`.
    File(PathBuf),
    /// `--prompt-file -`.
    Stdin,
}

impl PromptSource {
    /// The source of `--prompt` / `--prompt-file` (clap keeps them exclusive); `None` if neither.
    pub fn from_args(prompt: Option<&str>, file: Option<&Path>) -> Option<Self> {
        match (prompt, file) {
            (Some(p), _) => Some(Self::Text(p.to_string())),
            (None, Some(f)) if f.as_os_str() == "-" => Some(Self::Stdin),
            (None, Some(f)) => Some(Self::File(f.to_path_buf())),
            (None, None) => None,
        }
    }

    /// Reads the whole text (UTF-8).
    pub fn read(&self) -> anyhow::Result<String> {
        match self {
            Self::Text(t) => Ok(t.clone()),
            Self::File(p) => {
                let bytes = std::fs::read(p).with_context(|| format!("--prompt-file {}", p.display()))?;
                String::from_utf8(bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "--prompt-file {}: not UTF-8 text (byte {}); save it as UTF-8",
                        p.display(),
                        e.utf8_error().valid_up_to()
                    )
                })
            }
            Self::Stdin => {
                let mut bytes = Vec::new();
                std::io::stdin()
                    .lock()
                    .read_to_end(&mut bytes)
                    .context("--prompt-file -: reading standard input")?;
                String::from_utf8(bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "--prompt-file -: standard input is not UTF-8 text (byte {})",
                        e.utf8_error().valid_up_to()
                    )
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dash_is_stdin_and_a_bad_file_is_named() {
        assert_eq!(PromptSource::from_args(None, Some(Path::new("-"))), Some(PromptSource::Stdin));
        assert_eq!(PromptSource::from_args(Some("hi"), None), Some(PromptSource::Text("hi".into())));
        assert_eq!(PromptSource::from_args(None, None), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.txt");
        std::fs::write(&p, b"ok \xff no").unwrap();
        let e = PromptSource::File(p.clone()).read().unwrap_err().to_string();
        assert!(e.contains("bad.txt") && e.contains("byte 3") && e.contains("UTF-8"), "{e}");
        std::fs::write(&p, "long\nprompt").unwrap();
        assert_eq!(PromptSource::File(p).read().unwrap(), "long\nprompt");
    }
}

//! `blackmamba chat` (and `blackmamba` with no subcommand): the terminal UI.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::commands::ModelArgs;
use crate::engine::protocol::LoadSpec;
use crate::signals::{Interrupted, Signals};
use crate::tui::Exit;

#[derive(Debug, Args, Default)]
pub struct ChatArgs {
    /// Colour theme: dark, light, high-contrast, or a .toml file (see themes/dark.toml).
    #[arg(long)]
    pub theme: Option<String>,
    /// System prompt of the chat (Ctrl-G changes it in the UI).
    #[arg(long, conflicts_with = "system_file")]
    pub system: Option<String>,
    /// Read the system prompt from this text file.
    #[arg(long)]
    pub system_file: Option<PathBuf>,
}

impl ChatArgs {
    /// These options, falling back to `other`'s (given before the subcommand).
    pub fn or(self, other: Self) -> Self {
        Self {
            theme: self.theme.or(other.theme),
            system: self.system.or(other.system),
            system_file: self.system_file.or(other.system_file),
        }
    }

    /// The system prompt given by `--system` or `--system-file` (trimmed; empty means none).
    pub fn system_prompt(&self) -> anyhow::Result<Option<String>> {
        let text = match (&self.system, &self.system_file) {
            (Some(s), _) => s.clone(),
            (None, Some(p)) => {
                std::fs::read_to_string(p).with_context(|| format!("--system-file {}: cannot read it as UTF-8 text", p.display()))?
            }
            (None, None) => return Ok(None),
        };
        let text = text.trim();
        Ok((!text.is_empty()).then(|| text.to_string()))
    }
}

/// Runs the TUI. SIGINT, SIGTERM and SIGHUP end it with the terminal restored and the signal's exit
/// code (via [`Interrupted`]).
pub fn run(m: &ModelArgs, a: &ChatArgs) -> anyhow::Result<()> {
    let load = LoadSpec {
        model: m.model.clone(),
        revision: m.revision.clone(),
        tokenizer: m.tokenizer.clone(),
        device: m.device.map(|d| d.as_str().to_string()),
        dtype: m.dtype.map(|d| d.as_str().to_string()),
        adapter: m.adapter.clone(),
        quant: m.quant_spec()?,
    };
    let system = a.system_prompt()?;
    let signals = Signals::install(false)?;
    let exit = crate::tui::run(crate::tui::Options {
        load,
        engine: crate::engine::protocol::EngineOpts {
            kernels: m.kernels.kernels(),
            hub: Some(super::environment::hub_env()),
        },
        theme: a.theme.clone(),
        theme_dir: super::environment::theme_dir(),
        system,
        signals,
    })
    .context("running the terminal UI")?;
    match exit {
        Exit::Quit => Ok(()),
        Exit::Signal(sig) => Err(Interrupted(sig).into()),
    }
}

//! `blackmamba chat` (and `blackmamba` with no subcommand): the terminal UI.

use clap::Args;

use crate::commands::ModelArgs;
use crate::engine::protocol::LoadSpec;

#[derive(Debug, Args, Default)]
pub struct ChatArgs {
    /// Colour theme: dark, light, high-contrast, or a .toml file (see themes/dark.toml).
    #[arg(long)]
    pub theme: Option<String>,
}

impl ChatArgs {
    /// These options, falling back to `other`'s (given before the subcommand).
    pub fn or(self, other: Self) -> Self {
        Self {
            theme: self.theme.or(other.theme),
        }
    }
}

pub fn run(m: &ModelArgs, a: &ChatArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let load = LoadSpec {
        model: m.model.clone(),
        revision: m.revision.clone(),
        tokenizer: m.tokenizer.clone(),
        device: m.device.map(|d| d.as_str().to_string()),
        dtype: m.dtype.map(|d| d.as_str().to_string()),
        adapter: m.adapter.clone(),
    };
    crate::tui::run(crate::tui::Options {
        load,
        theme: a.theme.clone(),
    })
    .context("running the terminal UI")
}

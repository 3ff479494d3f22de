//! `blackmamba completions SHELL`: the shell completion script of the whole command tree.

use clap::{Args, CommandFactory};
use clap_complete::Shell;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Writes the script to stdout, e.g. `blackmamba completions bash > ~/.local/share/bash-completion/completions/blackmamba`.
pub fn run(a: &CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = super::Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(a.shell, &mut cmd, "blackmamba", &mut out);
    Ok(())
}

//! The `blackmamba` binary: parses the command line and runs one command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = blackmamba::commands::Cli::parse();
    match blackmamba::commands::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, outermost first.
            let msg = e.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ");
            eprintln!("error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! The `blackmamba` binary: parses the command line and runs one command. Exit codes: 0 success,
//! 1 error, 2 usage (clap), 128 + the signal's number when SIGINT, SIGTERM or SIGHUP stopped a
//! command ([`blackmamba::signals::EXIT_CODES_HELP`], shown at the end of `--help`).

use std::io::Write;

use blackmamba::signals::Interrupted;

fn main() -> std::process::ExitCode {
    // candle asks for its thread count on every CPU matmul and, without this variable, answers by
    // reading /proc/cpuinfo each time (a tenth of decode time on small models). Decide it once.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let cli = blackmamba::commands::parse();
    match blackmamba::commands::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // writeln, not eprintln: after SIGHUP stderr may be a terminal that is gone
            let mut err = std::io::stderr();
            if let Some(Interrupted(sig)) = e.downcast_ref::<Interrupted>() {
                let _ = writeln!(err, "blackmamba: stopped by {}", sig.name());
                return std::process::ExitCode::from(sig.exit_code());
            }
            // One line: the error and its causes, outermost first.
            let msg = e.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ");
            let _ = writeln!(err, "error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}

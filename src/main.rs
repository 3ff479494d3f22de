//! The `blackmamba` binary: parses the command line and runs one command.

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
            // One line: the error and its causes, outermost first.
            let msg = e.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ");
            eprintln!("error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}

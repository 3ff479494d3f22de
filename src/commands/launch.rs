//! `blackmamba launch --gpus N -- finetune ...`: starts the ranks of a data-parallel run on this
//! host (one process per GPU, as torchrun does), watches them, and stops them all when one fails
//! or a signal comes.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::signals::{Interrupted, Signals};

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Ranks (processes) on this host, one per GPU: rank i uses GPU i.
    #[arg(long, value_name = "N")]
    pub gpus: usize,
    /// Hosts in the run; start `launch` on each with its --node-rank (default: this one only).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nodes: usize,
    /// This host's place among --nodes (0 on the host of rank 0).
    #[arg(long, default_value_t = 0, value_name = "R")]
    pub node_rank: usize,
    /// Rank 0's host, where the ranks meet (the same on every host).
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    pub master_addr: String,
    /// The port rank 0 listens on (default: a free one; give one with --nodes > 1).
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// The command each rank runs (`finetune ...`; `--distributed` is added).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// How long ranks get to stop after SIGTERM before they are killed.
const GRACE: Duration = Duration::from_secs(60);

pub fn run(a: &LaunchArgs) -> anyhow::Result<()> {
    if a.gpus == 0 || a.nodes == 0 || a.node_rank >= a.nodes {
        bail!(
            "launch: --gpus {} --nodes {} --node-rank {}: need at least one GPU and one node, and --node-rank below --nodes",
            a.gpus,
            a.nodes,
            a.node_rank
        );
    }
    if a.command.first().map(String::as_str) != Some("finetune") {
        bail!(
            "launch runs `finetune` ranks: blackmamba launch --gpus N -- finetune --data ... (got {:?})",
            a.command.first()
        );
    }
    if a.nodes > 1 && a.master_port.is_none() {
        bail!("launch --nodes {}: give --master-port (the same on every host)", a.nodes);
    }
    let port = match a.master_port {
        Some(p) => p,
        None => free_port().context("launch: finding a free port for the rendezvous (or give --master-port)")?,
    };
    let exe = std::env::current_exe().context("launch: finding this program to start its ranks")?;
    let world = a.gpus * a.nodes;
    let mut args = a.command.clone();
    if !args.iter().any(|x| x == "--distributed") {
        args.push("--distributed".into());
    }
    let signals = Signals::install(false)?;
    let mut ranks: Vec<(usize, Child)> = Vec::new();
    for local in 0..a.gpus {
        let rank = a.node_rank * a.gpus + local;
        let child = Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", a.gpus.to_string())
            .env("MASTER_ADDR", &a.master_addr)
            .env("MASTER_PORT", port.to_string())
            .spawn();
        match child {
            Ok(c) => ranks.push((rank, c)),
            Err(e) => {
                stop_all(&mut ranks);
                bail!("launch: starting rank {rank}: {e}");
            }
        }
    }
    eprintln!(
        "launch: ranks {}..{} of {world} started (rendezvous at {}:{port})",
        a.node_rank * a.gpus,
        a.node_rank * a.gpus + a.gpus - 1,
        a.master_addr
    );
    watch(ranks, &signals)
}

/// Waits for every rank. The first that fails (or a signal to the launcher) stops the others:
/// SIGTERM (they save and exit), then SIGKILL after [`GRACE`].
fn watch(mut ranks: Vec<(usize, Child)>, signals: &Signals) -> anyhow::Result<()> {
    let mut done: Vec<(usize, ExitStatus)> = Vec::new();
    loop {
        if let Some(sig) = signals.received() {
            eprintln!("launch: {} received; stopping the ranks (they save their checkpoint)", sig.name());
            stop_all(&mut ranks);
            return Err(Interrupted(sig).into());
        }
        let mut failed = reap(&mut ranks, &mut done)?;
        if !failed.is_empty() {
            // the others follow within moments (their peer is gone): give them that moment, so
            // the report leads with the rank that failed first (killed by a signal, say)
            std::thread::sleep(Duration::from_millis(500));
            failed.extend(reap(&mut ranks, &mut done)?);
            failed.sort_by_key(|(rank, st)| (st.code().is_some(), *rank));
            let what: Vec<String> = failed
                .iter()
                .map(|(r, st)| format!("rank {r} failed ({})", describe(*st)))
                .collect();
            eprintln!("launch: {}; stopping the other ranks", what.join(", "));
            stop_all(&mut ranks);
            bail!("{} (see the ranks' errors above)", what.join(", "));
        }
        if ranks.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes the ranks that ended from `ranks`: those that succeeded go to `done`, the failed ones
/// are returned.
fn reap(ranks: &mut Vec<(usize, Child)>, done: &mut Vec<(usize, ExitStatus)>) -> anyhow::Result<Vec<(usize, ExitStatus)>> {
    let mut failed = Vec::new();
    let mut i = 0;
    while i < ranks.len() {
        match ranks[i].1.try_wait() {
            Ok(Some(st)) => {
                let (rank, _) = ranks.remove(i);
                if st.success() {
                    done.push((rank, st));
                } else {
                    failed.push((rank, st));
                }
            }
            Ok(None) => i += 1,
            Err(e) => bail!("launch: watching rank {}: {e}", ranks[i].0),
        }
    }
    Ok(failed)
}

/// SIGTERM to every rank still running, then SIGKILL to those that outlive [`GRACE`].
fn stop_all(ranks: &mut [(usize, Child)]) {
    for (_, c) in ranks.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            // kill(1): std sends only SIGKILL, and the ranks should save first
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        }
    }
    let t0 = Instant::now();
    for (_, c) in ranks.iter_mut() {
        while matches!(c.try_wait(), Ok(None)) {
            if t0.elapsed() > GRACE {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn describe(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

/// A port nothing listens on now (the OS picks it).
fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

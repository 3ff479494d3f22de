//! `blackmamba models`: the models that can be loaded, as the TUI's model picker (Ctrl-K) lists
//! them: the embedded model, the Zyphra checkpoints and other BlackMamba repos in the hub cache
//! (cached or not, converted or not), and the random shapes. Uses no network.

use clap::Args;

use crate::catalog::{human_bytes, human_count, scan, Availability};

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &ModelsArgs) -> anyhow::Result<()> {
    let c = scan(Some(&super::environment::hub_env()));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
        return Ok(());
    }
    println!("{:<28} {:<16} {:<9} {:<10} STATUS", "--model", "PARAMS (ACTIVE)", "BF16", "ON DISK");
    for m in &c.choices {
        let arg = m.arg.clone().unwrap_or_else(|| "(none: embedded)".into());
        let params = m
            .params
            .map_or_else(|| "?".into(), |(t, a)| format!("{} ({})", human_count(t), human_count(a)));
        let mem = m.params.map_or_else(|| "?".into(), |(t, _)| human_bytes(2.0 * t as f64));
        let disk = m.disk_bytes.map_or_else(|| "-".into(), |b| human_bytes(b as f64));
        let status = match &m.availability {
            Availability::Unavailable { reason } => format!("unavailable: {reason}"),
            other => other.short(),
        };
        println!("{arg:<28} {params:<16} {mem:<9} {disk:<10} {status}");
    }
    println!(
        "hub cache: {} ({}); CUDA in this build: {}",
        c.cache_dir.display(),
        if c.offline { "offline: HF_HUB_OFFLINE set" } else { "online" },
        if c.cuda { "yes" } else { "no" }
    );
    Ok(())
}

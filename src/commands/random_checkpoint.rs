//! `blackmamba random-checkpoint`: write a checkpoint of random weights in the release format, for
//! benchmarks (load time of the exact 2.8B shapes) and tests, since real weights need a download.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Args;

use crate::model::random::{random_tensors, RandomInit};

#[derive(Debug, Args)]
pub struct RandomCheckpointArgs {
    /// Shape: tiny, 1.5b or 2.8b.
    #[arg(long, default_value = "tiny")]
    pub shape: String,
    /// Output folder (config.json + weights).
    #[arg(long)]
    pub out: PathBuf,
    /// pth (pytorch_model.bin, like the hub) or safetensors.
    #[arg(long, default_value = "pth")]
    pub format: String,
    /// Stored dtype: bf16 (like the hub) or f32.
    #[arg(long = "weights-dtype", default_value = "bf16")]
    pub weights_dtype: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: &RandomCheckpointArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        ["tiny", "1.5b", "2.8b"].contains(&a.shape.as_str()),
        "--shape {}: use tiny, 1.5b or 2.8b",
        a.shape
    );
    let dtype = match a.weights_dtype.as_str() {
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        other => anyhow::bail!("--weights-dtype {other}: use bf16 or f32"),
    };
    let cfg = crate::loader::random_config(&a.shape);
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let t = random_tensors(
        &cfg,
        RandomInit {
            seed: a.seed,
            perturb: false,
        },
        &Device::Cpu,
    )?;
    let mut v: Vec<(String, Tensor)> = t
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
        .collect::<candle_core::Result<_>>()?;
    v.sort_by(|x, y| x.0.cmp(&y.0));
    match a.format.as_str() {
        "pth" => crate::model::pth_write::write(&a.out.join("pytorch_model.bin"), &v)?,
        "safetensors" => crate::model::weights::save_safetensors(&v.into_iter().collect(), &a.out.join("model.safetensors"))?,
        other => anyhow::bail!("--format {other}: use pth or safetensors"),
    }
    crate::model::weights::write_atomic(&a.out.join("config.json"), cfg.to_json_string()?.as_bytes())?;
    eprintln!("wrote random {} checkpoint to {}", a.shape, a.out.display());
    Ok(())
}

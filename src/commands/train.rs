//! `blackmamba train`: full training from random weights of a `config.json` (the embedded model
//! of the project is trained this way). Same trainer, data and checkpoints as `finetune`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::commands::finetune::{drive, RunOpts};
use crate::commands::ModelArgs;
use crate::finetune::{FinetuneConfig, Method};
use crate::model::config::Config;
use crate::model::random::{random_weights, RandomInit};
use crate::model::Model;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The model's config.json (shape: layers, widths, experts, vocabulary).
    #[arg(long)]
    pub config: PathBuf,
    #[command(flatten)]
    pub run: RunOpts,
}

pub fn run(m: &ModelArgs, a: &TrainArgs) -> anyhow::Result<()> {
    if m.model.is_some() || m.adapter.is_some() {
        anyhow::bail!("train starts from random weights of --config; to continue from a model use `finetune --method full`");
    }
    let model_cfg = Config::from_file(&a.config).with_context(|| format!("reading {}", a.config.display()))?;
    let mut cfg = FinetuneConfig {
        method: Method::Full,
        lr: 1e-3,
        warmup: 100,
        weight_decay: 0.1,
        steps: 1000,
        seq_len: 512,
        batch: 16,
        eval_every: 100,
        save_every: 500,
        ..FinetuneConfig::default()
    };
    a.run.apply(&mut cfg)?;
    let device = crate::loader::device(m.device)?;
    let dtype = crate::loader::dtype(m.dtype, &device);
    let tok = match &m.tokenizer {
        Some(p) => crate::tokenizer::from_file(p)?,
        None => crate::tokenizer::neox()?,
    };
    crate::tokenizer::check_fits(&tok, model_cfg.vocab_size, "the tokenizer")?;
    let init = RandomInit {
        seed: cfg.seed,
        perturb: false,
    };
    let w = random_weights(&model_cfg, init, dtype, &device)?;
    let base = Model::from_tensors(&model_cfg, w, dtype, &device)?;
    cfg.base_model = format!("random init of {} (seed {})", a.config.display(), cfg.seed);
    let (total, active) = model_cfg.param_counts();
    eprintln!(
        "model: {total} parameters ({active} active per token), device {}, dtype {dtype:?}",
        if device.is_cuda() { "cuda" } else { "cpu" }
    );
    drive(&base, &tok, cfg)
}

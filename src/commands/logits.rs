//! `blackmamba logits`: teacher-forced outputs of given token ids, for checking a port or a
//! checkpoint against a reference.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Args;

use crate::commands::prompt::PromptSource;
use crate::commands::ModelArgs;
use crate::lm::AnyModel;
use crate::model::probe::Probe;
use crate::model::{Logits, Model};
use crate::moe_lm::MoeLm;

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("input").required(true))]
pub struct LogitsArgs {
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',', group = "input")]
    pub ids: Vec<u32>,
    /// Text to tokenize instead of --ids.
    #[arg(long, group = "input")]
    pub prompt: Option<String>,
    /// Read the text from a UTF-8 file instead of --ids; `-` reads standard input.
    #[arg(long, group = "input", value_name = "PATH")]
    pub prompt_file: Option<PathBuf>,
    /// Output safetensors file: `logits` (L, V) f32, `experts` (n_moe, L) i64 (a transformer: (layers, L, k),
    /// best first), `router_probs` (n_moe, L, E) f32, `ids` (L) i64.
    #[arg(long)]
    pub out: PathBuf,
    /// Use the cached path: the first token prefilled, then one step per token (a transformer:
    /// one cached step per token).
    #[arg(long)]
    pub step: bool,
}

/// Logits (L, V) and the probe of a teacher-forced pass.
pub fn teacher_forced(model: &Model, ids: &[u32], step: bool) -> crate::Result<(Tensor, Probe)> {
    model.check_ids(ids)?;
    let mut state = model.new_state(1)?;
    let mut probe = Probe::new();
    let dev = &model.device;
    let logits = if step {
        let first = Tensor::from_slice(&ids[..1], (1, 1), dev)?;
        let mut rows = vec![model.forward(&first, &mut state, Logits::All, Some(&mut probe))?.squeeze(0)?];
        for &id in &ids[1..] {
            rows.push(model.step(&Tensor::from_slice(&[id], 1, dev)?, &mut state, Some(&mut probe))?);
        }
        Tensor::cat(&rows, 0)?
    } else {
        let t = Tensor::from_slice(ids, (1, ids.len()), dev)?;
        model.forward(&t, &mut state, Logits::All, Some(&mut probe))?.squeeze(0)?
    };
    Ok((logits, probe))
}

/// Logits (L, V) f32, chosen experts (layers, L, k) i64 best first and router probabilities
/// (layers, L, E) f32 of a transformer on `ids`: one run, or with `step` one cached step per token.
pub fn transformer_forced(model: &MoeLm, ids: &[u32], step: bool) -> crate::Result<(Tensor, Tensor, Tensor)> {
    let mut cache = model.new_cache();
    let mut rows = Vec::new();
    let n_layers = model.config().num_hidden_layers;
    let mut experts: Vec<Vec<i64>> = vec![Vec::new(); n_layers];
    let mut probs: Vec<Vec<f32>> = vec![Vec::new(); n_layers];
    let (k, e) = (model.config().num_experts_per_tok, model.config().num_experts);
    let runs: Vec<&[u32]> = if step { ids.chunks(1).collect() } else { vec![ids] };
    for run in runs {
        let (l, probe) = model.forward(run, &mut cache)?;
        rows.push(l.to_device(&Device::Cpu)?);
        for (i, p) in probe.iter().enumerate() {
            experts[i].extend(p.routing.experts.iter().map(|&x| i64::from(x)));
            probs[i].extend_from_slice(&p.routing.router_probs);
        }
    }
    let l = ids.len();
    Ok((
        Tensor::cat(&rows, 0)?,
        Tensor::from_vec(experts.concat(), (n_layers, l, k), &Device::Cpu)?,
        Tensor::from_vec(probs.concat(), (n_layers, l, e), &Device::Cpu)?,
    ))
}

/// The `experts` [n_moe, L] and `router_probs` [n_moe, L, E_max] tensors of a probe.
pub fn routing_tensors(probe: &Probe, max_experts: usize) -> crate::Result<(Tensor, Tensor)> {
    let l = probe.n_tokens;
    let n = probe.moe.len();
    let mut experts = Vec::with_capacity(n * l);
    let mut probs = vec![0f32; n * l * max_experts];
    for (m, rec) in probe.moe.iter().enumerate() {
        experts.extend(rec.experts.iter().map(|&e| i64::from(e)));
        for t in 0..l {
            for e in 0..rec.n_experts {
                probs[(m * l + t) * max_experts + e] = rec.prob(t, e);
            }
        }
    }
    Ok((
        Tensor::from_vec(experts, (n, l), &Device::Cpu)?,
        Tensor::from_vec(probs, (n, l, max_experts), &Device::Cpu)?,
    ))
}

pub fn run(m: &ModelArgs, a: &LogitsArgs) -> anyhow::Result<()> {
    check_out(&a.out)?;
    let text = PromptSource::from_args(a.prompt.as_deref(), a.prompt_file.as_deref())
        .map(|p| p.read())
        .transpose()?;
    if text.is_none() && a.ids.is_empty() {
        anyhow::bail!("--ids: give at least one token id");
    }
    let loaded = super::load_any(m)?;
    let ids = match &text {
        Some(t) => crate::tokenizer::encode(&loaded.tokenizer, t)?,
        None => a.ids.clone(),
    };
    anyhow::ensure!(!ids.is_empty(), "the prompt has no tokens; give some text");
    let (logits, experts, probs, n_moe) = match &loaded.model {
        AnyModel::BlackMamba(model) => {
            let (logits, probe) = teacher_forced(model, &ids, a.step)?;
            let (experts, probs) = routing_tensors(&probe, model.cfg.max_experts())?;
            (logits, experts, probs, probe.moe.len())
        }
        AnyModel::Transformer(model) => {
            let (logits, experts, probs) = transformer_forced(model, &ids, a.step)?;
            let n = experts.dim(0)?;
            (logits, experts, probs, n)
        }
    };
    let mut out = HashMap::new();
    out.insert("logits".to_string(), logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
    out.insert("experts".to_string(), experts);
    out.insert("router_probs".to_string(), probs);
    let n = ids.len();
    let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    out.insert("ids".to_string(), Tensor::from_vec(ids, n, &Device::Cpu)?);
    save(&out, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {} ({n} positions, {n_moe} MoE layers)", a.out.display());
    Ok(())
}

/// `--out` must name a file (checked before the model loads, so a typo costs nothing).
pub fn check_out(out: &Path) -> anyhow::Result<()> {
    if out.is_dir() {
        anyhow::bail!(
            "--out {}: is a folder; give a file name such as {}",
            out.display(),
            out.join("logits.safetensors").display()
        );
    }
    Ok(())
}

/// Writes the tensors atomically (temp file + rename); on any failure the temp file is removed.
fn save(tensors: &HashMap<String, Tensor>, path: &Path) -> anyhow::Result<()> {
    let tmp = crate::model::weights::tmp_path(path);
    let res = candle_core::safetensors::save(tensors, &tmp)
        .map_err(anyhow::Error::from)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(anyhow::Error::from));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

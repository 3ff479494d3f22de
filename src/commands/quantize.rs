//! `blackmamba quantize`: write a quantised checkpoint (`--out DIR`) and/or report what the
//! quantisation does to routing and predictions (`--compare [--text FILE]`). The format comes from the
//! global `--quant` (with `--quant-keep` / `--quant-also`), as for every other command.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::commands::ModelArgs;

/// The text `--compare` runs without `--text` (written for this project).
pub const SAMPLE_TEXT: &str = "The harbour was quiet before dawn. A fisherman checked his nets, \
counted the floats twice and pushed off into the grey water. Far out, the gulls followed a trawler \
home while the lighthouse keeper wrote the weather into his log: wind from the north-east, a falling \
glass, rain by noon. In the town the baker lit her ovens, the first bus left the square, and the \
schoolteacher read the letters that had come the day before. By eight o'clock the market was full: \
apples and pears, cheese from the hills, bread still warm, and a boy selling newspapers that told of \
ships, prices, a storm in the south and a new bridge over the river.";

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Write the quantised checkpoint into this folder (config.json, model.safetensors with the
    /// packed weights and scales, tokenizer.json, quantization.json; docs/quantization.md).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Compare the quantised model with the unquantised one on a text (--text, default a built-in
    /// paragraph): perplexity, logits, and per MoE layer the tokens whose expert changes and the
    /// drift of the router probabilities.
    #[arg(long)]
    pub compare: bool,
    /// The UTF-8 text file --compare runs.
    #[arg(long, value_name = "FILE", requires = "compare")]
    pub text: Option<PathBuf>,
    /// Tokens per window of the comparison (each window starts from a fresh state).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Quantise the linear layers by GPTQ calibrated on this UTF-8 text (the embedding stays
    /// round-to-nearest); without it, round-to-nearest throughout.
    #[arg(long, value_name = "TEXT")]
    pub gptq: Option<PathBuf>,
    /// GPTQ's damping: this fraction of the mean diagonal of XᵀX is added to its diagonal.
    #[arg(long, default_value_t = 0.01, requires = "gptq")]
    pub gptq_damp: f64,
    /// Also write the comparison as JSON to this file.
    #[arg(long, value_name = "FILE", requires = "compare")]
    pub json: Option<PathBuf>,
}

/// Runs the command.
pub fn run(m: &ModelArgs, a: &QuantizeArgs) -> anyhow::Result<()> {
    let spec = m.quant_spec()?.context("quantize needs --quant FORMAT (int8, fp8, q4 or q4g128)")?;
    if a.out.is_none() && !a.compare {
        anyhow::bail!("quantize: say what to do: --out DIR writes the checkpoint, --compare reports the routing drift");
    }
    // the unquantised model: the reference of the comparison, and what the checkpoint quantises
    let plain = ModelArgs {
        quant: None,
        quant_keep: vec![],
        quant_also: vec![],
        ..m.clone()
    };
    let loaded = super::load(&plain)?;
    let mut model = loaded.model.clone();
    let sum = match &a.gptq {
        None => crate::quant::quantize_model(&mut model, &spec),
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let ids = crate::tokenizer::encode(&loaded.tokenizer, &text)?;
            let r = crate::quant::gptq::quantize_model_gptq(&mut model, &spec, &ids, a.window, a.gptq_damp);
            r.map(|(sum, layers)| {
                let (rtn, gptq): (f64, f64) = layers.iter().fold((0.0, 0.0), |(a, b), l| (a + l.rtn_error, b + l.gptq_error));
                let lower = layers.iter().filter(|l| l.gptq_error < l.rtn_error).count();
                eprintln!(
                    "GPTQ on {} tokens of {}: layer output error {:.1}% of round-to-nearest's in total, lower in {lower} of {} layers",
                    ids.len(),
                    path.display(),
                    100.0 * gptq / rtn.max(f64::MIN_POSITIVE),
                    layers.len()
                );
                sum
            })
        }
    }
    .with_context(|| format!("quantising {} to {}", loaded.label, spec.format))?;
    eprintln!(
        "{}: {} matrices to {} ({:.1} MiB -> {:.1} MiB, {} on the CPU's GGML matmuls), {} tensors quantised in place",
        loaded.label,
        sum.linears,
        spec.format,
        sum.bytes_before as f64 / 1048576.0,
        sum.bytes_after as f64 / 1048576.0,
        sum.ggml,
        sum.in_place
    );
    if let Some(dir) = &a.out {
        crate::quant::checkpoint::save(&model, &loaded.tokenizer, &spec, dir).with_context(|| format!("writing {}", dir.display()))?;
        eprintln!("wrote {} (load it with --model {})", dir.display(), dir.display());
    }
    if a.compare {
        let text = match &a.text {
            None => SAMPLE_TEXT.to_string(),
            Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        };
        let ids = crate::tokenizer::encode(&loaded.tokenizer, &text)?;
        let r = crate::quant::compare::compare(&loaded.model, &model, &ids, a.window, &spec.format.name())?;
        print!("{}", r.to_markdown());
        if let Some(j) = &a.json {
            crate::model::weights::write_atomic(j, serde_json::to_string_pretty(&r)?.as_bytes())
                .with_context(|| format!("writing {}", j.display()))?;
        }
    }
    Ok(())
}

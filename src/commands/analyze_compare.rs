//! `blackmamba analyze --compare A B --text FILE…`: two models of any family side by side on the
//! same text set (see [`crate::analysis::study`]), written as report.md, compare.json and PNG
//! figures into --out.

use anyhow::Context;

use super::analyze::{progress, AnalyzeArgs};
use crate::analysis::study::{collect_routes, read_sources, ModelRoutes, Source, Study, StudyOpts};
use crate::commands::ModelArgs;

/// The text set: `--text`, else `--input` (one source), else `--prompt`.
fn sources(a: &AnalyzeArgs) -> anyhow::Result<Vec<Source>> {
    if !a.text.is_empty() {
        return Ok(read_sources(&a.text)?);
    }
    if let Some(f) = &a.input {
        return Ok(read_sources(std::slice::from_ref(f))?);
    }
    if let Some(p) = &a.prompt {
        anyhow::ensure!(!p.trim().is_empty(), "--prompt: the text is empty");
        return Ok(vec![Source {
            name: "prompt".into(),
            text: p.clone(),
        }]);
    }
    anyhow::bail!("--compare A B: give the text set with --text FILE (repeatable; a folder of .txt files works too)")
}

fn routes_of(m: &ModelArgs, spec: &str, sources: &[Source], a: &AnalyzeArgs) -> anyhow::Result<ModelRoutes> {
    let m2 = ModelArgs {
        model: Some(spec.to_string()),
        ..m.clone()
    };
    let loaded = super::load_any(&m2).with_context(|| format!("--compare {spec}"))?;
    if loaded.untrained {
        eprintln!(
            "note: {} has untrained random weights; its routing is not a trained model's",
            loaded.label
        );
    }
    let t0 = std::time::Instant::now();
    let r = collect_routes(&loaded, sources, a.chunk, a.max_tokens, &mut progress(&loaded.label))
        .with_context(|| format!("running {} on the text set", loaded.label))?;
    eprintln!(
        "\r{} ({}): {} tokens in {:.1} s          ",
        r.label,
        r.family,
        r.n_tokens(),
        t0.elapsed().as_secs_f64()
    );
    Ok(r)
}

/// Runs the study.
pub fn run(m: &ModelArgs, a: &AnalyzeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.chunk > 0, "--chunk 0: give at least 1 token per forward call");
    anyhow::ensure!(a.min_count > 0, "--min-count 0: give at least 1");
    anyhow::ensure!(
        a.reset_every == 0,
        "--reset-every: --compare A B runs each source as one sequence; leave it out"
    );
    let sources = sources(a)?;
    let (ra, rb) = (routes_of(m, &a.compare[0], &sources, a)?, routes_of(m, &a.compare[1], &sources, a)?);
    let opts = StudyOpts {
        min_count: a.min_count,
        seed: 0,
    };
    let mut study = Study::build(&sources, &ra, &rb, opts);
    study
        .write(&ra, &rb, &a.out, true)
        .with_context(|| format!("writing the comparison into {}", a.out.display()))?;
    eprintln!(
        "wrote {}/report.md, compare.json and {} figures ({} vs {}, {} source(s))",
        a.out.display(),
        study.plots.len(),
        ra.label,
        rb.label,
        sources.len()
    );
    Ok(())
}

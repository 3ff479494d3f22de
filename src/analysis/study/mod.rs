//! `analyze --compare A B --text FILE`: two models of any family (BlackMamba, OLMoE, Mixtral) side
//! by side on the same text set (issue 19). Each model tokenises each source with its own
//! tokenizer, keeping the character span of every token, and runs it as one sequence; the routes
//! (top-k experts per token and MoE layer, router entropy) are gathered in a [`ModelRoutes`].
//! [`measures`] turns them into per-layer balance, co-activation, vocabulary and domain
//! specialisation, stickiness and the drift-to-imbalance check, and aligns the two models' tokens
//! by their spans to ask whether they cut the text the same way; [`markdown`] and [`plots`] write
//! the report.

pub mod align;
pub mod markdown;
pub mod measures;
pub mod plots;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lm::{run, AnyLoaded, AnyModel};

/// One text of the set: a domain (a file; its name is the file's stem).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The name the report gives it.
    pub name: String,
    /// Its text.
    pub text: String,
}

/// Reads the text set: each path is a UTF-8 file (one source) or a folder whose `.txt` and `.md`
/// files are the sources, in name order.
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<Source>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|e| Error::io(p, e))?;
            let mut inner: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "txt" || x == "md"))
                .collect();
            inner.sort();
            if inner.is_empty() {
                return Err(Error::bad_file(p, "holds no .txt or .md file; give text files or a folder of them"));
            }
            files.extend(inner);
        } else {
            files.push(p.clone());
        }
    }
    let mut out: Vec<Source> = Vec::with_capacity(files.len());
    for f in files {
        let bytes = std::fs::read(&f).map_err(|e| Error::io(&f, e))?;
        let text = String::from_utf8(bytes).map_err(|_| Error::bad_file(&f, "is not UTF-8 text; give a UTF-8 text file"))?;
        if text.trim().is_empty() {
            return Err(Error::bad_file(&f, "is empty; every source needs some text"));
        }
        let mut name = f
            .file_stem()
            .map_or_else(|| "text".to_string(), |s| s.to_string_lossy().into_owned());
        if out.iter().any(|s| s.name == name) {
            name = f.display().to_string();
        }
        out.push(Source { name, text });
    }
    if out.is_empty() {
        return Err(Error::Invalid("--text: give at least one text file".into()));
    }
    Ok(out)
}

/// The routes of one model over the text set (tokens of all sources in order).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelRoutes {
    /// The model's label.
    pub label: String,
    /// `blackmamba`, `olmoe` or `mixtral`.
    pub family: String,
    /// Random weights.
    pub untrained: bool,
    /// Layers of the model (for relative depth).
    pub num_layers: usize,
    /// Index of each MoE layer.
    pub layers: Vec<usize>,
    /// Experts of each MoE layer.
    pub n_experts: Vec<usize>,
    /// Experts per token of each MoE layer.
    pub k: Vec<usize>,
    /// (T) token ids.
    pub ids: Vec<u32>,
    /// (T) byte span of each token in its source's text (see [`cover`]).
    pub spans: Vec<(usize, usize)>,
    /// (T) index of each token's source.
    pub source: Vec<u16>,
    /// (n_moe, T·k) chosen experts, best first.
    pub experts: Vec<Vec<u32>>,
    /// (n_moe, T) router entropy in nats.
    pub entropy: Vec<Vec<f32>>,
    /// Fresh caches a transformer started because a source passed its context.
    pub resets: usize,
}

impl ModelRoutes {
    /// Tokens in all.
    pub fn n_tokens(&self) -> usize {
        self.ids.len()
    }

    /// The chosen experts of token `t` in MoE layer `m`.
    pub fn experts_of(&self, m: usize, t: usize) -> &[u32] {
        let k = self.k[m];
        self.experts[m].get(t * k..(t + 1) * k).unwrap_or(&[])
    }
}

/// Runs every source through the model (each a sequence of its own; at most `max_tokens` tokens
/// of each, 0 = all) in chunks of `chunk` tokens and gathers the routes.
pub fn collect_routes(
    loaded: &AnyLoaded,
    sources: &[Source],
    chunk: usize,
    max_tokens: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<ModelRoutes> {
    let who = Labelled {
        model: &loaded.model,
        tokenizer: &loaded.tokenizer,
        label: &loaded.label,
        untrained: loaded.untrained,
    };
    collect_routes_of(who, sources, chunk, max_tokens, progress)
}

/// A model with its tokenizer and the name a report gives it (borrowed: the TUI's engine compares
/// the model it chats with without giving it up).
#[derive(Clone, Copy)]
pub struct Labelled<'a> {
    pub model: &'a AnyModel,
    pub tokenizer: &'a tokenizers::Tokenizer,
    pub label: &'a str,
    pub untrained: bool,
}

/// [`collect_routes`] on a borrowed model.
pub fn collect_routes_of(
    loaded: Labelled<'_>,
    sources: &[Source],
    chunk: usize,
    max_tokens: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<ModelRoutes> {
    let mut r = ModelRoutes {
        label: loaded.label.to_string(),
        family: loaded.model.family().to_string(),
        untrained: loaded.untrained,
        num_layers: loaded.model.num_layers(),
        ..Default::default()
    };
    for (si, src) in sources.iter().enumerate() {
        let enc = loaded
            .tokenizer
            .encode(src.text.as_str(), false)
            .map_err(|e| Error::Tokenizer(format!("source '{}': {e}", src.name)))?;
        let mut ids = enc.get_ids().to_vec();
        let mut spans = cover(enc.get_offsets(), src.text.len());
        if max_tokens > 0 {
            ids.truncate(max_tokens);
            spans.truncate(max_tokens);
        }
        if ids.is_empty() {
            return Err(Error::Invalid(format!("source '{}': no tokens", src.name)));
        }
        let done = r.n_tokens();
        let streamed = run::stream(loaded.model, &ids, chunk, &mut |c| {
            let (start, part, probe) = (c.start, c.ids, c.probe);
            if r.layers.is_empty() {
                r.layers = probe.moe.iter().map(|m| m.layer).collect();
                r.n_experts = probe.moe.iter().map(|m| m.n_experts).collect();
                r.k = probe.moe.iter().map(|m| m.k).collect();
                r.experts = vec![Vec::new(); probe.moe.len()];
                r.entropy = vec![Vec::new(); probe.moe.len()];
            }
            if probe.moe.len() != r.layers.len() || probe.moe.iter().any(|m| m.tokens() != part.len()) {
                return Err(Error::Invalid("internal: the probe's layout changed between runs".into()));
            }
            for (m, routes) in probe.moe.iter().enumerate() {
                r.experts[m].extend_from_slice(&routes.experts);
                r.entropy[m].extend_from_slice(&routes.entropy);
            }
            progress(done + start + part.len());
            Ok(())
        })?;
        r.resets += streamed.resets;
        r.ids.extend_from_slice(&ids);
        r.spans.extend_from_slice(&spans);
        let tag = u16::try_from(si).map_err(|_| Error::Invalid("--text: at most 65535 sources".into()))?;
        r.source.extend(std::iter::repeat_n(tag, ids.len()));
    }
    if r.layers.is_empty() {
        return Err(Error::Invalid(format!("{}: the model has no MoE layer to compare", r.label)));
    }
    Ok(r)
}

/// Token spans that cover the text without gaps: the bytes a tokenizer trims from the offsets
/// (the spaces of byte-level BPE) go to the token after them (the one whose first bytes they
/// are), and the end of the text to the last token, so every token gets a non-empty span where it
/// can. Tokens that share bytes (the byte pieces of one character) keep their overlapping spans.
pub fn cover(offsets: &[(usize, usize)], len: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(offsets.len());
    let mut prev_end = 0;
    for (t, &(s, e)) in offsets.iter().enumerate() {
        let (s, e) = (s.min(len), e.min(len));
        let start = prev_end.min(s);
        let mut end = e.max(start);
        if t + 1 == offsets.len() {
            end = len.max(start);
        } else if end == start {
            end = offsets[t + 1].0.min(len).max(start);
        }
        out.push((start, end));
        prev_end = prev_end.max(end);
    }
    out
}

/// Writes `text` to `dir/name` atomically.
pub fn write_text(dir: &Path, name: &str, text: &str) -> Result<()> {
    crate::model::weights::write_atomic(&dir.join(name), text.as_bytes())
}

/// Options of [`Study::build`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StudyOpts {
    /// Least occurrences of a token id for vocabulary specialisation.
    pub min_count: u64,
    /// Seed of the shuffles that give the chance values.
    pub seed: u64,
}

impl Default for StudyOpts {
    fn default() -> Self {
        Self { min_count: 3, seed: 0 }
    }
}

/// A source as the report lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub name: String,
    pub bytes: usize,
}

/// The whole study: `compare.json`, and `report.md` through [`markdown::render`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Study {
    pub version: String,
    pub sources: Vec<SourceInfo>,
    pub min_count: u64,
    pub seed: u64,
    /// Model A, then model B.
    pub models: Vec<measures::ModelStudy>,
    pub alignment: align::Alignment,
    /// Figure files written beside the report.
    pub plots: Vec<String>,
}

impl Study {
    /// Measures both models and aligns their tokens.
    pub fn build(sources: &[Source], a: &ModelRoutes, b: &ModelRoutes, opts: StudyOpts) -> Self {
        let n = sources.len();
        Self {
            version: env!("CARGO_PKG_VERSION").to_string(),
            sources: sources
                .iter()
                .map(|s| SourceInfo {
                    name: s.name.clone(),
                    bytes: s.text.len(),
                })
                .collect(),
            min_count: opts.min_count,
            seed: opts.seed,
            models: [a, b]
                .iter()
                .map(|r| measures::model_study(r, n, opts.min_count, opts.seed))
                .collect(),
            alignment: align::align(a, b, opts.seed),
            plots: Vec::new(),
        }
    }

    /// Writes the figures (with `plots`), then `compare.json` and `report.md` into `dir` (created
    /// if missing), each atomically.
    pub fn write(&mut self, a: &ModelRoutes, b: &ModelRoutes, dir: &Path, plots: bool) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if plots {
            self.plots = self::plots::write_all(&self.models, &[a, b], &self.alignment.nmi, dir)?;
        }
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Invalid(format!("compare.json: {e}")))?;
        write_text(dir, "compare.json", &json)?;
        write_text(dir, "report.md", &markdown::render(self))
    }
}

#[cfg(test)]
mod tests {
    use super::cover;

    #[test]
    fn spans_cover_the_text_without_gaps() {
        // "ab  cd": [ab] [ ] trimmed to (3,3), [ cd] trimmed to (4,6)
        assert_eq!(cover(&[(0, 2), (3, 3), (4, 6)], 6), vec![(0, 2), (2, 3), (3, 6)]);
        // two byte pieces of one character, then a trailing newline trimmed away
        assert_eq!(cover(&[(0, 3), (0, 3), (3, 4), (5, 5)], 5), vec![(0, 3), (0, 3), (3, 4), (4, 5)]);
    }
}

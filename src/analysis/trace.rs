//! `blackmamba trace`: one record per token (position, id, text; per MoE layer the expert, its
//! sigmoid probability and the router logits; per Mamba layer the SSM- and conv-state norms and
//! mean Δ), written as JSON lines or CSV while the input streams through the model. The file is
//! written under a temporary name and renamed when complete.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::lm::probe::SharedProbe;
use crate::model::probe::Probe;

/// The routing of one token in one MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeEntry {
    pub layer: usize,
    pub expert: u32,
    /// σ(logit) of the chosen expert: the gate that scales its output.
    pub prob: f32,
    /// (E) router logits (BlackMamba; empty for a transformer)
    pub logits: Vec<f32>,
    /// (k) the chosen experts, best first (a transformer's top-k; absent for BlackMamba)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<u32>,
    /// (k) their router probabilities
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probs: Vec<f32>,
    /// Entropy of the router distribution in nats (a transformer)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<f32>,
}

/// The state telemetry of one token in one Mamba layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MambaEntry {
    pub layer: usize,
    pub ssm_norm: f32,
    pub conv_norm: f32,
    pub mean_delta: f32,
}

/// One line of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub pos: usize,
    pub id: u32,
    pub text: String,
    pub moe: Vec<MoeEntry>,
    pub mamba: Vec<MambaEntry>,
    /// Key/value positions each attention layer caches after this token (a transformer)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_len: Option<usize>,
}

/// The records of the tokens of one forward call (`start` = position of `ids[0]`); `text` gives a
/// token's text.
pub fn token_records(start: usize, ids: &[u32], probe: &Probe, text: &mut dyn FnMut(u32) -> Result<String>) -> Result<Vec<TokenRecord>> {
    ids.iter()
        .enumerate()
        .map(|(t, &id)| {
            let moe = probe
                .moe
                .iter()
                .map(|m| {
                    let e = m.n_experts;
                    let row = m.logits.get(t * e..(t + 1) * e).ok_or_else(|| short(m.layer))?;
                    Ok(MoeEntry {
                        layer: m.layer,
                        expert: *m.experts.get(t).ok_or_else(|| short(m.layer))?,
                        prob: m.gate(t),
                        logits: row.to_vec(),
                        experts: Vec::new(),
                        probs: Vec::new(),
                        entropy: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let mamba = probe
                .mamba
                .iter()
                .map(|m| {
                    let at = |v: &[f32]| v.get(t).copied().ok_or_else(|| short(m.layer));
                    Ok(MambaEntry {
                        layer: m.layer,
                        ssm_norm: at(&m.ssm_norm)?,
                        conv_norm: at(&m.conv_norm)?,
                        mean_delta: at(&m.mean_delta)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(TokenRecord {
                pos: start + t,
                id,
                text: text(id)?,
                moe,
                mamba,
                kv_len: None,
            })
        })
        .collect()
}

/// The records of a transformer's run (`start` = position of `ids[0]` in the input, `seq_start`
/// its position in the current sequence, `kv_cap` the most positions a layer caches).
pub fn shared_records(
    start: usize,
    seq_start: usize,
    ids: &[u32],
    probe: &SharedProbe,
    kv_cap: usize,
    text: &mut dyn FnMut(u32) -> Result<String>,
) -> Result<Vec<TokenRecord>> {
    ids.iter()
        .enumerate()
        .map(|(t, &id)| {
            let moe = probe
                .moe
                .iter()
                .map(|m| {
                    let experts = m.experts_of(t).to_vec();
                    let probs = m.probs_of(t).to_vec();
                    Ok(MoeEntry {
                        layer: m.layer,
                        expert: *experts.first().ok_or_else(|| short(m.layer))?,
                        prob: probs.first().copied().unwrap_or(0.0),
                        logits: Vec::new(),
                        experts,
                        probs,
                        entropy: m.entropy.get(t).copied(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(TokenRecord {
                pos: start + t,
                id,
                text: text(id)?,
                moe,
                mamba: Vec::new(),
                kv_len: Some((seq_start + t + 1).min(kv_cap)),
            })
        })
        .collect()
}

fn short(layer: usize) -> Error {
    Error::Invalid(format!("probe of layer {layer} holds fewer tokens than the call"))
}

/// Output format of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    #[default]
    Jsonl,
    /// A header row, then one row per token; text quoted as in RFC 4180.
    Csv,
}

/// Quotes a CSV field when it needs it.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The CSV header of a record's layout.
pub fn csv_header(r: &TokenRecord) -> String {
    let mut cols = vec!["pos".to_string(), "id".into(), "text".into()];
    for m in &r.moe {
        if m.experts.is_empty() {
            cols.push(format!("L{}_expert", m.layer));
            cols.push(format!("L{}_prob", m.layer));
            cols.extend((0..m.logits.len()).map(|e| format!("L{}_logit{e}", m.layer)));
        } else {
            cols.extend((0..m.experts.len()).map(|j| format!("L{}_expert{j}", m.layer)));
            cols.extend((0..m.probs.len()).map(|j| format!("L{}_prob{j}", m.layer)));
            cols.push(format!("L{}_entropy", m.layer));
        }
    }
    for m in &r.mamba {
        cols.extend(["ssm_norm", "conv_norm", "mean_delta"].map(|c| format!("L{}_{c}", m.layer)));
    }
    if r.kv_len.is_some() {
        cols.push("kv_len".into());
    }
    cols.join(",")
}

/// A record as a CSV row.
pub fn csv_row(r: &TokenRecord) -> String {
    let mut cols = vec![r.pos.to_string(), r.id.to_string(), csv_field(&r.text)];
    for m in &r.moe {
        if m.experts.is_empty() {
            cols.push(m.expert.to_string());
            cols.push(m.prob.to_string());
            cols.extend(m.logits.iter().map(ToString::to_string));
        } else {
            cols.extend(m.experts.iter().map(ToString::to_string));
            cols.extend(m.probs.iter().map(ToString::to_string));
            cols.push(m.entropy.map_or(String::new(), |h| h.to_string()));
        }
    }
    for m in &r.mamba {
        cols.extend([m.ssm_norm, m.conv_norm, m.mean_delta].map(|x| x.to_string()));
    }
    if let Some(kv) = r.kv_len {
        cols.push(kv.to_string());
    }
    cols.join(",")
}

/// Streams records into a file (temp name until [`TraceWriter::finish`]).
pub struct TraceWriter {
    out: BufWriter<std::fs::File>,
    tmp: PathBuf,
    path: PathBuf,
    format: Format,
    rows: usize,
    texts: HashMap<u32, String>,
}

impl TraceWriter {
    /// Creates the temp file beside `path`.
    pub fn create(path: &Path, format: Format) -> Result<Self> {
        let tmp = crate::model::weights::tmp_path(path);
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Self {
            out: BufWriter::new(f),
            tmp,
            path: path.to_path_buf(),
            format,
            rows: 0,
            texts: HashMap::new(),
        })
    }

    /// Writes the records of one forward call.
    pub fn write_chunk(&mut self, start: usize, ids: &[u32], probe: &Probe, tok: &Tokenizer) -> Result<()> {
        let records = {
            let mut text = self.texter(tok);
            token_records(start, ids, probe, &mut text)?
        };
        self.write_records(&records)
    }

    /// Writes the records of one run of a transformer (see [`shared_records`]).
    pub fn write_shared(
        &mut self,
        start: usize,
        seq_start: usize,
        ids: &[u32],
        probe: &SharedProbe,
        kv_cap: usize,
        tok: &Tokenizer,
    ) -> Result<()> {
        let records = {
            let mut text = self.texter(tok);
            shared_records(start, seq_start, ids, probe, kv_cap, &mut text)?
        };
        self.write_records(&records)
    }

    /// A token's text, decoded once per id.
    fn texter<'a>(&'a mut self, tok: &'a Tokenizer) -> impl FnMut(u32) -> Result<String> + 'a {
        let texts = &mut self.texts;
        move |id: u32| -> Result<String> {
            if let Some(t) = texts.get(&id) {
                return Ok(t.clone());
            }
            let t = crate::tokenizer::decode(tok, &[id])?;
            texts.insert(id, t.clone());
            Ok(t)
        }
    }

    fn write_records(&mut self, records: &[TokenRecord]) -> Result<()> {
        let tmp = self.tmp.clone();
        let io = |e: std::io::Error| Error::io(&tmp, e);
        for r in records {
            match self.format {
                Format::Jsonl => {
                    serde_json::to_writer(&mut self.out, r).map_err(|e| Error::Invalid(format!("{}: {e}", tmp.display())))?;
                    self.out.write_all(b"\n").map_err(io)?;
                }
                Format::Csv => {
                    if self.rows == 0 {
                        writeln!(self.out, "{}", csv_header(r)).map_err(io)?;
                    }
                    writeln!(self.out, "{}", csv_row(r)).map_err(io)?;
                }
            }
            self.rows += 1;
        }
        Ok(())
    }

    /// Flushes and moves the file into place; returns the number of records.
    pub fn finish(mut self) -> Result<usize> {
        self.out.flush().map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(self.rows)
    }

    /// Removes the temp file after a failure.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_when_needed() {
        assert_eq!(csv_field("cat"), "cat");
        assert_eq!(csv_field(" the"), "\" the\"");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("\n"), "\"\n\"");
    }
}

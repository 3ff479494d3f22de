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
use crate::model::probe::Probe;

/// The routing of one token in one MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeEntry {
    pub layer: usize,
    pub expert: u32,
    /// σ(logit) of the chosen expert: the gate that scales its output.
    pub prob: f32,
    /// (E) router logits
    pub logits: Vec<f32>,
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
        cols.push(format!("L{}_expert", m.layer));
        cols.push(format!("L{}_prob", m.layer));
        cols.extend((0..m.logits.len()).map(|e| format!("L{}_logit{e}", m.layer)));
    }
    for m in &r.mamba {
        cols.extend(["ssm_norm", "conv_norm", "mean_delta"].map(|c| format!("L{}_{c}", m.layer)));
    }
    cols.join(",")
}

/// A record as a CSV row.
pub fn csv_row(r: &TokenRecord) -> String {
    let mut cols = vec![r.pos.to_string(), r.id.to_string(), csv_field(&r.text)];
    for m in &r.moe {
        cols.push(m.expert.to_string());
        cols.push(m.prob.to_string());
        cols.extend(m.logits.iter().map(ToString::to_string));
    }
    for m in &r.mamba {
        cols.extend([m.ssm_norm, m.conv_norm, m.mean_delta].map(|x| x.to_string()));
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
        let texts = &mut self.texts;
        let mut text = |id: u32| -> Result<String> {
            if let Some(t) = texts.get(&id) {
                return Ok(t.clone());
            }
            let t = crate::tokenizer::decode(tok, &[id])?;
            texts.insert(id, t.clone());
            Ok(t)
        };
        let records = token_records(start, ids, probe, &mut text)?;
        let tmp = self.tmp.clone();
        let io = |e: std::io::Error| Error::io(&tmp, e);
        for r in &records {
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

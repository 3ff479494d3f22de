//! Teacher-forced runs of either family: token ids in chunks, the recurrent state (BlackMamba) or
//! the key/value cache (transformer) carried from chunk to chunk, each chunk's [`SharedProbe`]
//! handed on. A transformer's context is finite: a run that would pass
//! `max_position_embeddings` starts a fresh cache first (counted in [`Streamed::resets`]).

use candle_core::{Device, Tensor};

use super::probe::SharedProbe;
use super::AnyModel;
use crate::error::{Error, Result};
use crate::model::probe::Probe;
use crate::model::state::State;
use crate::model::Logits;
use crate::moe_lm::KvCache;

/// The memory a run carries.
enum Carry {
    Mamba(State),
    Kv(KvCache),
}

/// Runs token ids through a model of either family, carrying its memory.
pub struct Runner<'m> {
    model: &'m AnyModel,
    carry: Carry,
}

impl<'m> Runner<'m> {
    /// A runner with a fresh state or an empty cache.
    pub fn new(model: &'m AnyModel) -> Result<Self> {
        Ok(Self {
            model,
            carry: fresh(model)?,
        })
    }

    /// Forgets everything run so far (a new sequence).
    pub fn reset(&mut self) -> Result<()> {
        self.carry = fresh(self.model)?;
        Ok(())
    }

    /// Tokens in the current sequence (BlackMamba: its state's position).
    pub fn pos(&self) -> usize {
        match &self.carry {
            Carry::Mamba(s) => s.pos,
            Carry::Kv(c) => c.pos(),
        }
    }

    /// The longest sequence the model takes (`None`: no limit, as a recurrent state has none).
    pub fn context_limit(&self) -> Option<usize> {
        match self.model {
            AnyModel::BlackMamba(_) => None,
            AnyModel::Transformer(m) => Some(m.config().max_position_embeddings),
        }
    }

    /// Runs `ids` after what was run; returns the logits of every position (T, V) f32 on the host
    /// when `logits` is set, and the probe of the run.
    pub fn run(&mut self, ids: &[u32], logits: bool) -> Result<(Option<Tensor>, SharedProbe)> {
        if ids.is_empty() {
            return Err(Error::Invalid("no tokens to run: the text is empty".into()));
        }
        self.model.check_ids(ids)?;
        match (&mut self.carry, self.model) {
            (Carry::Mamba(state), AnyModel::BlackMamba(m)) => {
                let t = Tensor::from_slice(ids, (1, ids.len()), &m.device)?;
                let mut probe = Probe::new();
                let which = if logits { Logits::All } else { Logits::Last };
                let out = m.forward(&t, state, which, Some(&mut probe))?;
                let l = if logits {
                    Some(out.squeeze(0)?.to_device(&Device::Cpu)?)
                } else {
                    None
                };
                Ok((l, SharedProbe::from_mamba(&probe)))
            }
            (Carry::Kv(cache), AnyModel::Transformer(m)) => {
                let (l, p) = m.forward(ids, cache)?;
                let l = if logits { Some(l.to_device(&Device::Cpu)?) } else { None };
                Ok((l, SharedProbe::from_transformer(&p)))
            }
            _ => Err(Error::Invalid("internal: the runner's memory does not fit its model".into())),
        }
    }

    /// Runs `ids` one token per call (the cached decode path); returns the logits (T, V) f32 on
    /// the host and the probe of all the steps together.
    pub fn run_stepwise(&mut self, ids: &[u32]) -> Result<(Tensor, SharedProbe)> {
        let mut rows = Vec::with_capacity(ids.len());
        let mut all = SharedProbe::default();
        for &id in ids {
            let (l, p) = self.run(&[id], true)?;
            rows.push(l.ok_or_else(|| Error::Invalid("internal: no logits".into()))?);
            append(&mut all, p);
        }
        Ok((Tensor::cat(&rows, 0)?, all))
    }
}

fn fresh(model: &AnyModel) -> Result<Carry> {
    Ok(match model {
        AnyModel::BlackMamba(m) => Carry::Mamba(m.new_state(1)?),
        AnyModel::Transformer(m) => Carry::Kv(m.new_cache()),
    })
}

/// Appends the tokens of run `p` to `all` (the layers' memory becomes `p`'s).
pub fn append(all: &mut SharedProbe, p: SharedProbe) {
    if all.moe.is_empty() {
        *all = p;
        return;
    }
    for (a, b) in all.moe.iter_mut().zip(&p.moe) {
        a.extend(b);
    }
    all.tokens += p.tokens;
    all.memory = p.memory;
}

/// One run of [`stream`]: where it starts in the ids and in the current sequence, its ids and
/// its probe.
pub struct RunChunk<'a> {
    /// Position of the first token in the ids given to [`stream`].
    pub start: usize,
    /// Position of the first token in the current sequence (the cache's length before the run).
    pub seq_pos: usize,
    /// The tokens of the run.
    pub ids: &'a [u32],
    /// What the run recorded.
    pub probe: &'a SharedProbe,
}

/// What [`stream`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Streamed {
    /// Tokens run.
    pub tokens: usize,
    /// Fresh caches started because the context limit was reached.
    pub resets: usize,
}

/// Runs `ids` in chunks of `chunk` tokens, one sequence (a transformer starts a fresh cache where
/// its context would overflow), handing to `f` each chunk's start in `ids`, its start in the
/// current sequence, its ids and its probe.
pub fn stream(model: &AnyModel, ids: &[u32], chunk: usize, f: &mut dyn FnMut(RunChunk<'_>) -> Result<()>) -> Result<Streamed> {
    if chunk == 0 {
        return Err(Error::Invalid("--chunk 0: give at least 1 token per forward call".into()));
    }
    let mut r = Runner::new(model)?;
    let mut out = Streamed::default();
    let mut at = 0;
    while at < ids.len() {
        let mut n = chunk.min(ids.len() - at);
        if let Some(limit) = r.context_limit() {
            if r.pos() + n > limit {
                if r.pos() > 0 {
                    r.reset()?;
                    out.resets += 1;
                }
                n = n.min(limit);
            }
        }
        let part = &ids[at..at + n];
        let seq_pos = r.pos();
        let (_, probe) = r.run(part, false)?;
        f(RunChunk {
            start: at,
            seq_pos,
            ids: part,
            probe: &probe,
        })?;
        at += n;
    }
    out.tokens = at;
    Ok(out)
}

//! Chat turns on a transformer MoE (OLMoE, Mixtral): the same turn layout as [`super::chat`]
//! (the previous answer's unfed token, the end-of-turn, the next prompt; all but the last id read
//! in cancellable chunks), with the key/value cache in place of the recurrent state. A cache is
//! cheap to keep (its tensors are shared, a run appends new ones), so every turn keeps the cache
//! before it (undo) and before its last prompt id (regenerate), as BlackMamba's turns keep states.
//! The router history gets each token's log-probabilities, so the Sinkhorn view runs on a
//! transformer's routing too (a per-token constant does not change what Sinkhorn balances).

use tokenizers::Tokenizer;

use crate::chat_template::{prompt_for_turn, STOP_STRINGS};
use crate::engine::protocol::{CancelFlag, ConversationInfo, EngineEvent, ReqId};
use crate::engine::telemetry::{records_shared, RouterHistory};
use crate::error::{Error, Result};
use crate::generate::{GenOutcome, GenStats, StopReason};
use crate::lm::probe::SharedProbe;
use crate::lm::text::{generate_text, TextEvent};
use crate::moe_lm::{KvCache, MoeLm};
use crate::sampling::SamplingParams;

use super::chat::{Emit, PREFILL_CHUNK};

/// One question and its answer, with the caches to go back to.
#[derive(Debug, Clone)]
struct Turn {
    user: String,
    answer: String,
    before: KvCache,
    before_pending: Option<u32>,
    ready: KvCache,
    last_id: u32,
    regens: u64,
}

/// The conversation the engine holds for a transformer.
#[derive(Debug, Clone)]
pub struct MoeConversation {
    /// The system prompt of the first turn.
    pub system: Option<String>,
    turns: Vec<Turn>,
    cache: KvCache,
    pending: Option<u32>,
    eos: Vec<u32>,
}

impl MoeConversation {
    /// An empty conversation; `eos` are the model's end-of-text ids.
    pub fn new(model: &MoeLm, system: Option<String>, eos: Vec<u32>) -> Self {
        Self {
            system,
            turns: Vec::new(),
            cache: model.new_cache(),
            pending: None,
            eos,
        }
    }

    /// The model's end-of-text ids.
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }

    /// Answers `user`. On error or a cancel while the prompt is read the conversation is as
    /// before.
    #[allow(clippy::too_many_arguments)]
    pub fn chat(
        &mut self,
        model: &MoeLm,
        tok: &Tokenizer,
        hist: &mut RouterHistory,
        id: ReqId,
        user: &str,
        params: &SamplingParams,
        cancel: &CancelFlag,
        emit: Emit<'_>,
    ) -> Result<()> {
        let first = self.turns.is_empty() && self.cache.pos() == 0;
        let mut prefix = Vec::new();
        if !first {
            if let Some(p) = self.pending.filter(|p| !self.eos.contains(p)) {
                prefix.push(p);
            }
            prefix.extend(self.eos.first().copied());
            prefix.extend(crate::tokenizer::encode(tok, "\n")?);
        }
        prefix.extend(prompt_for_turn(tok, self.system.as_deref(), user, first)?);
        let Some((&last_id, head)) = prefix.split_last() else {
            return Err(Error::Invalid("empty prompt".into()));
        };
        emit(EngineEvent::TurnStarted {
            id,
            user: user.to_string(),
        });
        let run = (|| -> Result<Option<(KvCache, GenOutcome, KvCache)>> {
            let mut ready = self.cache.clone();
            let t0 = std::time::Instant::now();
            for chunk in head.chunks(PREFILL_CHUNK) {
                if cancel.is_cancelled() {
                    return Ok(None);
                }
                let pos0 = ready.pos();
                let (_, layers) = model.forward(chunk, &mut ready)?;
                let probe = SharedProbe::from_transformer(&layers);
                hist.push_shared(&probe, pos0);
                emit(EngineEvent::Prompt {
                    id,
                    tokens: records_shared(tok, chunk, pos0, false, Some(&probe)),
                });
            }
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let head_secs = t0.elapsed().as_secs_f64();
            let (mut out, end) = self.answer(model, tok, hist, id, &ready, last_id, params, cancel, emit)?;
            out.stats.prompt_tokens += head.len();
            out.stats.prefill_secs += head_secs;
            out.stats.ttft_secs += head_secs;
            Ok(Some((ready, out, end)))
        })();
        match run {
            Ok(Some((ready, out, end))) => {
                self.turns.push(Turn {
                    user: user.to_string(),
                    answer: out.text.clone(),
                    before: std::mem::replace(&mut self.cache, end),
                    before_pending: std::mem::replace(&mut self.pending, out.pending),
                    ready,
                    last_id,
                    regens: 0,
                });
                emit(EngineEvent::Done {
                    id,
                    stats: out.stats,
                    stop: out.stop,
                });
                Ok(())
            }
            Ok(None) => {
                self.rewound(hist, emit);
                emit(EngineEvent::Done {
                    id,
                    stats: GenStats::default(),
                    stop: StopReason::Cancelled,
                });
                Ok(())
            }
            Err(e) => {
                self.rewound(hist, emit);
                Err(e)
            }
        }
    }

    fn rewound(&self, hist: &mut RouterHistory, emit: Emit<'_>) {
        hist.truncate(self.cache.pos());
        emit(EngineEvent::Rewound {
            pos: self.cache.pos(),
            turns: self.turns.len(),
        });
    }

    /// Samples the last answer again from the cache before its last prompt id (seed moved on).
    #[allow(clippy::too_many_arguments)]
    pub fn regenerate(
        &mut self,
        model: &MoeLm,
        tok: &Tokenizer,
        hist: &mut RouterHistory,
        id: ReqId,
        params: &SamplingParams,
        cancel: &CancelFlag,
        emit: Emit<'_>,
    ) -> Result<()> {
        let n = self.turns.len();
        let Some(turn) = self.turns.last_mut() else {
            return Err(Error::Invalid("nothing to regenerate: the conversation is empty".into()));
        };
        turn.regens += 1;
        let mut p = params.clone();
        p.seed = p.seed.wrapping_add(turn.regens);
        let (ready, last_id, user) = (turn.ready.clone(), turn.last_id, turn.user.clone());
        hist.truncate(ready.pos());
        emit(EngineEvent::Rewound {
            pos: ready.pos(),
            turns: n - 1,
        });
        emit(EngineEvent::TurnStarted { id, user });
        match self.answer(model, tok, hist, id, &ready, last_id, &p, cancel, emit) {
            Ok((out, end)) => {
                if let Some(turn) = self.turns.last_mut() {
                    turn.answer = out.text.clone();
                }
                self.cache = end;
                self.pending = out.pending;
                emit(EngineEvent::Done {
                    id,
                    stats: out.stats,
                    stop: out.stop,
                });
                Ok(())
            }
            Err(e) => {
                self.undo(hist, emit);
                Err(e)
            }
        }
    }

    /// Removes the last turn; returns false when there is none.
    pub fn undo(&mut self, hist: &mut RouterHistory, emit: Emit<'_>) -> bool {
        let Some(turn) = self.turns.pop() else { return false };
        self.cache = turn.before;
        self.pending = turn.before_pending;
        self.rewound(hist, emit);
        true
    }

    /// What the UI shows of the conversation.
    pub fn info(&self) -> ConversationInfo {
        ConversationInfo {
            system: self.system.clone(),
            turns: self.turns.iter().map(|t| (t.user.clone(), t.answer.clone())).collect(),
            pos: self.cache.pos(),
        }
    }

    /// Generates from `ready` + `last_id`; returns the outcome and the cache after it.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        model: &MoeLm,
        tok: &Tokenizer,
        hist: &mut RouterHistory,
        id: ReqId,
        ready: &KvCache,
        last_id: u32,
        params: &SamplingParams,
        cancel: &CancelFlag,
        emit: Emit<'_>,
    ) -> Result<(GenOutcome, KvCache)> {
        let mut params = params.clone();
        for s in STOP_STRINGS {
            if !params.stop.iter().any(|x| x == s) {
                params.stop.push((*s).to_string());
            }
        }
        let mut cache = ready.clone();
        let pos0 = ready.pos();
        let out = generate_text(model, tok, &mut cache, &[last_id], &params, &self.eos, cancel.as_atomic(), |ev| {
            match ev {
                TextEvent::Prefilled { probe, .. } => {
                    hist.push_shared(probe, pos0);
                    emit(EngineEvent::Prompt {
                        id,
                        tokens: records_shared(tok, &[last_id], pos0, false, Some(probe)),
                    });
                }
                TextEvent::Token { id: tid, pos, text, probe } => {
                    if let Some(p) = probe {
                        hist.push_shared(p, pos);
                    }
                    let rec = records_shared(tok, &[tid], pos, true, probe).pop().unwrap_or_default();
                    emit(EngineEvent::Token {
                        id,
                        text: text.to_string(),
                        rec: Box::new(rec),
                    });
                }
                TextEvent::Tail { text } => emit(EngineEvent::Tail {
                    id,
                    text: text.to_string(),
                }),
            }
            Ok(())
        })?;
        Ok((out, cache))
    }
}

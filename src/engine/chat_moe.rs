//! Chat turns on a transformer MoE (OLMoE, Mixtral): the shared turn loop of [`super::turns`]
//! with the key/value cache in place of the recurrent state. A cache is cheap to keep (its tensors
//! are shared, a run appends new ones), so every turn keeps the cache before it (undo) and before
//! its last prompt id (regenerate), as BlackMamba's turns keep states. The router history gets
//! each token's log-probabilities, so the Sinkhorn view runs on a transformer's routing too (a
//! per-token constant does not change what Sinkhorn balances).

use tokenizers::Tokenizer;

use crate::chat_template::prompt_for_turn;
use crate::engine::protocol::{CancelFlag, ConversationInfo, EngineEvent, ReqId};
use crate::engine::telemetry::{records_shared, RouterHistory};
use crate::error::Result;
use crate::lm::probe::SharedProbe;
use crate::lm::text::{generate_text, TextEvent};
use crate::moe_lm::{KvCache, MoeLm};
use crate::sampling::SamplingParams;

use super::turns::{with_chat_stops, Answer, Dialog, Emit, Memory, TurnModel};

impl Memory for KvCache {
    fn pos(&self) -> usize {
        KvCache::pos(self)
    }
}

/// A transformer with its end-of-text ids: what the turn loop runs.
struct Transformer<'a> {
    model: &'a MoeLm,
    eos: &'a [u32],
}

impl TurnModel for Transformer<'_> {
    type Mem = KvCache;

    fn prefix(&self, tok: &Tokenizer, pending: Option<u32>, system: Option<&str>, user: &str, first: bool) -> Result<Vec<u32>> {
        let mut prefix = Vec::new();
        if !first {
            if let Some(p) = pending.filter(|p| !self.eos.contains(p)) {
                prefix.push(p);
            }
            prefix.extend(self.eos.first().copied());
            prefix.extend(crate::tokenizer::encode(tok, "\n")?);
        }
        prefix.extend(prompt_for_turn(tok, system, user, first)?);
        Ok(prefix)
    }

    fn read(&self, tok: &Tokenizer, hist: &mut RouterHistory, id: ReqId, chunk: &[u32], mem: &mut KvCache, emit: Emit<'_>) -> Result<()> {
        let pos0 = mem.pos();
        let (_, layers) = self.model.forward(chunk, mem)?;
        let probe = SharedProbe::from_transformer(&layers);
        hist.push_shared(&probe, pos0);
        emit(EngineEvent::Prompt {
            id,
            tokens: records_shared(tok, chunk, pos0, false, Some(&probe)),
        });
        Ok(())
    }

    fn answer(
        &self,
        tok: &Tokenizer,
        hist: &mut RouterHistory,
        id: ReqId,
        ready: &KvCache,
        last_id: u32,
        params: &SamplingParams,
        cancel: &CancelFlag,
        emit: Emit<'_>,
    ) -> Result<Answer<KvCache>> {
        let params = with_chat_stops(params);
        let mut cache = ready.clone();
        let pos0 = ready.pos();
        let out = generate_text(
            self.model,
            tok,
            &mut cache,
            &[last_id],
            &params,
            self.eos,
            cancel.as_atomic(),
            |ev| {
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
            },
        )?;
        // fed ids: the last prompt id then the answer, less an unfed last token
        let n_fed = cache.pos() - pos0;
        let fed = std::iter::once(last_id).chain(out.tokens.iter().copied()).take(n_fed).collect();
        Ok((out, fed, cache))
    }
}

/// The conversation the engine holds for a transformer.
#[derive(Debug, Clone)]
pub struct MoeConversation {
    dialog: Dialog<KvCache>,
    eos: Vec<u32>,
}

impl MoeConversation {
    /// An empty conversation; `eos` are the model's end-of-text ids.
    pub fn new(model: &MoeLm, system: Option<String>, eos: Vec<u32>) -> Self {
        Self {
            dialog: Dialog::with_state(model.new_cache(), system),
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
        let m = Transformer { model, eos: &self.eos };
        self.dialog.chat(&m, tok, hist, id, user, params, cancel, emit)
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
        let m = Transformer { model, eos: &self.eos };
        self.dialog.regenerate(&m, tok, hist, id, params, cancel, emit)
    }

    /// Removes the last turn; returns false when there is none.
    pub fn undo(&mut self, hist: &mut RouterHistory, emit: Emit<'_>) -> bool {
        self.dialog.undo(hist, emit)
    }

    /// What the UI shows of the conversation.
    pub fn info(&self) -> ConversationInfo {
        self.dialog.info()
    }
}

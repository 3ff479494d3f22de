//! Chat turns on the recurrent state (the shared loop: [`super::turns`]): one snapshot per turn
//! so that "regenerate" and "undo" restore the state without reading anything again, and
//! conversations saved as JSON with those snapshots.
//!
//! A turn feeds `prefix` = (the previous answer's unfed last token, unless it was end-of-text) +
//! `close_turn` + `prompt_for_turn`.

use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::chat_template::{close_turn, prompt_for_turn};
use crate::engine::protocol::{CancelFlag, EngineEvent, ReqId};
use crate::engine::telemetry::{records, RouterHistory};
use crate::error::{Error, Result};
use crate::generate::{generate, GenEvent};
use crate::model::probe::Probe;
use crate::model::state::{State, StateSnapshot};
use crate::model::{Logits, Model};
use crate::sampling::SamplingParams;
use crate::tokenizer::EOS_ID;

use super::turns::{with_chat_stops, Answer, Dialog, Memory, TurnModel};
pub use super::turns::{Emit, PREFILL_CHUNK};

/// One question and its answer, with the states to go back to.
pub type Turn = super::turns::Turn<State>;

/// The conversation the engine holds for BlackMamba.
pub type Conversation = Dialog<State>;

impl Memory for State {
    fn pos(&self) -> usize {
        self.pos
    }
}

impl TurnModel for Model {
    type Mem = State;

    fn prefix(&self, tok: &Tokenizer, pending: Option<u32>, system: Option<&str>, user: &str, first: bool) -> Result<Vec<u32>> {
        let mut prefix = Vec::new();
        if !first {
            if let Some(p) = pending.filter(|&p| p != EOS_ID) {
                prefix.push(p);
            }
            prefix.extend(close_turn(tok)?);
        }
        prefix.extend(prompt_for_turn(tok, system, user, first)?);
        self.check_ids(&prefix)?;
        Ok(prefix)
    }

    fn read(&self, tok: &Tokenizer, hist: &mut RouterHistory, id: ReqId, chunk: &[u32], mem: &mut State, emit: Emit<'_>) -> Result<()> {
        let mut probe = Probe::new();
        let pos0 = mem.pos;
        let ids = Tensor::from_slice(chunk, (1, chunk.len()), &self.device)?;
        self.forward(&ids, mem, Logits::Last, Some(&mut probe))?;
        hist.push(&probe, pos0);
        emit(EngineEvent::Prompt {
            id,
            tokens: records(tok, chunk, pos0, false, Some(&probe)),
        });
        Ok(())
    }

    fn answer(
        &self,
        tok: &Tokenizer,
        hist: &mut RouterHistory,
        id: ReqId,
        ready: &State,
        last_id: u32,
        params: &SamplingParams,
        cancel: &CancelFlag,
        emit: Emit<'_>,
    ) -> Result<Answer<State>> {
        let params = with_chat_stops(params);
        let mut state = ready.clone();
        let out = generate(self, tok, &mut state, &[last_id], &params, true, cancel.as_atomic(), |ev| {
            match ev {
                GenEvent::Prefilled { probe, .. } => {
                    if let Some(p) = probe {
                        hist.push(p, ready.pos);
                    }
                    emit(EngineEvent::Prompt {
                        id,
                        tokens: records(tok, &[last_id], ready.pos, false, probe),
                    });
                }
                GenEvent::Token { id: tid, pos, text, probe } => {
                    if let Some(p) = probe {
                        hist.push(p, pos);
                    }
                    let rec = records(tok, &[tid], pos, true, probe).pop().unwrap_or_default();
                    emit(EngineEvent::Token {
                        id,
                        text: text.to_string(),
                        rec: Box::new(rec),
                    });
                }
                GenEvent::Tail { text } => emit(EngineEvent::Tail {
                    id,
                    text: text.to_string(),
                }),
            }
            Ok(())
        })?;
        // Fed ids: the last prompt id then the answer, less an unfed last token.
        let n_fed = state.pos - ready.pos;
        let fed: Vec<u32> = std::iter::once(last_id).chain(out.tokens.iter().copied()).take(n_fed).collect();
        Ok((out, fed, state))
    }
}

impl Dialog<State> {
    /// An empty conversation with a zero state.
    pub fn new(model: &Model, system: Option<String>) -> Result<Self> {
        Ok(Self::with_state(model.new_state(1)?, system))
    }

    /// Writes the conversation as JSON (atomically), one state snapshot per turn.
    pub fn save(&self, path: &Path, model_label: &str) -> Result<()> {
        let turns = self
            .turns
            .iter()
            .map(|t| {
                Ok(SavedTurn {
                    user: t.user.clone(),
                    assistant: t.answer.clone(),
                    last_id: t.last_id,
                    fed: t.fed.clone(),
                    pending: t.pending,
                    state: t.ready.to_host()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let saved = SavedChat {
            format: FORMAT.into(),
            version: 1,
            model: model_label.into(),
            system: self.system.clone(),
            turns,
        };
        let json = serde_json::to_vec(&saved).map_err(|e| Error::bad_file(path, format!("cannot write JSON: {e}")))?;
        crate::model::weights::write_atomic(path, &json)
    }

    /// Reads a conversation written by [`Conversation::save`]; the state after each turn is rebuilt
    /// from that turn's snapshot and its fed answer ids (prompts are not read again).
    pub fn load(path: &Path, model: &Model) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let saved: SavedChat = serde_json::from_slice(&bytes).map_err(|e| {
            Error::bad_file(
                path,
                format!("not a saved blackmamba chat ({e}); save one with Ctrl-S in the chat view"),
            )
        })?;
        if saved.format != FORMAT || saved.version != 1 {
            return Err(Error::bad_file(
                path,
                format!("format '{}' version {} is not '{FORMAT}' version 1", saved.format, saved.version),
            ));
        }
        let mut conv = Self::new(model, saved.system)?;
        for (k, t) in saved.turns.into_iter().enumerate() {
            let ready = State::from_host(&model.cfg, &t.state, &model.device)
                .map_err(|e| Error::bad_file(path, format!("turn {}: {e}; was it saved with another model?", k + 1)))?;
            if t.fed.first() != Some(&t.last_id) {
                return Err(Error::bad_file(path, format!("turn {}: 'fed' must start with 'last_id'", k + 1)));
            }
            model.check_ids(&t.fed)?;
            let mut end = ready.clone();
            replay(model, &mut end, &t.fed)?;
            conv.turns.push(Turn {
                user: t.user,
                answer: t.assistant,
                before: std::mem::replace(&mut conv.state, end),
                before_pending: std::mem::replace(&mut conv.pending, t.pending),
                ready,
                last_id: t.last_id,
                fed: t.fed,
                pending: t.pending,
                regens: 0,
            });
        }
        Ok(conv)
    }
}

const FORMAT: &str = "blackmamba-chat";

#[derive(Debug, Serialize, Deserialize)]
struct SavedChat {
    format: String,
    version: u32,
    model: String,
    system: Option<String>,
    turns: Vec<SavedTurn>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedTurn {
    user: String,
    assistant: String,
    last_id: u32,
    fed: Vec<u32>,
    pending: Option<u32>,
    /// The state before `last_id` (the turn's "ready" snapshot).
    state: StateSnapshot,
}

/// Feeds `ids` to `state` (no logits needed beyond the last).
fn replay(model: &Model, state: &mut State, ids: &[u32]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let t = Tensor::from_slice(ids, (1, ids.len()), &model.device)?;
    model.forward(&t, state, Logits::Last, None)?;
    Ok(())
}

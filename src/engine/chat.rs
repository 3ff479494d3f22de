//! Chat turns on the recurrent state: one snapshot per turn so that "regenerate" and "undo" restore
//! the state without reading anything again, and conversations saved as JSON with those snapshots.
//!
//! A turn feeds `prefix` = (the previous answer's unfed last token, unless it was end-of-text) +
//! `close_turn` + `prompt_for_turn`. All of it but its last id is read first, in chunks of
//! [`PREFILL_CHUNK`] with a cancel check between them (cancelled there, the turn is dropped:
//! `Rewound`, then `Done`); the state there is the turn's `ready` snapshot. Generation starts from
//! `ready` with that last id, so regenerating is: restore `ready`, generate again.

use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::chat_template::{close_turn, prompt_for_turn, STOP_STRINGS};
use crate::engine::protocol::{CancelFlag, ConversationInfo, EngineEvent, ReqId};
use crate::engine::telemetry::{records, RouterHistory};
use crate::error::{Error, Result};
use crate::generate::{generate, GenEvent, GenOutcome, GenStats, StopReason};
use crate::model::probe::Probe;
use crate::model::state::{State, StateSnapshot};
use crate::model::{Logits, Model};
use crate::sampling::SamplingParams;
use crate::tokenizer::EOS_ID;

/// Prompt tokens read per forward call; the cancel flag is checked between calls, so Esc stops a
/// long paste within one chunk.
pub const PREFILL_CHUNK: usize = 128;

/// One question and its answer.
#[derive(Debug, Clone)]
pub struct Turn {
    pub user: String,
    pub answer: String,
    /// The state (and unfed token) before this turn: what "undo" restores.
    pub before: State,
    pub before_pending: Option<u32>,
    /// The state before the last prompt id: what "regenerate" restores.
    pub ready: State,
    pub last_id: u32,
    /// Ids fed from `ready` on: `last_id` and the answer's fed tokens.
    pub fed: Vec<u32>,
    /// The answer's last sampled id, not yet fed.
    pub pending: Option<u32>,
    pub regens: u64,
}

/// A turn that was answered: its `ready` snapshot, the outcome, the ids fed and the state after.
type Answered = (State, GenOutcome, Vec<u32>, State);

/// The conversation the engine holds.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub system: Option<String>,
    pub turns: Vec<Turn>,
    pub state: State,
    pub pending: Option<u32>,
}

/// Where events go.
pub type Emit<'a> = &'a mut dyn FnMut(EngineEvent);

impl Conversation {
    pub fn new(model: &Model, system: Option<String>) -> Result<Self> {
        Ok(Self {
            system,
            turns: Vec::new(),
            state: model.new_state(1)?,
            pending: None,
        })
    }

    /// Answers `user`. On error the conversation is as before and the UI is told to drop the turn.
    #[allow(clippy::too_many_arguments)]
    pub fn chat(
        &mut self,
        model: &Model,
        tok: &Tokenizer,
        hist: &mut RouterHistory,
        id: ReqId,
        user: &str,
        params: &SamplingParams,
        cancel: &CancelFlag,
        emit: Emit<'_>,
    ) -> Result<()> {
        let first = self.turns.is_empty() && self.state.pos == 0;
        let mut prefix = Vec::new();
        if !first {
            if let Some(p) = self.pending.filter(|&p| p != EOS_ID) {
                prefix.push(p);
            }
            prefix.extend(close_turn(tok)?);
        }
        prefix.extend(prompt_for_turn(tok, self.system.as_deref(), user, first)?);
        model.check_ids(&prefix)?;
        let Some((&last_id, head)) = prefix.split_last() else {
            return Err(Error::Invalid("empty prompt".into()));
        };
        emit(EngineEvent::TurnStarted {
            id,
            user: user.to_string(),
        });
        let run = (|| -> Result<Option<Answered>> {
            let mut ready = self.state.clone();
            let t0 = std::time::Instant::now();
            // in chunks, so that a long paste can be cancelled while it is read
            for chunk in head.chunks(PREFILL_CHUNK) {
                if cancel.is_cancelled() {
                    return Ok(None);
                }
                let mut probe = Probe::new();
                let pos0 = ready.pos;
                let ids = Tensor::from_slice(chunk, (1, chunk.len()), &model.device)?;
                model.forward(&ids, &mut ready, Logits::Last, Some(&mut probe))?;
                hist.push(&probe, pos0);
                emit(EngineEvent::Prompt {
                    id,
                    tokens: records(tok, chunk, pos0, false, Some(&probe)),
                });
            }
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let head_secs = t0.elapsed().as_secs_f64();
            let (mut out, fed, end) = answer(model, tok, hist, id, &ready, last_id, params, cancel, emit)?;
            // the prompt was read in two calls (all but its last id, then the last id)
            out.stats.prompt_tokens += head.len();
            out.stats.prefill_secs += head_secs;
            out.stats.ttft_secs += head_secs;
            Ok(Some((ready, out, fed, end)))
        })();
        match run {
            Ok(Some((ready, out, fed, end))) => {
                let turn = Turn {
                    user: user.to_string(),
                    answer: out.text.clone(),
                    before: std::mem::replace(&mut self.state, end),
                    before_pending: std::mem::replace(&mut self.pending, out.pending),
                    ready,
                    last_id,
                    fed,
                    pending: out.pending,
                    regens: 0,
                };
                self.turns.push(turn);
                emit(EngineEvent::Done {
                    id,
                    stats: out.stats,
                    stop: out.stop,
                });
                Ok(())
            }
            Ok(None) => {
                // cancelled while reading the prompt: the turn never happened
                hist.truncate(self.state.pos);
                emit(EngineEvent::Rewound {
                    pos: self.state.pos,
                    turns: self.turns.len(),
                });
                emit(EngineEvent::Done {
                    id,
                    stats: GenStats::default(),
                    stop: StopReason::Cancelled,
                });
                Ok(())
            }
            Err(e) => {
                hist.truncate(self.state.pos);
                emit(EngineEvent::Rewound {
                    pos: self.state.pos,
                    turns: self.turns.len(),
                });
                Err(e)
            }
        }
    }

    /// Samples the last answer again from the state saved before it (seed moved on by one).
    #[allow(clippy::too_many_arguments)]
    pub fn regenerate(
        &mut self,
        model: &Model,
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
        hist.truncate(turn.ready.pos);
        emit(EngineEvent::Rewound {
            pos: turn.ready.pos,
            turns: n - 1,
        });
        emit(EngineEvent::TurnStarted {
            id,
            user: turn.user.clone(),
        });
        turn.regens += 1;
        let mut p = params.clone();
        p.seed = p.seed.wrapping_add(turn.regens);
        let ready = turn.ready.clone();
        match answer(model, tok, hist, id, &ready, turn.last_id, &p, cancel, emit) {
            Ok((out, fed, end)) => {
                let Some(turn) = self.turns.last_mut() else {
                    return Err(Error::Invalid("nothing to regenerate: the conversation is empty".into()));
                };
                turn.answer = out.text.clone();
                turn.fed = fed;
                turn.pending = out.pending;
                self.state = end;
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
        self.state = turn.before;
        self.pending = turn.before_pending;
        hist.truncate(self.state.pos);
        emit(EngineEvent::Rewound {
            pos: self.state.pos,
            turns: self.turns.len(),
        });
        true
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

    /// What the UI shows of the conversation.
    pub fn info(&self) -> ConversationInfo {
        ConversationInfo {
            system: self.system.clone(),
            turns: self.turns.iter().map(|t| (t.user.clone(), t.answer.clone())).collect(),
            pos: self.state.pos,
        }
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

/// Generates an answer from `ready` + `last_id`; returns the outcome and the ids it fed.
#[allow(clippy::too_many_arguments)]
fn answer(
    model: &Model,
    tok: &Tokenizer,
    hist: &mut RouterHistory,
    id: ReqId,
    ready: &State,
    last_id: u32,
    params: &SamplingParams,
    cancel: &CancelFlag,
    emit: Emit<'_>,
) -> Result<(GenOutcome, Vec<u32>, State)> {
    let mut params = params.clone();
    for s in STOP_STRINGS {
        if !params.stop.iter().any(|x| x == s) {
            params.stop.push((*s).to_string());
        }
    }
    let mut state = ready.clone();
    let out = generate(model, tok, &mut state, &[last_id], &params, true, cancel.as_atomic(), |ev| {
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

//! The chat turn loop both families share: a turn feeds `prefix` (the family's turn separator and
//! the prompt), all of it but its last id read in chunks of [`PREFILL_CHUNK`] with a cancel check
//! between them (cancelled there, the turn is dropped: `Rewound`, then `Done`); the memory there is
//! the turn's `ready` snapshot, and generation starts from it with that last id, so regenerating
//! is: restore `ready`, generate again. Each turn keeps the memory before it (undo).
//!
//! A family supplies only what differs ([`TurnModel`]): its memory (the recurrent state, the
//! key/value cache), how a turn's ids are laid out, how a chunk is read with its probe, and how an
//! answer is generated.

use tokenizers::Tokenizer;

use crate::engine::protocol::{CancelFlag, ConversationInfo, EngineEvent, ReqId};
use crate::engine::telemetry::RouterHistory;
use crate::error::{Error, Result};
use crate::generate::{GenOutcome, GenStats, StopReason};
use crate::sampling::SamplingParams;

/// Prompt tokens read per forward call; the cancel flag is checked between calls, so Esc stops a
/// long paste within one chunk.
pub const PREFILL_CHUNK: usize = 128;

/// Where events go.
pub type Emit<'a> = &'a mut dyn FnMut(EngineEvent);

/// A model's memory of the conversation so far (cheap to clone: tensors are shared).
pub trait Memory: Clone {
    /// Tokens read so far.
    fn pos(&self) -> usize;
}

/// An answer: the outcome, the ids fed from `ready` on (the last prompt id and the answer less
/// its unfed last token) and the memory after them.
pub type Answer<S> = (GenOutcome, Vec<u32>, S);

/// What a family supplies to the shared turn loop.
pub trait TurnModel {
    /// The memory carried from turn to turn.
    type Mem: Memory;

    /// The ids a turn feeds: the separator after the previous answer (whose last sampled token
    /// `pending` was not fed) unless `first`, then the prompt of `user`.
    fn prefix(&self, tok: &Tokenizer, pending: Option<u32>, system: Option<&str>, user: &str, first: bool) -> Result<Vec<u32>>;

    /// Reads `chunk` after `mem`, recording its routes in `hist` and emitting its prompt records.
    fn read(&self, tok: &Tokenizer, hist: &mut RouterHistory, id: ReqId, chunk: &[u32], mem: &mut Self::Mem, emit: Emit<'_>) -> Result<()>;

    /// Generates an answer from `ready` + `last_id`, streaming its events.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        tok: &Tokenizer,
        hist: &mut RouterHistory,
        id: ReqId,
        ready: &Self::Mem,
        last_id: u32,
        params: &SamplingParams,
        cancel: &CancelFlag,
        emit: Emit<'_>,
    ) -> Result<Answer<Self::Mem>>;
}

/// One question and its answer, with the memories to go back to.
#[derive(Debug, Clone)]
pub struct Turn<S> {
    pub user: String,
    pub answer: String,
    /// The memory (and unfed token) before this turn: what "undo" restores.
    pub before: S,
    pub before_pending: Option<u32>,
    /// The memory before the last prompt id: what "regenerate" restores.
    pub ready: S,
    pub last_id: u32,
    /// Ids fed from `ready` on: `last_id` and the answer's fed tokens.
    pub fed: Vec<u32>,
    /// The answer's last sampled id, not yet fed.
    pub pending: Option<u32>,
    pub regens: u64,
}

/// A conversation over memory `S`.
#[derive(Debug, Clone)]
pub struct Dialog<S> {
    /// The system prompt of the first turn.
    pub system: Option<String>,
    pub turns: Vec<Turn<S>>,
    /// The memory after the last turn.
    pub state: S,
    /// The last answer's unfed token.
    pub pending: Option<u32>,
}

/// A turn that was answered: its `ready` memory, the outcome, the ids fed and the memory after.
type Answered<S> = (S, GenOutcome, Vec<u32>, S);

/// The stop strings of the chat template added to `params`.
pub fn with_chat_stops(params: &SamplingParams) -> SamplingParams {
    let mut params = params.clone();
    for s in crate::chat_template::STOP_STRINGS {
        if !params.stop.iter().any(|x| x == s) {
            params.stop.push((*s).to_string());
        }
    }
    params
}

impl<S: Memory> Dialog<S> {
    /// An empty conversation starting from `state`.
    pub fn with_state(state: S, system: Option<String>) -> Self {
        Self {
            system,
            turns: Vec::new(),
            state,
            pending: None,
        }
    }

    /// Answers `user`. On error or a cancel while the prompt is read the conversation is as
    /// before and the UI is told to drop the turn.
    #[allow(clippy::too_many_arguments)]
    pub fn chat<M: TurnModel<Mem = S> + ?Sized>(
        &mut self,
        model: &M,
        tok: &Tokenizer,
        hist: &mut RouterHistory,
        id: ReqId,
        user: &str,
        params: &SamplingParams,
        cancel: &CancelFlag,
        emit: Emit<'_>,
    ) -> Result<()> {
        let first = self.turns.is_empty() && self.state.pos() == 0;
        let prefix = model.prefix(tok, self.pending, self.system.as_deref(), user, first)?;
        let Some((&last_id, head)) = prefix.split_last() else {
            return Err(Error::Invalid("empty prompt".into()));
        };
        emit(EngineEvent::TurnStarted {
            id,
            user: user.to_string(),
        });
        let run = (|| -> Result<Option<Answered<S>>> {
            let mut ready = self.state.clone();
            let t0 = std::time::Instant::now();
            // in chunks, so that a long paste can be cancelled while it is read
            for chunk in head.chunks(PREFILL_CHUNK) {
                if cancel.is_cancelled() {
                    return Ok(None);
                }
                model.read(tok, hist, id, chunk, &mut ready, emit)?;
            }
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let head_secs = t0.elapsed().as_secs_f64();
            let (mut out, fed, end) = model.answer(tok, hist, id, &ready, last_id, params, cancel, emit)?;
            // the prompt was read in two calls (all but its last id, then the last id)
            out.stats.prompt_tokens += head.len();
            out.stats.prefill_secs += head_secs;
            out.stats.ttft_secs += head_secs;
            Ok(Some((ready, out, fed, end)))
        })();
        match run {
            Ok(Some((ready, out, fed, end))) => {
                self.turns.push(Turn {
                    user: user.to_string(),
                    answer: out.text.clone(),
                    before: std::mem::replace(&mut self.state, end),
                    before_pending: std::mem::replace(&mut self.pending, out.pending),
                    ready,
                    last_id,
                    fed,
                    pending: out.pending,
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

    /// Samples the last answer again from the memory before its last prompt id (seed moved on by
    /// one).
    #[allow(clippy::too_many_arguments)]
    pub fn regenerate<M: TurnModel<Mem = S> + ?Sized>(
        &mut self,
        model: &M,
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
        match model.answer(tok, hist, id, &ready, last_id, &p, cancel, emit) {
            Ok((out, fed, end)) => {
                if let Some(turn) = self.turns.last_mut() {
                    turn.answer = out.text.clone();
                    turn.fed = fed;
                    turn.pending = out.pending;
                }
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
        self.rewound(hist, emit);
        true
    }

    fn rewound(&self, hist: &mut RouterHistory, emit: Emit<'_>) {
        hist.truncate(self.state.pos());
        emit(EngineEvent::Rewound {
            pos: self.state.pos(),
            turns: self.turns.len(),
        });
    }

    /// What the UI shows of the conversation.
    pub fn info(&self) -> ConversationInfo {
        ConversationInfo {
            system: self.system.clone(),
            turns: self.turns.iter().map(|t| (t.user.clone(), t.answer.clone())).collect(),
            pos: self.state.pos(),
        }
    }
}

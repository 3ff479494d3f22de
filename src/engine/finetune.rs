//! The engine side of fine-tuning: takes [`FinetuneCommand`]s, runs one trainer step per engine
//! loop turn while running, and reports progress as [`FinetuneEvent`](crate::engine::protocol::FinetuneEvent)s.
//!
//! The trainer (`crate::finetune::Trainer`) is written in parallel; until it is wired in here,
//! every command is answered with a plain error. Wiring it in means: hold the trainer in
//! [`Finetuning`], build it on `Start`, call `step()` in [`Finetuning::step`] and turn its
//! `StepReport` into a [`FinetuneProgress`](crate::engine::protocol::FinetuneProgress) (+ a Sinkhorn report with origin `Finetune`).

use crate::engine::protocol::{EngineEvent, FinetuneCommand};
use crate::error::{Error, Result};
use crate::model::Model;

/// Whether this build can fine-tune (the UI says so in the fine-tune panel).
pub const AVAILABLE: bool = false;

/// The message every fine-tuning command gets until the trainer is wired in.
pub const NOT_AVAILABLE: &str = "fine-tuning is not available in this build yet";

/// Fine-tuning state held by the engine thread.
#[derive(Debug, Default)]
pub struct Finetuning {}

impl Finetuning {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the engine should run a training step instead of waiting for a command.
    pub fn wants_step(&self) -> bool {
        false
    }

    /// Handles a command. `base` is the model chat uses when not on the fine-tuned weights.
    pub fn handle(&mut self, cmd: FinetuneCommand, _base: &Model, _emit: &mut dyn FnMut(EngineEvent)) -> Result<()> {
        let _ = cmd;
        Err(Error::Invalid(NOT_AVAILABLE.into()))
    }

    /// One training step (only called while [`Finetuning::wants_step`]).
    pub fn step(&mut self, _emit: &mut dyn FnMut(EngineEvent)) -> Result<()> {
        Ok(())
    }

    /// The model chat should use: `Some` while chatting with the fine-tuned weights.
    pub fn chat_model(&self) -> Option<&Model> {
        None
    }
}

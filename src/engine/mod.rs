//! The engine thread: the one owner of the device, the weights, the tokenizer and the recurrent
//! state. The UI sends [`Command`]s and receives [`EngineEvent`]s; the engine never blocks the UI,
//! checks a cancel flag between tokens, turns every error into an event and keeps running.
//!
//! A thread rather than an async task: model calls block, and a long-lived blocking loop belongs on
//! its own thread (DESIGN §3).

pub mod chat;
pub mod finetune;
pub mod protocol;
pub mod sinkhorn;
pub mod telemetry;

use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::hub::HubEnv;
use crate::loader::{LoadOpts, Loaded, ModelSource};
use crate::model::Model;
use chat::Conversation;
use protocol::{Command, EngineEvent, EngineOpts, LoadSpec, ModelInfo};
use telemetry::RouterHistory;

/// The nominal HBM bandwidth of one NVIDIA H200 (4.8 TB/s, NVIDIA's data sheet): decoding one token
/// reads every active weight once, so this bounds decode speed; the status bar shows the share of
/// it achieved.
pub const HBM_BANDWIDTH_CEILING: f64 = 4.8e12;

/// Where the engine gets its model.
pub enum Source {
    /// Load from the command-line flags (in the engine thread, with progress events).
    Spec(LoadSpec),
    /// An already loaded model (tests, embedding).
    Loaded(Box<Loaded>),
}

/// Where the engine sends its events.
pub type Sink = Box<dyn FnMut(EngineEvent) + Send>;

/// A handle on the running engine thread.
pub struct Engine {
    tx: Sender<Command>,
    join: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the engine thread; it loads the model and then waits for commands.
    pub fn spawn(source: Source, sink: Sink) -> Result<Self> {
        Self::spawn_with(source, EngineOpts::default(), sink)
    }

    /// [`Engine::spawn`] with the options every model it loads runs with.
    pub fn spawn_with(source: Source, opts: EngineOpts, sink: Sink) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let join = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || run(source, opts, rx, sink))
            .map_err(|e| Error::Invalid(format!("cannot start the engine thread: {e}")))?;
        Ok(Self { tx, join: Some(join) })
    }

    /// Sends a command; false when the engine is gone.
    pub fn send(&self, cmd: Command) -> bool {
        self.tx.send(cmd).is_ok()
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Asks the engine to stop and waits for it (it stops after the current token).
    pub fn shutdown(mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

fn run(source: Source, opts: EngineOpts, rx: Receiver<Command>, mut sink: Sink) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut worker = match Worker::start(source, opts, &mut sink) {
            Ok(w) => w,
            Err(e) => {
                sink(EngineEvent::Fatal(format!("loading the model failed: {e}")));
                return;
            }
        };
        worker.serve(&rx, &mut sink);
    }));
    if let Err(p) = result {
        sink(EngineEvent::Fatal(format!("the engine stopped: {}", panic_text(p.as_ref()))));
    }
}

/// The message of a panic payload (a `String` or `&str`; anything else is "unknown panic").
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// What the engine thread owns.
struct Worker {
    model: Model,
    tok: Tokenizer,
    label: String,
    conv: Conversation,
    hist: RouterHistory,
    ft: finetune::Finetuning,
    opts: EngineOpts,
}

impl Worker {
    fn start(source: Source, opts: EngineOpts, sink: &mut Sink) -> Result<Self> {
        let loaded = match source {
            Source::Loaded(l) => *l,
            Source::Spec(spec) => load(&spec, opts, sink)?,
        };
        let info = model_info(&loaded);
        let model = loaded.model;
        let conv = Conversation::new(&model, None)?;
        let hist = RouterHistory::new(&info.moe_layers);
        sink(EngineEvent::Loaded(Box::new(info)));
        Ok(Self {
            model,
            tok: loaded.tokenizer,
            label: loaded.label,
            conv,
            hist,
            ft: finetune::Finetuning::new(),
            opts,
        })
    }

    fn serve(&mut self, rx: &Receiver<Command>, sink: &mut Sink) {
        loop {
            let cmd = if self.ft.wants_step() {
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => {
                        if let Err(e) = self.ft.step(sink) {
                            sink(EngineEvent::Error {
                                id: None,
                                message: e.to_string(),
                            });
                        }
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                }
            };
            if matches!(cmd, Command::Shutdown) {
                return;
            }
            let id = match &cmd {
                Command::Chat { id, .. } | Command::Regenerate { id, .. } => Some(*id),
                _ => None,
            };
            if let Err(e) = self.handle(cmd, sink) {
                sink(EngineEvent::Error {
                    id,
                    message: e.to_string(),
                });
            }
        }
    }

    fn handle(&mut self, cmd: Command, sink: &mut Sink) -> Result<()> {
        let model = self.ft.chat_model().unwrap_or(&self.model);
        let emit: &mut dyn FnMut(EngineEvent) = sink;
        match cmd {
            Command::Chat { id, text, params, cancel } => {
                self.conv.chat(model, &self.tok, &mut self.hist, id, &text, &params, &cancel, emit)
            }
            Command::Regenerate { id, params, cancel } => {
                self.conv.regenerate(model, &self.tok, &mut self.hist, id, &params, &cancel, emit)
            }
            Command::Undo => {
                if !self.conv.undo(&mut self.hist, emit) {
                    emit(EngineEvent::Notice("nothing to undo".into()));
                }
                Ok(())
            }
            Command::NewChat { system } => {
                let has_system = system.is_some();
                self.conv = Conversation::new(model, system)?;
                self.hist.clear();
                emit(EngineEvent::Rewound { pos: 0, turns: 0 });
                // the UI shows the system prompt as the chat's first message
                if has_system {
                    emit(EngineEvent::Conversation(Box::new(self.conv.info())));
                }
                Ok(())
            }
            Command::Sinkhorn { window, max_iters, tol } => {
                if window == 0 || max_iters == 0 || tol.is_nan() || tol <= 0.0 {
                    return Err(Error::Invalid(format!(
                        "Sinkhorn window {window}, max iterations {max_iters}, tolerance {tol}: all must be positive"
                    )));
                }
                let r = sinkhorn::window_report(&self.hist, window, max_iters, tol);
                emit(EngineEvent::Sinkhorn(Box::new(r)));
                Ok(())
            }
            Command::SaveChat(path) => {
                self.conv.save(&path, &self.label)?;
                emit(EngineEvent::Notice(format!("saved the conversation to {}", path.display())));
                Ok(())
            }
            Command::LoadChat(path) => {
                let conv = Conversation::load(&path, model)?;
                self.conv = conv;
                self.hist.clear();
                emit(EngineEvent::Conversation(Box::new(self.conv.info())));
                emit(EngineEvent::Notice(format!(
                    "loaded {} turns from {}",
                    self.conv.turns.len(),
                    path.display()
                )));
                Ok(())
            }
            Command::Finetune(c) => self.ft.handle(c, &self.model, &self.tok, &self.label, emit),
            Command::ListModels => {
                emit(EngineEvent::Models(Box::new(crate::catalog::scan(&HubEnv::from_env()))));
                Ok(())
            }
            Command::Load(spec) => {
                if let Err(e) = self.switch(&spec, emit) {
                    emit(EngineEvent::LoadFailed(format!("{e}; still on {}", self.label)));
                }
                Ok(())
            }
            Command::Shutdown => Ok(()),
        }
    }

    /// Replaces the model by the one `spec` names. The old one serves until the new one has
    /// loaded; then the conversation, router history and fine-tuning state start afresh.
    fn switch(&mut self, spec: &LoadSpec, emit: &mut dyn FnMut(EngineEvent)) -> Result<()> {
        if let Some((done, steps)) = self.ft.active_run() {
            return Err(Error::Invalid(format!(
                "a fine-tuning run is going (step {done} of {steps}); stop it with x in the Fine-tune view before loading another model"
            )));
        }
        let loaded = load(spec, self.opts, emit)?;
        let info = model_info(&loaded);
        self.conv = Conversation::new(&loaded.model, None)?;
        self.hist = RouterHistory::new(&info.moe_layers);
        self.ft = finetune::Finetuning::new();
        self.model = loaded.model;
        self.tok = loaded.tokenizer;
        self.label = loaded.label;
        emit(EngineEvent::Loaded(Box::new(info)));
        Ok(())
    }
}

/// Loads the model named by `spec`, reporting stages.
fn load(spec: &LoadSpec, eo: EngineOpts, sink: &mut dyn FnMut(EngineEvent)) -> Result<Loaded> {
    let total = 3;
    sink(EngineEvent::LoadProgress {
        stage: "choosing the device".into(),
        done: 0,
        total,
    });
    let source = ModelSource::parse(spec.model.as_deref(), spec.revision.as_deref())?;
    let device = crate::loader::device(spec.device.as_deref().map(str::parse).transpose()?)?;
    let dtype = crate::loader::dtype(spec.dtype.as_deref().map(str::parse).transpose()?, &device);
    sink(EngineEvent::LoadProgress {
        stage: format!("loading {}", source.label()),
        done: 1,
        total,
    });
    // The loader reports downloads, conversion and tensor reads from a helper thread; this
    // thread forwards them as events until the model is there.
    let (tx, rx) = std::sync::mpsc::channel::<crate::loader::LoadProgress>();
    let opts = LoadOpts {
        tokenizer: spec.tokenizer.clone(),
        progress: Some(std::sync::Arc::new(move |p: &crate::loader::LoadProgress| {
            let _ = tx.send(p.clone());
        })),
        hub: None,
    };
    let mut loaded = std::thread::scope(|scope| {
        let job = std::thread::Builder::new()
            .name("loader".into())
            .spawn_scoped(scope, || crate::loader::load(&source, &device, dtype, &opts))
            .map_err(|e| Error::Invalid(format!("cannot start the model loader thread: {e}")))?;
        while !job.is_finished() {
            if let Ok(p) = rx.recv_timeout(std::time::Duration::from_millis(50)) {
                if p.stage != "ready" {
                    sink(EngineEvent::LoadProgress {
                        stage: format!("{}: {}", source.label(), p.stage),
                        done: usize::try_from(p.done).unwrap_or(usize::MAX),
                        total: usize::try_from(p.total).unwrap_or(usize::MAX),
                    });
                }
            }
        }
        job.join()
            .unwrap_or_else(|p| Err(Error::Invalid(format!("the model loader panicked: {}", panic_text(p.as_ref())))))
    })?;
    loaded.model.kernels = eo.kernels;
    if let Some(dir) = &spec.adapter {
        sink(EngineEvent::LoadProgress {
            stage: format!("applying adapter {}", dir.display()),
            done: 2,
            total,
        });
        crate::finetune::adapter::apply_merged(&mut loaded.model, dir)?;
        loaded.label = format!("{} + adapter {}", loaded.label, dir.display());
    }
    if !eo.kernels.enabled {
        crate::quant::apply::set_ggml(&mut loaded.model, false)?;
    }
    if let Some(q) = &spec.quant {
        sink(EngineEvent::LoadProgress {
            stage: format!("quantising to {}", q.format),
            done: 2,
            total,
        });
        crate::quant::apply::quantize_loaded(&mut loaded, q)?;
    }
    sink(EngineEvent::LoadProgress {
        stage: "ready".into(),
        done: total,
        total,
    });
    Ok(loaded)
}

/// The facts about a loaded model that the UI shows.
pub fn model_info(l: &Loaded) -> ModelInfo {
    let cfg = &l.model.cfg;
    let (total, active) = cfg.param_counts();
    let is_gpu = l.model.device.is_cuda();
    let dtype = l.model.dtype;
    ModelInfo {
        label: l.label.clone(),
        untrained: l.untrained,
        device: if is_gpu { "cuda".into() } else { "cpu".into() },
        is_gpu,
        dtype: format!("{dtype:?}").to_lowercase(),
        n_layers: cfg.num_layers,
        moe_layers: cfg.moe_layers(),
        mamba_layers: cfg.mamba_layers(),
        d_model: cfg.hidden_size,
        d_state: cfg.state_size,
        vocab: cfg.vocab_size,
        params_total: total,
        params_active: active,
        bytes_per_token: active as f64 * dtype.size_in_bytes() as f64,
        load_secs: l.load_secs,
        finetune_available: finetune::AVAILABLE,
    }
}

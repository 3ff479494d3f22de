//! The engine thread: the one owner of the device, the weights, the tokenizer and the recurrent
//! state. The UI sends [`Command`]s and receives [`EngineEvent`]s; the engine never blocks the UI,
//! checks a cancel flag between tokens, turns every error into an event and keeps running.
//!
//! A thread rather than an async task: model calls block, and a long-lived blocking loop belongs on
//! its own thread (DESIGN §3).

pub mod chat;
pub mod chat_moe;
pub mod compare;
pub mod finetune;
pub mod info;
pub mod protocol;
pub mod sinkhorn;
pub mod telemetry;
pub mod turns;

use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::lm::{AnyLoaded, AnyModel};
use crate::loader::{LoadOpts, Loaded, ModelSource};
use crate::model::Model;
use crate::moe_lm::MoeLm;
use chat::Conversation;
use chat_moe::MoeConversation;
pub use info::{model_info, model_info_any};
use protocol::{Command, EngineEvent, EngineOpts, LoadSpec};
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

/// The model and conversation of the family loaded.
enum Chat {
    /// BlackMamba: the recurrent-state conversation and fine-tuning.
    Mamba {
        model: Box<Model>,
        conv: Conversation,
        ft: Box<finetune::Finetuning>,
    },
    /// A transformer MoE: the key/value-cache conversation (no fine-tuning, no Sinkhorn).
    Moe { model: Box<MoeLm>, conv: MoeConversation },
}

impl Chat {
    fn new(model: AnyModel, eos: Vec<u32>) -> Result<Self> {
        Ok(match model {
            AnyModel::BlackMamba(m) => {
                let conv = Conversation::new(&m, None)?;
                Self::Mamba {
                    model: m,
                    conv,
                    ft: Box::new(finetune::Finetuning::new()),
                }
            }
            AnyModel::Transformer(m) => {
                let conv = MoeConversation::new(&m, None, eos);
                Self::Moe { model: m, conv }
            }
        })
    }

    fn ft(&mut self) -> Option<&mut finetune::Finetuning> {
        match self {
            Self::Mamba { ft, .. } => Some(ft),
            Self::Moe { .. } => None,
        }
    }
}

/// What the engine thread owns.
struct Worker {
    chat: Chat,
    tok: Tokenizer,
    label: String,
    hist: RouterHistory,
    opts: EngineOpts,
    /// What the current model was loaded from (`None`: it was handed over loaded).
    spec: Option<LoadSpec>,
}

impl Worker {
    fn start(source: Source, opts: EngineOpts, sink: &mut Sink) -> Result<Self> {
        let (mut loaded, spec) = match source {
            Source::Loaded(l) => (AnyLoaded::from(*l), None),
            Source::Spec(spec) => (load(&spec, &opts, sink)?, Some(spec)),
        };
        let mut info = model_info_any(&loaded);
        info.quant = quant_name(&mut loaded.model)?;
        let hist = RouterHistory::new(&info.moe_layers);
        let chat = Chat::new(loaded.model, loaded.eos)?;
        sink(EngineEvent::Loaded(Box::new(info)));
        Ok(Self {
            chat,
            tok: loaded.tokenizer,
            label: loaded.label,
            hist,
            opts,
            spec,
        })
    }

    fn serve(&mut self, rx: &Receiver<Command>, sink: &mut Sink) {
        loop {
            let cmd = if self.chat.ft().is_some_and(|f| f.wants_step()) {
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => {
                        if let Some(Err(e)) = self.chat.ft().map(|f| f.step(sink)) {
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
        let emit: &mut dyn FnMut(EngineEvent) = sink;
        match cmd {
            Command::ListModels => {
                emit(EngineEvent::Models(Box::new(crate::catalog::scan(self.opts.hub.as_ref()))));
                return Ok(());
            }
            Command::Load(spec) => {
                if let Err(e) = self.switch(&spec, emit) {
                    emit(EngineEvent::LoadFailed(format!("{e}; still on {}", self.label)));
                }
                return Ok(());
            }
            Command::Compare { text, with } => return compare::run(self, &text, &with, emit),
            Command::Shutdown => return Ok(()),
            _ => {}
        }
        let (model, conv, ft) = match &mut self.chat {
            Chat::Mamba { model, conv, ft } => (model, conv, ft),
            Chat::Moe { model, conv } => return handle_moe(model, conv, &self.tok, &mut self.hist, cmd, emit),
        };
        let model = ft.chat_model().unwrap_or(model);
        match cmd {
            Command::Chat { id, text, params, cancel } => conv.chat(model, &self.tok, &mut self.hist, id, &text, &params, &cancel, emit),
            Command::Regenerate { id, params, cancel } => conv.regenerate(model, &self.tok, &mut self.hist, id, &params, &cancel, emit),
            Command::Undo => {
                if !conv.undo(&mut self.hist, emit) {
                    emit(EngineEvent::Notice("nothing to undo".into()));
                }
                Ok(())
            }
            Command::NewChat { system } => {
                let has_system = system.is_some();
                *conv = Conversation::new(model, system)?;
                self.hist.clear();
                emit(EngineEvent::Rewound { pos: 0, turns: 0 });
                // the UI shows the system prompt as the chat's first message
                if has_system {
                    emit(EngineEvent::Conversation(Box::new(conv.info())));
                }
                Ok(())
            }
            Command::Sinkhorn { window, max_iters, tol } => sinkhorn_report(&self.hist, window, max_iters, tol, emit),
            Command::SaveChat(path) => {
                conv.save(&path, &self.label)?;
                emit(EngineEvent::Notice(format!("saved the conversation to {}", path.display())));
                Ok(())
            }
            Command::LoadChat(path) => {
                let loaded = Conversation::load(&path, model)?;
                *conv = loaded;
                self.hist.clear();
                emit(EngineEvent::Conversation(Box::new(conv.info())));
                emit(EngineEvent::Notice(format!(
                    "loaded {} turns from {}",
                    conv.turns.len(),
                    path.display()
                )));
                Ok(())
            }
            Command::Finetune(c) => {
                let Chat::Mamba { model, ft, .. } = &mut self.chat else {
                    return Ok(());
                };
                ft.handle(c, model, &self.tok, &self.label, emit)
            }
            Command::ListModels | Command::Load(_) | Command::Compare { .. } | Command::Shutdown => Ok(()),
        }
    }

    /// Replaces the model by the one `spec` names. The old one serves until the new one has
    /// loaded; then the conversation, router history and fine-tuning state start afresh.
    fn switch(&mut self, spec: &LoadSpec, emit: &mut dyn FnMut(EngineEvent)) -> Result<()> {
        if let Some((done, steps)) = self.chat.ft().and_then(|f| f.active_run()) {
            return Err(Error::Invalid(format!(
                "a fine-tuning run is going (step {done} of {steps}); stop it with x in the Fine-tune view before loading another model"
            )));
        }
        let mut loaded = load(spec, &self.opts, emit)?;
        let mut info = model_info_any(&loaded);
        info.quant = quant_name(&mut loaded.model)?;
        self.spec = Some(spec.clone());
        self.chat = Chat::new(loaded.model, loaded.eos)?;
        self.hist = RouterHistory::new(&info.moe_layers);
        self.tok = loaded.tokenizer;
        self.label = loaded.label;
        emit(EngineEvent::Loaded(Box::new(info)));
        Ok(())
    }
}

/// The commands of a transformer's chat: turns, regenerate, undo, a new chat and Sinkhorn over
/// the router history; fine-tuning and saved conversations are BlackMamba's and answered with one
/// line saying so.
fn handle_moe(
    model: &MoeLm,
    conv: &mut MoeConversation,
    tok: &Tokenizer,
    hist: &mut RouterHistory,
    cmd: Command,
    emit: &mut dyn FnMut(EngineEvent),
) -> Result<()> {
    let family = model.config().family.model_type();
    let only = |what: &str| {
        Err(Error::Invalid(format!(
            "{what} works on BlackMamba models; this is a {family} checkpoint"
        )))
    };
    match cmd {
        Command::Chat { id, text, params, cancel } => conv.chat(model, tok, hist, id, &text, &params, &cancel, emit),
        Command::Regenerate { id, params, cancel } => conv.regenerate(model, tok, hist, id, &params, &cancel, emit),
        Command::Undo => {
            if !conv.undo(hist, emit) {
                emit(EngineEvent::Notice("nothing to undo".into()));
            }
            Ok(())
        }
        Command::NewChat { system } => {
            let has_system = system.is_some();
            let eos = conv.eos().to_vec();
            *conv = MoeConversation::new(model, system, eos);
            hist.clear();
            emit(EngineEvent::Rewound { pos: 0, turns: 0 });
            if has_system {
                emit(EngineEvent::Conversation(Box::new(conv.info())));
            }
            Ok(())
        }
        Command::Sinkhorn { window, max_iters, tol } => sinkhorn_report(hist, window, max_iters, tol, emit),
        Command::SaveChat(_) | Command::LoadChat(_) => only("saving and loading a conversation"),
        Command::Finetune(_) => only("fine-tuning"),
        Command::ListModels | Command::Load(_) | Command::Compare { .. } | Command::Shutdown => Ok(()),
    }
}

/// Sinkhorn of both variants over the last `window` rows of the router history.
fn sinkhorn_report(hist: &RouterHistory, window: usize, max_iters: usize, tol: f64, emit: &mut dyn FnMut(EngineEvent)) -> Result<()> {
    if window == 0 || max_iters == 0 || tol.is_nan() || tol <= 0.0 {
        return Err(Error::Invalid(format!(
            "Sinkhorn window {window}, max iterations {max_iters}, tolerance {tol}: all must be positive"
        )));
    }
    let r = sinkhorn::window_report(hist, window, max_iters, tol);
    emit(EngineEvent::Sinkhorn(Box::new(r)));
    Ok(())
}

/// The weight format of a quantised BlackMamba (`None`: dense, or a transformer).
fn quant_name(m: &mut AnyModel) -> Result<Option<String>> {
    match m {
        AnyModel::BlackMamba(m) => Ok(crate::quant::apply::model_format(m)?.map(|f| f.name())),
        AnyModel::Transformer(_) => Ok(None),
    }
}

/// Loads the model named by `spec`, reporting stages.
fn load(spec: &LoadSpec, eo: &EngineOpts, sink: &mut dyn FnMut(EngineEvent)) -> Result<AnyLoaded> {
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
        hub: eo.hub.clone(),
    };
    let mut loaded = std::thread::scope(|scope| {
        let job = std::thread::Builder::new()
            .name("loader".into())
            .spawn_scoped(scope, || crate::lm::load_any(&source, &device, dtype, &opts))
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
    match &mut loaded.model {
        AnyModel::BlackMamba(m) => {
            m.kernels = eo.kernels;
            if let Some(dir) = &spec.adapter {
                sink(EngineEvent::LoadProgress {
                    stage: format!("applying adapter {}", dir.display()),
                    done: 2,
                    total,
                });
                crate::finetune::adapter::apply_merged(m, dir)?;
                loaded.label = format!("{} + adapter {}", loaded.label, dir.display());
            }
            if !eo.kernels.enabled {
                crate::quant::apply::set_ggml(m, false)?;
            }
            if let Some(q) = &spec.quant {
                sink(EngineEvent::LoadProgress {
                    stage: format!("quantising to {}", q.format),
                    done: 2,
                    total,
                });
                let q = crate::quant::QuantSpec {
                    ggml: q.ggml && eo.kernels.enabled,
                    ..q.clone()
                };
                crate::quant::apply::quantize_model(m, &q)?;
                loaded.label = format!("{} [{}]", loaded.label, q.format);
            }
        }
        AnyModel::Transformer(_) => {
            if let Some(dir) = &spec.adapter {
                return Err(Error::Invalid(format!(
                    "--adapter {}: adapters apply to BlackMamba models; {} is a transformer checkpoint",
                    dir.display(),
                    loaded.label
                )));
            }
            if let Some(q) = &spec.quant {
                return Err(Error::Invalid(format!(
                    "--quant {}: quantisation applies to BlackMamba models; {} is a transformer checkpoint",
                    q.format, loaded.label
                )));
            }
        }
    }
    sink(EngineEvent::LoadProgress {
        stage: "ready".into(),
        done: total,
        total,
    });
    Ok(loaded)
}

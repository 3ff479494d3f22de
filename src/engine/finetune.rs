//! The engine side of fine-tuning: takes [`FinetuneCommand`]s, runs one trainer step per engine
//! loop turn while running, and reports progress as [`FinetuneEvent`]s.
//!
//! The trainer is the one `blackmamba finetune` drives ([`crate::finetune::Trainer`]); the panel's
//! [`FinetuneSpec`] becomes its [`FinetuneConfig`] ([`config_from_spec`]). The engine loop calls
//! [`Finetuning::step`] whenever no command is waiting, so chat, pause and stop are answered
//! between two steps. Each step becomes a [`FinetuneProgress`] and a Sinkhorn report with origin
//! `Finetune` (the Sinkhorn that routed the step's last micro-batch). A fixed probe prompt is
//! routed by the base model at the start and by the fine-tuned weights as training goes on (at
//! most once a second, and on pause, stop and at the end).

use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokenizers::Tokenizer;

use crate::chat_template::prompt_for_turn;
use crate::engine::protocol::{
    EngineEvent, FinetuneCommand, FinetuneEvent, FinetuneMethod, FinetuneProgress, FinetuneSpec, FinetuneStatus, PrefProgress,
    ProbeRouting, RoutingShiftInfo, SinkhornLayer, SinkhornOrigin, SinkhornReport,
};
use crate::engine::sinkhorn::summarize;
use crate::engine::telemetry::piece;
use crate::error::{Error, Result};
use crate::finetune::checkpoint::STATE_FILE;
use crate::finetune::data::Example;
use crate::finetune::routing_shift::{routes, Routes, RoutingShift};
use crate::finetune::{FinetuneConfig, Method, Objective, StepReport, Target, Trainer};
use crate::model::probe::Probe;
use crate::model::{Logits, Model};
use crate::sinkhorn::loads;

/// Whether this build can fine-tune (the UI says so in the fine-tune panel).
pub const AVAILABLE: bool = true;

/// The user message of the probe prompt whose routing the panel shows before vs after.
pub const PROBE_PROMPT: &str = "What do the experts of a mixture-of-experts model do?";

/// Fastest pace of "after" probe routings while training runs.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Fine-tuning state held by the engine thread.
#[derive(Default)]
pub struct Finetuning {
    run: Option<Run>,
    /// A snapshot of fine-tuned weights while chat uses them.
    tuned: Option<Model>,
}

/// One run from the panel.
struct Run {
    trainer: Trainer,
    status: FinetuneStatus,
    /// Seconds spent in steps (pauses excluded), for the ETA.
    active_secs: f64,
    probe_ids: Vec<u32>,
    probe_pieces: Vec<String>,
    last_probe: Instant,
    /// Half-block index of each MoE layer.
    moe_layers: Vec<usize>,
    /// The routing comparison's slice (label, examples) and the base model's routes of it.
    routes_before: Option<(String, Vec<Example>, Routes)>,
}

impl Finetuning {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the engine should run a training step instead of waiting for a command.
    pub fn wants_step(&self) -> bool {
        self.run.as_ref().is_some_and(|r| r.status == FinetuneStatus::Running)
    }

    /// Handles a command. `base` is the model chat uses when not on the fine-tuned weights and
    /// the one a new run starts from; `label` names it in the adapter's JSON.
    pub fn handle(
        &mut self,
        cmd: FinetuneCommand,
        base: &Model,
        tok: &Tokenizer,
        label: &str,
        emit: &mut dyn FnMut(EngineEvent),
    ) -> Result<()> {
        let status = |s| EngineEvent::Finetune(FinetuneEvent::Status(s));
        match cmd {
            FinetuneCommand::Start(spec) => self.start(&spec, base, tok, label, emit),
            FinetuneCommand::Pause => {
                let run = self.active("pause")?;
                if run.status == FinetuneStatus::Running {
                    run.status = FinetuneStatus::Paused;
                    run.probe_after(emit)?;
                }
                emit(status(run.status));
                Ok(())
            }
            FinetuneCommand::Resume => {
                let run = self.active("resume")?;
                run.status = FinetuneStatus::Running;
                emit(status(run.status));
                Ok(())
            }
            FinetuneCommand::Stop => {
                let run = self.active("stop")?;
                run.status = FinetuneStatus::Stopped;
                run.probe_after(emit)?;
                emit(status(run.status));
                let c = run.trainer.config();
                emit(EngineEvent::Notice(format!(
                    "fine-tuning stopped at step {} of {}; w saves the adapter to {}",
                    run.trainer.steps_done(),
                    c.steps,
                    c.out.display()
                )));
                Ok(())
            }
            FinetuneCommand::Save => {
                let run = self.run.as_mut().ok_or_else(|| no_run("save"))?;
                run.trainer.save()?;
                emit(EngineEvent::Finetune(FinetuneEvent::Saved(run.trainer.config().out.clone())));
                Ok(())
            }
            FinetuneCommand::UseFinetuned(true) => {
                let run = self.run.as_ref().ok_or_else(|| no_run("chat with"))?;
                self.tuned = Some(run.trainer.model()?);
                emit(EngineEvent::Finetune(FinetuneEvent::UsingFinetuned(true)));
                emit(EngineEvent::Notice(format!(
                    "chat now uses the fine-tuned weights of step {} (u switches back)",
                    run.trainer.steps_done()
                )));
                Ok(())
            }
            FinetuneCommand::UseFinetuned(false) => {
                self.tuned = None;
                emit(EngineEvent::Finetune(FinetuneEvent::UsingFinetuned(false)));
                emit(EngineEvent::Notice("chat now uses the base weights".into()));
                Ok(())
            }
        }
    }

    /// The run that pause / resume / stop act on: one that is running or paused.
    fn active(&mut self, what: &str) -> Result<&mut Run> {
        match self.run.as_mut() {
            Some(r) if matches!(r.status, FinetuneStatus::Running | FinetuneStatus::Paused) => Ok(r),
            Some(r) => Err(Error::Invalid(format!(
                "nothing to {what}: the run is {} at step {}; s starts a new one",
                status_name(r.status),
                r.trainer.steps_done()
            ))),
            None => Err(no_run(what)),
        }
    }

    fn start(&mut self, spec: &FinetuneSpec, base: &Model, tok: &Tokenizer, label: &str, emit: &mut dyn FnMut(EngineEvent)) -> Result<()> {
        if let Some(r) = self
            .run
            .as_ref()
            .filter(|r| matches!(r.status, FinetuneStatus::Running | FinetuneStatus::Paused))
        {
            return Err(Error::Invalid(format!(
                "a fine-tuning run is going (step {} of {}); x stops it before a new one starts",
                r.trainer.steps_done(),
                r.trainer.config().steps
            )));
        }
        let cfg = config_from_spec(spec, label)?;
        if cfg.out.join(STATE_FILE).is_file() {
            return Err(Error::Invalid(format!(
                "output folder {} already holds a checkpoint: choose another output folder (or continue that run with `blackmamba finetune --resume {}`)",
                cfg.out.display(),
                cfg.out.display()
            )));
        }
        let mut trainer = Trainer::new(base, tok, cfg)?;
        let probe_ids = prompt_for_turn(tok, None, PROBE_PROMPT, true)?;
        base.check_ids(&probe_ids)?;
        let probe_pieces: Vec<String> = probe_ids.iter().map(|&id| piece(tok, id)).collect();
        let before = trainer.eval()?;
        if let Some(e) = before {
            trainer.log_eval(e.loss)?;
        }
        let (label, slice) = trainer.routing_slice();
        let base_routes = routes(base, &slice, trainer.config().batch)?;
        let routes_before = (!base_routes.is_empty()).then_some((label, slice, base_routes));
        emit(EngineEvent::Notice(start_notice(&trainer, before.map(|e| e.loss))));
        emit(EngineEvent::Finetune(FinetuneEvent::ProbeRouting(Box::new(probe_routing(
            base,
            &probe_ids,
            &probe_pieces,
            false,
        )?))));
        self.run = Some(Run {
            trainer,
            status: FinetuneStatus::Running,
            active_secs: 0.0,
            probe_ids,
            probe_pieces,
            last_probe: Instant::now(),
            moe_layers: base.cfg.moe_layers().iter().map(|&(l, _)| l).collect(),
            routes_before,
        });
        emit(EngineEvent::Finetune(FinetuneEvent::Status(FinetuneStatus::Running)));
        Ok(())
    }

    /// One training step (only called while [`Finetuning::wants_step`]). A failed step (a NaN
    /// loss, a device error) stops the run and is reported in the panel.
    pub fn step(&mut self, emit: &mut dyn FnMut(EngineEvent)) -> Result<()> {
        let Some(run) = self.run.as_mut().filter(|r| r.status == FinetuneStatus::Running) else {
            return Ok(());
        };
        let t0 = Instant::now();
        let r = match run.trainer.step() {
            Ok(r) => r,
            Err(e) => {
                run.status = FinetuneStatus::Stopped;
                emit(EngineEvent::Finetune(FinetuneEvent::Status(FinetuneStatus::Stopped)));
                emit(EngineEvent::Finetune(FinetuneEvent::Failed(format!("fine-tuning stopped: {e}"))));
                return Ok(());
            }
        };
        run.active_secs += t0.elapsed().as_secs_f64();
        // a DPO step routes greedily: no Sinkhorn run to show
        if !r.sinkhorn.is_empty() {
            let variant = run.trainer.config().sinkhorn.variant;
            emit(EngineEvent::Sinkhorn(Box::new(sinkhorn_report(&r, &run.moe_layers, variant))));
        }
        emit(EngineEvent::Finetune(FinetuneEvent::Progress(Box::new(progress(
            &r,
            run.active_secs,
        )))));
        if !run.trainer.done() {
            if run.last_probe.elapsed() >= PROBE_EVERY {
                run.probe_after(emit)?;
            }
            return Ok(());
        }
        // the end: save, route the probe with the final weights, and move chat onto them
        run.status = FinetuneStatus::Finished;
        let saved = run.trainer.save();
        run.probe_after(emit)?;
        emit(EngineEvent::Finetune(FinetuneEvent::Status(FinetuneStatus::Finished)));
        let out = run.trainer.config().out.clone();
        match saved {
            Ok(()) => {
                emit(EngineEvent::Finetune(FinetuneEvent::Saved(out)));
                run.routing_shift(emit)?;
            }
            Err(e) => emit(EngineEvent::Finetune(FinetuneEvent::Failed(format!(
                "fine-tuning finished but saving to {} failed: {e}; w tries again",
                out.display()
            )))),
        }
        if self.tuned.is_some() {
            self.tuned = Some(run.trainer.model()?);
            emit(EngineEvent::Notice(format!(
                "chat now uses the final fine-tuned weights (step {})",
                run.trainer.steps_done()
            )));
        }
        Ok(())
    }

    /// A run that is running or paused, as (steps done, steps): switching models must wait for it.
    pub fn active_run(&self) -> Option<(usize, usize)> {
        self.run
            .as_ref()
            .filter(|r| matches!(r.status, FinetuneStatus::Running | FinetuneStatus::Paused))
            .map(|r| (r.trainer.steps_done(), r.trainer.config().steps))
    }

    /// The model chat should use: `Some` while chatting with the fine-tuned weights.
    pub fn chat_model(&self) -> Option<&Model> {
        self.tuned.as_ref()
    }
}

impl Run {
    /// The routing comparison of the finished run: saved beside the checkpoint, summed up in a
    /// notice and sent to the panel.
    fn routing_shift(&self, emit: &mut dyn FnMut(EngineEvent)) -> Result<()> {
        let Some((label, slice, before)) = &self.routes_before else {
            return Ok(());
        };
        let after = routes(&self.trainer.serving_view()?, slice, self.trainer.config().batch)?;
        let shift = RoutingShift::compare(label, before, &after);
        shift.save(&self.trainer.config().out)?;
        emit(EngineEvent::Notice(shift.summary()));
        emit(EngineEvent::Finetune(FinetuneEvent::RoutingShift(Box::new(RoutingShiftInfo {
            tokens: shift.tokens,
            layers: shift.layers.iter().map(|l| (l.layer, l.moved, l.tokens_rerouted)).collect(),
        }))));
        Ok(())
    }

    /// Routes the probe prompt with the weights trained so far.
    fn probe_after(&mut self, emit: &mut dyn FnMut(EngineEvent)) -> Result<()> {
        let m = self.trainer.serving_view()?;
        let r = probe_routing(&m, &self.probe_ids, &self.probe_pieces, true)?;
        emit(EngineEvent::Finetune(FinetuneEvent::ProbeRouting(Box::new(r))));
        self.last_probe = Instant::now();
        Ok(())
    }
}

/// The panel's form as a trainer config: LoRA targets by name (`all`, `in_proj`, `x_proj`,
/// `dt_proj`, `out_proj`, `experts`; `fc1` / `fc2` mean `experts`; `router` also trains the
/// routers), a warmup of a tenth of the steps (at most 10) and an evaluation every tenth of the
/// run; the rest are the trainer's defaults.
pub fn config_from_spec(spec: &FinetuneSpec, base_label: &str) -> Result<FinetuneConfig> {
    if spec.data.as_os_str().is_empty() {
        return Err(Error::Invalid(
            "dataset: type the path of a training data file (Enter on the field)".into(),
        ));
    }
    if spec.out.as_os_str().is_empty() {
        return Err(Error::Invalid(
            "output: type the folder to write the adapter into (Enter on the field)".into(),
        ));
    }
    let (method, objective) = match spec.method {
        FinetuneMethod::Lora => (Method::Lora, Objective::Sft),
        FinetuneMethod::Router => (Method::Router, Objective::Sft),
        FinetuneMethod::Full => (Method::Full, Objective::Sft),
        FinetuneMethod::Dpo => (Method::Lora, Objective::Dpo),
        FinetuneMethod::DpoFull => (Method::Full, Objective::Dpo),
    };
    let mut cfg = FinetuneConfig {
        data: spec.data.clone(),
        method,
        objective,
        rank: spec.rank,
        alpha: spec.alpha,
        lr: spec.lr,
        steps: spec.steps,
        warmup: (spec.steps / 10).min(10),
        eval_every: (spec.steps / 10).max(1),
        seq_len: spec.seq_len,
        batch: spec.batch,
        out: spec.out.clone(),
        base_model: base_label.to_string(),
        ..FinetuneConfig::default()
    };
    if method == Method::Lora {
        let (targets, router) = parse_targets(&spec.targets)?;
        cfg.targets = targets;
        cfg.train_router = router;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// LoRA target names -> targets, and whether `router` was among them.
fn parse_targets(names: &[String]) -> Result<(Vec<Target>, bool)> {
    let mut targets = Vec::new();
    let mut router = false;
    for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        let add: Vec<Target> = match n {
            "all" => Target::ALL.to_vec(),
            "fc1" | "fc2" => vec![Target::Experts],
            "router" => {
                router = true;
                vec![]
            }
            other => vec![Target::parse(other).map_err(|_| {
                Error::Invalid(format!(
                    "LoRA targets: unknown '{other}'; use in_proj, x_proj, dt_proj, out_proj, experts, router or all"
                ))
            })?],
        };
        for t in add {
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
    }
    if targets.is_empty() && !router {
        return Err(Error::Invalid(
            "LoRA targets: name at least one of in_proj, x_proj, dt_proj, out_proj, experts, router (or all)".into(),
        ));
    }
    Ok((targets, router))
}

/// What the run trains on, said once at the start.
fn start_notice(t: &Trainer, eval_before: Option<f64>) -> String {
    let c = t.config();
    let (n_train, n_eval) = t.data_sizes();
    let mut s = format!(
        "fine-tuning ({}): {} trainable values, {n_train} training and {n_eval} held-out {}",
        c.method_label(),
        t.n_trainable(),
        if c.objective == Objective::Dpo { "pairs" } else { "examples" }
    );
    if let Some(l) = eval_before {
        s.push_str(&format!(", eval loss before {l:.4}"));
    }
    if let Some(b) = t.bad_lines.first() {
        s.push_str(&format!(
            "; skipped {} line(s) of {} (line {}: {})",
            t.bad_lines.len(),
            c.data.display(),
            b.line,
            b.reason
        ));
    }
    s
}

/// A step report as the panel's progress point.
fn progress(r: &StepReport, elapsed_secs: f64) -> FinetuneProgress {
    FinetuneProgress {
        step: r.step,
        total_steps: r.total_steps,
        loss: r.loss,
        lr: r.lr,
        grad_norm: r.grad_norm,
        tokens_per_s: r.tokens_per_s,
        eval_loss: r.eval_loss,
        expert_load: r.expert_load.clone(),
        sinkhorn_iters: r.sinkhorn_iters.clone(),
        elapsed_secs,
        pref: r.pref.map(|p| PrefProgress {
            reward_chosen: p.reward_chosen,
            reward_rejected: p.reward_rejected,
            margin: p.margin,
            accuracy: p.accuracy,
        }),
    }
}

/// The Sinkhorn runs that routed the step's last micro-batch, with the greedy routes they
/// replaced, as the Sinkhorn view's report.
fn sinkhorn_report(r: &StepReport, moe_layers: &[usize], variant: crate::sinkhorn::Variant) -> SinkhornReport {
    let layers: Vec<SinkhornLayer> = r
        .sinkhorn
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let greedy = r.greedy.get(k).map_or(&s.assignment, |g| g);
            SinkhornLayer {
                layer: moe_layers.get(k).copied().unwrap_or(k),
                n_experts: s.n_experts,
                greedy_loads: loads(greedy, s.n_experts),
                runs: vec![summarize(s, greedy, variant)],
            }
        })
        .collect();
    let n_tokens = r.sinkhorn.first().map_or(0, |s| s.n_tokens);
    SinkhornReport {
        origin: SinkhornOrigin::Finetune { step: r.step },
        window: n_tokens,
        n_tokens,
        layers,
    }
}

/// The experts `model` picks for each token of the probe prompt, per MoE layer.
fn probe_routing(model: &Model, ids: &[u32], pieces: &[String], after: bool) -> Result<ProbeRouting> {
    let mut state = model.new_state(1)?;
    let mut probe = Probe {
        moe_only: true,
        ..Probe::default()
    };
    let t = Tensor::from_slice(ids, (1, ids.len()), &model.device)?;
    model.forward(&t, &mut state, Logits::Last, Some(&mut probe))?;
    Ok(ProbeRouting {
        after,
        pieces: pieces.to_vec(),
        experts: probe
            .moe
            .iter()
            .map(|m| m.experts.iter().map(|&e| u16::try_from(e).unwrap_or(u16::MAX)).collect())
            .collect(),
    })
}

fn no_run(what: &str) -> Error {
    Error::Invalid(format!(
        "nothing to {what}: no fine-tuning run yet; s in the Fine-tune view starts one"
    ))
}

fn status_name(s: FinetuneStatus) -> &'static str {
    match s {
        FinetuneStatus::Idle => "idle",
        FinetuneStatus::Running => "running",
        FinetuneStatus::Paused => "paused",
        FinetuneStatus::Stopped => "stopped",
        FinetuneStatus::Finished => "finished",
    }
}

//! The training loop: one optimiser step per [`Trainer::step`] call.
//!
//! The model runs its differentiable path (`differentiable = true`: tensor-op norms) with
//! Sinkhorn routing over each micro-batch (SPEC §3: experts chosen under no-grad on the host,
//! gate = σ(router logit of the chosen expert), so the router learns only through the gate).
//! Trainable tensors are f32 `Var`s (the master copies); where the model computes in bf16 the
//! model holds a cast of the master, rebuilt after each update, so gradients reach the f32 copy.

use std::time::Instant;

use candle_core::{DType, Tensor};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::finetune::checkpoint::{self, check_resumable, same_path, STATE_FILE};
use crate::finetune::data::{self, BadLine, Batch, Batcher, DataCursor, Example};
use crate::finetune::dpo::PrefSums;
use crate::finetune::lora::merge_all;
use crate::finetune::loss::{batch_nll, evaluate, inference_view, EvalResult};
use crate::finetune::metrics::{Metrics, MetricsLine, StepTiming};
use crate::finetune::optim::{clip_scale, global_norm, lr_at, AdamW, AdamWParams, Param};
use crate::finetune::params::{make_params, Casts};
use crate::finetune::prefs::PrefPair;
use crate::finetune::recompute::{accumulate, nll_and_grads};
use crate::finetune::{FinetuneConfig, Objective, StepReport};
use crate::model::moe::Routing;
use crate::model::probe::Probe;
use crate::model::Model;
use crate::runtime::dist::{all_reduce_tensors, check_same, Collective, Single};
use crate::sinkhorn::{greedy, loads};

mod pref;
mod save;

/// A run's examples (or preference pairs) and the hash of its data file.
struct RunData {
    train: Vec<Example>,
    held_out: Vec<Example>,
    /// The training pairs of a DPO run (then `train` is empty).
    pairs: Vec<PrefPair>,
    hash: String,
}

/// A fine-tuning or training run.
pub struct Trainer {
    cfg: FinetuneConfig,
    /// The model being trained: trainable tensors are (casts of) the params' vars.
    model: Model,
    params: Vec<Param>,
    /// Params the model holds as a cast (bf16 model): name -> (param index, model dtype).
    casts: Casts,
    /// Per param, the model's cast of it (empty without casts): the fused optimiser rewrites
    /// these in place; the autograd link to the master (the cast op) stays as built.
    cast_of: Vec<Option<Tensor>>,
    opt: AdamW,
    train: Vec<Example>,
    held_out: Vec<Example>,
    /// Lines skipped in the training and the eval file.
    pub bad_lines: Vec<BadLine>,
    pub eval_bad_lines: Vec<BadLine>,
    batcher: Batcher,
    step: usize,
    data_hash: String,
    tok: Tokenizer,
    /// `metrics.jsonl` (None for an in-memory run).
    metrics: Option<Metrics>,
    started: Instant,
    last_loss: Option<f64>,
    /// Step of the last checkpoint written or resumed from.
    last_saved: Option<usize>,
    /// Why training stopped for good (non-finite loss).
    failed: Option<String>,
    /// Wait for the device between the phases of a step, so [`StepTiming`] splits it exactly.
    sync_timing: bool,
    timing: StepTiming,
    /// The other ranks of a data-parallel run ([`crate::runtime::dist::Single`] alone).
    group: Box<dyn Collective>,
    /// The pairs and reference of a DPO run.
    prefs: Option<pref::PrefRun>,
}

impl Trainer {
    /// Sets up a run on a copy of `base` (any adapter on it is merged in first): loads the data,
    /// makes the trainable tensors, and resumes from `cfg.resume` when set.
    pub fn new(base: &Model, tok: &Tokenizer, cfg: FinetuneConfig) -> Result<Self> {
        Self::new_in(base, tok, cfg, Box::new(Single))
    }

    /// [`Trainer::new`] as one rank of a data-parallel run: every rank draws the same global
    /// batches of `batch × world size` examples and trains on its own `batch` of them; the
    /// gradients and the loss are summed across ranks before the optimiser step, so the run
    /// follows the one-process run with the global batch (within rounding, and with Sinkhorn
    /// routing balanced over each rank's micro-batch, as Megatron balances per rank). Rank 0
    /// alone writes metrics.jsonl and checkpoints; every rank must see the same data, settings
    /// and resumed checkpoint (checked at the start).
    pub fn new_in(base: &Model, tok: &Tokenizer, cfg: FinetuneConfig, group: Box<dyn Collective>) -> Result<Self> {
        cfg.validate()?;
        let same_dir = cfg.resume.as_ref().is_some_and(|r| same_path(r, &cfg.out));
        if cfg.out.join(STATE_FILE).is_file() && !same_dir {
            return Err(Error::Invalid(format!(
                "{} already holds a checkpoint; continue it with --resume {}, or choose another --out",
                cfg.out.display(),
                cfg.out.display()
            )));
        }
        let vocab = base.cfg.vocab_size;
        if cfg.objective == Objective::Dpo {
            let (pairs, held_out, hash) = pref::load(&cfg, tok, vocab)?;
            let data = RunData {
                train: Vec::new(),
                held_out,
                pairs,
                hash,
            };
            return Self::setup(base, tok, cfg, data, true, group);
        }
        let ds = data::load(&cfg.data, cfg.format, tok, cfg.seq_len, vocab)?;
        let (train, mut held_out, eval_bad) = match &cfg.eval_data {
            Some(p) => {
                let ev = data::load(p, cfg.format, tok, cfg.seq_len, vocab)?;
                (ds.examples, ev.examples, ev.bad)
            }
            None => {
                let (t, e) = data::split(ds.examples, cfg.eval_fraction, cfg.seed);
                (t, e, vec![])
            }
        };
        if cfg.eval_max > 0 {
            held_out.truncate(cfg.eval_max);
        }
        let data = RunData {
            train,
            held_out,
            pairs: Vec::new(),
            hash: ds.hash,
        };
        let mut me = Self::setup(base, tok, cfg, data, true, group)?;
        me.bad_lines = ds.bad;
        me.eval_bad_lines = eval_bad;
        Ok(me)
    }

    /// A run on examples already in memory, with no files at all: no data file is read, no
    /// `metrics.jsonl` is written, `cfg.data`, `cfg.resume` and the eval settings are ignored,
    /// and nothing is saved unless [`Trainer::save`] is called. `blackmamba bench --finetune`
    /// times the real training step this way on random tokens.
    pub fn in_memory(base: &Model, tok: &Tokenizer, mut cfg: FinetuneConfig, train: Vec<Example>) -> Result<Self> {
        cfg.resume = None;
        cfg.eval_data = None;
        cfg.validate_settings()?;
        if train.is_empty() {
            return Err(Error::Invalid("no training examples were given".into()));
        }
        if cfg.objective == Objective::Dpo {
            return Err(Error::Invalid(
                "a run on examples in memory trains on their tokens; DPO reads a preference file".into(),
            ));
        }
        let data = RunData {
            train,
            held_out: Vec::new(),
            pairs: Vec::new(),
            hash: String::from("in-memory"),
        };
        Self::setup(base, tok, cfg, data, false, Box::new(Single))
    }

    /// The common part of [`Trainer::new`] and [`Trainer::in_memory`]: the model copy, the
    /// trainable tensors, the optimiser, the resume (when `cfg.resume` is set) and the metrics
    /// file (when `files`).
    fn setup(
        base: &Model,
        tok: &Tokenizer,
        cfg: FinetuneConfig,
        data: RunData,
        files: bool,
        mut group: Box<dyn Collective>,
    ) -> Result<Self> {
        let RunData {
            train,
            held_out,
            pairs,
            hash: data_hash,
        } = data;
        if group.world_size() > 1 {
            check_same(&mut *group, "training data (sha256)", &data_hash)?;
            let settings = serde_json::to_string(&cfg).map_err(|e| Error::Invalid(format!("serialising the run's settings: {e}")))?;
            check_same(&mut *group, "set of run settings", &settings)?;
        }
        let mut model = base.clone();
        merge_all(&mut model)?;
        model.differentiable = true;
        // a quantised base trains on its dequantised weights (the GGML matmul has no backward)
        crate::quant::apply::drop_packed(&mut model)?;
        // DPO scores whole responses as served (see `pref`): greedy routing
        model.routing = match cfg.objective {
            Objective::Sft => Routing::Sinkhorn(cfg.sinkhorn),
            Objective::Dpo => Routing::Greedy,
        };
        let (params, casts) = make_params(&mut model, &cfg)?;
        if params.is_empty() {
            return Err(Error::Invalid(format!(
                "--method {}: this model has nothing to train that way (no MoE layer for router, or no layer of the --targets)",
                cfg.method_label()
            )));
        }
        // before a resume overwrites the trained tensors: the stored reference is the base's
        let prefs = match cfg.objective {
            Objective::Dpo => Some(pref::PrefRun::new(&model, &cfg, pairs)?),
            Objective::Sft => None,
        };
        let n_items = prefs.as_ref().map_or(train.len(), |p| p.pairs.len());
        let hp = AdamWParams {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        };
        let mut opt = AdamW::new(&params, hp)?;
        opt.fused = model.kernels.enabled;
        let mut step = 0;
        let mut cursor = DataCursor::default();
        let mut last_loss = None;
        let mut last_saved = None;
        if let Some(dir) = &cfg.resume {
            let ck = checkpoint::load(dir, &model.device)?;
            check_resumable(&ck.state, &cfg, &data_hash, &params, dir)?;
            let mut moments = Vec::with_capacity(params.len());
            for (p, (m, v)) in params.iter().zip(ck.moments) {
                let w = ck
                    .weights
                    .get(&p.name)
                    .ok_or_else(|| Error::bad_file(dir.join(&ck.meta.weights), format!("checkpoint has no tensor '{}'", p.name)))?;
                p.var.set(&w.to_dtype(DType::F32)?)?;
                moments.push((m.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?));
            }
            opt.moments = moments;
            opt.t = ck.state.adam_t;
            step = ck.state.step;
            cursor = ck.state.cursor;
            last_loss = ck.state.last_loss;
            last_saved = Some(step);
        }
        let metrics = if files && group.rank() == 0 {
            Some(Metrics::open(&cfg.out, cfg.resume.as_deref().map(|d| (d, step)))?)
        } else {
            None
        };
        let mut me = Self {
            batcher: Batcher::new(n_items, cfg.seed, cursor),
            cfg,
            model,
            params,
            casts,
            cast_of: Vec::new(),
            opt,
            train,
            held_out,
            bad_lines: Vec::new(),
            eval_bad_lines: Vec::new(),
            step,
            data_hash,
            tok: tok.clone(),
            metrics,
            started: Instant::now(),
            last_loss,
            last_saved,
            failed: None,
            sync_timing: false,
            timing: StepTiming::default(),
            group,
            prefs,
        };
        me.refresh_casts()?;
        Ok(me)
    }

    /// One optimiser step over `grad_accum` micro-batches.
    pub fn step(&mut self) -> Result<StepReport> {
        if let Some(why) = &self.failed {
            return Err(Error::Invalid(format!("training has stopped: {why}")));
        }
        if self.done() {
            return Err(Error::Invalid(format!(
                "training is finished ({} of {} steps); raise --steps to go on",
                self.step, self.cfg.steps
            )));
        }
        let t0 = Instant::now();
        let lr = lr_at(self.step, self.cfg.steps, self.cfg.lr, self.cfg.warmup, self.cfg.min_lr_ratio);
        // every rank draws the same global micro-batches and takes its own share of each
        let (world, rank, b) = (self.group.world_size(), self.group.rank(), self.cfg.batch);
        let global: Vec<Vec<usize>> = (0..self.cfg.grad_accum).map(|_| self.batcher.next(b * world)).collect();
        // the loss is the mean per target token (DPO: per pair)
        let total_targets: usize = match &self.prefs {
            Some(_) => global.iter().map(Vec::len).sum(),
            None => global.iter().flatten().map(|&i| self.train[i].n_targets()).sum(),
        };
        let mut pref_sums = PrefSums::default();
        let micro: Vec<Vec<usize>> = global.iter().map(|g| g.iter().skip(rank * b).take(b).copied().collect()).collect();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.params.len()];
        let (mut nll_total, mut n_inputs) = (0f64, 0usize);
        let mut expert_load: Vec<Vec<usize>> = Vec::new();
        let mut sinkhorn = Vec::new();
        let mut greedy_routes = Vec::new();
        let mut timing = StepTiming::default();
        for idx in &micro {
            let tf = Instant::now();
            let mut probe = Probe {
                moe_only: true,
                ..Probe::default()
            };
            let per = total_targets.max(1) as f64;
            let vars: Vec<&candle_core::Var> = self.params.iter().map(|p| &p.var).collect();
            if let Some(run) = &self.prefs {
                // forward, reference and backward of the pairs (no recomputation): timed as one
                // backward
                let m = pref::micro(&self.model, run, &self.cfg, idx, total_targets, &vars, &mut grads, &mut probe)?;
                self.phase_sync()?;
                timing.backward_s += tf.elapsed().as_secs_f64();
                nll_total += m.loss_sum;
                pref_sums.add(&m.out);
                n_inputs += m.n_inputs;
            } else if self.cfg.recompute.applies(&self.model.device) {
                let refs: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
                let batch = Batch::new(&refs, &self.model.device)?;
                n_inputs += batch.n_inputs;
                // forward and backward interleave, layer by layer: all of it counts as backward
                // (the profile splits it; see `recompute`)
                let prof = self.sync_timing.then_some(&mut timing.layers);
                let nll = nll_and_grads(
                    &self.model,
                    &batch,
                    Some(&mut probe),
                    per,
                    &vars,
                    &mut grads,
                    self.cfg.first_pass,
                    prof,
                )?;
                self.phase_sync()?;
                timing.backward_s += tf.elapsed().as_secs_f64();
                nll_total += nll.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            } else {
                let refs: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
                let batch = Batch::new(&refs, &self.model.device)?;
                n_inputs += batch.n_inputs;
                let nll = batch_nll(&self.model, &batch, Some(&mut probe))?;
                self.phase_sync()?;
                let tb = Instant::now();
                timing.forward_s += (tb - tf).as_secs_f64();
                let store = (&nll / per)?.backward()?;
                accumulate(&mut grads, &vars, &store)?;
                // read after the accumulation: the read waits for it as well (one stream)
                nll_total += nll.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                self.phase_sync()?;
                timing.backward_s += tb.elapsed().as_secs_f64();
            }
            // the loss read above waited for the device: forward + backward are done
            timing.fwd_bwd_s += tf.elapsed().as_secs_f64();
            if expert_load.is_empty() {
                expert_load = probe.moe.iter().map(|r| vec![0; r.n_experts]).collect();
            }
            for (acc, rec) in expert_load.iter_mut().zip(&probe.moe) {
                for (a, l) in acc.iter_mut().zip(loads(&rec.experts, rec.n_experts)) {
                    *a += l;
                }
            }
            greedy_routes = probe
                .moe
                .iter()
                .map(|r| greedy(&r.logits, r.logits.len() / r.n_experts.max(1), r.n_experts))
                .collect();
            sinkhorn = probe.moe.into_iter().filter_map(|r| r.sinkhorn).collect();
        }
        let to = Instant::now();
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&self.params)
            .map(|(g, p)| g.map_or_else(|| p.var.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        let grads = if world > 1 {
            let mut sums = [nll_total, 0.0, 0.0, 0.0, 0.0];
            sums[1..].copy_from_slice(&pref_sums.0);
            self.group.all_reduce_f64(&mut sums)?;
            nll_total = sums[0];
            pref_sums.0.copy_from_slice(&sums[1..]);
            all_reduce_tensors(&mut *self.group, grads)?
        } else {
            grads
        };
        let loss = nll_total / total_targets.max(1) as f64;
        if !loss.is_finite() {
            return Err(self.fail(format!("the loss is {loss} at step {}", self.step + 1)));
        }
        let grad_norm = global_norm(&grads, self.model.kernels.enabled)?;
        if !grad_norm.is_finite() {
            return Err(self.fail(format!("the gradient norm is {grad_norm} at step {}", self.step + 1)));
        }
        timing.norm_s = to.elapsed().as_secs_f64();
        let ta = Instant::now();
        let recast = !self
            .opt
            .step(&self.params, &grads, lr, clip_scale(grad_norm, self.cfg.clip), &self.cast_of)?;
        self.phase_sync()?;
        timing.adam_s = ta.elapsed().as_secs_f64();
        let tc = Instant::now();
        self.step += 1;
        self.last_loss = Some(loss);
        if recast {
            self.refresh_casts()?;
        }
        self.phase_sync()?;
        timing.cast_s = tc.elapsed().as_secs_f64();
        timing.optim_s = to.elapsed().as_secs_f64();
        let secs = t0.elapsed().as_secs_f64();
        timing.total_s = secs;
        self.timing = timing;
        let eval_due = (self.cfg.eval_every > 0 && self.step % self.cfg.eval_every == 0) || self.done();
        let eval_loss = if eval_due { self.eval()?.map(|e| e.loss) } else { None };
        let report = StepReport {
            step: self.step,
            total_steps: self.cfg.steps,
            loss,
            lr,
            grad_norm,
            tokens_per_s: if secs > 0.0 { n_inputs as f64 / secs } else { 0.0 },
            eval_loss,
            sinkhorn_iters: sinkhorn.iter().map(|s| s.iters()).collect(),
            expert_load,
            sinkhorn,
            greedy: greedy_routes,
            pref: self.prefs.as_ref().map(|_| pref_sums.stats()),
        };
        if let Some(m) = &mut self.metrics {
            m.push(&MetricsLine::from_report(&report, self.started.elapsed().as_secs_f64()))?;
        }
        if self.cfg.save_every > 0 && self.step % self.cfg.save_every == 0 && !self.done() {
            self.save()?;
        }
        Ok(report)
    }

    /// Where the last step's time went.
    pub fn last_timing(&self) -> StepTiming {
        self.timing
    }

    /// Makes each step wait for the device after its forward, backward and update phases, so
    /// [`Trainer::last_timing`] splits the step exactly (at the price of those waits).
    pub fn set_sync_timing(&mut self, on: bool) {
        self.sync_timing = on;
    }

    /// Waits for the device when timing phases exactly.
    fn phase_sync(&self) -> Result<()> {
        if self.sync_timing {
            self.model.device.synchronize()?;
        }
        Ok(())
    }

    /// Records a fatal problem and builds the error that says what is kept.
    fn fail(&mut self, what: String) -> Error {
        let kept = match self.last_saved {
            Some(s) => format!("the last good checkpoint (step {s}) in {} is kept", self.cfg.out.display()),
            None => "no checkpoint had been saved yet".to_string(),
        };
        let msg = format!("{what}; training stopped without applying it, {kept}; try a lower --lr or check the data");
        self.failed = Some(msg.clone());
        Error::Invalid(msg)
    }

    /// All steps done.
    pub fn done(&self) -> bool {
        self.step >= self.cfg.steps
    }

    /// Steps done so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    pub fn config(&self) -> &FinetuneConfig {
        &self.cfg
    }

    /// Training and held-out example counts (DPO: pairs).
    pub fn data_sizes(&self) -> (usize, usize) {
        let n = self.prefs.as_ref().map_or(self.train.len(), |p| p.pairs.len());
        (n, self.held_out.len())
    }

    /// The examples a routing comparison runs on ([`crate::finetune::routing_shift`]): the
    /// held-out ones (DPO: their chosen sides), else the first training examples (at most
    /// `eval_max`, or 64), with a label saying which.
    pub fn routing_slice(&self) -> (String, Vec<Example>) {
        if !self.held_out.is_empty() {
            return (format!("{} held-out examples", self.held_out.len()), self.held_out.clone());
        }
        let n = if self.cfg.eval_max > 0 { self.cfg.eval_max } else { 64 };
        let ex: Vec<Example> = match &self.prefs {
            Some(p) => p.pairs.iter().take(n).map(|p| p.chosen.clone()).collect(),
            None => self.train.iter().take(n).cloned().collect(),
        };
        (format!("the first {} training examples (no held-out data)", ex.len()), ex)
    }

    /// Number of trainable values.
    pub fn n_trainable(&self) -> usize {
        self.params.iter().map(|p| p.var.as_tensor().elem_count()).sum()
    }

    /// Held-out loss of the model as served (greedy routing); None without held-out data.
    pub fn eval(&self) -> Result<Option<EvalResult>> {
        if self.held_out.is_empty() {
            return Ok(None);
        }
        let m = inference_view(&self.model)?;
        evaluate(&m, &self.held_out, self.cfg.batch).map(Some)
    }

    /// The model as served (greedy routing) on the trainer's own tensors, for one-off forward
    /// passes such as a probe prompt: cheap (no copy), but later steps change it; [`Trainer::model`]
    /// is the snapshot to keep.
    pub fn serving_view(&self) -> Result<Model> {
        inference_view(&self.model)
    }

    /// Writes an eval result outside a step into metrics.jsonl (the "before" evaluation).
    pub fn log_eval(&mut self, loss: f64) -> Result<()> {
        match &mut self.metrics {
            Some(m) => m.push(&MetricsLine::eval(self.step, loss, self.started.elapsed().as_secs_f64())),
            None => Ok(()),
        }
    }

    /// The base model with the adapter (or the trained weights), ready to chat with: a snapshot
    /// that later steps do not change.
    pub fn model(&self) -> Result<Model> {
        let mut m = self.model.clone();
        m.visit_mut(&mut |_, t| {
            // vars and the casts of them are updated in place by later steps: copy them
            *t = if t.is_variable() || t.track_op() {
                t.detach().copy()?
            } else {
                t.detach()
            };
            Ok(())
        })?;
        m.routing = Routing::Greedy;
        m.differentiable = false;
        Ok(m)
    }

    /// Whether `flag` holds on any rank (the flag itself in a run of one process): how the ranks
    /// agree to stop after the same step.
    pub fn any_rank(&mut self, flag: bool) -> Result<bool> {
        if self.group.world_size() == 1 {
            return Ok(flag);
        }
        let mut v = [f64::from(u8::from(flag))];
        self.group.all_reduce_f64(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// This process's rank (0 outside a data-parallel run).
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// Rebuilds the model's casts of the masters (bf16 models) after an update the optimiser
    /// did not already write into them.
    fn refresh_casts(&mut self) -> Result<()> {
        if self.casts.is_empty() {
            return Ok(());
        }
        let (casts, params) = (&self.casts, &self.params);
        let mut cast_of = vec![None; params.len()];
        self.model.visit_mut(&mut |name, t| {
            if let Some(&(i, dt)) = casts.get(name) {
                *t = params[i].var.as_tensor().to_dtype(dt)?;
                cast_of[i] = Some(t.clone());
            }
            Ok(())
        })?;
        self.cast_of = cast_of;
        Ok(())
    }
}

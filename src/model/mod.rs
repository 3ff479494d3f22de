//! The BlackMamba model (Anthony et al., "BlackMamba: Mixture of Experts for State-Space Models",
//! arXiv 2402.01771; reference: Zyphra/BlackMamba `mamba_model.py`, `mamba_block.py`).
//!
//! embedding → half-blocks (pre-RMSNorm, f32 residual stream; each a Mamba mixer, a SwitchMLP or a
//! dense MLP) → final LayerNorm with bias → tied LM head (SPEC §2).

pub mod config;
pub mod convert;
#[cfg(feature = "cuda")]
pub mod fused;
pub mod kernels;
pub mod linear;
pub mod mamba;
pub mod moe;
pub mod permute;
pub mod pickle;
pub mod probe;
pub mod pth;
pub mod pth_write;
pub mod random;
pub mod state;
pub mod weights;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::ops::prof::{self, lap};
use config::{Config, LayerKind};
pub use kernels::Kernels;
use linear::{layer_norm, rms_norm};
use mamba::{take, MambaMixer};
use moe::{Mlp, Route, Routing, SwitchMlp};
use probe::{MambaRecord, MoeRecord, Probe};
use state::State;

/// The mixer of one half-block.
#[derive(Debug, Clone)]
pub enum Mixer {
    Mamba(MambaMixer),
    Moe(SwitchMlp),
    Dense(Mlp),
}

/// One half-block: RMSNorm then a mixer.
#[derive(Debug, Clone)]
pub struct Block {
    /// (d) f32
    pub norm: Tensor,
    pub mixer: Mixer,
}

impl Block {
    /// Whether the mixer is a MoE layer.
    pub fn is_moe(&self) -> bool {
        matches!(self.mixer, Mixer::Moe(_))
    }
}

/// Which logits a full-sequence call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position: (B, L, V).
    All,
    /// Only the last position: (B, 1, V) — all a prefill needs.
    Last,
}

/// The model: weights plus how to run them.
#[derive(Debug, Clone)]
pub struct Model {
    pub cfg: Config,
    /// (V, d): the embedding, also the LM head
    pub embedding: Tensor,
    /// The embedding's quantised form (`--quant`): `embedding` then holds its dequantised values;
    /// the CPU's head reads the packed codes through a GGML matmul where the format has one.
    pub head_quant: Option<std::sync::Arc<crate::quant::QLinear>>,
    pub layers: Vec<Block>,
    /// (d) f32 each
    pub final_w: Tensor,
    pub final_b: Tensor,
    /// The matmul dtype.
    pub dtype: DType,
    pub device: Device,
    pub routing: Routing,
    /// Use only ops autograd can differentiate (fine-tuning).
    pub differentiable: bool,
    /// Which families of the math run on fused kernels (on a CUDA device, and the CPU's fused
    /// scan op for fine-tuning); off, the same tensor-op path as the CPU (the kernels' twin).
    pub kernels: Kernels,
}

impl Model {
    /// Builds the model from checked tensors (see [`weights::check_and_convert`]).
    pub fn from_tensors(cfg: &Config, mut w: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Result<Self> {
        let embedding = take(&mut w, "embedding.word_embeddings.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("decoder.layers.{i}");
            let norm = take(&mut w, &format!("{p}.norm.weight"))?.to_dtype(DType::F32)?;
            let m = format!("{p}.mixer");
            let mixer = match cfg.layer_kind(i) {
                LayerKind::Mamba => Mixer::Mamba(MambaMixer::new(cfg, &m, &mut w)?),
                LayerKind::Moe { experts } => Mixer::Moe(SwitchMlp::new(cfg, &m, experts, &mut w)?),
                LayerKind::Dense => Mixer::Dense(Mlp::new(cfg, &m, &mut w)?),
            };
            layers.push(Block { norm, mixer });
        }
        Ok(Self {
            cfg: cfg.clone(),
            embedding,
            head_quant: None,
            layers,
            final_w: take(&mut w, "decoder.final_layernorm.weight")?.to_dtype(DType::F32)?,
            final_b: take(&mut w, "decoder.final_layernorm.bias")?.to_dtype(DType::F32)?,
            dtype,
            device: device.clone(),
            routing: Routing::Greedy,
            differentiable: false,
            kernels: Kernels::default(),
        })
    }

    /// Visits every tensor (adapters included) under its checkpoint name, e.g.
    /// `decoder.layers.0.mixer.in_proj.weight` or `...in_proj.lora_a`.
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        f("embedding.word_embeddings.weight", &mut self.embedding)?;
        for (i, b) in self.layers.iter_mut().enumerate() {
            let p = format!("decoder.layers.{i}");
            f(&format!("{p}.norm.weight"), &mut b.norm)?;
            let mut g = |n: &str, t: &mut Tensor| f(&format!("{p}.mixer.{n}"), t);
            match &mut b.mixer {
                Mixer::Mamba(m) => m.visit_mut(&mut g)?,
                Mixer::Moe(m) => m.visit_mut(&mut g)?,
                Mixer::Dense(m) => m.visit_mut("", &mut g)?,
            }
        }
        f("decoder.final_layernorm.weight", &mut self.final_w)?;
        f("decoder.final_layernorm.bias", &mut self.final_b)
    }

    /// Every tensor under its checkpoint name (clones are cheap: storage is shared).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        let mut me = self.clone();
        me.visit_mut(&mut |n, t| {
            out.push((n.to_string(), t.clone()));
            Ok(())
        })?;
        Ok(out)
    }

    /// Writes `config.json` and `model.safetensors` (adapters merged in) into `dir`, atomically.
    pub fn save_dir(&self, dir: &std::path::Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut merged = self.clone();
        merged.visit_linears_mut(&mut |l| {
            l.weight = l.merged_weight()?;
            l.lora = None;
            Ok(())
        })?;
        let mut map = HashMap::new();
        for (n, t) in merged.named_tensors()? {
            let t = if weights::keeps_f32(&n) {
                t.to_dtype(DType::F32)?
            } else {
                t.to_dtype(dtype)?
            };
            map.insert(n, t.to_device(&Device::Cpu)?);
        }
        weights::write_atomic(&dir.join("config.json"), self.cfg.to_json_string()?.as_bytes())?;
        weights::save_safetensors(&map, &dir.join("model.safetensors"))
    }

    /// Visits every linear layer (for adapters).
    pub fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&mut linear::Linear) -> Result<()>) -> Result<()> {
        for b in &mut self.layers {
            match &mut b.mixer {
                Mixer::Mamba(m) => {
                    for l in [&mut m.in_proj, &mut m.x_proj, &mut m.dt_proj, &mut m.out_proj] {
                        f(l)?;
                    }
                }
                Mixer::Moe(m) => {
                    f(&mut m.router)?;
                    for e in &mut m.experts {
                        f(&mut e.fc1)?;
                        f(&mut e.fc2)?;
                    }
                }
                Mixer::Dense(m) => {
                    f(&mut m.fc1)?;
                    f(&mut m.fc2)?;
                }
            }
        }
        Ok(())
    }

    /// Checks every id against the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            Some(&id) => Err(Error::TokenOutOfVocab {
                id,
                vocab: self.cfg.vocab_size,
            }),
            None => Ok(()),
        }
    }

    /// A fresh zero state for `batch` sequences.
    pub fn new_state(&self, batch: usize) -> Result<State> {
        State::new(&self.cfg, batch, &self.device)
    }

    pub(crate) fn probe_slots(&self, probe: &mut Probe) {
        if probe.moe.is_empty() && probe.mamba.is_empty() {
            for (i, b) in self.layers.iter().enumerate() {
                match &b.mixer {
                    Mixer::Moe(m) => probe.moe.push(MoeRecord {
                        layer: i,
                        n_experts: m.experts.len(),
                        ..Default::default()
                    }),
                    Mixer::Mamba(_) => probe.mamba.push(MambaRecord {
                        layer: i,
                        ..Default::default()
                    }),
                    Mixer::Dense(_) => {}
                }
            }
        }
    }

    /// Full-sequence pass: ids (B, L) u32 -> f32 logits (B, L, V) or (B, 1, V), continuing from
    /// `state` (a fresh state for a new sequence) and leaving it after the last token.
    pub fn forward(&self, ids: &Tensor, state: &mut State, logits: Logits, probe: Option<&mut Probe>) -> Result<Tensor> {
        let (bsz, len) = ids.dims2()?;
        if len == 0 {
            return Err(Error::Invalid("empty input: at least one token is needed".into()));
        }
        let x = self.embedding.index_select(&ids.flatten_all()?, 0)?.reshape((bsz, len, ()))?; // (B, L, d)
        let h = self.run_blocks(x, state, probe, true)?; // (B, L, d) f32
        let h = match logits {
            Logits::All => h,
            Logits::Last => h.narrow(1, len - 1, 1)?,
        };
        state.pos += len;
        self.head(&h)
    }

    /// Full-sequence pass that returns the logits of chosen positions only: `rows` (n) u32
    /// indexes the flattened B·L positions -> (n, V) f32. Training uses it to run the head only
    /// where a loss applies.
    pub fn forward_rows(&self, ids: &Tensor, state: &mut State, rows: &Tensor, probe: Option<&mut Probe>) -> Result<Tensor> {
        let (bsz, len) = ids.dims2()?;
        if len == 0 {
            return Err(Error::Invalid("empty input: at least one token is needed".into()));
        }
        let x = self.embedding.index_select(&ids.flatten_all()?, 0)?.reshape((bsz, len, ()))?; // (B, L, d)
        let h = self.run_blocks(x, state, probe, true)?; // (B, L, d) f32
        let h = h.reshape((bsz * len, ()))?.index_select(rows, 0)?; // (n, d)
        state.pos += len;
        self.head(&h)
    }

    /// One token per sequence: ids (B) u32 -> f32 logits (B, V), advancing `state`.
    pub fn step(&self, ids: &Tensor, state: &mut State, probe: Option<&mut Probe>) -> Result<Tensor> {
        let x = self.embedding.index_select(ids, 0)?; // (B, d)
        let h = self.run_blocks(x, state, probe, false)?; // (B, d) f32
        state.pos += 1;
        self.head(&h)
    }

    /// The residual stack (SPEC §2), the one both backends share. `seq` picks the full-sequence
    /// mixers, else the step ones. Each layer's norm and mixer run on the fused kernels where
    /// [`Model::runs_kernels`] (the residual add folded into the next layer's norm), else on
    /// tensor ops ([`Model::block`]).
    fn run_blocks(&self, x: Tensor, state: &mut State, mut probe: Option<&mut Probe>, seq: bool) -> Result<Tensor> {
        if let Some(p) = probe.as_deref_mut() {
            self.probe_slots(p);
            p.n_tokens += x.elem_count() / self.cfg.hidden_size;
        }
        let mut res = x.to_dtype(DType::F32)?; // residual stream, f32
        #[cfg(feature = "cuda")]
        if self.runs_kernels() {
            let mut pending: Option<Tensor> = None; // the last mixer's output, not yet added
            for i in 0..self.layers.len() {
                let (r, out) = self.fused_block(i, &res, pending.as_ref(), state, probe.as_deref_mut(), seq)?;
                res = r;
                pending = Some(out);
            }
            return match pending {
                Some(p) => Ok((res + p.to_dtype(DType::F32)?)?),
                None => Ok(res),
            };
        }
        for i in 0..self.layers.len() {
            res = self.block(i, &res, state, probe.as_deref_mut(), seq, None)?;
        }
        Ok(res)
    }

    /// Half-block `i` on the fused kernels: res (.., d) f32 plus the previous mixer's output
    /// `pending` (not yet added) -> (res + pending, mixer(rmsnorm(res + pending))), the add and the
    /// norm in one kernel. Twin: [`Model::block`].
    #[cfg(feature = "cuda")]
    fn fused_block(
        &self,
        i: usize,
        res: &Tensor,
        pending: Option<&Tensor>,
        state: &mut State,
        probe: Option<&mut Probe>,
        seq: bool,
    ) -> Result<(Tensor, Tensor)> {
        let block = self.layer(i)?;
        let mut laps = prof::start(&self.device)?;
        let (res, normed) = fused::add_rmsnorm(res, pending, &block.norm, self.cfg.layernorm_epsilon, self.dtype)?;
        lap(&mut laps, "add+rmsnorm")?;
        let out = match &block.mixer {
            Mixer::Mamba(m) => {
                let st = state.layers[i]
                    .as_mut()
                    .ok_or_else(|| Error::Invalid(format!("state has no entry for Mamba layer {i}")))?;
                let rec = probe.map(|p| &mut p.mamba[self.probe_slot(i, false)]);
                match seq {
                    true => fused::mamba_forward(m, &normed, st, rec)?,
                    false => fused::mamba_step(m, &normed, st, rec)?,
                }
            }
            Mixer::Moe(m) => {
                let rec = probe.map(|p| &mut p.moe[self.probe_slot(i, true)]);
                fused::moe_forward(m, &normed, self.routing, rec, self.kernels)?
            }
            Mixer::Dense(m) => m.forward(&normed)?,
        };
        Ok((res, out))
    }

    /// Half-block `i` of the residual stack (tensor-op path): res (.., d) f32 -> res +
    /// mixer(rmsnorm(res)), advancing `state`'s entry for a Mamba layer. `probe` (already given
    /// its slots by `Model::probe_slots`) records into the layer's slot. Fine-tuning calls it
    /// layer by layer to recompute activations (`finetune::recompute`), with `route` a MoE layer's
    /// routing cache (see [`SwitchMlp::forward_cached`]; ignored by the other layers).
    pub fn block(
        &self,
        i: usize,
        res: &Tensor,
        state: &mut State,
        probe: Option<&mut Probe>,
        seq: bool,
        route: Option<&mut Option<Route>>,
    ) -> Result<Tensor> {
        let block = self.layer(i)?;
        let slot = |moe: bool| self.probe_slot(i, moe);
        let mut laps = prof::start(&self.device)?; // `bench --finetune --profile`; None otherwise
        let normed = self.block_norm(res, &block.norm)?; // (.., d) model dtype
        lap(&mut laps, "block rms_norm")?;
        let out = match &block.mixer {
            Mixer::Mamba(m) => {
                let st = state.layers[i]
                    .as_mut()
                    .ok_or_else(|| Error::Invalid(format!("state has no entry for Mamba layer {i}")))?;
                let rec = probe.filter(|p| !p.moe_only).map(|p| &mut p.mamba[slot(false)]);
                match (seq, self.fused_training_mixer(m, &normed, st, rec.is_some())?) {
                    (true, Some(out)) => out,
                    (true, None) => m.forward(&normed, st, rec, self.fused_scan())?,
                    (false, _) => m.step(&normed, st, rec)?,
                }
            }
            Mixer::Moe(m) => {
                let rec = probe.map(|p| &mut p.moe[slot(true)]);
                m.forward_cached(&normed, self.routing, rec, route, self.trains_with_kernels())?
            }
            Mixer::Dense(m) => m.forward_fused(&normed, self.trains_with_kernels())?,
        };
        laps = prof::start(&self.device)?; // the mixer timed its own parts
        let res = (res + out.to_dtype(DType::F32)?)?;
        lap(&mut laps, "block residual add")?;
        Ok(res)
    }

    /// Fine-tuning on CUDA (no probe): the Mamba mixer past its projections as the fused autograd
    /// ops of `model::fused::mamba_train`; `None` where they do not apply (then the tensor-op
    /// mixer runs, its twin). The full-sequence path only.
    fn fused_training_mixer(&self, m: &MambaMixer, x: &Tensor, st: &mut state::LayerState, probing: bool) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if self.trains_with_kernels() && !probing {
            return fused::mamba_train::mixer_forward(m, x, st);
        }
        let _ = (m, x, st, probing);
        Ok(None)
    }

    /// A half-block's RMSNorm: res (.., d) f32, w (d) f32 -> (.., d) in the model's dtype. Training
    /// on CUDA takes the fused autograd op of `ops::rms_norm` (the cast folded in); everything else,
    /// and `kernels.rms_norm` off, the tensor ops of [`rms_norm`] and a cast, its twin.
    fn block_norm(&self, res: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.cfg.layernorm_epsilon;
        #[cfg(feature = "cuda")]
        if self.trains_with_kernels() && self.kernels.rms_norm && res.dtype() == DType::F32 && w.dtype() == DType::F32 {
            return crate::ops::rms_norm::rms_norm(res, w, eps, self.dtype);
        }
        Ok(rms_norm(res, w, eps, self.differentiable)?.to_dtype(self.dtype)?)
    }

    /// Layer `i`'s record in a [`Probe`] (see [`Model::probe_slots`]): the MoE layers before it
    /// (`moe`), else the Mamba layers before it.
    pub(crate) fn probe_slot(&self, i: usize, moe: bool) -> usize {
        self.layers[..i]
            .iter()
            .filter(|b| matches!(b.mixer, Mixer::Moe(_)) == moe && !matches!(b.mixer, Mixer::Dense(_)))
            .count()
    }

    /// Half-block `i`, or an error that names the model's depth.
    pub fn layer(&self, i: usize) -> Result<&Block> {
        self.layers
            .get(i)
            .ok_or_else(|| Error::Invalid(format!("layer {i} is past the model's {} layers", self.layers.len())))
    }

    /// The embedding rows of ids (B, L) u32 -> (B, L, d) in the weight dtype.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (bsz, len) = ids.dims2()?;
        Ok(self.embedding.index_select(&ids.flatten_all()?, 0)?.reshape((bsz, len, ()))?)
    }

    /// The logits of chosen positions of a final residual h (B, L, d) f32, for the training loss:
    /// `rows` (n) u32 indexes the flattened B·L positions -> (n, V), f32, or in the embedding's
    /// dtype where the training loss fuses it ([`Model::fuses_loss`]; CUDA: no (n, V) f32 copy, and
    /// the gradient flows back into the matmul in that dtype).
    pub fn head_rows(&self, h: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let (bsz, len, _) = h.dims3()?;
        let h2 = h.reshape((bsz * len, ()))?; // (B·L, d)
        #[cfg(feature = "cuda")]
        let x = match self.trains_with_kernels() && h2.dtype() == DType::F32 {
            true => crate::ops::rows::select_rows(&h2, rows)?, // scatter backward (ops::rows)
            false => h2.index_select(rows, 0)?,
        }; // (n, d)
        #[cfg(not(feature = "cuda"))]
        let x = h2.index_select(rows, 0)?; // (n, d)
        if !self.runs_kernels() && self.fuses_loss(self.embedding.dtype()) {
            return self.head_logits(&x); // (n, V) in the embedding's dtype
        }
        self.head(&x)
    }

    /// Whether fine-tuning scans with the fused autograd kernels: a differentiable model on
    /// CUDA with its kernels on (the rest of its forward stays tensor ops, which autograd sees).
    pub fn trains_with_kernels(&self) -> bool {
        crate::ops::available() && self.kernels.enabled && self.differentiable && self.device.is_cuda()
    }

    /// Whether fine-tuning scans with a fused autograd op that keeps only its inputs: the CUDA
    /// kernels ([`Model::trains_with_kernels`]) or, on the CPU, [`crate::ops::scan_cpu`]; both
    /// only with the kernels on (`--no-kernels` trains through the tensor-op scan).
    pub fn trains_with_fused_scan(&self) -> bool {
        self.trains_with_kernels() || (self.kernels.enabled && self.differentiable && self.device.is_cpu())
    }

    /// Which scan a full-sequence read takes: the fine-tuning ops when training
    /// ([`Model::trains_with_fused_scan`], also for a DPO reference pass, so policy and reference
    /// agree exactly), and for inference on the CPU with the kernels on the f32 loop of
    /// [`crate::ops::scan_cpu_infer`] (L·d_inner·N updates against the tensor-op scan's
    /// L·log₂(chunk) rounds of (B, chunk, d_inner, N) tensors, which took over half of `eval`'s and
    /// CPU prefill's time). `--no-kernels` keeps the tensor-op scan, the twin both are tested against.
    pub fn fused_scan(&self) -> crate::ops::scan_train::FusedScan {
        use crate::ops::scan_train::FusedScan;
        match (
            self.trains_with_fused_scan(),
            self.kernels.enabled && self.device.is_cpu() && !self.differentiable,
        ) {
            (true, _) => FusedScan::Train,
            (false, true) => FusedScan::Infer,
            (false, false) => FusedScan::Off,
        }
    }

    /// Whether forward/step take the fused CUDA kernels (see [`Model::kernels`]).
    pub fn runs_kernels(&self) -> bool {
        crate::ops::available() && self.kernels.enabled && !self.differentiable && self.device.is_cuda()
    }

    /// Whether the training loss takes logits of `dtype` through the fused CUDA cross-entropy,
    /// which computes in f32 whatever their dtype (the head then hands over its bf16 logits as
    /// they are); elsewhere the loss wants f32 logits.
    pub fn fuses_loss(&self, dtype: DType) -> bool {
        crate::ops::available()
            && self.device.is_cuda()
            && self.kernels.on(self.kernels.xent)
            && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
    }

    /// Final LayerNorm + tied head: h (.., d) f32 -> (.., V) f32.
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.runs_kernels() && self.embedding.dtype() != DType::F32 {
            return fused::head(self, h);
        }
        Ok(self.head_logits(h)?.to_dtype(DType::F32)?)
    }

    /// [`Model::head`]'s tensor ops before the cast to f32: h (.., d) f32 -> (.., V) in the
    /// embedding's dtype.
    fn head_logits(&self, h: &Tensor) -> Result<Tensor> {
        let eps = self.cfg.layernorm_epsilon;
        let out = layer_norm(h, &self.final_w, &self.final_b, eps, self.differentiable)?.to_dtype(self.embedding.dtype())?;
        let dims = out.dims().to_vec();
        let d = dims[dims.len() - 1];
        let out = out.reshape(((), d))?; // (n, d)
        let packed = match self.head_quant.as_ref().filter(|_| !self.differentiable) {
            Some(q) => q.matmul(&out)?,
            None => None,
        };
        let logits = match packed {
            Some(l) => l.to_dtype(self.embedding.dtype())?,
            None => out.matmul(&self.embedding.t()?)?, // (n, V)
        };
        let mut shape = dims;
        let last = shape.len() - 1;
        shape[last] = self.cfg.vocab_size;
        Ok(logits.reshape(shape)?)
    }
}

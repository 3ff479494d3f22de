//! The host side of the megakernel: from a [`Config`], an SM count and tile sizes, the per-SM
//! instruction lists of one token (built once per model), balanced by weight bytes, and their
//! statistics (bytes per SM, dependency stages per token).
//!
//! Every op is cut into near-equal tiles of its output rows, at most one per SM; tiles go to the
//! least-loaded SM so far (greedy by bytes). A Mamba layer's two stages use the same channel
//! split and the same SM for a channel range (channel ownership: the kernel may keep v and z in
//! shared memory). Instructions are appended op by op, so every SM's list follows one global
//! topological order: the oldest unfinished instruction of the token can always run, which is
//! why the lists cannot deadlock (checked by [`super::validate()`]).

use crate::error::{Error, Result};
use crate::model::config::{Config, LayerKind};

use super::isa::{Counter, CounterKind, Encoded, Instr, OpKind, Wait, WeightFormat};

/// The smallest tile of each kind of op, in output rows (an op gets fewer tiles than SMs when
/// its rows run out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileSizes {
    /// d_inner channels per Mamba tile.
    pub channels: usize,
    /// Expert hidden units per FFN tile.
    pub ffn: usize,
    /// Vocabulary rows per head tile.
    pub head_rows: usize,
}

impl Default for TileSizes {
    fn default() -> Self {
        Self {
            channels: 8,
            ffn: 16,
            head_rows: 64,
        }
    }
}

/// The storage format of each class of weight matrix (issue 22); the small per-channel vectors
/// (norms, conv, dt bias, A, D, router, biases) stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FormatPlan {
    pub in_proj: WeightFormat,
    pub x_proj: WeightFormat,
    pub dt_proj: WeightFormat,
    pub out_proj: WeightFormat,
    pub fc1: WeightFormat,
    pub fc2: WeightFormat,
    pub head: WeightFormat,
}

impl FormatPlan {
    /// Every matrix in one format.
    pub fn uniform(f: WeightFormat) -> Self {
        Self {
            in_proj: f,
            x_proj: f,
            dt_proj: f,
            out_proj: f,
            fc1: f,
            fc2: f,
            head: f,
        }
    }

    fn all(&self) -> [WeightFormat; 7] {
        [
            self.in_proj,
            self.x_proj,
            self.dt_proj,
            self.out_proj,
            self.fc1,
            self.fc2,
            self.head,
        ]
    }

    /// The formats of an op's operands, in [`OpKind::operands`] order.
    pub fn of(&self, op: OpKind) -> Vec<WeightFormat> {
        match op {
            OpKind::MambaIn => vec![self.in_proj, self.x_proj],
            OpKind::MambaSsm => vec![self.dt_proj, self.out_proj],
            OpKind::MoeFfn | OpKind::DenseFfn => vec![self.fc1, self.fc2],
            OpKind::Head => vec![self.head],
        }
    }
}

/// What to build a schedule for, besides the model's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleOpts {
    /// Streaming multiprocessors = persistent blocks (132 on an H100 SXM).
    pub sms: usize,
    pub tiles: TileSizes,
    pub formats: FormatPlan,
}

impl ScheduleOpts {
    /// `sms` SMs, the default tiles, bf16 weights.
    pub fn new(sms: usize) -> Self {
        Self {
            sms,
            tiles: TileSizes::default(),
            formats: FormatPlan::default(),
        }
    }
}

/// One token's per-SM instruction lists and the counters they share.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub cfg: Config,
    pub opts: ScheduleOpts,
    /// Indexed by [`Wait::counter`] and [`Instr::signal`].
    pub counters: Vec<Counter>,
    /// One list per SM, run in order.
    pub lists: Vec<Vec<Instr>>,
}

/// Near-equal tiles of `rows` rows, at least `min` rows each (one tile if fewer), at most `sms`.
fn split(rows: usize, min: usize, sms: usize) -> Vec<(u32, u32)> {
    let n = (rows / min.max(1)).clamp(1, sms.max(1));
    (0..n).map(|i| ((i * rows / n) as u32, ((i + 1) * rows / n) as u32)).collect()
}

/// Weight bytes of a tile of `rows` output rows of `op` (the chosen expert's for MoE).
pub fn tile_bytes(cfg: &Config, f: &FormatPlan, op: OpKind, rows: usize) -> u64 {
    let (d, n, k) = (cfg.hidden_size, cfg.state_size, cfg.conv_dimension);
    let bias = u64::from(cfg.add_bias_linear);
    let r = rows as u64;
    match op {
        OpKind::MambaIn => 2 * f.in_proj.bytes(rows, d) + f.x_proj.bytes(rows, cfg.x_proj_rows()) + 4 * r * (k as u64 + 1) + bias * 8 * r,
        OpKind::MambaSsm => f.dt_proj.bytes(rows, cfg.dt_rank()) + 4 * r * (2 + n as u64) + f.out_proj.bytes(rows, d),
        OpKind::MoeFfn | OpKind::DenseFfn => {
            let halves = if cfg.swiglu { 2 } else { 1 };
            halves * f.fc1.bytes(rows, d) + f.fc2.bytes(rows, d) + bias * 4 * r * halves
        }
        OpKind::Head => f.head.bytes(rows, d),
    }
}

/// An op of a layer: what it is, what it waits on, the counter it signals.
type OpSpec = (OpKind, Vec<Wait>, u32);

struct Builder<'a> {
    cfg: &'a Config,
    opts: &'a ScheduleOpts,
    counters: Vec<Counter>,
    lists: Vec<Vec<Instr>>,
    loads: Vec<u64>,
}

impl Builder<'_> {
    fn counter(&mut self, kind: CounterKind, target: usize) -> u32 {
        self.counters.push(Counter {
            kind,
            target: target as u32,
        });
        (self.counters.len() - 1) as u32
    }

    /// The SM of each tile: largest first, each to the least-loaded SM (lowest index on ties).
    fn place(&mut self, bytes: &[u64]) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..bytes.len()).collect();
        idx.sort_by_key(|&i| std::cmp::Reverse(bytes[i]));
        let mut out = vec![0; bytes.len()];
        for i in idx {
            let sm = (0..self.loads.len()).min_by_key(|&s| (self.loads[s], s)).unwrap_or(0);
            self.loads[sm] += bytes[i];
            out[i] = sm;
        }
        out
    }

    fn push(&mut self, sm: usize, (op, waits, signal): &OpSpec, layer: usize, tiles: &[(u32, u32)], tile: usize) {
        let (op, signal) = (*op, *signal);
        let rows = tiles[tile];
        self.lists[sm].push(Instr {
            op,
            layer: layer as u32,
            rows,
            tile: tile as u32,
            tiles: tiles.len() as u32,
            waits: waits.to_vec(),
            signal,
            formats: self.opts.formats.of(op),
            weight_bytes: tile_bytes(self.cfg, &self.opts.formats, op, (rows.1 - rows.0) as usize),
        });
    }

    /// One op (or a Mamba layer's two) over `tiles`, each tile on its placed SM.
    fn ops(&mut self, ops: &[OpSpec], layer: usize, tiles: &[(u32, u32)]) {
        let bytes: Vec<u64> = tiles
            .iter()
            .map(|&(a, e)| {
                ops.iter()
                    .map(|o| tile_bytes(self.cfg, &self.opts.formats, o.0, (e - a) as usize))
                    .sum()
            })
            .collect();
        let sms = self.place(&bytes);
        for spec in ops {
            for (t, &sm) in sms.iter().enumerate() {
                self.push(sm, spec, layer, tiles, t);
            }
        }
    }
}

impl Schedule {
    /// Builds the lists for `cfg` (any config [`Config::validate`] accepts).
    pub fn build(cfg: &Config, opts: &ScheduleOpts) -> Result<Self> {
        cfg.validate()?;
        if opts.sms == 0 || opts.sms > 4096 {
            return Err(Error::Invalid(format!("megakernel: {} SMs; expected 1..=4096", opts.sms)));
        }
        let t = opts.tiles;
        if t.channels == 0 || t.ffn == 0 || t.head_rows == 0 {
            return Err(Error::Invalid(format!("megakernel: tile sizes must be positive, got {t:?}")));
        }
        opts.formats.all().iter().try_for_each(|f| f.check())?;
        let mut b = Builder {
            cfg,
            opts,
            counters: Vec::new(),
            lists: vec![Vec::new(); opts.sms],
            loads: vec![0; opts.sms],
        };
        let mut res: Option<u32> = None; // the counter of the residual entering the current layer
        for l in 0..cfg.num_layers {
            let wait_res: Vec<Wait> = res
                .map(|c| Wait {
                    counter: c,
                    target: b.counters[c as usize].target,
                })
                .into_iter()
                .collect();
            let kind = cfg.layer_kind(l);
            let tiles = match kind {
                LayerKind::Mamba => split(cfg.d_inner(), t.channels, opts.sms),
                _ => split(cfg.ffn_hidden_size, t.ffn, opts.sms),
            };
            let next = b.counter(CounterKind::Res(l as u32 + 1), tiles.len());
            match kind {
                LayerKind::Mamba => {
                    let xp = b.counter(CounterKind::Xp(l as u32), tiles.len());
                    let wait_xp = vec![Wait {
                        counter: xp,
                        target: tiles.len() as u32,
                    }];
                    b.ops(&[(OpKind::MambaIn, wait_res, xp), (OpKind::MambaSsm, wait_xp, next)], l, &tiles);
                }
                LayerKind::Moe { .. } => b.ops(&[(OpKind::MoeFfn, wait_res, next)], l, &tiles),
                LayerKind::Dense => b.ops(&[(OpKind::DenseFfn, wait_res, next)], l, &tiles),
            }
            res = Some(next);
        }
        let tiles = split(cfg.vocab_size, t.head_rows, opts.sms);
        let done = b.counter(CounterKind::Done, tiles.len());
        let wait: Vec<Wait> = res
            .map(|c| Wait {
                counter: c,
                target: b.counters[c as usize].target,
            })
            .into_iter()
            .collect();
        b.ops(&[(OpKind::Head, wait, done)], cfg.num_layers, &tiles);
        Ok(Self {
            cfg: cfg.clone(),
            opts: *opts,
            counters: b.counters,
            lists: b.lists,
        })
    }

    /// The kernel's words, one list per SM.
    pub fn encode(&self) -> Result<Vec<Vec<Encoded>>> {
        self.lists.iter().map(|l| l.iter().map(Instr::encode).collect()).collect()
    }

    /// A counter's name for messages (or a note that the id is out of range).
    pub fn counter_name(&self, id: u32) -> String {
        match self.counters.get(id as usize) {
            Some(c) => c.kind.to_string(),
            None => format!("counter #{id} (no such counter: the schedule has {})", self.counters.len()),
        }
    }

    /// Dependency stages per token: the longest chain of waits (an instruction that waits on a
    /// counter is one stage after that counter's last producer); `None` if the waits form a cycle.
    pub fn stages(&self) -> Option<usize> {
        let mut depth_of = vec![0usize; self.counters.len()];
        let all: Vec<&Instr> = self.lists.iter().flatten().collect();
        for _ in 0..=self.counters.len() + 1 {
            let mut changed = false;
            for i in &all {
                let d = 1 + i
                    .waits
                    .iter()
                    .map(|w| depth_of.get(w.counter as usize).copied().unwrap_or(0))
                    .max()
                    .unwrap_or(0);
                if let Some(c) = depth_of.get_mut(i.signal as usize) {
                    if d > *c {
                        *c = d;
                        changed = true;
                    }
                }
            }
            if !changed {
                return depth_of.iter().copied().max();
            }
        }
        None
    }

    /// Bytes per SM, stages and the other figures of [`ScheduleStats`].
    pub fn stats(&self) -> ScheduleStats {
        let per_sm: Vec<u64> = self.lists.iter().map(|l| l.iter().map(|i| i.weight_bytes).sum()).collect();
        let total: u64 = per_sm.iter().sum();
        let mean = total as f64 / per_sm.len().max(1) as f64;
        let max = per_sm.iter().copied().max().unwrap_or(0);
        // the worst stage: max over SMs of one op's bytes against that op's mean per SM
        let mut worst = (String::new(), 1.0f64);
        let mut ops: Vec<(OpKind, u32)> = self.lists.iter().flatten().map(|i| (i.op, i.layer)).collect();
        ops.sort_by_key(|&(o, l)| (l, o.code()));
        ops.dedup();
        for (op, layer) in ops {
            let bytes: Vec<u64> = self
                .lists
                .iter()
                .map(|l| l.iter().filter(|i| i.op == op && i.layer == layer).map(|i| i.weight_bytes).sum())
                .collect();
            let m = bytes.iter().sum::<u64>() as f64 / bytes.len() as f64;
            let r = bytes.iter().copied().max().unwrap_or(0) as f64 / m.max(1.0);
            if r > worst.1 {
                worst = (format!("{} layer {layer}", op.name()), r);
            }
        }
        // static bytes the loader can stream while a MoE tile waits for its router: the next
        // instruction's weights on the same SM
        let window: u64 = self
            .lists
            .iter()
            .flat_map(|l| l.windows(2).filter(|w| w[0].expert_dependent()).map(|w| w[1].weight_bytes))
            .sum();
        let moe_tiles = self.lists.iter().flatten().filter(|i| i.expert_dependent()).count();
        ScheduleStats {
            sms: self.lists.len(),
            instructions: self.lists.iter().map(Vec::len).sum(),
            stages: self.stages().unwrap_or(0),
            weight_bytes: total,
            max_sm_bytes: max,
            mean_sm_bytes: mean,
            worst_stage: worst,
            moe_window_bytes: window as f64 / moe_tiles.max(1) as f64,
        }
    }
}

/// Figures of a [`Schedule`] (weights of one token; a MoE layer counts one expert).
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleStats {
    pub sms: usize,
    pub instructions: usize,
    /// Dependency stages per token (see [`Schedule::stages`]).
    pub stages: usize,
    pub weight_bytes: u64,
    pub max_sm_bytes: u64,
    pub mean_sm_bytes: f64,
    /// The stage whose busiest SM streams the most against that stage's mean, and the ratio.
    pub worst_stage: (String, f64),
    /// Mean bytes per MoE tile of the next, router-independent instruction on the same SM: what
    /// the loader can stream while the router decides.
    pub moe_window_bytes: f64,
}

impl ScheduleStats {
    /// Busiest SM's bytes over the mean (1.0 is perfect).
    pub fn balance(&self) -> f64 {
        self.max_sm_bytes as f64 / self.mean_sm_bytes.max(1.0)
    }
}

impl std::fmt::Display for ScheduleStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} SMs, {} instructions, {} stages/token, {:.1} MB weights/token, {:.1} KB/SM (max {:.1}, max/mean {:.4}), \
             worst stage {} at {:.4}, {:.1} KB streamable per MoE router window",
            self.sms,
            self.instructions,
            self.stages,
            self.weight_bytes as f64 / 1e6,
            self.mean_sm_bytes / 1e3,
            self.max_sm_bytes as f64 / 1e3,
            self.balance(),
            self.worst_stage.0,
            self.worst_stage.1,
            self.moe_window_bytes / 1e3
        )
    }
}

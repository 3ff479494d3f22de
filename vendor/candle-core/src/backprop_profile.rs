//! Opt-in time breakdown of [`crate::Tensor::backward`] by op kind (blackmamba patch).
//!
//! When switched on with [`set_op_profile`], the backward pass synchronises the node's device
//! before and after computing each node's input gradients and adds the elapsed time to a total
//! keyed by the node's op kind ("matmul", "binary mul", "custom3 conv-silu", ...). The adds of
//! the gradient accumulation (a tensor's second and later gradients, see `GradStore::accumulate`)
//! are timed under their own key, [`ACCUMULATE`], and left out of the node's time; the host-side
//! topological sort of the graph is timed as [`SORT`]. Off by default: then each node costs one
//! relaxed atomic load. The synchronisations serialise the device, so the totals are a
//! breakdown, not the speed of an unprofiled backward.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::op::Op;
use crate::{DType, Device, Result};

/// Key of the gradient accumulation (the adds into a tensor's gradient).
pub const ACCUMULATE: &str = "grad accumulate";
/// Key of the topological sort of the graph (host only).
pub const SORT: &str = "graph sort";

static ON: AtomicBool = AtomicBool::new(false);
/// op kind -> (seconds, count)
static TOTALS: Mutex<BTreeMap<String, (f64, usize)>> = Mutex::new(BTreeMap::new());

thread_local! {
    /// Seconds of accumulation inside the node being timed (taken out of the node's time).
    static ACCUM_IN_NODE: Cell<f64> = const { Cell::new(0.0) };
}

/// Switches the per-op timing of the backward pass on or off, and clears the totals.
pub fn set_op_profile(on: bool) {
    ON.store(on, Ordering::Relaxed);
    if let Ok(mut t) = TOTALS.lock() {
        t.clear();
    }
}

/// Whether the per-op timing is on.
pub fn op_profile_enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// (op kind, total seconds, nodes) since [`set_op_profile`], longest first.
pub fn op_profile_totals() -> Vec<(String, f64, usize)> {
    let mut v: Vec<(String, f64, usize)> = match TOTALS.lock() {
        Ok(t) => t.iter().map(|(k, &(s, n))| (k.clone(), s, n)).collect(),
        Err(_) => Vec::new(),
    };
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

fn add(key: &str, secs: f64) {
    if let Ok(mut t) = TOTALS.lock() {
        match t.get_mut(key) {
            Some(e) => {
                e.0 += secs;
                e.1 += 1;
            }
            None => {
                t.insert(key.to_string(), (secs, 1));
            }
        }
    }
}

/// The profile key of the op that made a tensor of dtype `out`: its variant and sub-kind, or a
/// custom op's name; a cast as "cast {from}->{to}" (the forward's direction).
pub fn op_kind(op: &Op, out: DType) -> String {
    let s = |x: &str| x.to_string();
    match op {
        Op::Binary(_, _, b) => format!("binary {}", format!("{b:?}").to_lowercase()),
        Op::Unary(_, u) => format!("unary {}", format!("{u:?}").to_lowercase()),
        Op::Cmp(..) => s("cmp"),
        Op::Reduce(_, r, _) => format!("reduce {}", r.name()),
        Op::Matmul(..) => s("matmul"),
        Op::Gather(..) => s("gather"),
        Op::Scatter(..) => s("scatter"),
        Op::ScatterAdd(..) => s("scatter_add"),
        Op::IndexSelect(..) => s("index_select"),
        Op::IndexAdd(..) => s("index_add"),
        Op::WhereCond(..) => s("where_cond"),
        Op::Conv1D { .. } => s("conv1d"),
        Op::ConvTranspose1D { .. } => s("conv_transpose1d"),
        Op::Conv2D { .. } => s("conv2d"),
        Op::ConvTranspose2D { .. } => s("conv_transpose2d"),
        Op::AvgPool2D { .. } => s("avg_pool2d"),
        Op::MaxPool2D { .. } => s("max_pool2d"),
        Op::UpsampleNearest1D { .. } => s("upsample_nearest1d"),
        Op::UpsampleNearest2D { .. } => s("upsample_nearest2d"),
        Op::UpsampleBilinear2D { .. } => s("upsample_bilinear2d"),
        Op::Cat(..) => s("cat"),
        Op::Affine { .. } => s("affine"),
        Op::ToDType(arg) => format!("cast {}->{}", arg.dtype().as_str(), out.as_str()),
        Op::Copy(_) => s("copy"),
        Op::Broadcast(_) => s("broadcast"),
        Op::Narrow(..) => s("narrow"),
        Op::SliceScatter0(..) => s("slice_scatter0"),
        Op::Reshape(_) => s("reshape"),
        Op::ToDevice(_) => s("to_device"),
        Op::Transpose(..) => s("transpose"),
        Op::Permute(..) => s("permute"),
        Op::Elu(..) => s("elu"),
        Op::Powf(..) => s("powf"),
        Op::CustomOp1(_, c) => format!("custom {}", c.name()),
        Op::CustomOp2(_, _, c) => format!("custom2 {}", c.name()),
        Op::CustomOp3(_, _, _, c) => format!("custom3 {}", c.name()),
    }
}

/// A running timer of one node, or of the accumulation (None while profiling is off).
pub(crate) struct Timer {
    dev: Device,
    t: Instant,
}

impl Timer {
    /// Starts timing a node on `dev` (waits for the device first) when profiling is on.
    #[inline]
    pub(crate) fn node(dev: &Device) -> Result<Option<Self>> {
        if !ON.load(Ordering::Relaxed) {
            return Ok(None);
        }
        ACCUM_IN_NODE.with(|c| c.set(0.0));
        Self::start(dev).map(Some)
    }

    /// Starts timing an accumulation on `dev` when profiling is on.
    #[inline]
    pub(crate) fn accumulate(dev: &Device) -> Result<Option<Self>> {
        if !ON.load(Ordering::Relaxed) {
            return Ok(None);
        }
        Self::start(dev).map(Some)
    }

    fn start(dev: &Device) -> Result<Self> {
        dev.synchronize()?;
        Ok(Self {
            dev: dev.clone(),
            t: Instant::now(),
        })
    }

    fn elapsed_synced(&self) -> Result<f64> {
        self.dev.synchronize()?;
        Ok(self.t.elapsed().as_secs_f64())
    }

    /// Ends a node's timer: its time less the accumulation inside it, under `op`'s kind.
    pub(crate) fn finish_node(self, op: &Op, out: DType) -> Result<()> {
        let secs = self.elapsed_synced()?;
        let accum = ACCUM_IN_NODE.with(|c| c.replace(0.0));
        add(&op_kind(op, out), (secs - accum).max(0.0));
        Ok(())
    }

    /// Ends an accumulation's timer, under [`ACCUMULATE`].
    pub(crate) fn finish_accumulate(self) -> Result<()> {
        let secs = self.elapsed_synced()?;
        ACCUM_IN_NODE.with(|c| c.set(c.get() + secs));
        add(ACCUMULATE, secs);
        Ok(())
    }
}

/// Starts a host-only timer when profiling is on (no device wait).
#[inline]
pub(crate) fn host_start() -> Option<Instant> {
    ON.load(Ordering::Relaxed).then(Instant::now)
}

/// Ends a host-only timer under `key`.
pub(crate) fn host_finish(t: Option<Instant>, key: &str) {
    if let Some(t) = t {
        add(key, t.elapsed().as_secs_f64());
    }
}

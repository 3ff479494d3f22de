//! The fine-tune panel's state: the form, the trainer's status and its progress history. Drawn by
//! `views::finetune`, whose key table changes it through these methods; the engine's news comes in
//! through [`FinetuneState::apply`].

use std::path::{Path, PathBuf};

use crate::engine::protocol::{
    FinetuneEvent, FinetuneMethod, FinetuneProgress, FinetuneSpec, FinetuneStatus, ProbeRouting, RoutingShiftInfo,
};
use crate::tui::editor::Editor;

/// The form fields, in order.
pub const FIELDS: [&str; 10] = [
    "dataset",
    "method",
    "LoRA targets",
    "LoRA rank",
    "LoRA alpha",
    "learning rate",
    "steps",
    "seq len",
    "batch",
    "output",
];

/// The form's first dataset.
pub const DEFAULT_DATA: &str = "data.jsonl";
/// The dataset a DPO method starts with: the demo preference pairs shipped in the repository.
pub const DEMO_PREFS: &str = "assets/prefs/demo.jsonl";

/// Most progress points kept for the charts.
pub const MAX_HISTORY: usize = 20_000;

/// Fine-tune panel state.
#[derive(Debug, Clone)]
pub struct FinetuneState {
    pub sel: usize,
    /// The text field being edited.
    pub editing: Option<Editor>,
    pub spec: FinetuneSpec,
    pub status: FinetuneStatus,
    pub history: Vec<FinetuneProgress>,
    /// The last error or note about fine-tuning.
    pub message: Option<String>,
    /// A command was sent and no answer has come yet.
    pub awaiting: bool,
    pub using_finetuned: bool,
    pub probe_before: Option<Box<ProbeRouting>>,
    pub probe_after: Option<Box<ProbeRouting>>,
    pub saved: Option<PathBuf>,
    /// The routing comparison of the finished run.
    pub routing_shift: Option<Box<RoutingShiftInfo>>,
}

impl Default for FinetuneState {
    fn default() -> Self {
        Self {
            sel: 0,
            editing: None,
            spec: FinetuneSpec {
                data: PathBuf::from(DEFAULT_DATA),
                method: FinetuneMethod::Lora,
                targets: vec!["in_proj".into(), "out_proj".into()],
                rank: 8,
                alpha: 16.0,
                lr: 1e-4,
                steps: 200,
                seq_len: 256,
                batch: 8,
                out: PathBuf::from("adapter"),
            },
            status: FinetuneStatus::Idle,
            history: Vec::new(),
            message: None,
            awaiting: false,
            using_finetuned: false,
            probe_before: None,
            probe_after: None,
            saved: None,
            routing_shift: None,
        }
    }
}

impl FinetuneState {
    /// The shown value of field `i`.
    pub fn value(&self, i: usize) -> String {
        let s = &self.spec;
        match i {
            0 => s.data.display().to_string(),
            1 => s.method.name().to_string(),
            2 => s.targets.join(","),
            3 => s.rank.to_string(),
            4 => format!("{}", s.alpha),
            5 => format!("{:.0e}", s.lr),
            6 => s.steps.to_string(),
            7 => s.seq_len.to_string(),
            8 => s.batch.to_string(),
            _ => s.out.display().to_string(),
        }
    }

    /// Whether field `i` is typed (Enter edits) rather than stepped (Left/Right).
    pub fn is_text(i: usize) -> bool {
        matches!(i, 0 | 2 | 9)
    }

    /// Sets text field `i` from what was typed.
    pub fn set_text(&mut self, i: usize, v: &str) {
        let v = v.trim();
        match i {
            0 => self.spec.data = PathBuf::from(v),
            2 => self.spec.targets = v.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect(),
            _ => self.spec.out = PathBuf::from(v),
        }
    }

    /// Steps field `i` up (`d` > 0) or down.
    pub fn adjust(&mut self, i: usize, d: i64) {
        let s = &mut self.spec;
        let step = |x: usize, by: usize, lo: usize, hi: usize| {
            let v = if d > 0 { x.saturating_add(by) } else { x.saturating_sub(by) };
            v.clamp(lo, hi)
        };
        match i {
            1 => {
                let k = FinetuneMethod::ALL.iter().position(|&m| m == s.method).unwrap_or(0) as i64;
                let n = FinetuneMethod::ALL.len() as i64;
                s.method = FinetuneMethod::ALL[(k + d).rem_euclid(n) as usize];
                // the untouched default dataset follows the method: text data or preference pairs
                if s.method.is_dpo() && s.data == Path::new(DEFAULT_DATA) {
                    s.data = PathBuf::from(DEMO_PREFS);
                } else if !s.method.is_dpo() && s.data == Path::new(DEMO_PREFS) {
                    s.data = PathBuf::from(DEFAULT_DATA);
                }
            }
            3 => s.rank = if d > 0 { (s.rank * 2).min(256) } else { (s.rank / 2).max(1) },
            4 => {
                s.alpha = if d > 0 {
                    (s.alpha * 2.0).min(1024.0)
                } else {
                    (s.alpha / 2.0).max(0.5)
                }
            }
            5 => s.lr = if d > 0 { (s.lr * 2.0).min(1.0) } else { (s.lr / 2.0).max(1e-7) },
            6 => s.steps = step(s.steps, if s.steps >= 1000 { 100 } else { 10 }, 1, 1_000_000),
            7 => {
                s.seq_len = if d > 0 {
                    (s.seq_len * 2).min(8192)
                } else {
                    (s.seq_len / 2).max(16)
                }
            }
            8 => s.batch = step(s.batch, 1, 1, 1024),
            _ => {}
        }
    }

    /// Applies fine-tuning news from the engine.
    pub fn apply(&mut self, ev: FinetuneEvent) {
        match ev {
            FinetuneEvent::Status(s) => {
                self.status = s;
                self.message = None;
            }
            FinetuneEvent::Progress(p) => {
                self.status = FinetuneStatus::Running;
                if self.history.len() >= MAX_HISTORY {
                    // keep every other point: the chart keeps its shape
                    let mut k = 0;
                    self.history.retain(|_| {
                        k += 1;
                        k % 2 == 0
                    });
                }
                self.history.push(*p);
            }
            FinetuneEvent::Saved(p) => self.saved = Some(p),
            FinetuneEvent::Failed(m) => self.message = Some(m),
            FinetuneEvent::UsingFinetuned(b) => self.using_finetuned = b,
            FinetuneEvent::RoutingShift(r) => self.routing_shift = Some(r),
            FinetuneEvent::ProbeRouting(r) => {
                if r.after {
                    self.probe_after = Some(r);
                } else {
                    self.probe_before = Some(r);
                }
            }
        }
    }

    /// Whether a run has trained steps that a save would keep (running, paused or stopped).
    pub fn run_to_save(&self) -> bool {
        matches!(
            self.status,
            FinetuneStatus::Running | FinetuneStatus::Paused | FinetuneStatus::Stopped
        ) && !self.history.is_empty()
    }

    /// Seconds left at the recent pace.
    pub fn eta_secs(&self) -> Option<f64> {
        let last = self.history.last()?;
        if last.step == 0 || last.elapsed_secs <= 0.0 {
            return None;
        }
        Some(last.elapsed_secs / last.step as f64 * last.total_steps.saturating_sub(last.step) as f64)
    }
}

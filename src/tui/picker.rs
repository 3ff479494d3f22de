//! The model picker (Ctrl-K): the models the engine can load ([`crate::catalog`]), a field for any
//! folder, hub id or random shape, the device and dtype to load on and the weight format. Drawn by
//! `views::picker`, whose key table changes it through these methods, [`Picker::paste`] and
//! [`Picker::set_catalog`]. Choosing a model yields the [`LoadSpec`] the engine loads.

use crate::catalog::{split_revision, Catalog, ModelChoice};
use crate::engine::protocol::{LoadSpec, ModelInfo};
use crate::quant::{QuantFormat, QuantSpec};
use crate::tui::editor::Editor;
use crate::tui::keymap::step_in;

/// (device, dtype) pairs ←→ cycles through; the `cuda` ones only when the build has CUDA.
pub const RUNTIMES: [(&str, &str); 6] = [
    ("cpu", "f32"),
    ("cpu", "bf16"),
    ("cpu", "f16"),
    ("cuda", "bf16"),
    ("cuda", "f16"),
    ("cuda", "f32"),
];

/// The weight formats the picker offers, in the order Ctrl-F cycles them (`None`: as loaded).
pub const FORMATS: [Option<QuantFormat>; 5] = [
    None,
    Some(QuantFormat::Int8),
    Some(QuantFormat::Fp8),
    Some(QuantFormat::Q4 { group: 64 }),
    Some(QuantFormat::Q4 { group: 128 }),
];

/// What the picker chooses a model for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PickTarget {
    /// Load it in place of the current model (Ctrl-K).
    #[default]
    Load,
    /// Compare the current model with it (the compare view's `m`).
    Compare,
}

/// Picker state. Kept while closed, so a failed load can be retried with the same text.
#[derive(Debug, Clone, Default)]
pub struct Picker {
    pub open: bool,
    /// The engine's answer to `ListModels` (None until it comes).
    pub catalog: Option<Box<Catalog>>,
    /// Selected row: a choice, or `choices.len()` for the typed entry.
    pub sel: usize,
    /// A folder, hub id (`owner/name[@revision]`) or `random:SHAPE[@seed]`.
    pub other: Editor,
    /// (device, dtype) to load on.
    pub device: String,
    pub dtype: String,
    /// `--quant` of the command line: its parts and GGML choice go with every format picked.
    pub quant: Option<crate::quant::QuantSpec>,
    /// The weight format of the next model loaded (`None`: as loaded, bf16/f32).
    pub format: Option<QuantFormat>,
    /// What Enter does with the chosen model.
    pub target: PickTarget,
    /// Select the loaded model's row when the catalog comes.
    pending_select: bool,
}

/// What a key in the picker asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum PickerAction {
    /// Load this model; the string names it for the status line.
    Load(LoadSpec, String),
    /// A choice that cannot load now: the reason.
    Refuse(String),
}

impl Picker {
    /// Opens the picker on the current model's device and dtype; the caller asks the engine for
    /// the catalog.
    pub fn open(&mut self, current: Option<&ModelInfo>) {
        self.open = true;
        self.pending_select = true;
        self.target = PickTarget::Load;
        if let Some(m) = current {
            self.device.clone_from(&m.device);
            self.dtype.clone_from(&m.dtype);
            self.format = m.quant.as_deref().and_then(|q| q.parse().ok());
        } else if self.device.is_empty() {
            self.device = "cpu".into();
            self.dtype = "f32".into();
        }
    }

    /// The choices so far (empty until the catalog comes).
    pub fn choices(&self) -> &[ModelChoice] {
        self.catalog.as_ref().map_or(&[], |c| &c.choices)
    }

    /// Whether the typed entry is selected.
    pub fn on_other(&self) -> bool {
        self.sel >= self.choices().len()
    }

    /// Rows: the choices and the typed entry.
    pub fn rows(&self) -> usize {
        self.choices().len() + 1
    }

    /// Takes the engine's list; selects the loaded model's row the first time after opening.
    pub fn set_catalog(&mut self, catalog: Box<Catalog>, current_label: Option<&str>) {
        let typed = self.on_other() && !self.other.text.is_empty();
        self.catalog = Some(catalog);
        if self.pending_select && !typed {
            self.sel = current_label
                .and_then(|l| self.choices().iter().position(|c| c.label == l))
                .unwrap_or(0);
        }
        self.pending_select = false;
        self.sel = self.sel.min(self.rows() - 1);
    }

    /// CUDA is offered when the build has it (or the model already runs on it).
    fn cuda(&self) -> bool {
        self.catalog.as_ref().is_some_and(|c| c.cuda) || self.device == "cuda"
    }

    /// The (device, dtype) pairs offered.
    pub fn runtimes(&self) -> Vec<(&'static str, &'static str)> {
        let cuda = self.cuda();
        RUNTIMES.iter().copied().filter(|(d, _)| cuda || *d == "cpu").collect()
    }

    /// Moves to the next (`d` > 0) or previous (device, dtype) pair.
    pub fn cycle_runtime(&mut self, d: isize) {
        let all = self.runtimes();
        let i = all
            .iter()
            .position(|&(dev, dt)| dev == self.device && dt == self.dtype)
            .map_or(0, |i| (i as isize + d).rem_euclid(all.len() as isize) as usize);
        if let Some(&(dev, dt)) = all.get(i) {
            self.device = dev.into();
            self.dtype = dt.into();
        }
    }

    /// Moves to the next (`d` > 0) or previous weight format of [`FORMATS`].
    pub fn cycle_format(&mut self, d: isize) {
        let n = FORMATS.len() as isize;
        let i = FORMATS.iter().position(|f| *f == self.format).unwrap_or(0) as isize;
        self.format = FORMATS[(i + d).rem_euclid(n) as usize];
    }

    /// The format's name as the picker shows it: `as loaded` or `int8`, `fp8`, `q4g64`, `q4g128`.
    pub fn format_name(&self) -> String {
        self.format.map_or_else(|| "as loaded".to_string(), QuantFormat::name)
    }

    /// The `--quant` spec of `format`: the command line's parts and GGML choice when it gave
    /// `--quant`, else the defaults.
    pub fn quant_spec(&self, format: QuantFormat) -> QuantSpec {
        match &self.quant {
            Some(q) => QuantSpec { format, ..q.clone() },
            None => QuantSpec {
                format,
                parts: crate::quant::Part::DEFAULT.to_vec(),
                ggml: true,
            },
        }
    }

    /// Pasted text goes into the typed entry (one line).
    pub fn paste(&mut self, text: &str) {
        self.sel = self.choices().len();
        self.other.insert(&text.replace(['\r', '\n'], " "));
    }

    /// The mouse wheel moves the selection.
    pub fn scroll(&mut self, d: isize) {
        self.sel = step_in(self.sel, d, self.rows());
    }

    /// The selected row as something to load.
    pub fn choose(&self) -> PickerAction {
        let (model, revision, name) = match self.choices().get(self.sel) {
            Some(c) => {
                if let crate::catalog::Availability::Unavailable { reason } = &c.availability {
                    return PickerAction::Refuse(format!("{}: {reason}", c.name));
                }
                (c.arg.clone(), None, c.name.clone())
            }
            None => {
                let text = self.other.text.trim();
                if text.is_empty() {
                    return PickerAction::Refuse(
                        "type a model folder, a hub id (owner/name[@revision]) or random:SHAPE, or pick one from the list".into(),
                    );
                }
                let (m, rev) = split_revision(text);
                let name = match &rev {
                    Some(r) => format!("{m}@{r}"),
                    None => m.clone(),
                };
                (Some(m), rev, name)
            }
        };
        let spec = LoadSpec {
            model,
            revision,
            tokenizer: None,
            device: Some(self.device.clone()),
            dtype: Some(self.dtype.clone()),
            adapter: None,
            quant: self.format.map(|f| self.quant_spec(f)),
        };
        PickerAction::Load(spec, name)
    }
}

//! The model picker (Ctrl-K): the models the engine can load ([`crate::catalog`]), a field for any
//! folder, hub id or random shape, and the device and dtype to load on. Drawn by
//! `views::picker`; changed only through [`Picker::key`], [`Picker::paste`] and
//! [`Picker::set_catalog`]. Choosing a model yields the [`LoadSpec`] the engine loads.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::catalog::{split_revision, Catalog, ModelChoice};
use crate::engine::protocol::{Command, LoadSpec, ModelInfo};
use crate::tui::app::{edit_line, step_in, Loading};
use crate::tui::finetune_state::FinetuneState;
use crate::tui::text::Editor;

/// (device, dtype) pairs ←→ cycles through; the `cuda` ones only when the build has CUDA.
pub const RUNTIMES: [(&str, &str); 6] = [
    ("cpu", "f32"),
    ("cpu", "bf16"),
    ("cpu", "f16"),
    ("cuda", "bf16"),
    ("cuda", "f16"),
    ("cuda", "f32"),
];

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
    /// Select the loaded model's row when the catalog comes.
    pending_select: bool,
}

/// What a key in the picker asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum PickerAction {
    None,
    Close,
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
        if let Some(m) = current {
            self.device.clone_from(&m.device);
            self.dtype.clone_from(&m.dtype);
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

    fn rows(&self) -> usize {
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

    fn cycle_runtime(&mut self, d: isize) {
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

    /// Pasted text goes into the typed entry (one line).
    pub fn paste(&mut self, text: &str) {
        self.sel = self.choices().len();
        self.other.insert(&text.replace(['\r', '\n'], " "));
    }

    /// The mouse wheel moves the selection.
    pub fn scroll(&mut self, d: isize) {
        self.sel = step_in(self.sel, d, self.rows());
    }

    /// Handles a key while the picker is open.
    pub fn key(&mut self, k: KeyEvent) -> PickerAction {
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        let n = self.rows();
        match k.code {
            KeyCode::Esc => return PickerAction::Close,
            KeyCode::Char('k') if ctrl => return PickerAction::Close,
            KeyCode::Up => self.sel = step_in(self.sel, -1, n),
            KeyCode::Down => self.sel = step_in(self.sel, 1, n),
            KeyCode::PageUp => self.sel = 0,
            KeyCode::PageDown => self.sel = n - 1,
            KeyCode::Home if !self.on_other() => self.sel = 0,
            KeyCode::End if !self.on_other() => self.sel = n - 1,
            KeyCode::Tab => self.cycle_runtime(1),
            KeyCode::BackTab => self.cycle_runtime(-1),
            KeyCode::Enter => return self.choose(),
            _ if self.on_other() => edit_line(&mut self.other, k),
            KeyCode::Left => self.cycle_runtime(-1),
            KeyCode::Right => self.cycle_runtime(1),
            // typing on a choice starts the typed entry
            KeyCode::Char(c) if !ctrl => {
                self.sel = self.choices().len();
                self.other.insert(c.encode_utf8(&mut [0; 4]));
            }
            _ => {}
        }
        PickerAction::None
    }

    /// The selected row as something to load.
    fn choose(&self) -> PickerAction {
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
        };
        PickerAction::Load(spec, name)
    }
}

impl crate::tui::app::App {
    /// Ctrl-K: opens the picker and asks the engine for the list of models.
    pub(crate) fn open_picker(&mut self, out: &mut Vec<Command>) {
        if self.fatal.is_some() {
            self.notify("the engine has stopped; quit with Ctrl-Q", true);
            return;
        }
        // the engine answers nothing until a load ends
        if let Some(name) = &self.switching {
            self.notify(format!("{name} is loading; Ctrl-K works once it is ready"), false);
            return;
        }
        if self.model.is_none() {
            self.notify("the model is still loading; Ctrl-K works once it is ready", false);
            return;
        }
        self.picker.open(self.model.as_ref());
        out.push(Command::ListModels);
    }

    /// A key while the picker is open.
    pub(crate) fn picker_key(&mut self, k: KeyEvent, out: &mut Vec<Command>) {
        match self.picker.key(k) {
            PickerAction::None => {}
            PickerAction::Close => self.picker.open = false,
            PickerAction::Refuse(why) => self.notify(why, true),
            PickerAction::Load(spec, name) => {
                let same = self.model.as_ref().is_some_and(|m| {
                    spec.revision.is_none()
                        && crate::loader::ModelSource::parse(spec.model.as_deref(), None).is_ok_and(|s| s.label() == m.label)
                        && spec.device.as_deref() == Some(m.device.as_str())
                        && spec.dtype.as_deref() == Some(m.dtype.as_str())
                });
                if same {
                    self.picker.open = false;
                    self.notify(
                        format!("{name} is already loaded ({} {})", self.picker.device, self.picker.dtype),
                        false,
                    );
                    return;
                }
                if !self.ready() {
                    return;
                }
                self.picker.open = false;
                self.loading = Some(Loading {
                    stage: format!("loading {name}"),
                    done: 0,
                    total: 1,
                });
                self.switching = Some(name);
                out.push(Command::Load(spec));
            }
        }
    }

    /// Another model replaced the old one: its conversation, telemetry and fine-tuning run are
    /// gone (the fine-tune form stays).
    pub(crate) fn model_switched(&mut self) {
        self.switching = None;
        self.chat.messages.clear();
        self.chat.scroll = 0;
        self.tele.clear();
        self.routing_sel = None;
        self.sink.chat = None;
        self.sink.train = None;
        self.sink.layer = 0;
        self.state_layer = 0;
        self.stats = None;
        self.ft = FinetuneState {
            spec: self.ft.spec.clone(),
            ..FinetuneState::default()
        };
    }
}

//! Where a model comes from (`--model`), and loading it with its tokenizer onto a device.
//!
//! * nothing: the embedded default model (compiled into the binary, see [`crate::embedded`]);
//! * `random:tiny|1.5b|2.8b[@seed]`: random weights of those shapes (benchmarks, demos);
//! * a folder with `config.json`, the weights and optionally `tokenizer.json`;
//! * a hub id such as `Zyphra/BlackMamba-2.8B` (see [`crate::hub`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::config::Config;
use crate::model::convert::ConversionCache;
use crate::model::random::{random_weights, RandomInit};
use crate::model::weights::{check_and_convert, check_index, read_tensors_with, tensor_index, WeightFiles};
use crate::model::Model;
use crate::tokenizer;

/// A model source named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The model shipped in the binary.
    Embedded,
    /// Random weights of a named shape.
    Random { shape: String, seed: u64 },
    /// A local folder.
    Dir(PathBuf),
    /// A Hugging Face hub repository.
    Hub { repo: String, revision: Option<String> },
}

impl ModelSource {
    /// Parses `--model`: `None` (or `embedded`) is the embedded model; an existing path is a folder; `random:…`
    /// is random weights; `2.8b` / `1.5b` are aliases of the Zyphra repos; `owner/name` is a hub id.
    pub fn parse(arg: Option<&str>, revision: Option<&str>) -> Result<Self> {
        let Some(arg) = arg else { return Ok(Self::Embedded) };
        if arg == "embedded" && !Path::new(arg).exists() {
            return Ok(Self::Embedded);
        }
        if let Some(rest) = arg.strip_prefix("random:") {
            let (shape, seed) = match rest.split_once('@') {
                Some((s, seed)) => (
                    s,
                    seed.parse()
                        .map_err(|_| Error::Invalid(format!("--model {arg}: seed '{seed}' is not a number")))?,
                ),
                None => (rest, 0),
            };
            if !["tiny", "1.5b", "2.8b"].contains(&shape) {
                return Err(Error::Invalid(format!(
                    "--model {arg}: unknown random shape '{shape}'; use random:tiny, random:1.5b or random:2.8b"
                )));
            }
            return Ok(Self::Random { shape: shape.into(), seed });
        }
        let path = Path::new(arg);
        if path.exists() {
            if !path.is_dir() {
                return Err(Error::Invalid(format!(
                    "--model {arg}: expected a folder holding config.json and the weights, found a file"
                )));
            }
            return Ok(Self::Dir(path.to_path_buf()));
        }
        let repo = match arg.to_ascii_lowercase().as_str() {
            "2.8b" | "blackmamba-2.8b" => "Zyphra/BlackMamba-2.8B".to_string(),
            "1.5b" | "blackmamba-1.5b" => "Zyphra/BlackMamba-1.5B".to_string(),
            _ if arg.split('/').count() == 2 && !arg.starts_with('.') && !arg.contains('\\') => arg.to_string(),
            _ => {
                return Err(Error::Invalid(format!(
                    "--model {arg}: no such folder, and not a hub id (owner/name) or random:SHAPE"
                )))
            }
        };
        Ok(Self::Hub {
            repo,
            revision: revision.map(str::to_string),
        })
    }

    /// A short name for status lines.
    pub fn label(&self) -> String {
        match self {
            Self::Embedded => "embedded".into(),
            Self::Random { shape, seed } => format!("random:{shape}@{seed}"),
            Self::Dir(p) => p.display().to_string(),
            Self::Hub { repo, .. } => repo.clone(),
        }
    }
}

/// Config of a random shape.
pub fn random_config(shape: &str) -> Config {
    match shape {
        "1.5b" => Config::blackmamba_1_5b(),
        "2.8b" => Config::blackmamba_2_8b(),
        _ => demo_config(),
    }
}

/// The small shape of the demo model (GPT-NeoX vocabulary).
pub fn demo_config() -> Config {
    Config {
        num_layers: 4,
        hidden_size: 64,
        state_size: 16,
        conv_dimension: 4,
        vocab_size: 50304,
        expansion_factor: 2,
        mamba_moe_layers: vec!["r".into(), "8".into(), "r".into(), "8".into()],
        ffn_hidden_size: 128,
        add_bias_linear: false,
        swiglu: true,
        max_sequence_length: 2048,
        expert_activation: Default::default(),
        layernorm_epsilon: 1e-5,
    }
}

/// A loaded model with its tokenizer and what the UI should say about it.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub label: String,
    /// Set for random weights: the UI shows a banner.
    pub untrained: bool,
    pub load_secs: f64,
    /// What the user should know about this load, one line each (e.g. that the checkpoint was read
    /// without its conversion, and why).
    pub notes: Vec<String>,
}

/// A step of loading, for progress bars and the TUI.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadProgress {
    /// "download FILE", "convert", "read" or "ready"
    pub stage: String,
    pub done: u64,
    pub total: u64,
}

/// Receives [`LoadProgress`] reports (from the loading thread).
pub type ProgressFn = std::sync::Arc<dyn Fn(&LoadProgress) + Send + Sync>;

/// Options of [`load`].
#[derive(Clone, Default)]
pub struct LoadOpts {
    pub tokenizer: Option<PathBuf>,
    pub progress: Option<ProgressFn>,
    /// The hub settings (read from the environment at the edge); `None`: hub ids cannot load.
    pub hub: Option<crate::hub::HubEnv>,
}

impl std::fmt::Debug for LoadOpts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOpts")
            .field("tokenizer", &self.tokenizer)
            .field("progress", &self.progress.is_some())
            .field("hub", &self.hub)
            .finish()
    }
}

impl LoadOpts {
    fn report(&self, stage: &str, done: u64, total: u64) {
        if let Some(p) = &self.progress {
            p(&LoadProgress {
                stage: stage.to_string(),
                done,
                total,
            });
        }
    }
}

/// Loads a model and its tokenizer.
pub fn load(source: &ModelSource, device: &Device, dtype: DType, opts: &LoadOpts) -> Result<Loaded> {
    let t0 = Instant::now();
    let mut notes = Vec::new();
    let (model, tok_path, untrained) = match source {
        ModelSource::Embedded => {
            opts.report("read", 0, 1);
            let (m, tok) = crate::embedded::load(device, dtype)?;
            opts.report("ready", 1, 1);
            let tokenizer = match &opts.tokenizer {
                Some(p) => {
                    let t = tokenizer::from_file(p)?;
                    tokenizer::check_fits(&t, m.cfg.vocab_size, &format!("tokenizer {}", p.display()))?;
                    t
                }
                None => tok,
            };
            return Ok(Loaded {
                model: m,
                tokenizer,
                label: source.label(),
                untrained: false,
                load_secs: t0.elapsed().as_secs_f64(),
                notes,
            });
        }
        ModelSource::Random { shape, seed } => (random_model(shape, *seed, device, dtype)?, None, true),
        ModelSource::Dir(dir) => {
            let (m, t) = load_dir_with(dir, device, dtype, opts)?;
            (m, t, false)
        }
        ModelSource::Hub { repo, revision } => {
            let env = opts
                .hub
                .as_ref()
                .ok_or_else(|| Error::Invalid(format!("{repo}: this caller gives no hub settings; pass a local folder instead")))?;
            let dir = crate::hub::resolve_with(env, repo, revision.as_deref(), &mut |f, d, t| {
                opts.report(&format!("download {f}"), d, t)
            })?;
            // the config first: a bad one is reported before any conversion
            let cfg = Config::from_file(&dir.join("config.json"))?;
            let (files, note) = hub_weights(env, &dir, opts)?;
            notes.extend(note);
            let (m, t) = load_files(&dir, &cfg, &files, device, dtype, opts)?;
            (m, t, false)
        }
    };
    // The hub repos ship no tokenizer: they use the embedded GPT-NeoX one, which must fit.
    let strict = matches!(source, ModelSource::Hub { .. });
    let tokenizer = match opts.tokenizer.clone().or(tok_path) {
        Some(p) => {
            let t = tokenizer::from_file(&p)?;
            tokenizer::check_fits(&t, model.cfg.vocab_size, &format!("tokenizer {}", p.display()))?;
            t
        }
        None => {
            let t = tokenizer::neox()?;
            if strict {
                tokenizer::check_fits(&t, model.cfg.vocab_size, "the GPT-NeoX-20B tokenizer")?;
            }
            t
        }
    };
    opts.report("ready", 1, 1);
    Ok(Loaded {
        model,
        tokenizer,
        label: source.label(),
        untrained,
        load_secs: t0.elapsed().as_secs_f64(),
        notes,
    })
}

/// The weights of a hub snapshot: the conversion of its `pytorch_model.bin` in this program's
/// cache (made on the first load; nothing is written into the hub cache), or the `.bin` itself,
/// with a note saying why, when there is no cache or it cannot be written.
fn hub_weights(env: &crate::hub::HubEnv, dir: &Path, opts: &LoadOpts) -> Result<(WeightFiles, Option<String>)> {
    let bin = dir.join("pytorch_model.bin");
    let slow = "reading pytorch_model.bin directly, which is slower on every load";
    let Some(root) = &env.convert_cache else {
        return Ok((
            WeightFiles::Pth(bin),
            Some(format!("no cache folder for conversions (set XDG_CACHE_HOME or HOME): {slow}")),
        ));
    };
    let cache = ConversionCache::new(root);
    match cache.ensure(&bin, &mut |d, t| opts.report("convert", d as u64, t as u64)) {
        Ok((st, _)) => Ok((WeightFiles::Safetensors(vec![st]), None)),
        Err(e) if cache.is_cache_error(&e) => Ok((
            WeightFiles::Pth(bin),
            Some(format!(
                "the conversion cache cannot be written ({e}): {slow}; make {} writable or set XDG_CACHE_HOME to a writable folder",
                root.display()
            )),
        )),
        Err(e) => Err(e),
    }
}

/// A model with random weights of a named shape.
pub fn random_model(shape: &str, seed: u64, device: &Device, dtype: DType) -> Result<Model> {
    let cfg = random_config(shape);
    let w = random_weights(&cfg, RandomInit { seed, perturb: false }, dtype, device)?;
    Model::from_tensors(&cfg, w, dtype, device)
}

/// Loads `config.json` and the weights of a folder; returns the folder's tokenizer path if any.
pub fn load_dir(dir: &Path, device: &Device, dtype: DType) -> Result<(Model, Option<PathBuf>)> {
    load_dir_with(dir, device, dtype, &LoadOpts::default())
}

/// [`load_dir`] with progress reports: names and shapes are checked from the file headers
/// before any tensor data is read.
pub fn load_dir_with(dir: &Path, device: &Device, dtype: DType, opts: &LoadOpts) -> Result<(Model, Option<PathBuf>)> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::bad_file(
            dir,
            "no config.json in this folder; --model needs a folder with config.json and the weights",
        ));
    }
    if let Some(family) = crate::lm::family_of(dir)? {
        return Err(Error::bad_file(
            &cfg_path,
            format!(
                "model_type '{}' is a transformer checkpoint, which this command does not run; generate, logits, trace and analyze --compare take it",
                family.model_type()
            ),
        ));
    }
    let cfg = Config::from_file(&cfg_path)?;
    let files = WeightFiles::find(dir)?;
    load_files(dir, &cfg, &files, device, dtype, opts)
}

/// Loads the model of `cfg` with the weights `files`: names and shapes are checked from the file
/// headers before any tensor data is read; every error names the weights file. Returns the
/// tokenizer path of `dir`, if any.
fn load_files(
    dir: &Path,
    cfg: &Config,
    files: &WeightFiles,
    device: &Device,
    dtype: DType,
    opts: &LoadOpts,
) -> Result<(Model, Option<PathBuf>)> {
    let model = (|| {
        // a quantised checkpoint (`blackmamba quantize`): checked and built as the dense model its
        // dequantised matrices make, then given the packed ones
        let manifest = crate::quant::checkpoint::read_manifest(dir)?;
        let mut index = tensor_index(files)?;
        if let Some((m, f)) = &manifest {
            index = crate::quant::checkpoint::dense_index(index, m, *f);
        }
        check_index(cfg, &index)?;
        let mut raw = read_tensors_with(files, device, &mut |d, t| opts.report("read", d as u64, t as u64))?;
        let packed = match &manifest {
            Some((m, f)) => Some(crate::quant::checkpoint::take_quantized(&mut raw, m, *f, device)?),
            None => None,
        };
        let w = check_and_convert(cfg, raw, dtype)?;
        let mut model = Model::from_tensors(cfg, w, dtype, device)?;
        if let Some(q) = packed {
            crate::quant::checkpoint::attach(&mut model, q, true)?;
        }
        Ok(model)
    })()
    .map_err(|e| files.name_in(e))?;
    let tok = dir.join("tokenizer.json");
    Ok((model, tok.is_file().then_some(tok)))
}

/// `--device`: where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// The CPU (always available).
    Cpu,
    /// The first NVIDIA GPU (needs a build with `--features cuda`).
    Cuda,
}

impl DeviceArg {
    /// The name as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        }
    }
}

impl std::str::FromStr for DeviceArg {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(Error::Invalid(format!("--device {other}: use cpu or cuda"))),
        }
    }
}

/// `--dtype`: the floating-point type of the weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    /// 32-bit float (the CPU default).
    F32,
    /// bfloat16 (the GPU default).
    Bf16,
    /// IEEE half precision.
    F16,
}

impl DTypeArg {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// The name as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

impl std::str::FromStr for DTypeArg {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(Error::Invalid(format!("--dtype {other}: use f32, bf16 or f16"))),
        }
    }
}

/// Picks the device: `cuda` when asked or when built with CUDA and a GPU is there, else CPU.
/// On CUDA, casts take this project's kernels from here on (`ops::cast`), and a GPU that none of
/// the compiled kernels fits (see [`crate::gpu_arch`]) is an error naming it.
pub fn device(kind: Option<DeviceArg>) -> Result<Device> {
    device_on(kind, 0)
}

/// [`device`] with the GPU of CUDA ordinal `gpu` (a data-parallel rank's local rank).
pub fn device_on(kind: Option<DeviceArg>, gpu: usize) -> Result<Device> {
    #[cfg(feature = "cuda")]
    crate::ops::cast::install();
    let dev = pick_device(kind, gpu)?;
    #[cfg(feature = "cuda")]
    cuda_arch(&dev)?;
    Ok(dev)
}

/// The compute capability of a CUDA device and the code of this build it runs (see
/// [`crate::gpu_arch::check`]), or the one-line error naming the card and the archs built;
/// `None` on the CPU. Use [`crate::gpu_arch::hopper_features`] on the result before launching with
/// Hopper-only attributes.
#[cfg(feature = "cuda")]
pub fn cuda_arch(dev: &Device) -> Result<Option<((u32, u32), crate::gpu_arch::Code)>> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as Attr;
    let Device::Cuda(d) = dev else { return Ok(None) };
    let ctx = d.cuda_stream().context().clone();
    let attr = |a| {
        ctx.attribute(a)
            .map(|v| u32::try_from(v).unwrap_or(0))
            .map_err(|e| Error::Invalid(format!("reading the GPU's compute capability: {e}")))
    };
    let cc = (
        attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    let name = ctx.name().unwrap_or_else(|_| "GPU 0".into());
    let code = crate::gpu_arch::check(&name, cc, &crate::gpu_arch::built_archs()).map_err(Error::Invalid)?;
    Ok(Some((cc, code)))
}

fn pick_device(kind: Option<DeviceArg>, gpu: usize) -> Result<Device> {
    match kind {
        Some(DeviceArg::Cpu) => Ok(Device::Cpu),
        Some(DeviceArg::Cuda) => Device::new_cuda(gpu).map_err(|e| {
            Error::Invalid(format!(
                "--device cuda: no usable GPU {gpu} ({e}); build with --features cuda on a machine with an NVIDIA driver, or use --device cpu"
            ))
        }),
        None => Ok(if candle_core::utils::cuda_is_available() {
            Device::new_cuda(gpu).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
    }
}

/// The dtype of `--dtype`; the default is bf16 on a GPU and f32 on the CPU.
pub fn dtype(kind: Option<DTypeArg>, device: &Device) -> DType {
    match kind {
        Some(k) => k.dtype(),
        None if device.is_cuda() => DType::BF16,
        None => DType::F32,
    }
}

//! Plumbing of the fused kernels: the fat binaries that `build.rs` compiles from `kernels/*.cu`,
//! loaded once per device; raw device pointers of tensors; kernel launches with their arguments.
//!
//! Every launch goes through [`Launch::run`], which counts it ([`launches`]), so the benchmark
//! reports launches per token by counting, not by estimate. `run` is an `unsafe fn`: a launch
//! reads and writes raw device addresses, and only its caller can vouch that each one addresses
//! live memory of the size the kernel assumes. Integer arguments are converted with checks; a
//! value that does not fit makes `run` fail before anything is launched.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaStream, DevicePtr, LaunchArgs, LaunchConfig};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{DType, Device, Storage, Tensor};

use crate::error::{Error, Result};

mod bins {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// One compiled `kernels/*.cu` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    Cast,
    Decode,
    GatedAct,
    MambaStep,
    MambaTrain,
    Megakernel,
    MoeTrain,
    Optim,
    Prefill,
    Qgemv,
    RmsNorm,
    Rows,
    Sample,
    Scan,
    Sinkhorn,
    Xent,
}

impl Module {
    fn image(self) -> &'static [u8] {
        match self {
            Self::Cast => bins::CAST,
            Self::Decode => bins::DECODE,
            Self::GatedAct => bins::GATED_ACT,
            Self::MambaStep => bins::MAMBA_STEP,
            Self::MambaTrain => bins::MAMBA_TRAIN,
            Self::Megakernel => bins::MEGAKERNEL,
            Self::MoeTrain => bins::MOE_TRAIN,
            Self::Optim => bins::OPTIM,
            Self::Prefill => bins::PREFILL,
            Self::Qgemv => bins::QGEMV,
            Self::RmsNorm => bins::RMS_NORM,
            Self::Rows => bins::ROWS,
            Self::Sample => bins::SAMPLE,
            Self::Scan => bins::SCAN,
            Self::Sinkhorn => bins::SINKHORN,
            Self::Xent => bins::XENT,
        }
    }
}

type FuncKey = (DeviceId, Module, String);

#[derive(Default)]
struct Cache {
    modules: HashMap<(DeviceId, Module), std::sync::Arc<CudaModule>>,
    funcs: HashMap<FuncKey, CudaFunction>,
}

static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// Kernel launches made through [`Launch::run`] since the process started.
pub fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

fn internal(msg: impl Into<String>) -> Error {
    Error::Invalid(format!("GPU kernels: {}", msg.into()))
}

/// The CUDA device of a candle device.
pub fn cuda_device(dev: &Device) -> Result<&CudaDevice> {
    Ok(dev.as_cuda_device()?)
}

/// Our error as candle's (inside candle's custom-op callbacks).
pub fn to_candle(e: Error) -> candle_core::Error {
    match e {
        Error::Candle(c) => c,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

/// [`storage_ptr`] of an f32 storage (any other dtype is an error naming `what`).
pub fn f32_ptr(s: &candle_core::CudaStorage, l: &candle_core::Layout, what: &str) -> candle_core::Result<u64> {
    if s.dtype() != DType::F32 {
        candle_core::bail!("{what}: the inputs must be f32, got {:?}", s.dtype());
    }
    storage_ptr(s, l, what)
}

/// The device address of a contiguous storage's first element (inside candle's custom-op
/// callbacks); `what` names the op in the error for a strided or unsupported input.
pub fn storage_ptr(s: &candle_core::CudaStorage, l: &candle_core::Layout, what: &str) -> candle_core::Result<u64> {
    if !l.is_contiguous() {
        candle_core::bail!("{what}: the inputs must be contiguous");
    }
    let stream = s.device().cuda_stream();
    let base = match s.dtype() {
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::BF16 => s.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        DType::F16 => s.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        DType::U32 => s.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        other => candle_core::bail!("{what}: no kernel for {other:?}"),
    };
    Ok(base + (l.start_offset() * s.dtype().size_in_bytes()) as u64)
}

/// Loads (once per device) and returns the kernel `name` of module `m`.
pub fn func(dev: &CudaDevice, m: Module, name: &str) -> Result<CudaFunction> {
    let lock = CACHE.get_or_init(|| Mutex::new(Cache::default()));
    let mut cache = lock.lock().map_err(|_| internal("kernel cache lock poisoned"))?;
    let key = (dev.id(), m, name.to_string());
    if let Some(f) = cache.funcs.get(&key) {
        return Ok(f.clone());
    }
    let module = match cache.modules.get(&(dev.id(), m)) {
        Some(md) => md.clone(),
        None => {
            let md = dev.cuda_stream().context().load_module(Ptx::from_binary(m.image().to_vec())).w()?;
            cache.modules.insert((dev.id(), m), md.clone());
            md
        }
    };
    let f = module.load_function(name).w()?;
    cache.funcs.insert(key, f.clone());
    Ok(f)
}

/// The kernel-name suffix of a dtype.
pub fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => Err(internal(format!("no kernels for dtype {other:?}; use f32, bf16 or f16"))),
    }
}

/// The device address of a contiguous CUDA tensor's first element.
pub fn dptr(t: &Tensor) -> Result<u64> {
    let (st, layout) = t.storage_and_layout();
    if !layout.is_contiguous() {
        return Err(internal(format!("a kernel input of shape {:?} is not contiguous", t.dims())));
    }
    let Storage::Cuda(cs) = &*st else {
        return Err(internal("a kernel input is not on the GPU"));
    };
    let stream = cs.device().cuda_stream();
    let base = match t.dtype() {
        DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::BF16 => cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        DType::I64 => cs.as_cuda_slice::<i64>()?.device_ptr(&stream).0,
        DType::U8 => cs.as_cuda_slice::<u8>()?.device_ptr(&stream).0,
        DType::F64 => cs.as_cuda_slice::<f64>()?.device_ptr(&stream).0,
        other => return Err(internal(format!("no pointer for dtype {other:?}"))),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

/// `Some(dptr)` of an optional tensor, else 0 (a null pointer for the kernel).
pub fn dptr_opt(t: Option<&Tensor>) -> Result<u64> {
    t.map_or(Ok(0), dptr)
}

/// An uninitialised tensor (every element is written by the kernel that fills it).
pub fn empty(shape: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
    // SAFETY: callers launch a kernel that writes every element before anything reads it.
    Ok(unsafe { Tensor::empty(shape, dtype, dev) }?)
}

/// A kernel's params struct (`crate::ops::params`) as a launch holds it: the one argument of
/// the kernel, passed by value (the driver copies the struct at launch). Implemented by the
/// `params!` macro for the structs of `crate::ops::params` only.
pub trait KernelParams: std::fmt::Debug + Send + Sync {
    /// Pushes the struct onto cudarc's argument list.
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>);
    /// The struct's address, for `cuLaunchKernelEx`'s argument array.
    fn as_arg(&self) -> *mut std::ffi::c_void;
}

/// A kernel with its params struct and launch shape, ready to run (and to run again: the decode
/// step builds its launches once and replays them).
#[derive(Debug, Clone)]
pub struct Launch {
    pub func: CudaFunction,
    /// The kernel's one argument, its params struct (`crate::ops::params`); `None` until
    /// [`Launch::params`] sets it (then `run` refuses to launch).
    pub params: Option<std::sync::Arc<dyn KernelParams>>,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem: u32,
    /// Launch with programmatic dependent launch (the kernel may start while the previous one
    /// finishes; it waits with `griddepcontrol.wait`).
    pub pdl: bool,
    /// Launch cooperatively: the driver refuses the launch unless every block can be resident at
    /// once (the megakernel's blocks wait on each other).
    pub cooperative: bool,
    /// A short label (profiles).
    pub label: &'static str,
}

impl Launch {
    pub fn new(func: CudaFunction, grid: (u32, u32, u32), block: u32, smem: u32) -> Self {
        Self {
            func,
            params: None,
            grid,
            block,
            smem,
            pdl: false,
            cooperative: false,
            label: "",
        }
    }
    pub fn pdl(mut self, on: bool) -> Self {
        self.pdl = on;
        self
    }
    /// See [`Launch::cooperative`].
    pub fn cooperative(mut self, on: bool) -> Self {
        self.cooperative = on;
        self
    }
    pub fn label(mut self, l: &'static str) -> Self {
        self.label = l;
        self
    }
    /// The kernel's params struct: the twin of the struct its `kernels/*.cu` declaration takes
    /// by value (`crate::ops::params`, `kernels/params.cuh`).
    pub fn params<P: KernelParams + 'static>(mut self, p: P) -> Self {
        self.params = Some(std::sync::Arc::new(p));
        self
    }

    /// Enqueues the kernel on `stream` (asynchronous). Fails without launching when no params
    /// struct was set.
    ///
    /// # Safety
    /// The params struct must be the one the kernel's declaration in `kernels/*.cu` takes, and
    /// every pointer in it must address live device memory of the size the kernel reads or
    /// writes there (or be 0 where the kernel allows null), until the launch has completed on
    /// the stream.
    pub unsafe fn run(&self, stream: &CudaStream) -> Result<()> {
        let Some(params) = &self.params else {
            return Err(internal(format!("launch of {}: no params struct", self.label_or_name())));
        };
        if self.grid.0 == 0 || self.grid.1 == 0 || self.grid.2 == 0 {
            return Ok(());
        }
        if self.pdl || self.cooperative {
            // SAFETY: the caller's promise, as for this function.
            return unsafe { self.run_ex(stream, params.as_ref()) };
        }
        let mut b = stream.launch_builder(&self.func);
        params.push(&mut b);
        let cfg = LaunchConfig {
            grid_dim: self.grid,
            block_dim: (self.block, 1, 1),
            shared_mem_bytes: self.smem,
        };
        // SAFETY: the caller's promise (see `# Safety`).
        unsafe { b.launch(cfg) }.w()?;
        LAUNCHES.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn label_or_name(&self) -> String {
        match self.label {
            "" => format!("{:?}", self.func),
            l => l.to_string(),
        }
    }

    /// cuLaunchKernelEx with the programmatic-stream-serialization and/or cooperative attribute.
    ///
    /// # Safety
    /// As for [`Launch::run`].
    unsafe fn run_ex(&self, stream: &CudaStream, params: &dyn KernelParams) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let mut args = [params.as_arg()];
        // SAFETY: an all-zero attribute is valid (id 0 = ignore, value bytes unused).
        let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
        let mut n_attrs = 0;
        if self.pdl {
            attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[n_attrs].value.programmaticStreamSerializationAllowed = 1;
            n_attrs += 1;
        }
        if self.cooperative {
            attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
            attrs[n_attrs].value.cooperative = 1;
            n_attrs += 1;
        }
        let cfg = sys::CUlaunchConfig {
            gridDimX: self.grid.0,
            gridDimY: self.grid.1,
            gridDimZ: self.grid.2,
            blockDimX: self.block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: self.smem,
            hStream: stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: n_attrs as u32,
        };
        stream.context().bind_to_thread().w()?;
        // SAFETY: args holds the address of the params struct, which `params` keeps alive across
        // the call (the driver copies it at launch); the struct is the kernel's declared argument.
        unsafe { sys::cuLaunchKernelEx(&cfg, self.func.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .w()?;
        LAUNCHES.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Number of streaming multiprocessors of the device.
pub fn sm_count(dev: &CudaDevice) -> Result<u32> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let n = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(n.max(1) as u32)
}

/// The device's compute capability (major, minor), e.g. (9, 0) for an H100 or H200.
pub fn compute_capability(dev: &CudaDevice) -> Result<(u32, u32)> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let ctx = dev.cuda_stream().context().clone();
    let major = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    let minor = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .w()?;
    Ok((major.max(0) as u32, minor.max(0) as u32))
}

/// (free, total) bytes of device memory.
pub fn mem_info(dev: &CudaDevice) -> Result<(usize, usize)> {
    dev.cuda_stream().context().bind_to_thread().w()?;
    Ok(candle_core::cuda_backend::cudarc::driver::result::mem_get_info().w()?)
}

/// Waits for all work queued on the device's stream.
pub fn synchronize(dev: &CudaDevice) -> Result<()> {
    Ok(dev.cuda_stream().synchronize().w()?)
}

/// Blocks of `threads` threads that cover `n` items, one per thread, capped at `cap`.
pub fn blocks_for(n: usize, threads: u32, cap: u32) -> u32 {
    (n.div_ceil(threads as usize) as u32).clamp(1, cap.max(1))
}

/// `name`, a refusing `cpu_fwd` and `bwd` of a candle `CustomOp3` that runs on CUDA only (the CPU
/// takes the op's tensor-op twin before the op is ever built); `bwd` calls the op's own
/// `fn backward(&self, a, b, c, grad) -> Result<(Tensor, Tensor, Tensor)>`, the gradients of its
/// three inputs.
macro_rules! cuda_only_op3 {
    ($name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!(concat!(
                "the ",
                $name,
                " op runs on CUDA only; the CPU takes the tensor-op path"
            ))
        }

        fn bwd(
            &self,
            a: &candle_core::Tensor,
            b: &candle_core::Tensor,
            c: &candle_core::Tensor,
            _res: &candle_core::Tensor,
            grad: &candle_core::Tensor,
        ) -> candle_core::Result<(
            Option<candle_core::Tensor>,
            Option<candle_core::Tensor>,
            Option<candle_core::Tensor>,
        )> {
            self.backward(a, b, c, grad)
                .map(|(x, y, z)| (Some(x), Some(y), Some(z)))
                .map_err(crate::ops::cuda::to_candle)
        }
    };
}
pub(crate) use cuda_only_op3;

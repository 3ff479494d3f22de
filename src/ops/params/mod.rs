//! Typed launch parameters of the CUDA kernels: one `#[repr(C)]` struct per kernel (or per family
//! of kernels sharing a signature, such as the `_f32`/`_bf16`/`_f16` variants), the twin of the C
//! struct of the same name in `kernels/params.cuh`. A kernel takes its struct by value
//! (`__global__ void k(const KParams p)`), and the launch passes it as its one argument
//! (`crate::ops::cuda::Launch::new(.., &params)`), so each argument list is written once per
//! side and the two sides are compared field by field by `tests/kernel_params.rs` (names, order,
//! C types, offsets and sizes).
//!
//! Conventions: pointers are `u64` device addresses (`const T*` / `T*` in C; 0 is a null
//! pointer), `int` is `i32`, `long long` is `i64`, `unsigned long long` is `u64`, `unsigned int`
//! is `u32`; field names are the C names (hence some upper-case ones, `W`, `K`, `A_log`). Fields
//! are ordered 8-byte ones first, so neither side pads between fields. Sizes that come from
//! `usize` go through [`to_i32`] / [`to_i64`], which name the value that does not fit.
//!
//! The structs live here, outside `ops::cuda`, so that the layout test runs without CUDA.
#![allow(non_snake_case)]

use crate::error::{Error, Result};

mod decode;
mod elementwise;
mod scan;

pub use decode::*;
pub use elementwise::*;
pub use scan::*;

/// One field of a params struct, as the Rust side declares it.
#[derive(Debug, Clone, Copy)]
pub struct FieldLayout {
    /// The field's name, the same on both sides.
    pub name: &'static str,
    /// Its C type, spelled as in `kernels/params.cuh` (without `__restrict__`).
    pub c_type: &'static str,
    /// Its Rust type, as written in the struct.
    pub rust_type: &'static str,
    /// Byte offset in the Rust struct.
    pub offset: usize,
    /// Byte size of the Rust field.
    pub size: usize,
}

/// One params struct, as the Rust side declares it.
#[derive(Debug, Clone, Copy)]
pub struct StructLayout {
    /// The struct's name, the same on both sides.
    pub name: &'static str,
    /// `size_of` of the Rust struct.
    pub size: usize,
    /// `align_of` of the Rust struct.
    pub align: usize,
    /// The fields in declaration order.
    pub fields: &'static [FieldLayout],
}

/// Declares `#[repr(C)]` params structs with their C field types, their `DeviceRepr` impl (with
/// feature `cuda`) and a const of the given name, their layouts, which the layout test compares
/// with the C header. Each field is `name: "C type" => RustType`.
macro_rules! params {
    ($list:ident; $(
        $(#[$m:meta])*
        struct $name:ident {
            $( $(#[$fm:meta])* $f:ident : $ct:literal => $t:ty ),* $(,)?
        }
    )*) => {
        $(
            $(#[$m])*
            #[repr(C)]
            #[derive(Debug, Clone, Copy, Default, PartialEq)]
            pub struct $name {
                $( $(#[$fm])* pub $f: $t, )*
            }

            // SAFETY: a #[repr(C)] struct of integers, floats and nested params structs, laid out
            // as the C struct of the same name (checked by tests/kernel_params.rs); any bit
            // pattern is valid for the kernel to read.
            #[cfg(feature = "cuda")]
            #[allow(unsafe_code)]
            unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for $name {}

            #[cfg(feature = "cuda")]
            impl $crate::ops::cuda::KernelParams for $name {
                fn push<'a>(&'a self, b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>) {
                    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
                    b.arg(self);
                }
                fn as_arg(&self) -> *mut std::ffi::c_void {
                    std::ptr::from_ref(self).cast_mut().cast()
                }
            }
        )*

        /// The layouts of this file's params structs (for the layout test).
        pub(super) const $list: &[$crate::ops::params::StructLayout] = &[$(
            $crate::ops::params::StructLayout {
                name: stringify!($name),
                size: std::mem::size_of::<$name>(),
                align: std::mem::align_of::<$name>(),
                fields: &[$(
                    $crate::ops::params::FieldLayout {
                        name: stringify!($f),
                        c_type: $ct,
                        rust_type: stringify!($t),
                        offset: std::mem::offset_of!($name, $f),
                        size: std::mem::size_of::<$t>(),
                    }
                ),*],
            }
        ),*];
    };
}
pub(crate) use params;

/// Every params struct of every kernel family, for the layout test.
pub fn all() -> Vec<StructLayout> {
    [scan::SCAN, elementwise::ELEMENTWISE, decode::DECODE].concat()
}

/// `v` as a kernel's `int`; `what` names the value in the error when it does not fit.
pub fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Invalid(format!(
            "GPU kernels: {what} = {v} does not fit a kernel int (at most {})",
            i32::MAX
        ))
    })
}

/// `v` as a kernel's `long long`; `what` names the value in the error when it does not fit.
pub fn to_i64(v: usize, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Invalid(format!("GPU kernels: {what} = {v} does not fit a kernel long long")))
}

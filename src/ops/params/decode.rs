//! Params of the decode and prefill kernels (kernels/decode.cuh, kernels/decode.cu,
//! kernels/sample.cu, kernels/prefill.cu).

use super::params;

params! { DECODE; }

//! The experts' activation (SPEC §3 step 4): which function, its code in the kernels, and the
//! tensor-op form every kernel is the twin of.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The activation of the expert's gate half; `config.json`'s `expert_activation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// Exact (erf) GELU: what Zyphra's inference code runs.
    #[default]
    Gelu,
    /// SiLU: what Megatron's `--swiglu` trains with.
    Silu,
}

impl Activation {
    /// The `act` argument of the kernels (`act_f` in kernels/common.cuh): 0 GELU, 1 SiLU.
    pub fn code(self) -> i32 {
        match self {
            Self::Gelu => 0,
            Self::Silu => 1,
        }
    }

    /// The activation as tensor ops (any shape, any float dtype).
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Gelu => x.gelu_erf()?,
            Self::Silu => candle_nn::ops::silu(x)?,
        })
    }
}

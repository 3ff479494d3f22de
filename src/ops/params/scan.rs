//! Params of the selective-scan kernels (kernels/scan.cu, kernels/mamba_train.cu) and of the
//! Mamba decode step (kernels/mamba_step.cu).

use super::params;

params! {
    SCAN;

    /// The sizes of the selective-scan kernels: B sequences of L tokens, di channels, N states,
    /// chunks of LC tokens, Q chunks (Q = ceil(L / LC)).
    struct ScanIn {
        Bn: "int" => i32,
        L: "int" => i32,
        di: "int" => i32,
        N: "int" => i32,
        LC: "int" => i32,
        Q: "int" => i32,
    }
}

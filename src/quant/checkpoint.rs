//! Quantised checkpoints (written by `blackmamba quantize`).

//! Atomic file writes: every file this program writes goes to a sibling temp file first and is
//! renamed over the target, so a crash or a full disk never leaves a half-written file under the
//! real name. A module of its own so that readers and writers of checkpoints can share it without
//! importing each other.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A sibling temp path for atomic writes: `.NAME.tmpPID` in the same folder (same file system, so
/// the final rename is atomic).
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

/// Writes bytes atomically (temp file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

//! The local state directories of partitions and their marked siblings: a restore or a standby refresh
//! writes a scratch sibling and swaps it into place, so a crash never leaves a half-written directory
//! where the partition opens its state — only marked siblings, removed at the next start.

use std::path::{Path, PathBuf};

use crate::error::{ProcessorError, ProcessorResult};

/// Marks the scratch directory a checkpoint is restored into before it is renamed into place.
pub(crate) const RESTORING: &str = ".restoring-";
/// Marks a local state directory that failed to open and was moved aside.
pub(crate) const UNREADABLE: &str = ".unreadable-";

/// A new sibling of `dir` named `{dir}{mark}{random}`.
pub(crate) fn sibling(dir: &Path, mark: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!("{name}{mark}{:016x}", rand::random::<u64>()))
}

/// Removes the siblings of `dir` marked `mark` (scratch left by a crash).
pub(crate) fn remove_leftovers(dir: &Path, mark: &str) {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return;
    };
    let prefix = format!("{}{mark}", name.to_string_lossy());
    if let Ok(entries) = std::fs::read_dir(parent) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Marks the scratch directory a standby refresh restores into.
pub(crate) const STANDBY_NEXT: &str = ".standby-next-";
/// Marks the standby copy being replaced.
pub(crate) const STANDBY_OLD: &str = ".standby-old-";

/// Moves `next` into `dir`'s place (the old `dir` aside first, then deleted). A crash in between leaves
/// marked siblings that the next start removes.
pub(crate) fn replace_dir(dir: &Path, next: &Path) -> ProcessorResult<()> {
    if dir.exists() {
        let old = sibling(dir, STANDBY_OLD);
        std::fs::rename(dir, &old).map_err(ProcessorError::io(dir))?;
        std::fs::rename(next, dir).map_err(ProcessorError::io(next))?;
        std::fs::remove_dir_all(&old).map_err(ProcessorError::io(&old))?;
    } else {
        std::fs::rename(next, dir).map_err(ProcessorError::io(next))?;
    }
    Ok(())
}

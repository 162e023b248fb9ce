//! The agent's small state files (guards, changed sysctls, the private interface) written so
//! that a crash or a power cut leaves either the old content or the new, never a half-written
//! file: a temporary file beside it, synced, then renamed over it. Depends on `std` only.

use std::io::Write as _;
use std::path::Path;

/// Replace the file at `path` with `text` in one rename; the temporary file is `path` with the
/// extension `tmp`, in the same directory (so the rename stays on one file system).
pub fn replace(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_leaves_the_new_content_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guards");
        replace(&path, "old\n").unwrap();
        replace(&path, "new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        assert!(!path.with_extension("tmp").exists());
    }
}

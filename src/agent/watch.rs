//! Watches registry files for changes (including editors' and `kubectl`'s replace-by-rename) and
//! turns them into a tokio channel of "something changed" signals.
//!
//! Depends on `notify` and tokio only.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::AgentError;

/// Keeps the watches alive; dropping it stops them.
pub struct FileWatcher {
    _inner: notify::RecommendedWatcher,
}

impl FileWatcher {
    /// Watch `files`. The parent directories are watched, so a file replaced by a rename (or
    /// created later) is seen too.
    pub fn new(files: &[PathBuf]) -> Result<(Self, mpsc::Receiver<()>), AgentError> {
        let (tx, rx) = mpsc::channel(64);
        let names: BTreeSet<OsString> = files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_owned()))
            .collect();
        let mut inner = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                let ours = ev
                    .paths
                    .iter()
                    .any(|p| p.file_name().is_some_and(|n| names.contains(n)));
                if ours && !ev.kind.is_access() {
                    // A full channel already holds a pending signal: dropping this one is fine.
                    let _ = tx.try_send(());
                }
            }
        })
        .map_err(|e| AgentError::Watch {
            path: String::new(),
            message: e.to_string(),
        })?;
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .map(|f| match f.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => Path::new(".").to_path_buf(),
            })
            .collect();
        for d in dirs {
            inner
                .watch(&d, RecursiveMode::NonRecursive)
                .map_err(|e| AgentError::Watch {
                    path: d.display().to_string(),
                    message: e.to_string(),
                })?;
        }
        Ok((FileWatcher { _inner: inner }, rx))
    }
}

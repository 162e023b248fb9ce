//! Watches registry files for changes (including editors' and `kubectl`'s replace-by-rename) and
//! tells how each changed: written in place (its content may be half-written until the writer
//! closes it), or replaced by a rename onto its name (its content is complete). The events are
//! folded into one [`Changes`] record under a lock and announced on a channel of capacity one, so
//! a burst of writes costs no memory and loses nothing.
//!
//! Depends on `notify` and tokio only.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::AgentError;

/// Keeps the watches alive; dropping it stops them.
pub struct FileWatcher {
    _inner: notify::RecommendedWatcher,
}

/// What happened to the watched files since the last look.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    /// Events seen (of every kind below).
    pub events: u64,
    /// A file was written, truncated, created, removed or renamed away: what it holds may be
    /// a writer's unfinished work.
    pub in_place: bool,
    /// A file was replaced by a rename onto its name.
    pub replaced: bool,
    /// A file was written and its writer has not closed it yet (as far as the events tell):
    /// the state now, not since the last look.
    pub writing: bool,
}

/// The receiving end of a [`FileWatcher`]: waits for changes and takes them.
pub struct ChangeFeed {
    signal: mpsc::Receiver<()>,
    state: Arc<Mutex<Changes>>,
}

impl ChangeFeed {
    /// Wait until something changed, then take everything that did; `None` once the watcher
    /// is gone.
    pub async fn next(&mut self) -> Option<Changes> {
        self.signal.recv().await?;
        Some(self.take())
    }

    /// Take what changed since the last look (`events == 0`: nothing) without waiting.
    pub fn take(&mut self) -> Changes {
        while self.signal.try_recv().is_ok() {}
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let out = *s;
        *s = Changes {
            writing: s.writing,
            ..Changes::default()
        };
        out
    }
}

/// Fold one event of a watched file into `state` and announce it.
fn note(state: &Mutex<Changes>, tx: &mpsc::Sender<()>, kind: &EventKind) {
    {
        let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
        match kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => s.writing = false,
            EventKind::Access(_) => return,
            EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => {
                s.replaced = true;
                s.writing = false;
            }
            EventKind::Modify(ModifyKind::Metadata(_)) => s.in_place = true,
            EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_) => {
                s.in_place = true;
                s.writing = false;
            }
            EventKind::Modify(_) | EventKind::Create(_) | EventKind::Any | EventKind::Other => {
                s.in_place = true;
                s.writing = true;
            }
        }
        s.events += 1;
    }
    // A full channel already holds a pending signal: the state above is read with it.
    let _ = tx.try_send(());
}

impl FileWatcher {
    /// Watch `files`. The parent directories are watched, so a file replaced by a rename (or
    /// created later) is seen too.
    pub fn new(files: &[PathBuf]) -> Result<(Self, ChangeFeed), AgentError> {
        let (tx, signal) = mpsc::channel(1);
        let state = Arc::new(Mutex::new(Changes::default()));
        let names: BTreeSet<OsString> = files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_owned()))
            .collect();
        let shared = state.clone();
        let mut inner = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(ev) = res else { return };
            // A rename names the destination last; any other event names the file itself.
            let ours = match ev.kind {
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => ev.paths.last(),
                _ => ev.paths.first(),
            }
            .is_some_and(|p| p.file_name().is_some_and(|n| names.contains(n)));
            let moved_away = matches!(
                ev.kind,
                EventKind::Modify(ModifyKind::Name(RenameMode::Both))
            ) && ev
                .paths
                .first()
                .is_some_and(|p| p.file_name().is_some_and(|n| names.contains(n)));
            if ours {
                note(&shared, &tx, &ev.kind);
            }
            if moved_away && !ours {
                note(
                    &shared,
                    &tx,
                    &EventKind::Remove(notify::event::RemoveKind::File),
                );
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
        Ok((FileWatcher { _inner: inner }, ChangeFeed { signal, state }))
    }
}

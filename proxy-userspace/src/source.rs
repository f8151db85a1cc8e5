//! Where the Kubernetes objects come from, behind one interface: a source notifies that something
//! changed, and the sync loop takes a snapshot of the current objects when it syncs — so a burst of
//! changes costs one snapshot, not one per change. Two sources: the API server (`kube_source`) and
//! `--objects`, a YAML file or directory re-read whenever it changes.

use std::{
    fs,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::objects::{self, Objects};

/// A running source.
pub struct Source {
    /// One message per change (coalesced: a pending notification is not repeated). Nothing is sent
    /// before the initial lists are complete.
    pub changes: mpsc::Receiver<()>,
    snapshot: Box<dyn Fn() -> Objects + Send>,
    tasks: Vec<JoinHandle<()>>,
}

impl Source {
    pub fn new(
        changes: mpsc::Receiver<()>,
        snapshot: Box<dyn Fn() -> Objects + Send>,
        tasks: Vec<JoinHandle<()>>,
    ) -> Self {
        Self { changes, snapshot, tasks }
    }

    /// The objects as they are now.
    pub fn snapshot(&self) -> Objects {
        (self.snapshot)()
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A notification channel: sending never blocks, and a pending notification absorbs later ones.
pub fn notifier() -> (mpsc::Sender<()>, mpsc::Receiver<()>) {
    mpsc::channel(1)
}

/// How often `--objects` is checked. Cheap: only names, sizes and modification times are read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// A fingerprint of the files under `path`; changes whenever one is added, removed or rewritten.
fn fingerprint(path: &Path) -> Result<u64> {
    let mut h = DefaultHasher::new();
    for file in objects::files(path)? {
        file.hash(&mut h);
        let meta = fs::metadata(&file)?;
        meta.len().hash(&mut h);
        meta.modified()?.hash(&mut h);
        // Same size within the same mtime tick is possible: the content decides.
        fs::read(&file)?.hash(&mut h);
    }
    Ok(h.finish())
}

/// The `--objects` source: the objects under `path`, re-read after every change.
pub fn files(path: PathBuf) -> Source {
    let (tx, rx) = notifier();
    let current = Arc::new(Mutex::new(Objects::default()));
    let latest = current.clone();
    let task = tokio::spawn(async move {
        let mut last = None;
        loop {
            match fingerprint(&path) {
                Ok(fp) if Some(fp) != last => match objects::load(&path) {
                    Ok(objs) => {
                        last = Some(fp);
                        *latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = objs;
                        let _ = tx.try_send(());
                    }
                    Err(e) => log::error!("reading {}: {e:#}", path.display()),
                },
                Ok(_) => {}
                // Keep the last good state: a file being replaced can vanish for a moment.
                Err(e) => log::warn!("checking {}: {e:#}", path.display()),
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    });
    let snapshot = Box::new(move || current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone());
    Source::new(rx, snapshot, vec![task])
}

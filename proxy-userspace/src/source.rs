//! The `--objects` source: a YAML file or directory, re-read whenever it changes.

use std::{
    fs,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;
use tokio::sync::mpsc;

use crate::objects::{self, Objects};

/// How often the path is checked. Cheap: only names, sizes and modification times are read.
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

/// Sends the objects under `path` now and after every change, until `tx` is closed.
pub async fn watch(path: PathBuf, tx: mpsc::Sender<Objects>) {
    let mut last = None;
    loop {
        match fingerprint(&path) {
            Ok(fp) if Some(fp) != last => match objects::load(&path) {
                Ok(objs) => {
                    last = Some(fp);
                    if tx.send(objs).await.is_err() {
                        return;
                    }
                }
                Err(e) => log::error!("reading {}: {e:#}", path.display()),
            },
            Ok(_) => {}
            // Keep the last good state: a file being replaced can vanish for a moment.
            Err(e) => log::warn!("checking {}: {e:#}", path.display()),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

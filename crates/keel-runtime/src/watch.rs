//! Watching files for changes by polling their contents. Polling (not inotify) also sees a
//! file replaced by rename, as configuration managers, certificate managers and
//! Kubernetes ConfigMaps do.

use std::path::PathBuf;
use std::time::Duration;

use crate::shutdown::Shutdown;

pub struct FileWatch {
    files: Vec<PathBuf>,
    last: Vec<Option<Vec<u8>>>,
}

impl FileWatch {
    /// Remembers the files' current contents.
    pub fn new(files: Vec<PathBuf>) -> Self {
        let last = read(&files);
        Self { files, last }
    }

    /// Waits until any file's contents differ from the last seen, checking every
    /// `interval`; false once `shutdown` fires.
    pub async fn changed(&mut self, interval: Duration, shutdown: &Shutdown) -> bool {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.wait() => return false,
            }
            let now = read(&self.files);
            if now != self.last {
                self.last = now;
                return true;
            }
        }
    }
}

fn read(files: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    files.iter().map(|file| std::fs::read(file).ok()).collect()
}

//! One host lock so two stages (or two installs) never mutate a host at the same time.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

use crate::error::{Result, StageError};

/// Host path of the lock file (relative to the host root): the one upstream kata-deploy 4.x
/// takes too, so our stages and an upstream install on the same node take turns. It lives in
/// /run/lock, the one directory the chart mounts writable for it (stage.hostMounts: precise).
pub const LOCK_PATH: &str = "/run/lock/kata-deploy.lock";

/// A held host lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct HostLock {
    _file: File,
    path: PathBuf,
}

impl HostLock {
    /// Takes the exclusive lock at `path`, waiting at most `wait`.
    pub fn acquire(path: &Path, wait: Duration) -> Result<HostLock> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StageError::io("create directory", parent, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| StageError::io("open lock", path, e))?;
        let start = Instant::now();
        let mut logged = false;
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    return Ok(HostLock {
                        _file: file,
                        path: path.to_path_buf(),
                    })
                }
                Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {
                    if start.elapsed() >= wait {
                        return Err(StageError::LockTimeout {
                            path: path.to_path_buf(),
                            waited_secs: wait.as_secs(),
                        });
                    }
                    if !logged {
                        tracing::info!(lock = %path.display(), "host lock busy; waiting for the other kata-deploy stage");
                        logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(StageError::io("lock", path, e.into())),
            }
        }
    }

    /// Where the lock lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_times_out_with_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("run/kata-deploy.lock");
        let held = HostLock::acquire(&p, Duration::from_secs(1)).unwrap();
        let e = HostLock::acquire(&p, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, StageError::LockTimeout { .. }));
        assert!(e.to_string().contains("kata-deploy.lock"));
        drop(held);
        HostLock::acquire(&p, Duration::from_millis(300)).unwrap();
    }
}

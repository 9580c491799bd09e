//! One `serve` per cache dir: an exclusive `flock` on `<cache-dir>/lock`,
//! taken before anything in the dir is touched (the sweep of `tmp/` would
//! delete another process's fills in flight, and two LRU indexes over one
//! dir would each evict what the other counts).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

/// Why the cache dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "cache dir {} is in use by another regproxy (pid {}); only one process may serve a cache dir",
        dir.display(),
        pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
    )]
    Held { dir: PathBuf, pid: Option<u32> },
    #[error("cannot lock cache dir {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The exclusive hold of a cache dir, for as long as this value lives.
///
/// The kernel releases a `flock` when the last descriptor of its open file
/// closes, so a crashed or killed process leaves no stale lock behind; the
/// pid in the file is only for the error message a second process prints
/// (it is not trusted for anything else, and may be stale).
///
/// Zero-downtime handover (not implemented yet): a successor process would
/// wait for this lock with a blocking `flock(LOCK_EX)` instead of failing,
/// while the old process drains and then drops its `CacheLock`; or the old
/// process would hand its descriptor over (SCM_RIGHTS) with its listeners.
/// Either way everything that needs the dir to itself (the `tmp/` sweep, the
/// index rebuild) already happens after [`CacheLock::acquire`], so only this
/// type has to learn to wait or to be handed over.
#[derive(Debug)]
pub struct CacheLock {
    _file: File,
}

impl CacheLock {
    /// File name of the lock inside the cache dir.
    pub const FILE: &'static str = "lock";

    /// Takes the lock of `dir` (created if missing) or fails at once, without
    /// changing anything in a dir another process holds.
    pub fn acquire(dir: &Path) -> Result<CacheLock, LockError> {
        let path = dir.join(Self::FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // No truncate on open: the holder's pid must survive our attempt.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    dir: dir.to_owned(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(e) => return Err(io(e.into())),
        }
        // The pid is only for the message a second process prints: failing
        // to write it (a full disk) is no reason not to serve.
        let written = file
            .set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "could not write our pid into the lock file");
        }
        Ok(CacheLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let first = CacheLock::acquire(&dir).expect("a fresh dir locks");
        // flock locks belong to the open file, so a second open in the same
        // process conflicts just as another process would.
        match CacheLock::acquire(&dir) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("a held dir should be refused, got {other:?}"),
        }
        drop(first);
        CacheLock::acquire(&dir).expect("the lock is free again once dropped");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

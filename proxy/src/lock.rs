//! One primary `serve` per cache dir: an exclusive `flock` on
//! `<cache-dir>/lock`, taken before anything in the dir is touched. A
//! successor on the same listen address (a handover) serves beside the
//! holder and waits for it; any other second process is refused.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::{flock, FlockOperation};
use tokio::sync::watch;

/// Why the cache dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "cache dir {} is in use by another regproxy (pid {}{}); only one process may serve a cache dir, \
         or a successor listening on the same address",
        dir.display(),
        pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
        listen.as_ref().map_or_else(String::new, |l| format!(", listening on {l}"))
    )]
    Held {
        dir: PathBuf,
        pid: Option<u32>,
        listen: Option<String>,
    },
    #[error("cannot lock cache dir {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The hold of a cache dir: the *primary* lock, or the wait for it.
///
/// The kernel releases a `flock` when the last descriptor of its open file
/// closes, so a crashed or killed process leaves no stale lock behind. The
/// file holds the holder's pid and `--listen` address: the pid for messages
/// only, the address to tell a successor (same address, so the same node
/// role: it shares the listener with `SO_REUSEPORT`) from a second proxy
/// pointed at the same dir by mistake, which is refused.
///
/// A successor serves beside the holder at once and waits for the lock in
/// the background ([`CacheLock::primary`]). What needs the dir to itself
/// (sweeping temp files of no live owner that are not in a per-process
/// dir, dropping orphaned sidecars, the index rebuilt to hold the cap over
/// what every process committed) waits for it; everything else is safe to
/// share (see the cache module).
#[derive(Debug)]
pub struct CacheLock {
    primary: watch::Receiver<bool>,
    /// The locked file, once this process holds the lock.
    _held: Arc<Mutex<Option<File>>>,
}

impl CacheLock {
    /// File name of the lock inside the cache dir.
    pub const FILE: &'static str = "lock";

    /// Takes the lock of `dir` (created if missing); if a process listening
    /// on `listen` holds it, waits for it in the background instead. Fails,
    /// without changing anything in the dir, when any other process holds it.
    pub fn acquire(dir: &Path, listen: SocketAddr) -> Result<CacheLock, LockError> {
        let path = dir.join(Self::FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = open(&path).map_err(io)?;
        let held = Arc::new(Mutex::new(None));
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                write_holder(&file, &path, listen);
                *held.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
                let (_, primary) = watch::channel(true);
                return Ok(CacheLock {
                    primary,
                    _held: held,
                });
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {}
            Err(e) => return Err(io(e.into())),
        }
        let (pid, holder) = read_holder(&file);
        // Port 0 binds a port of its own: no listener to share, no successor.
        if listen.port() == 0 || holder.as_deref() != Some(listen.to_string().as_str()) {
            return Err(LockError::Held {
                dir: dir.to_owned(),
                pid,
                listen: holder,
            });
        }
        tracing::info!(
            pid,
            "cache dir held by the regproxy this one replaces; serving beside it until it exits"
        );
        let (tx, primary) = watch::channel(false);
        let slot = Arc::clone(&held);
        let path2 = path.clone();
        // A thread of its own: the wait is a blocking `flock` as long as the
        // predecessor drains.
        std::thread::Builder::new()
            .name("cache-lock".into())
            .spawn(move || match flock(&file, FlockOperation::LockExclusive) {
                Ok(()) => {
                    write_holder(&file, &path2, listen);
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
                    let _ = tx.send(true);
                }
                Err(e) => tracing::error!(error = %e, "cannot wait for the cache dir lock"),
            })
            .map_err(io)?;
        Ok(CacheLock {
            primary,
            _held: held,
        })
    }

    /// Whether this process holds the lock now.
    pub fn is_primary(&self) -> bool {
        *self.primary.borrow()
    }

    /// Waits until this process holds the lock (at once if it does); for
    /// ever if waiting for it failed.
    pub async fn primary(&self) {
        let mut rx = self.primary.clone();
        if rx.wait_for(|p| *p).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    // No truncate on open: the holder's pid must survive our attempt.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Records this process as the holder. The record is only for other
/// processes' decisions and messages: failing to write it (a full disk) is
/// no reason not to serve.
fn write_holder(mut file: &File, path: &Path, listen: SocketAddr) {
    let written = file
        .set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| write!(file, "{}\n{listen}\n", std::process::id()));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "could not write our pid into the lock file");
    }
}

/// The holder's pid and listen address, as it recorded them. A holder that
/// has just taken the lock may not have written them yet: wait a little.
fn read_holder(mut file: &File) -> (Option<u32>, Option<String>) {
    for _ in 0..20 {
        let mut text = String::new();
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.read_to_string(&mut text);
        if text.ends_with('\n') {
            let mut lines = text.lines();
            let pid = lines.next().and_then(|l| l.trim().parse().ok());
            let listen = lines.next().map(|l| l.trim().to_owned());
            return (pid, listen);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "127.0.0.2:80";
    const B: &str = "127.0.0.3:80";

    #[test]
    fn a_second_proxy_on_another_address_is_refused_with_the_first_ones_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let first = CacheLock::acquire(&dir, A.parse().unwrap()).expect("a fresh dir locks");
        assert!(first.is_primary());
        // flock locks belong to the open file, so a second open in the same
        // process conflicts just as another process would.
        match CacheLock::acquire(&dir, B.parse().unwrap()) {
            Err(LockError::Held { pid, listen, .. }) => {
                assert_eq!(pid, Some(std::process::id()));
                assert_eq!(listen.as_deref(), Some(A));
            }
            other => panic!("a held dir should be refused, got {other:?}"),
        }
        drop(first);
        CacheLock::acquire(&dir, B.parse().unwrap()).expect("the lock is free again once dropped");
    }

    #[tokio::test]
    async fn a_successor_on_the_same_address_serves_beside_and_takes_over() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let first = CacheLock::acquire(&dir, A.parse().unwrap()).unwrap();
        let next = CacheLock::acquire(&dir, A.parse().unwrap()).expect("a successor is let in");
        assert!(!next.is_primary(), "the holder still runs");
        let waited = tokio::time::timeout(std::time::Duration::from_millis(200), next.primary());
        assert!(waited.await.is_err(), "no takeover while the holder runs");
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(60), next.primary())
            .await
            .expect("the successor takes over once the holder is gone");
        assert!(next.is_primary());
        match CacheLock::acquire(&dir, B.parse().unwrap()) {
            Err(LockError::Held { listen, .. }) => assert_eq!(listen.as_deref(), Some(A)),
            other => panic!("the successor holds the dir now, got {other:?}"),
        }
    }
}

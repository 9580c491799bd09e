//! What the processes that share a cache dir during a handover see of each
//! other: each writes only in a temp dir of its own, and finds the others'
//! fills in flight there.
//!
//! ```text
//! tmp/<id>/owner                 the pid; written once `tmp/<id>` is locked
//! tmp/<id>/<hex>-<size>.fill     a blob being filled, pre-sized, written in order
//! tmp/<id>/<hex>-<size>.written  how many of its bytes are final: 8 bytes, little-endian
//! tmp/<id>/<n>.part              other temp files (manifests, media types)
//! ```
//!
//! `<id>` is [`instance::id`]. A process holds an exclusive `flock` on its
//! temp dir for its whole life, so a dir whose lock can be taken, and that
//! has an `owner`, belongs to a process that is gone: any process may sweep
//! it. A dir without `owner` may be one being created (it is locked before
//! `owner` is written), and is left alone. Files directly in `tmp/` come from
//! versions before handovers and are swept only by the primary (the holder
//! of the cache dir's lock; see [`crate::lock`]).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

use std::io::Write;
use std::sync::Arc;

use super::{create_new, scan, Cache, Entry};
use crate::digest::Digest;
use crate::instance;

/// This process's temp dir, locked for as long as this value lives.
pub(super) struct OwnDir {
    pub path: PathBuf,
    _lock: File,
}

impl OwnDir {
    /// Creates and locks `tmp/<id>` under `root`, then marks it owned.
    pub fn create(root: &Path) -> io::Result<OwnDir> {
        let path = root.join(instance::TMP).join(instance::id());
        fs::create_dir_all(&path)?;
        let lock = File::open(&path)?;
        flock(&lock, FlockOperation::NonBlockingLockExclusive).map_err(io::Error::from)?;
        let owner = path.join(instance::OWNER);
        if let Err(e) = fs::write(&owner, format!("{}\n", std::process::id())) {
            // On a full disk the pid finds no room, but the file is made:
            // its being there is what marks the dir as owned.
            if !(super::disk::is_full(&e) && owner.is_file()) {
                return Err(e);
            }
        }
        Ok(OwnDir { path, _lock: lock })
    }
}

/// Whether the process owning the temp dir `dir` is alive: it holds the
/// dir's lock. A dir that cannot be opened counts as alive (nothing to do).
fn owner_alive(dir: &Path) -> bool {
    let Ok(f) = File::open(dir) else {
        return true;
    };
    match flock(&f, FlockOperation::NonBlockingLockShared) {
        // Ours for a moment: the owner is gone. Closing `f` lets go again.
        Ok(()) => false,
        Err(_) => true,
    }
}

/// Removes the temp dirs of processes that are gone and, for the primary,
/// files left directly in `tmp/` by older versions. Returns how many
/// entries were removed.
pub(super) fn sweep(root: &Path, primary: bool) -> usize {
    let Ok(entries) = fs::read_dir(root.join(instance::TMP)) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.filter_map(Result::ok) {
        let path = e.path();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        let name = e.file_name();
        let gone = if is_dir {
            name != instance::id() && path.join(instance::OWNER).is_file() && !owner_alive(&path)
        } else {
            primary
        };
        if !gone {
            continue;
        }
        let res = if is_dir {
            remove_dead_dir(&path)
        } else {
            fs::remove_file(&path)
        };
        match res {
            Ok(()) => removed += 1,
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "could not sweep a dead temp file")
            }
        }
    }
    removed
}

/// Removes a dead process's temp dir with its `owner` file last: a sweep
/// killed midway (a crash during start-up) leaves the dir still owned and
/// unlocked, so the next sweep finishes it. Removed all at once (in
/// listing order), it could lose `owner` first and keep the rest: a dir
/// without `owner` is taken for one being created and kept forever, with
/// up to a blob's bytes in it outside the cap.
fn remove_dead_dir(dir: &Path) -> io::Result<()> {
    let gone = |r: io::Result<()>| match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    let entries = match fs::read_dir(dir) {
        // Another process swept it meanwhile.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        r => r?,
    };
    for e in entries {
        let e = e?;
        if e.file_name() == instance::OWNER {
            continue;
        }
        let p = e.path();
        gone(if e.file_type()?.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        })?;
    }
    gone(fs::remove_file(dir.join(instance::OWNER)))?;
    gone(fs::remove_dir(dir))
}

/// A fill of a digest that another live process sharing the cache dir is
/// running now.
#[derive(Clone, Debug)]
pub struct SiblingFill {
    /// Its temp file, pre-sized to `size`.
    pub part: PathBuf,
    /// Where it publishes how many bytes are final.
    pub written: PathBuf,
    /// Its owner's temp dir, locked while the owner lives.
    pub owner: PathBuf,
    pub size: u64,
}

impl SiblingFill {
    /// Bytes of the fill that are on disk and final, as published.
    pub fn written(file: &File) -> io::Result<u64> {
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, 0)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Whether the fill can still make progress: its file is still in
    /// place and its owner alive.
    pub fn alive(&self) -> bool {
        self.part.exists() && owner_alive(&self.owner)
    }
}

/// File names of a blob fill's temp file and progress file.
pub(super) fn fill_names(d: &Digest, size: u64) -> (String, String) {
    let stem = format!("{}-{size}", d.hex());
    (format!("{stem}.fill"), format!("{stem}.written"))
}

/// The fill of `d` that a live sibling is running, if any. Cheap when this
/// process is alone: one directory listing.
pub(super) fn find(root: &Path, d: &Digest) -> Option<SiblingFill> {
    let prefix = format!("{}-", d.hex());
    for e in fs::read_dir(root.join(instance::TMP)).ok()?.flatten() {
        let owner = e.path();
        if e.file_name() == instance::id() || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(files) = fs::read_dir(&owner) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name();
            let Some(size) = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix)?.strip_suffix(".fill")?.parse().ok())
            else {
                continue;
            };
            let (_, written) = fill_names(d, size);
            let s = SiblingFill {
                part: f.path(),
                written: owner.join(written),
                owner: owner.clone(),
                size,
            };
            if s.written.exists() && owner_alive(&owner) {
                return Some(s);
            }
        }
    }
    None
}

/// What the cache does for processes sharing its dir.
impl Cache {
    /// Indexes content of `d` that is on disk but not in the index: a
    /// process sharing the dir committed it.
    pub(super) async fn adopt(self: &Arc<Self>, d: &Digest, manifest: bool) -> Option<Entry> {
        let path = self.path(d);
        let found = tokio::task::spawn_blocking(move || scan::on_disk(&path)).await;
        let mut e = found.ok()??;
        let evicted = {
            let mut st = self.lock();
            if let Some(now) = st.index.get(d) {
                e = *now;
            } else {
                e.generation = st.next_generation;
                st.next_generation += 1;
                st.index.put(d.clone(), e);
                st.committed += e.size;
                tracing::debug!(digest = %d, size = e.size, "found on disk, committed by another process");
            }
            let ev = self.evict_until(&mut st, 0);
            self.publish(&st);
            ev
        };
        self.unlink(evicted);
        (e.manifest || !manifest).then_some(e)
    }

    /// Called once this process holds the cache dir alone: sweeps what
    /// processes that are gone left in `tmp/`, and rebuilds the index over
    /// everything on disk, so that the cap holds over what they committed.
    pub async fn became_primary(self: &Arc<Self>) {
        let this = Arc::clone(self);
        let done = tokio::task::spawn_blocking(move || {
            let swept = sweep(&this.root, true);
            // Commits of this process during the scan are kept from here.
            let since = this.lock().next_generation;
            let found = scan::all(&this.root)?;
            let evicted = {
                let mut st = this.lock();
                scan::rebuild(&mut st, found, since);
                let ev = this.evict_until(&mut st, 0);
                this.publish(&st);
                tracing::info!(
                    entries = st.index.len(),
                    bytes = st.committed,
                    swept,
                    "the cache dir is ours alone now: index rebuilt from disk"
                );
                ev
            };
            this.unlink(evicted);
            io::Result::Ok(())
        })
        .await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "could not rebuild the index from disk");
        }
    }

    /// Whether this process is filling `d` now.
    pub fn filling(&self, d: &Digest) -> bool {
        self.lock().fills.contains_key(d)
    }

    /// The fill of `d` that another process sharing the cache dir runs now.
    pub async fn sibling_fill(&self, d: &Digest) -> Option<SiblingFill> {
        let (root, d) = (self.root.clone(), d.clone());
        tokio::task::spawn_blocking(move || find(&root, &d))
            .await
            .ok()?
    }

    /// A blob fill's temp file for `size` bytes of `d`, and the file where
    /// its progress is published, both named so that processes sharing the
    /// cache dir find them (see [`shared`]).
    pub(super) fn fill_files(
        &self,
        d: &Digest,
        size: u64,
    ) -> io::Result<(File, (PathBuf, PathBuf), File)> {
        let (part, written) = fill_names(d, size);
        let (part, written) = (self.own.path.join(part), self.own.path.join(written));
        let mut progress = create_new(&written)?;
        // Whatever fails past here (a full disk) must not leave `written`:
        // the next fill of this digest could not create it.
        let file = progress
            .write_all(&0u64.to_le_bytes())
            .and_then(|()| create_new(&part))
            .inspect_err(|_| {
                let _ = fs::remove_file(&written);
            })?;
        Ok((file, (part, written), progress))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_owners_dirs_are_swept_live_and_unowned_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let own = OwnDir::create(root).unwrap();
        let t = root.join(instance::TMP);
        let dead = t.join("d".repeat(32));
        fs::create_dir_all(&dead).unwrap();
        fs::write(dead.join(instance::OWNER), "1\n").unwrap();
        fs::write(dead.join("x.part"), "junk").unwrap();
        let unowned = t.join("e".repeat(32));
        fs::create_dir_all(&unowned).unwrap();
        let live = t.join("f".repeat(32));
        fs::create_dir_all(&live).unwrap();
        fs::write(live.join(instance::OWNER), "2\n").unwrap();
        let live_lock = File::open(&live).unwrap();
        flock(&live_lock, FlockOperation::LockExclusive).unwrap();
        fs::write(t.join("1-0.part"), "legacy").unwrap();

        assert_eq!(sweep(root, false), 1, "only the dead owner's dir");
        assert!(!dead.exists());
        assert!(unowned.exists() && live.exists() && own.path.exists());
        assert!(
            t.join("1-0.part").exists(),
            "legacy files wait for the primary"
        );
        assert_eq!(sweep(root, true), 1);
        assert!(!t.join("1-0.part").exists());
        assert!(live.exists() && own.path.exists());
    }

    #[test]
    fn a_live_siblings_fill_is_found_and_a_dead_ones_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let _own = OwnDir::create(root).unwrap();
        let d = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
        let sib = root.join(instance::TMP).join("c".repeat(32));
        fs::create_dir_all(&sib).unwrap();
        fs::write(sib.join(instance::OWNER), "3\n").unwrap();
        let (part, written) = fill_names(&d, 42);
        fs::write(sib.join(&part), [0u8; 42]).unwrap();
        fs::write(sib.join(&written), 7u64.to_le_bytes()).unwrap();
        assert!(find(root, &d).is_none(), "its owner is gone");
        let lock = File::open(&sib).unwrap();
        flock(&lock, FlockOperation::LockExclusive).unwrap();
        let f = find(root, &d).expect("a live sibling's fill");
        assert_eq!(f.size, 42);
        assert!(f.alive());
        assert_eq!(
            SiblingFill::written(&File::open(&f.written).unwrap()).unwrap(),
            7
        );
        drop(lock);
        assert!(!f.alive(), "its owner died");
    }
}

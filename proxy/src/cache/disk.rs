//! The cache disk's free space, checked before each fill, and whether the
//! disk is full: one state that `regproxy_cache_disk_full` shows and the log
//! reports once per change, never once per request.
//!
//! The cap (`--cache-size`) bounds what the cache keeps; the file system may
//! hold less, because it is smaller or because the node's other files (the
//! container runtime's, say) share it. So a fill reserves room twice: under
//! the cap, and on the disk, counting what the fills in flight have still to
//! write (their temp files are sparse: sized at creation, filled as bytes
//! come). Where the disk lacks room, least recently used entries are evicted
//! to make it, but only when evicting could make enough: a disk filled by
//! others is no reason to throw the cache away. Otherwise the blob is
//! streamed to its clients without being kept, and the disk is full until a
//! later check finds room.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use super::{Cache, State};
use crate::metrics::Metrics;

/// Bytes kept free beyond what fills need: for the small files written
/// beside them (a fill's progress file, a manifest's media type,
/// `state.json`) and the file system's own blocks.
pub(super) const HEADROOM: u64 = 1 << 20;

/// Why a blob will not be kept.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NoRoom {
    /// Larger than the cap, or the cap is taken by fills in flight.
    Cap,
    /// The file system lacks room, even after what eviction could free.
    Disk,
}

/// Whether the cache disk is full, and the gauge that shows it.
pub(super) struct Disk {
    root: PathBuf,
    /// While the disk is full: the bytes the last refused blob needed.
    full: Mutex<Option<u64>>,
    metrics: Arc<Metrics>,
}

impl Disk {
    pub fn new(root: &Path, metrics: Arc<Metrics>) -> Disk {
        Disk {
            root: root.to_owned(),
            full: Mutex::new(None),
            metrics,
        }
    }

    /// Bytes free for this process on the cache dir's file system.
    pub fn free(&self) -> io::Result<u64> {
        let s = rustix::fs::statvfs(&self.root)?;
        Ok(s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// A check found no room for `needed` bytes: the disk is full until a
    /// check finds room for as much (see [`Disk::room`]). Logs and sets the
    /// gauge only when the state changes.
    pub fn no_room(&self, free: u64, needed: u64) {
        let mut st = self.full.lock().unwrap_or_else(|e| e.into_inner());
        let was = st.replace(needed);
        if was.is_none() {
            self.metrics.cache_disk_full.store(1, Relaxed);
            tracing::warn!(
                free,
                needed,
                "cache disk is full: blobs that do not fit are served without being kept until there is room"
            );
        }
    }

    /// A check found room for its blob, and `free` bytes for a blob, counting
    /// what eviction could free. The disk has room again only if that is as
    /// much as the last blob refused needed: a small blob that fits between
    /// large ones that do not would otherwise flip the state, and its log
    /// line, on every request.
    pub fn room(&self, free: u64) {
        let mut st = self.full.lock().unwrap_or_else(|e| e.into_inner());
        if st.is_some_and(|needed| free >= needed) {
            *st = None;
            self.metrics.cache_disk_full.store(0, Relaxed);
            tracing::info!(free, "cache disk has room again");
        }
    }

    /// Takes in a cache write that failed with `e` while `needed` more bytes
    /// were to be written. Returns whether it failed for lack of room (and
    /// the disk is full now); any other failure is the caller's to report.
    pub fn write_failed(&self, e: &io::Error, needed: u64) -> bool {
        if !is_full(e) {
            return false;
        }
        self.no_room(self.free().unwrap_or(0), needed);
        true
    }
}

/// Whether `e` says the file system (or this user's quota on it) is full.
pub(super) fn is_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

impl Cache {
    /// Reserves room for `size` bytes, under the cap and on the disk,
    /// evicting least recently used entries to make it (see the module doc).
    /// Only a `blob` that finds room says the disk has room again: a
    /// manifest is small enough to fit where no layer does, and would flip
    /// the state back and forth.
    pub(super) fn reserve(&self, size: u64, blob: bool) -> Result<(), NoRoom> {
        if size > self.cap {
            return Err(NoRoom::Cap);
        }
        // Before the lock: a system call. Unknown (an error) checks the cap
        // only, and the writes tell.
        let free = self.disk.free().ok();
        let (mut counted_evicted, mut avail) = (false, 0);
        let (res, evicted) = {
            let mut st = self.lock();
            if st.reserved + size > self.cap {
                // Fills in flight hold the room: evicting could not make it.
                return Err(NoRoom::Cap);
            }
            let before = st.committed;
            let mut evicted = self.evict_until(&mut st, size);
            let res = if st.committed + st.reserved + size > self.cap {
                Err(NoRoom::Cap)
            } else if let Some(free) = free {
                // Evicted files free their blocks once unlinked, below.
                let freed = before - st.committed;
                let needed = size + unwritten(&st) + HEADROOM;
                // The room there is for this blob, counting what eviction
                // could free: what decides whether the disk is full.
                avail = (free + freed + st.committed).saturating_sub(needed - size);
                if free + freed + st.committed < needed {
                    Err(NoRoom::Disk)
                } else {
                    let want = needed.saturating_sub(free + freed);
                    evicted.extend(self.evict_bytes(&mut st, want));
                    counted_evicted = free < needed;
                    Ok(())
                }
            } else {
                Ok(())
            };
            if res.is_ok() {
                st.reserved += size;
            }
            self.publish(&st);
            (res, evicted)
        };
        self.unlink(evicted);
        // The room counted on files just unlinked: a file a response still
        // has open keeps its blocks until that response ends. Without room
        // now, the blob is not kept after all (nothing to cut midway).
        let short = counted_evicted
            && res.is_ok()
            && self.disk.free().is_ok_and(|now| now < size + HEADROOM);
        if short {
            let mut st = self.lock();
            st.reserved -= size;
            self.publish(&st);
            drop(st);
            self.disk
                .no_room(self.disk.free().unwrap_or(0), size + HEADROOM);
            return Err(NoRoom::Disk);
        }
        if let Some(free) = free {
            match res {
                Ok(()) if blob => self.disk.room(avail),
                Ok(()) => {}
                Err(NoRoom::Disk) => self.disk.no_room(free, size + HEADROOM),
                Err(NoRoom::Cap) => {}
            }
        }
        res
    }
}

/// Bytes the fills and writes in flight have reserved but not yet written:
/// they will take that much more of the disk.
fn unwritten(st: &State) -> u64 {
    let written: u64 = st.fills.values().map(|f| f.written()).sum();
    st.reserved.saturating_sub(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_changes_only_when_it_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::default());
        let disk = Disk::new(tmp.path(), Arc::clone(&m));
        let gauge = || m.cache_disk_full.load(Relaxed);
        assert!(
            disk.free().unwrap() > 0,
            "a temp dir's file system has room"
        );
        disk.room(1);
        assert_eq!(gauge(), 0, "room on a disk with room changes nothing");
        disk.no_room(0, 10);
        disk.no_room(0, 20);
        assert_eq!(gauge(), 1);
        assert!(disk.full.lock().unwrap().is_some());
        disk.room(19);
        assert_eq!(
            gauge(),
            1,
            "room for a smaller blob than the one refused is no room again"
        );
        disk.room(30);
        assert_eq!(gauge(), 0);
        let enospc = io::Error::from_raw_os_error(28);
        assert!(
            disk.write_failed(&enospc, 5),
            "ENOSPC means the disk is full"
        );
        assert_eq!(gauge(), 1);
        disk.room(30);
        let other = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(
            !disk.write_failed(&other, 5),
            "another failure is not a full disk"
        );
        assert_eq!(gauge(), 0);
    }
}

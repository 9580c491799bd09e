//! The node cache: content-addressed files on disk, a byte-weighted LRU index
//! in memory, and single-flight fills.
//!
//! Layout under the cache dir (pinned by a test):
//!
//! ```text
//! sha256/<hex[0..2]>/<hex>        verified content, never written after its rename
//! sha256/<hex[0..2]>/<hex>.type   media type of a cached manifest
//! tmp/<id>/...                    this process's temp files (see `shared`)
//! ```
//!
//! A file only appears under `sha256/` by a rename after its bytes matched the
//! digest and were synced, so a crash at any moment leaves either nothing or a
//! whole, verified file. Eviction unlinks files (never truncates them), so a
//! reader that has a file mapped keeps reading the bytes it was promised.
//!
//! Fills are in [`fill`], manifests stored whole in `manifests`, eviction
//! (which skips the digests [`crate::pins`] pins) in `pinned`, memory maps
//! (and their `unsafe`) in `growing`, the index rebuilt from the disk in
//! `scan`, room on the file system and whether it is full in `disk`, and
//! what processes sharing the dir
//! during a handover see of each other in [`shared`]: a miss looks on disk
//! before it fetches (a sibling may have committed it), and a fill another
//! process runs is followed rather than fetched again.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use lru::LruCache;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

pub mod admin;
mod disk;
pub mod fill;
mod growing;
mod manifests;
mod pinned;
mod scan;
mod seen;
pub mod shared;

pub use fill::{Failure, Fill, FillRequest};
use growing::Growing;

/// A committed entry in the index (`used`: last looked up, or its file's mtime).
#[derive(Clone, Copy, Debug)]
struct Entry {
    size: u64,
    /// Whether a `.type` sidecar says this content is a manifest.
    manifest: bool,
    /// Which commit of this digest the entry is: a reader that found the
    /// file gone drops the entry it looked up, never one committed since.
    generation: u64,
    used: SystemTime,
}

struct State {
    index: LruCache<Digest, Entry>,
    /// Bytes of committed entries.
    committed: u64,
    /// Bytes promised to fills in flight; counted against the cap so that the
    /// cap holds on disk while they write.
    reserved: u64,
    fills: HashMap<Digest, Arc<Fill>>,
    /// The generation the next indexed entry gets.
    next_generation: u64,
    /// Recently served entries, kept mapped: a hit on them takes no system
    /// call. Their pages are the page cache's, not the process's memory.
    open: LruCache<Digest, Hit>,
}

/// How many cache files stay mapped between requests.
pub(crate) const OPEN_FILES: usize = 1024;

pub struct Cache {
    root: PathBuf,
    cap: u64,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
    /// This process's temp dir, locked while the cache lives.
    own: shared::OwnDir,
    tmp_seq: AtomicU64,
    /// Every fill's task: shutdown waits for them to commit.
    fills: TaskTracker,
    /// The file system's free space, and whether it is full.
    disk: disk::Disk,
    book: seen::Book,
    /// What eviction skips (see [`crate::pins`]).
    pinned: pinned::Pinned,
}

/// Content opened from the cache.
#[derive(Clone)]
pub struct Hit {
    /// The whole file, memory-mapped.
    pub data: Bytes,
    /// For manifests, the media type stored with it.
    pub media_type: Option<String>,
}

/// What a commit stores.
enum Stored<'a> {
    /// The verified blob of this fill, which leaves the single-flight table.
    Fill(&'a Fill, &'a Growing),
    /// A manifest, stored whole in this file, with its media type.
    Manifest(&'a File, &'a str),
}

/// What the index holds for a digest a reader asked for.
enum Lookup {
    /// Mapped already: no system call needed.
    Mapped(Hit),
    /// Indexed; its file is to be opened.
    Closed(Entry),
}

/// What a reader should do about a digest that was not in the index.
pub enum Join {
    /// It was committed meanwhile: open it.
    Committed,
    /// A fill was started for this request: the caller runs it.
    Leader(Arc<Fill>),
    /// Another request's fill is running: follow it.
    Follower(Arc<Fill>),
}

impl Cache {
    /// Opens the cache at `root`, sweeping leftovers of processes that are
    /// gone and rebuilding the index from what is on disk (recency from
    /// mtime). `primary`: whether this process holds the cache dir's lock;
    /// a successor that does not yet calls [`Cache::became_primary`] later.
    pub fn open(root: &Path, cap: u64, metrics: Arc<Metrics>, primary: bool) -> io::Result<Cache> {
        fs::create_dir_all(root.join("sha256"))?;
        // Dead processes' leftovers first: on a full disk they are the room
        // this process needs to start.
        shared::sweep(root, primary);
        let own = shared::OwnDir::create(root)?;

        let state = scan::state(root, primary)?;
        let cache = Cache {
            root: root.to_owned(),
            cap,
            state: Mutex::new(state),
            disk: disk::Disk::new(root, Arc::clone(&metrics)),
            metrics,
            own,
            tmp_seq: AtomicU64::new(0),
            fills: TaskTracker::new(),
            book: seen::Book::default(),
            // Before the eviction below: pins survive a smaller cap.
            pinned: pinned::Pinned::load(root),
        };
        cache.metrics.cache_capacity.store(cap, Relaxed);
        let evicted = {
            let mut st = cache.lock();
            let ev = cache.evict_until(&mut st, 0);
            cache.publish(&st);
            ev
        };
        cache.unlink(evicted);
        let st = cache.lock();
        tracing::info!(
            entries = st.index.len(),
            bytes = st.committed,
            cap,
            "cache index rebuilt from disk"
        );
        drop(st);
        Ok(cache)
    }

    pub fn capacity(&self) -> u64 {
        self.cap
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the index inconsistent
        // with the disk in a way that matters more than stopping service.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `d` is committed in the index (its recency unchanged).
    pub fn contains(&self, d: &Digest) -> bool {
        self.lock().index.contains(d)
    }

    /// Path of committed content for `d`.
    pub fn path(&self, d: &Digest) -> PathBuf {
        content_path(&self.root, d)
    }

    /// Opens committed content. `manifest` asks for the stored media type too;
    /// content cached only as a blob is then a miss.
    pub async fn get(self: &Arc<Self>, d: &Digest, manifest: bool) -> Option<Hit> {
        let e = match self.lookup(d, manifest) {
            Some(Lookup::Mapped(hit)) => return Some(hit),
            Some(Lookup::Closed(e)) => e,
            None => self.adopt(d, manifest).await?,
        };
        let this = Arc::clone(self);
        let d2 = d.clone();
        let opened = tokio::task::spawn_blocking(move || this.open_file(&d2, e.manifest)).await;
        self.opened(d, e, opened.ok()?)
    }

    /// What the index holds for `d`, before any file is opened.
    fn lookup(&self, d: &Digest, manifest: bool) -> Option<Lookup> {
        let mut st = self.lock();
        let e = seen::used(st.index.get_mut(d)?);
        if manifest && !e.manifest {
            return None;
        }
        if let Some(hit) = st.open.get(d) {
            return Some(Lookup::Mapped(hit.clone()));
        }
        Some(Lookup::Closed(e))
    }

    /// Takes in what opening the file of entry `e` of `d` gave. Other
    /// requests ran meanwhile: the index may hold another commit of `d` now.
    fn opened(&self, d: &Digest, e: Entry, opened: io::Result<Hit>) -> Option<Hit> {
        match opened {
            Ok(hit) => {
                let mut st = self.lock();
                // Keep it mapped unless it was evicted or replaced meanwhile.
                if st
                    .index
                    .peek(d)
                    .is_some_and(|now| now.generation == e.generation)
                {
                    st.open.put(d.clone(), hit.clone());
                }
                Some(hit)
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(digest = %d, "cached file vanished; dropping it from the index");
                self.forget(d, e.generation);
                None
            }
            Err(err) => {
                // Out of descriptors or memory maps: a miss this time, the
                // entry (and its bytes under the cap) stay.
                tracing::warn!(digest = %d, error = %err, "cached content could not be opened");
                None
            }
        }
    }

    fn open_file(&self, d: &Digest, manifest: bool) -> io::Result<Hit> {
        let path = self.path(d);
        let file = File::open(&path)?;
        // Recency survives a restart through the mtime, set when a file is
        // mapped (not on every hit of a mapped one); failing to set it only
        // costs accuracy of the LRU order after a restart.
        let _ = file.set_modified(SystemTime::now());
        let data = growing::map_committed(file)?;
        let media_type = if manifest {
            Some(fs::read_to_string(type_path(&path))?)
        } else {
            None
        };
        Ok(Hit { data, media_type })
    }

    /// Drops entry `generation` of `d` from the index; a later commit of `d`
    /// stays.
    fn forget(&self, d: &Digest, generation: u64) {
        let mut st = self.lock();
        if st.index.peek(d).is_none_or(|e| e.generation != generation) {
            return;
        }
        if let Some(e) = st.index.pop(d) {
            st.committed -= e.size;
        }
        st.open.pop(d);
        self.publish(&st);
    }

    /// Called after a miss: joins the fill of `d` in flight or starts one.
    pub fn join(&self, d: &Digest) -> Join {
        let mut st = self.lock();
        if st.index.contains(d) {
            return Join::Committed;
        }
        if let Some(f) = st.fills.get(d) {
            return Join::Follower(Arc::clone(f));
        }
        let f = Arc::new(Fill::new(d.clone()));
        st.fills.insert(d.clone(), Arc::clone(&f));
        Join::Leader(f)
    }

    /// Starts the fill that a [`Join::Leader`] leads, on a task of its own
    /// (no client hanging up stops it) that [`Cache::fills_done`] waits for.
    pub fn spawn_fill(
        self: &Arc<Self>,
        upstream: Arc<Upstream>,
        fill: Arc<Fill>,
        req: FillRequest,
    ) {
        let span = tracing::info_span!("fill", digest = %fill.digest);
        // Counted from before the spawn, so the gauge never misses a fill.
        let counted = fill::Counted::new(&self.metrics);
        let run = fill::run(Arc::clone(self), upstream, fill, req);
        self.fills.spawn(
            async move {
                let _counted = counted;
                run.await
            }
            .instrument(span),
        );
    }

    /// Waits until every fill has ended (committed or not), those started
    /// meanwhile too: for a graceful shutdown, once no request can start more.
    pub async fn fills_done(&self) {
        self.fills.close();
        self.fills.wait().await;
    }

    /// Evicts least recently used entries until `need` more bytes fit under
    /// the cap; returns the files to unlink. Evicts nothing for a `need`
    /// that would not fit beside the pinned entries anyway.
    fn evict_until(&self, st: &mut State, need: u64) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if need > 0 && !self.pinned.could_fit(st, need, self.cap) {
            return out;
        }
        while st.committed + st.reserved + need > self.cap {
            if !self.evict_one(st, &mut out) {
                break;
            }
        }
        out
    }

    /// Evicts least recently used entries until they hold `want` bytes:
    /// room on the disk rather than under the cap.
    fn evict_bytes(&self, st: &mut State, want: u64) -> Vec<PathBuf> {
        let (mut out, goal) = (Vec::new(), st.committed.saturating_sub(want));
        while st.committed > goal {
            if !self.evict_one(st, &mut out) {
                break;
            }
        }
        out
    }

    fn unlink(&self, paths: Vec<PathBuf>) {
        for p in paths {
            if let Err(e) = fs::remove_file(&p) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "could not remove evicted file");
                }
            }
        }
    }

    fn publish(&self, st: &State) {
        self.metrics
            .cache_bytes
            .store(st.committed + st.reserved, Relaxed);
        self.metrics
            .cache_entries
            .store(st.index.len() as u64, Relaxed);
    }

    /// A fresh temp file in the cache dir, on the same file system as its
    /// final place so that the commit is a rename.
    fn temp_file(&self) -> io::Result<(File, PathBuf)> {
        let n = self.tmp_seq.fetch_add(1, Relaxed);
        let path = self.own.path.join(format!("{n}.part"));
        Ok((create_new(&path)?, path))
    }

    /// Moves a verified temp file into place and indexes it, turning its
    /// reservation into committed bytes. Ends a fill's single-flight entry
    /// under the same lock, so a request sees either the fill or the entry.
    fn commit(&self, d: &Digest, size: u64, temp: &Path, what: Stored<'_>) -> io::Result<()> {
        let media_type = match what {
            Stored::Manifest(_, t) => Some(t),
            Stored::Fill(..) => None,
        };
        let fin = self.path(d);
        let res = (|| {
            match what {
                Stored::Fill(_, file) => file.sync()?,
                Stored::Manifest(file, _) => file.sync_data()?,
            }
            fs::create_dir_all(fin.parent().expect("content paths have a parent"))?;
            if let Some(t) = media_type {
                let (mut tf, tp) = self.temp_file()?;
                let written = tf
                    .write_all(t.as_bytes())
                    .and_then(|()| tf.sync_data())
                    .and_then(|()| fs::rename(&tp, type_path(&fin)));
                if written.is_err() {
                    // A full disk: no temp file is left behind.
                    let _ = fs::remove_file(&tp);
                }
                written?;
            }
            fs::rename(temp, &fin)
        })();
        let mut st = self.lock();
        st.reserved -= size;
        if let Stored::Fill(fill, _) = what {
            end_fill(&mut st, fill);
        }
        if res.is_ok() {
            let generation = st.next_generation;
            st.next_generation += 1;
            let prev = st.index.put(
                d.clone(),
                Entry::new(size, media_type.is_some(), generation),
            );
            st.committed += size;
            if let Some(p) = prev {
                st.committed -= p.size;
                st.open.pop(d);
            }
            self.metrics.commits.fetch_add(1, Relaxed);
        }
        self.publish(&st);
        drop(st);
        if res.is_err() {
            let _ = fs::remove_file(temp);
        }
        res
    }

    /// Ends a fill that will not be committed, releasing its reservation.
    fn abandon(&self, fill: &Fill, reserved: u64, temp: Option<&Path>) {
        end_fill(&mut self.lock(), fill);
        self.release(reserved, temp);
    }

    /// Gives back a reservation that will not be committed, and its temp file.
    fn release(&self, reserved: u64, temp: Option<&Path>) {
        if let Some(t) = temp {
            let _ = fs::remove_file(t);
        }
        let mut st = self.lock();
        st.reserved -= reserved;
        self.publish(&st);
    }
}

/// Takes `fill` out of the single-flight table, if it is still the fill
/// there. Every fill leaves the table this way, committed or not, and before
/// its readers learn that it failed: a request that looks after that starts
/// a fill of its own instead of following one that is over.
fn end_fill(st: &mut State, fill: &Fill) {
    if st
        .fills
        .get(&fill.digest)
        .is_some_and(|f| std::ptr::eq(&**f, fill))
    {
        st.fills.remove(&fill.digest);
    }
}

fn create_new(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
}

pub(crate) fn content_path(root: &Path, d: &Digest) -> PathBuf {
    root.join("sha256").join(&d.hex()[..2]).join(d.hex())
}

pub(super) fn type_path(content: &Path) -> PathBuf {
    let mut s = content.as_os_str().to_owned();
    s.push(".type");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: &[u8]) -> Digest {
        Digest::of(b)
    }

    #[test]
    fn layout_is_pinned() {
        let d = Digest::parse(
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        )
        .unwrap();
        assert_eq!(
            content_path(Path::new("/c"), &d),
            PathBuf::from(
                "/c/sha256/e3/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            ),
            "the on-disk layout is part of the upgrade contract"
        );
    }

    #[tokio::test]
    async fn index_is_rebuilt_and_leftovers_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let m = Arc::new(Metrics::default());
        let c = Arc::new(Cache::open(&dir, 1 << 20, m.clone(), true).unwrap());
        c.put_manifest(
            digest(b"{}"),
            "application/vnd.oci.image.manifest.v1+json".into(),
            Bytes::from_static(b"{}"),
        )
        .await;
        fs::write(dir.join("tmp/leftover.part"), b"half a blob").unwrap();
        drop(c);

        let c = Arc::new(Cache::open(&dir, 1 << 20, m, true).unwrap());
        assert!(
            !dir.join("tmp/leftover.part").exists(),
            "temp files are swept at start"
        );
        let hit = c
            .get(&digest(b"{}"), true)
            .await
            .expect("the manifest survives a restart");
        assert_eq!(&hit.data[..], b"{}");
        assert_eq!(
            hit.media_type.as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn cap_evicts_least_recently_used() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let m = Arc::new(Metrics::default());
        let c = Arc::new(Cache::open(&dir, 10, m.clone(), true).unwrap());
        for b in [&b"aaaa"[..], b"bbbb"] {
            c.put_manifest(digest(b), "t".into(), Bytes::copy_from_slice(b))
                .await;
        }
        assert!(
            c.get(&digest(b"aaaa"), true).await.is_some(),
            "aaaa is now the most recent"
        );
        c.put_manifest(digest(b"cccc"), "t".into(), Bytes::from_static(b"cccc"))
            .await;
        assert!(
            c.get(&digest(b"bbbb"), true).await.is_none(),
            "bbbb was least recently used and is evicted"
        );
        assert!(c.get(&digest(b"aaaa"), true).await.is_some());
        assert!(
            !c.path(&digest(b"bbbb")).exists(),
            "eviction removes the file"
        );
        assert_eq!(m.evictions.load(Relaxed), 1);
        c.put_manifest(
            digest(b"much too large"),
            "t".into(),
            Bytes::from_static(b"much too large"),
        )
        .await;
        assert!(
            c.get(&digest(b"much too large"), true).await.is_none(),
            "content larger than the cap is not kept"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_vanished_file_forgets_only_the_entry_that_was_looked_up() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let c = Arc::new(Cache::open(&dir, 1 << 20, Arc::new(Metrics::default()), true).unwrap());
        let d = digest(b"{}");
        c.put_manifest(d.clone(), "t".into(), Bytes::from_static(b"{}"))
            .await;
        // A reader looks the entry up and finds its file gone...
        let Some(Lookup::Closed(looked_up)) = c.lookup(&d, true) else {
            panic!("a fresh commit is indexed and not mapped yet");
        };
        fs::remove_file(c.path(&d)).unwrap();
        let opened = c.open_file(&d, looked_up.manifest);
        // ...while the same digest is committed again, before it reports back.
        c.put_manifest(d.clone(), "t".into(), Bytes::from_static(b"{}"))
            .await;
        assert!(
            c.opened(&d, looked_up, opened).is_none(),
            "the reader that found no file has a miss"
        );
        assert!(
            c.get(&d, true).await.is_some(),
            "the entry committed meanwhile should stay in the index"
        );
        fs::remove_dir_all(dir).unwrap();
    }
}

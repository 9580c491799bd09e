//! Single-flight fills: one upstream download per digest, written to a temp
//! file while it is hashed, followed by every reader through a `watch` of how
//! many bytes are on disk.
//!
//! The contract that keeps corrupt bytes from ever looking complete: a reader
//! holds back the last byte of its response until the fill has verified the
//! digest and size. If the fill fails, the reader's body ends in an error, so
//! hyper cuts the connection short of its `Content-Length`; no client can take
//! a wrong layer for a whole one.
//!
//! `run` is the steps of a fill; `source` gets the blob's bytes from the
//! upstream (resuming after a cut), or first from the peer that owns the
//! digest (`peer`) or another process's fill (`sibling`); `writer` puts
//! them on disk.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream;
use http::header::HeaderMap;
use http::StatusCode;

use tokio::sync::watch;

use super::disk::NoRoom;
use super::growing::Growing;
use super::shared::SiblingFill;
use super::{Cache, Stored};
use crate::body::BoxError;
use crate::budget::Lane;
use crate::digest::Digest;
use crate::error::{Error, UpstreamError};
use crate::metrics::{Fallback, Metrics};
use crate::upstream::Upstream;

mod peer;
mod sibling;
mod source;
mod uncached;
mod writer;

pub use source::read_capped;
pub use uncached::verified_stream;
pub use writer::BUFFER_BUDGET;

use source::{First, Resumable};
use writer::{Sink, Writer};

/// Readers take at most this much per frame from a fill in flight.
const FOLLOW_CHUNK: u64 = 1 << 20;
/// Fills that talk to the upstream at once. Each holds an upstream
/// connection, its read buffer (`upstream::READ_BUF`) and a temp file, and
/// a fill goes on after its client hung up: without this, clients that ask
/// for many cold blobs and hang up could start any number. More wait for a
/// place before they connect; their readers wait as for a slow upstream.
pub const MAX_FILLS: usize = 256;
static FILLS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_FILLS);
/// Fills that ask a peer first take their place here instead: a fill that
/// waits for a peer must not hold a place the peer's own fill for it may
/// need on the other side (two nodes asking each other would wait on each
/// other). A fill here that falls back talks to the upstream too, so the
/// upstream sees at most twice [`MAX_FILLS`] connections.
static PEER_FILLS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_FILLS);

/// Where a fill is.
#[derive(Clone)]
pub enum Progress {
    /// Waiting for the upstream's response head.
    Connecting,
    /// Writing: `written` is the start of the blob that is on disk and final.
    Streaming { size: u64, written: Bytes },
    /// All `size` bytes are on disk and match the digest.
    Verified { size: u64, data: Bytes },
    /// The fill ended without a verified blob.
    Failed(Failure),
}

/// Why a fill did not produce a verified blob.
#[derive(Clone, Debug)]
pub enum Failure {
    /// Upstream answered something other than 200 before any byte: relay it.
    Relay {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// The blob will not be kept (larger than the cache, no room, or the disk
    /// failed): every reader streams it from upstream on its own.
    Uncached,
    /// Upstream failed or sent bytes that did not match: an error response
    /// before the head, an aborted body after it.
    Error(Error),
}

impl Failure {
    /// What a reader that is already streaming is cut off with.
    fn to_error(&self) -> Error {
        match self {
            Failure::Error(e) => e.clone(),
            Failure::Relay { status, .. } => Error::status("blob fill", *status),
            Failure::Uncached => Error::Internal("a fill that streamed was not kept"),
        }
    }
}

/// A fill in flight. Its readers subscribe to the progress channel.
pub struct Fill {
    pub digest: Digest,
    progress: watch::Sender<Progress>,
    /// Whether a client waits on it ([`Lane::Pull`]) or only a prefetch
    /// does ([`Lane::Prefetch`]), for the uplink budget.
    wanted: AtomicBool,
}

impl Fill {
    pub(super) fn new(digest: Digest) -> Fill {
        Fill {
            digest,
            progress: watch::Sender::new(Progress::Connecting),
            wanted: AtomicBool::new(true),
        }
    }

    /// A client waits on this fill (it leads it or follows it): from now on
    /// its upstream bytes are a pull's.
    pub fn wanted(&self) {
        self.wanted.store(true, Relaxed);
    }

    /// Only a prefetch waits on this fill, so far.
    pub fn prefetching(&self) {
        self.wanted.store(false, Relaxed);
    }

    /// The budget's lane for this fill's upstream bytes now.
    pub fn lane(&self) -> Lane {
        match self.wanted.load(Relaxed) {
            true => Lane::Pull,
            false => Lane::Prefetch,
        }
    }

    /// Waits for the upstream's answer: the blob size, or why there is none.
    pub async fn started(&self) -> Result<u64, Failure> {
        let mut rx = self.progress.subscribe();
        let p = rx
            .wait_for(|p| !matches!(p, Progress::Connecting))
            .await
            .map(|p| p.clone())
            .unwrap_or_else(|_| Progress::Failed(vanished()));
        match p {
            Progress::Streaming { size, .. } | Progress::Verified { size, .. } => Ok(size),
            Progress::Failed(f) => Err(f),
            Progress::Connecting => unreachable!("waited past Connecting"),
        }
    }

    /// The bytes `start..end` of the blob as they arrive. The body ends in an
    /// error, not cleanly, unless the fill verifies.
    pub fn reader(
        &self,
        start: u64,
        end: u64,
        served: Arc<std::sync::atomic::AtomicU64>,
    ) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static {
        let rx = self.progress.subscribe();
        stream::unfold((rx, start, false), move |(mut rx, pos, done)| {
            let served = Arc::clone(&served);
            async move {
                if done {
                    return None;
                }
                loop {
                    let seen = match &*rx.borrow_and_update() {
                        Progress::Connecting => Ok((None, 0, false)),
                        Progress::Streaming { written, .. } => {
                            // Hold back our last byte until the digest is checked.
                            let limit = (written.len() as u64).min(end.saturating_sub(1));
                            Ok((Some(written.clone()), limit, false))
                        }
                        Progress::Verified { data, .. } => Ok((Some(data.clone()), end, true)),
                        Progress::Failed(f) => Err(f.to_error()),
                    };
                    let (data, limit, verified) = match seen {
                        Ok(x) => x,
                        Err(e) => return Some((Err(e.into()), (rx, pos, true))),
                    };
                    if let Some(data) = data {
                        if pos < limit {
                            let n = (limit - pos).min(FOLLOW_CHUNK);
                            let chunk = data.slice(pos as usize..(pos + n) as usize);
                            served.fetch_add(n, Relaxed);
                            return Some((Ok(chunk), (rx, pos + n, false)));
                        }
                        if verified {
                            return None;
                        }
                    }
                    if rx.changed().await.is_err() {
                        let e = Error::Internal("the fill ended without a result");
                        return Some((Err(e.into()), (rx, pos, true)));
                    }
                }
            }
        })
    }

    fn set(&self, p: Progress) {
        self.progress.send_replace(p);
    }

    /// More bytes are on disk, from the writer's blocking task: published
    /// only while the fill is streaming, never over its end.
    fn advance(&self, size: u64, written: Bytes) {
        self.progress.send_if_modified(|p| match p {
            Progress::Streaming { written: w, .. } if w.len() < written.len() => {
                *p = Progress::Streaming { size, written };
                true
            }
            _ => false,
        });
    }

    /// Bytes of the blob on disk so far.
    pub(super) fn written(&self) -> u64 {
        match &*self.progress.borrow() {
            Progress::Streaming { written, .. } => written.len() as u64,
            Progress::Verified { size, .. } => *size,
            Progress::Connecting | Progress::Failed(_) => 0,
        }
    }
}

fn vanished() -> Failure {
    Failure::Error(Error::Internal("the fill ended without a result"))
}

/// What the leader needs to fetch the blob.
pub struct FillRequest {
    pub name: String,
    /// Client headers relayed upstream (credentials, user agent).
    pub headers: HeaderMap,
    /// Another process's fill of this blob to take the bytes from (the
    /// request was authorized without the upstream's answer to a GET).
    pub sibling: Option<SiblingFill>,
    /// The peer that owns this digest, asked before the upstream (the
    /// request was authorized without the upstream's answer to a GET).
    pub peer: Option<crate::peers::Ask>,
}

/// Counts a fill in `regproxy_fills_inflight` from before its task is
/// spawned until the task ends, however it ends. The gauge is for Prometheus
/// (and the tests); shutdown waits on the cache's task tracker instead.
pub(super) struct Counted(Arc<Metrics>);

impl Counted {
    pub(super) fn new(metrics: &Arc<Metrics>) -> Counted {
        metrics.fills_started.fetch_add(1, Relaxed);
        metrics.fills_inflight.fetch_add(1, Relaxed);
        Counted(Arc::clone(metrics))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fills_inflight.fetch_sub(1, Relaxed);
    }
}

/// Runs a fill to its end: start, reserve, copy, verify, commit. Spawned by
/// [`Cache::spawn_fill`] on a task of its own: no client hanging up stops it.
/// Whatever stops it, its [`Guard`] ends the fill.
pub(super) async fn run(
    cache: Arc<Cache>,
    upstream: Arc<Upstream>,
    fill: Arc<Fill>,
    req: FillRequest,
) {
    let metrics = Arc::clone(&cache.metrics);
    let mut guard = Guard::new(Arc::clone(&cache), Arc::clone(&fill));
    let places = match req.peer {
        Some(_) => &PEER_FILLS,
        None => &FILLS,
    };
    let _place = places
        .acquire()
        .await
        .expect("the semaphore is never closed");
    let digest = &fill.digest;
    let path = format!("/v2/{}/blobs/{digest}", req.name);
    let verified = async {
        let tail = req.sibling.clone().and_then(|s| {
            tracing::info!(%digest, from = %s.part.display(), "following another process's fill");
            sibling::Tail::open(s, upstream.timeout()).ok()
        });
        let from_peer = match (&tail, &req.peer) {
            (None, Some(ask)) => peer::start(ask, &path, digest).await,
            _ => None,
        };
        let (size, first) = match (tail, from_peer) {
            (Some(t), _) => (t.size(), First::Sibling(t)),
            (None, Some((size, body))) => (size, First::Peer(body)),
            (None, None) => {
                let (size, body) = source::start(&upstream, &path, &req, digest, &metrics).await?;
                (size, First::Upstream(body))
            }
        };
        let (file, progress) = guard.reserve(size).await?;
        tracing::debug!(%digest, size, "fill started");
        let mut src = Resumable::new(&upstream, &path, &req, &fill, &metrics, (size, first));
        let sink = copy(&mut src, Writer::new(Arc::clone(&fill), file, progress))
            .await
            .map_err(|e| write_failed(&cache, &fill, size, e))?;
        verify(digest, sink, &metrics).map_err(|e| {
            // Peers that sent all of it sent bad bytes; with the upstream's
            // bytes in the mix, nobody knows whose were bad.
            if let Some(ask) = &req.peer {
                for p in src.blamed() {
                    ask.peers.fell_back(*p, Fallback::BadBytes);
                }
            }
            Failure::Error(e)
        })
    };
    match verified.await {
        Ok((file, data)) => guard.commit(file, data).await,
        Err(f) => guard.fail(f),
    }
}

/// Why a copy stopped short.
enum CopyError {
    Upstream(Error),
    Write(std::io::Error),
}

/// Copies the blob's bytes into the temp file, where readers follow them.
async fn copy(src: &mut Resumable<'_>, mut w: Writer) -> Result<Sink, CopyError> {
    while let Some(chunk) = src.next().await.map_err(CopyError::Upstream)? {
        if chunk.is_empty() {
            // The upstream broke: readers get what came before the resume.
            w.flush().await.map_err(CopyError::Write)?;
        } else {
            w.push(chunk).await.map_err(CopyError::Write)?;
        }
    }
    w.finish().await.map_err(CopyError::Write)
}

/// Checks what was written against the digest: the whole file when it
/// matches.
fn verify(digest: &Digest, sink: Sink, m: &Metrics) -> Result<(Growing, Bytes), Error> {
    let got = Digest::from_hasher(sink.hasher);
    if got != *digest {
        m.digest_mismatches.fetch_add(1, Relaxed);
        tracing::warn!(%digest, %got, "upstream content does not match its digest; not cached, readers cut off");
        return Err(Error::from(UpstreamError::DigestMismatch {
            expected: digest.clone(),
            got,
        }));
    }
    let Some(data) = sink.file.complete() else {
        return Err(Error::invalid(format!(
            "{digest}: shorter than its Content-Length"
        )));
    };
    Ok((sink.file, data))
}

/// What a fill whose copy stopped tells its readers. A write that found the
/// disk full (someone else filled it) cuts them: the bytes they were sent
/// cannot be completed from here. The disk's state change says so in the
/// log, once; each fill only at debug.
fn write_failed(cache: &Cache, fill: &Fill, size: u64, e: CopyError) -> Failure {
    let e = match e {
        CopyError::Upstream(e) => return Failure::Error(e),
        CopyError::Write(e) => e,
    };
    let digest = &fill.digest;
    if cache
        .disk
        .write_failed(&e, size.saturating_sub(fill.written()))
    {
        tracing::debug!(%digest, error = %e, "cache write failed: the disk is full");
    } else {
        tracing::warn!(%digest, error = %e, "cache write failed");
    }
    Failure::Error(Error::disk("write a blob", e))
}

/// A fill from its start to its end, which it owns. Ended as failed when the
/// task stops early (an error, a panic, the runtime shutting down), so that
/// no reader waits forever and the reservation and temp file are given back;
/// ended by [`Guard::commit`] once verified. Either way the fill leaves the
/// single-flight table under the cache lock: a failure before its readers
/// hear of it, a commit together with the index entry.
struct Guard {
    cache: Arc<Cache>,
    fill: Arc<Fill>,
    /// Bytes reserved in the cache for this fill.
    reserved: u64,
    temp: Option<PathBuf>,
    /// Where the temp file's progress is published for other processes.
    written: Option<PathBuf>,
    /// Until the fill has ended, one way or the other.
    armed: bool,
}

impl Guard {
    fn new(cache: Arc<Cache>, fill: Arc<Fill>) -> Guard {
        Guard {
            cache,
            fill,
            reserved: 0,
            temp: None,
            written: None,
            armed: true,
        }
    }

    /// Reserves room for `size` bytes in the cache and creates the temp file.
    async fn reserve(&mut self, size: u64) -> Result<(Growing, File), Failure> {
        let (m, digest) = (&self.cache.metrics, &self.fill.digest);
        match self.cache.reserve(size, true) {
            Ok(()) => {}
            Err(NoRoom::Cap) => {
                m.uncached_fills.fetch_add(1, Relaxed);
                let cap = self.cache.capacity();
                tracing::info!(%digest, size, cap, "blob will not fit in the cache; streaming it uncached");
                return Err(Failure::Uncached);
            }
            Err(NoRoom::Disk) => {
                // The disk's state change is logged once, not each blob.
                m.uncached_fills.fetch_add(1, Relaxed);
                m.uncached_no_room.fetch_add(1, Relaxed);
                tracing::debug!(%digest, size, "no room on the cache disk; streaming the blob uncached");
                return Err(Failure::Uncached);
            }
        }
        self.reserved = size;
        let cache = Arc::clone(&self.cache);
        let d = digest.clone();
        let created = tokio::task::spawn_blocking(move || {
            let (file, paths, progress) = cache.fill_files(&d, size)?;
            match Growing::new(file, size) {
                Ok(g) => Ok((g, paths, progress)),
                Err(e) => {
                    let _ = std::fs::remove_file(&paths.0);
                    let _ = std::fs::remove_file(&paths.1);
                    Err(e)
                }
            }
        })
        .await;
        match created {
            Ok(Ok((file, (path, written), progress))) => {
                self.temp = Some(path);
                self.written = Some(written);
                Ok((file, progress))
            }
            Ok(Err(e)) => {
                m.uncached_fills.fetch_add(1, Relaxed);
                if self.cache.disk.write_failed(&e, size) {
                    m.uncached_no_room.fetch_add(1, Relaxed);
                    tracing::debug!(%digest, error = %e, "no room on the cache disk; streaming the blob uncached");
                } else {
                    tracing::warn!(%digest, error = %e, "cannot write to the cache; streaming uncached");
                }
                Err(Failure::Uncached)
            }
            Err(_) => Err(Failure::Uncached),
        }
    }

    /// Ends a verified fill: readers finish from `data` at once, then the
    /// file is synced, moved into place and indexed.
    async fn commit(mut self, file: Growing, data: Bytes) {
        let size = file.size();
        self.fill.set(Progress::Verified { size, data });
        // From here `Cache::commit` ends the fill and gives back the
        // reservation or the temp file, whatever happens.
        self.armed = false;
        let temp = self.temp.take().expect("a verified fill has a temp file");
        let (cache, fill) = (Arc::clone(&self.cache), Arc::clone(&self.fill));
        let digest = &self.fill.digest;
        let written = self.written.take();
        let commit = move || {
            let res = cache.commit(&fill.digest, size, &temp, Stored::Fill(&fill, &file));
            // After the rename: a process following this fill sees it whole.
            written.map(std::fs::remove_file);
            res
        };
        match tokio::task::spawn_blocking(commit).await {
            Ok(Ok(())) => tracing::debug!(%digest, size, "fill committed"),
            Ok(Err(e)) if self.cache.disk.write_failed(&e, 0) => {
                // The disk's state change says so, once.
                tracing::debug!(%digest, error = %e, "verified blob could not be committed: the disk is full")
            }
            Ok(Err(e)) => {
                tracing::warn!(%digest, error = %e, "verified blob could not be committed")
            }
            Err(e) => tracing::warn!(%digest, error = %e, "commit task failed"),
        }
    }

    fn fail(mut self, f: Failure) {
        self.end_failed(f);
    }

    fn end_failed(&mut self, f: Failure) {
        if !self.armed {
            return;
        }
        self.armed = false;
        // Out of the table first: a follower that sees the failure and joins
        // again must start a fill of its own, not find this one.
        self.cache
            .abandon(&self.fill, self.reserved, self.temp.as_deref());
        // After the temp file: a process following this fill sees it gone.
        if let Some(w) = &self.written {
            let _ = std::fs::remove_file(w);
        }
        self.fill.set(Progress::Failed(f));
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.end_failed(vanished());
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::Mutex;
    use std::task::{Context, Wake, Waker};

    use super::*;
    use crate::cache::Join;

    /// A follower that joins again the moment it is woken. Wakers run inside
    /// the sender's call, so it sees the single-flight table exactly as it is
    /// when the fill's end is published: as early as any follower could.
    struct Rejoin {
        cache: Arc<Cache>,
        digest: Digest,
        joined: Mutex<Vec<&'static str>>,
    }

    impl Wake for Rejoin {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            let what = match self.cache.join(&self.digest) {
                Join::Committed => "committed",
                Join::Leader(_) => "leader",
                Join::Follower(_) => "follower",
            };
            self.joined.lock().unwrap().push(what);
        }
    }

    #[tokio::test]
    async fn a_failed_fill_leaves_the_table_before_followers_hear_of_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let cache =
            Arc::new(Cache::open(&dir, 1 << 20, Arc::new(Metrics::default()), true).unwrap());
        let digest = Digest::of(b"a blob the upstream refuses");
        let Join::Leader(fill) = cache.join(&digest) else {
            panic!("the first request for a digest leads its fill");
        };
        let Join::Follower(followed) = cache.join(&digest) else {
            panic!("a second request follows the fill in flight");
        };

        let rejoin = Arc::new(Rejoin {
            cache: Arc::clone(&cache),
            digest: digest.clone(),
            joined: Mutex::new(Vec::new()),
        });
        let waker = Waker::from(Arc::clone(&rejoin));
        let mut started = std::pin::pin!(followed.started());
        assert!(
            started
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending(),
            "the follower waits while the fill connects"
        );

        let refused = Failure::Relay {
            status: StatusCode::UNAUTHORIZED,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        Guard::new(Arc::clone(&cache), Arc::clone(&fill)).fail(refused);

        assert_eq!(
            *rejoin.joined.lock().unwrap(),
            ["leader"],
            "a follower woken by the failure should start a new fill, never find the dead one"
        );
        assert!(
            matches!(started.await, Err(Failure::Relay { status, .. }) if status == StatusCode::UNAUTHORIZED),
            "the follower should see the leader's refusal"
        );
        assert!(
            matches!(cache.join(&digest), Join::Follower(f) if !Arc::ptr_eq(&f, &fill)),
            "the new fill is the one in the table, and the dead fill's end did not remove it"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}

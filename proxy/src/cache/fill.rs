//! Single-flight fills: one upstream download per digest, written to a temp
//! file while it is hashed, followed by every reader through a `watch` of how
//! many bytes are on disk.
//!
//! The contract that keeps corrupt bytes from ever looking complete: a reader
//! holds back the last byte of its response until the fill has verified the
//! digest and size. If the fill fails, the reader's body ends in an error, so
//! hyper cuts the connection short of its `Content-Length`; no client can take
//! a wrong layer for a whole one.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use super::{Cache, Stored};
use crate::body::BoxError;
use crate::digest::Digest;
use crate::error::{Cause, Error, UpstreamError, Wait};
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// Readers take at most this much per frame from a fill in flight.
const FOLLOW_CHUNK: u64 = 1 << 20;
/// Upstream bytes gathered before one write to the temp file, when the
/// budget allows: few large writes while memory is plentiful.
const WRITE_BATCH: usize = 256 << 10;
/// Bytes that all fills together may hold between the upstream socket and
/// the temp file (gathering, or on their way to disk), whatever the number
/// of fills. Past half of it, fills stop gathering and write each chunk as
/// it comes; when it is spent, a fill waits for room before it takes the
/// next chunk off its connection, so the upstream is slowed by TCP instead
/// of memory growing. Chunks are at most the upstream client's read buffer
/// (`upstream::READ_BUF`), so a fill never waits for more than exists.
pub const BUFFER_BUDGET: usize = 16 << 20;
/// Below this many free bytes of the budget, fills write chunk by chunk.
const GATHER_FLOOR: usize = BUFFER_BUDGET / 2;

/// The process-wide budget of [`BUFFER_BUDGET`] bytes, in permits of a byte.
static BUFFERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BUFFER_BUDGET);
/// Fills that talk to the upstream at once. Each holds an upstream
/// connection, its read buffer (`upstream::READ_BUF`) and a temp file, and
/// a fill goes on after its client hung up: without this, clients that ask
/// for many cold blobs and hang up could start any number. More wait for a
/// place before they connect; their readers wait as for a slow upstream.
pub const MAX_FILLS: usize = 256;
static FILLS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_FILLS);
/// Error bodies relayed from upstream are cut at this size.
const MAX_RELAY_BODY: usize = 64 << 10;

/// Where a fill is.
#[derive(Clone)]
pub enum Progress {
    /// Waiting for the upstream's response head.
    Connecting,
    /// Writing. `data` maps the whole (pre-sized) temp file; the first
    /// `written` bytes of it are final.
    Streaming {
        size: u64,
        data: Bytes,
        written: u64,
    },
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

/// A fill in flight. Its readers subscribe to the progress channel.
pub struct Fill {
    pub digest: Digest,
    progress: watch::Sender<Progress>,
}

impl Fill {
    pub(super) fn new(digest: Digest) -> Fill {
        Fill {
            digest,
            progress: watch::Sender::new(Progress::Connecting),
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
                        Progress::Streaming { data, written, .. } => {
                            // Hold back our last byte until the digest is checked.
                            Ok((
                                Some(data.clone()),
                                (*written).min(end.saturating_sub(1)),
                                false,
                            ))
                        }
                        Progress::Verified { data, .. } => Ok((Some(data.clone()), end, true)),
                        Progress::Failed(f) => Err(format!("blob fill failed: {f:?}")),
                    };
                    let (data, limit, verified) = match seen {
                        Ok(x) => x,
                        Err(msg) => {
                            let e: BoxError = msg.into();
                            return Some((Err(e), (rx, pos, true)));
                        }
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
                        let e: BoxError = "blob fill ended without a result".into();
                        return Some((Err(e), (rx, pos, true)));
                    }
                }
            }
        })
    }

    fn set(&self, p: Progress) {
        self.progress.send_replace(p);
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
}

/// Ends the fill as failed if the task stops early (error, panic, shutdown),
/// so that no reader waits forever and the reservation is released.
struct Guard {
    cache: Arc<Cache>,
    fill: Arc<Fill>,
    reserved: u64,
    temp: Option<PathBuf>,
    armed: bool,
}

impl Guard {
    fn fail(mut self, f: Failure) {
        self.finish_failed(f);
    }

    fn finish_failed(&mut self, f: Failure) {
        if !self.armed {
            return;
        }
        self.armed = false;
        // Out of the table first: a follower that sees the failure and joins
        // again must start a fill of its own, not find this one.
        self.cache
            .abandon(&self.fill, self.reserved, self.temp.as_deref());
        self.fill.set(Progress::Failed(f));
        self.cache.metrics.fills_inflight.fetch_sub(1, Relaxed);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.finish_failed(vanished());
    }
}

/// Runs a fill to its end. Spawned on its own task: no client hanging up
/// stops it.
pub async fn run(cache: Arc<Cache>, upstream: Arc<Upstream>, fill: Arc<Fill>, req: FillRequest) {
    let m = Arc::clone(&cache.metrics);
    m.fills_started.fetch_add(1, Relaxed);
    m.fills_inflight.fetch_add(1, Relaxed);
    let digest = fill.digest.clone();
    let mut g = Guard {
        cache: Arc::clone(&cache),
        fill: Arc::clone(&fill),
        reserved: 0,
        temp: None,
        armed: true,
    };
    let path = format!("/v2/{}/blobs/{}", req.name, digest);
    let _place = FILLS
        .acquire()
        .await
        .expect("the semaphore is never closed");

    let resp = match upstream.send(Method::GET, &path, &req.headers, &[]).await {
        Ok(r) => r,
        Err(e) => return g.fail(Failure::Error(e)),
    };
    if resp.status() != StatusCode::OK {
        let (parts, body) = resp.into_parts();
        let body = read_capped(body, MAX_RELAY_BODY, upstream.timeout()).await;
        return g.fail(Failure::Relay {
            status: parts.status,
            headers: parts.headers,
            body,
        });
    }
    let Some(size) = content_length(resp.headers()) else {
        return g.fail(Failure::Error(upstream.failed(UpstreamError::Invalid(
            "upstream sent a blob without Content-Length".into(),
        ))));
    };
    if !digest.admits_size(size) {
        m.digest_mismatches.fetch_add(1, Relaxed);
        let e = UpstreamError::Invalid(format!("upstream announced {digest} with 0 bytes"));
        return g.fail(Failure::Error(upstream.failed(e)));
    }
    if !cache.reserve(size) {
        m.uncached_fills.fetch_add(1, Relaxed);
        tracing::info!(%digest, size, cap = cache.capacity(), "blob will not fit in the cache; streaming it uncached");
        return g.fail(Failure::Uncached);
    }
    g.reserved = size;

    let c2 = Arc::clone(&cache);
    let created = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let (file, path) = c2.temp_file()?;
        file.set_len(size)?;
        let data = super::map(&file)?;
        Ok((file, path, data))
    })
    .await;
    let (file, temp, data) = match created {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::warn!(%digest, error = %e, "cannot write to the cache; streaming uncached");
            m.uncached_fills.fetch_add(1, Relaxed);
            return g.fail(Failure::Uncached);
        }
        Err(_) => return g.fail(Failure::Uncached),
    };
    g.temp = Some(temp.clone());
    let file = Arc::new(file);
    fill.set(Progress::Streaming {
        size,
        data: data.clone(),
        written: 0,
    });
    tracing::debug!(%digest, size, "fill started");

    let mut w = Writer {
        file: Arc::clone(&file),
        hasher: Some(Sha256::new()),
        written: 0,
        pending: None,
        written_pending: 0,
        batch: Vec::new(),
        batch_len: 0,
        batch_room: None,
    };
    let mut body = resp.into_body();
    let mut resumes = 0;
    let mut skip = 0u64; // bytes to drop from a 200 answer to a resume
    loop {
        let mut err = loop {
            let chunk = match tokio::time::timeout(upstream.timeout(), body.frame()).await {
                Ok(Some(Ok(f))) => match f.into_data() {
                    Ok(c) => c,
                    Err(_) => continue,
                },
                Ok(None) if w.total() == size => break None,
                Ok(None) => {
                    break Some(Error::invalid(format!(
                        "upstream body ended after {} of {size} bytes",
                        w.total()
                    )))
                }
                Ok(Some(Err(e))) => {
                    break Some(Error::from(UpstreamError::Broken {
                        url: path.clone(),
                        cause: Cause::new(e),
                    }))
                }
                Err(_) => {
                    break Some(Error::from(UpstreamError::Timeout {
                        url: path.clone(),
                        wait: Wait::Body(upstream.timeout()),
                    }))
                }
            };
            let mut chunk = chunk;
            m.upstream_bytes.fetch_add(chunk.len() as u64, Relaxed);
            if skip > 0 {
                let n = skip.min(chunk.len() as u64);
                skip -= n;
                let _ = chunk.split_to(n as usize);
            }
            if w.total() + chunk.len() as u64 > size {
                m.digest_mismatches.fetch_add(1, Relaxed);
                tracing::warn!(%digest, size, "upstream sent more bytes than it announced; discarding");
                let e = Error::invalid(format!("{digest}: longer than its Content-Length"));
                return g.fail(Failure::Error(e));
            }
            if let Err(e) = w.push(chunk, &fill, size, &data).await {
                return g.fail(write_failed(&digest, e));
            }
        };
        let Some(first_err) = err.take() else { break };
        // The connection broke: resume from the first byte we lack.
        if let Err(e) = w.flush(&fill, size, &data).await {
            return g.fail(write_failed(&digest, e));
        }
        let mut why = first_err;
        loop {
            m.upstream_errors.fetch_add(1, Relaxed);
            if resumes >= upstream.retries() {
                tracing::warn!(%digest, error = %why, resumes, "giving up on the upstream download");
                return g.fail(Failure::Error(why));
            }
            resumes += 1;
            m.upstream_resumes.fetch_add(1, Relaxed);
            let from = w.total();
            tracing::info!(%digest, error = %why, from, attempt = resumes, "resuming the upstream download");
            tokio::time::sleep(backoff(resumes)).await;
            let range = HeaderValue::from_str(&format!("bytes={from}-")).expect("ascii");
            match upstream
                .send(Method::GET, &path, &req.headers, &[(header::RANGE, range)])
                .await
            {
                Ok(r)
                    if r.status() == StatusCode::PARTIAL_CONTENT
                        && range_start(r.headers()) == Some(from) =>
                {
                    skip = 0;
                    body = r.into_body();
                    break;
                }
                Ok(r) if r.status() == StatusCode::OK => {
                    skip = from;
                    body = r.into_body();
                    break;
                }
                Ok(r) => why = Error::status("resume", r.status()),
                Err(e) => why = e,
            }
        }
    }
    if let Err(e) = w.flush(&fill, size, &data).await {
        return g.fail(write_failed(&digest, e));
    }
    let got = Digest::from_hasher(w.hasher.take().expect("hasher present until the end"));
    if got != digest {
        m.digest_mismatches.fetch_add(1, Relaxed);
        tracing::warn!(%digest, %got, "upstream content does not match its digest; not cached, readers cut off");
        let e = Error::from(UpstreamError::DigestMismatch {
            expected: digest.clone(),
            got,
        });
        return g.fail(Failure::Error(e));
    }
    fill.set(Progress::Verified { size, data });
    g.armed = false;
    let c2 = Arc::clone(&cache);
    let (d2, f2) = (digest.clone(), Arc::clone(&fill));
    let commit = move || c2.commit(&d2, size, &temp, &file, Stored::Fill(&f2));
    match tokio::task::spawn_blocking(commit).await {
        Ok(Ok(())) => tracing::debug!(%digest, size, "fill committed"),
        Ok(Err(e)) => tracing::warn!(%digest, error = %e, "verified blob could not be committed"),
        Err(e) => tracing::warn!(%digest, error = %e, "commit task failed"),
    }
    // Counted until committed, so that a graceful shutdown waits for it.
    m.fills_inflight.fetch_sub(1, Relaxed);
}

fn write_failed(digest: &Digest, e: std::io::Error) -> Failure {
    tracing::warn!(%digest, error = %e, "cache write failed");
    Failure::Error(Error::disk("write a blob", e))
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200 * (1 << attempt.min(5)))
}

/// Room in [`BUFFERS`] for `n` bytes held in memory; waits while the budget
/// is spent (waiters are served first come, first served).
async fn room_for(n: usize) -> tokio::sync::SemaphorePermit<'static> {
    BUFFERS
        .acquire_many(n.min(BUFFER_BUDGET) as u32)
        .await
        .expect("the budget is never closed")
}

/// Writes upstream chunks to the temp file in batches, hashing them on the
/// blocking pool while the next batch is read from the network. Every byte
/// it holds is counted in [`BUFFERS`].
struct Writer {
    file: Arc<File>,
    /// Taken by a batch in flight, returned when it is written.
    hasher: Option<Sha256>,
    /// Bytes on disk and hashed.
    written: u64,
    pending: Option<tokio::task::JoinHandle<std::io::Result<(Sha256, u64)>>>,
    /// Bytes of the batch in flight.
    written_pending: u64,
    batch: Vec<Bytes>,
    batch_len: usize,
    /// The budget held by `batch`; it goes with the batch to disk.
    batch_room: Option<tokio::sync::SemaphorePermit<'static>>,
}

impl Writer {
    /// Bytes received so far, written or not.
    fn total(&self) -> u64 {
        self.written + self.written_pending + self.batch_len as u64
    }

    async fn push(
        &mut self,
        chunk: Bytes,
        fill: &Fill,
        size: u64,
        data: &Bytes,
    ) -> std::io::Result<()> {
        let room = match BUFFERS.try_acquire_many(chunk.len().min(BUFFER_BUDGET) as u32) {
            Ok(p) => p,
            Err(_) => {
                // The budget is spent: give back what this fill holds (its
                // bytes go to disk), then wait for room for this chunk.
                self.flush(fill, size, data).await?;
                room_for(chunk.len()).await
            }
        };
        match &mut self.batch_room {
            Some(r) => r.merge(room),
            None => self.batch_room = Some(room),
        }
        self.batch_len += chunk.len();
        self.batch.push(chunk);
        if self.batch_len >= WRITE_BATCH || BUFFERS.available_permits() < GATHER_FLOOR {
            self.start_batch(fill, size, data).await?;
        }
        Ok(())
    }

    /// Waits for the batch in flight, publishes its bytes, and sends the
    /// gathered chunks to disk.
    async fn start_batch(&mut self, fill: &Fill, size: u64, data: &Bytes) -> std::io::Result<()> {
        self.finish_pending(fill, size, data).await?;
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let len = std::mem::take(&mut self.batch_len) as u64;
        let room = self.batch_room.take();
        let mut hasher = self.hasher.take().expect("one batch at a time");
        let file = Arc::clone(&self.file);
        let mut off = self.written;
        self.written_pending = len;
        self.pending = Some(tokio::task::spawn_blocking(move || {
            for b in &batch {
                file.write_all_at(b, off)?;
                hasher.update(b);
                off += b.len() as u64;
            }
            // The bytes are on disk: their room goes back to the budget.
            drop((batch, room));
            Ok((hasher, len))
        }));
        Ok(())
    }

    async fn finish_pending(
        &mut self,
        fill: &Fill,
        size: u64,
        data: &Bytes,
    ) -> std::io::Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let (hasher, len) = p.await.map_err(std::io::Error::other)??;
        self.hasher = Some(hasher);
        self.written += len;
        self.written_pending = 0;
        fill.set(Progress::Streaming {
            size,
            data: data.clone(),
            written: self.written,
        });
        Ok(())
    }

    /// Writes everything received so far.
    async fn flush(&mut self, fill: &Fill, size: u64, data: &Bytes) -> std::io::Result<()> {
        self.start_batch(fill, size, data).await?;
        self.finish_pending(fill, size, data).await
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The first byte of a `Content-Range: bytes a-b/n` answer.
fn range_start(h: &HeaderMap) -> Option<u64> {
    let v = h.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.strip_prefix("bytes ")?;
    rest.split(['-', '/']).next()?.trim().parse().ok()
}

/// Reads at most `cap` bytes of a small upstream body (an error document).
pub async fn read_capped(mut body: Incoming, cap: usize, timeout: Duration) -> Bytes {
    let mut out = Vec::new();
    let read = async {
        while let Some(Ok(f)) = body.frame().await {
            if let Ok(d) = f.into_data() {
                let room = cap.saturating_sub(out.len());
                out.extend_from_slice(&d[..d.len().min(room)]);
                if out.len() >= cap {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(timeout, read).await;
    Bytes::from(out)
}

/// Streams a blob straight from upstream for one client, checking its digest
/// and size on the way; the last chunk is held back until they match, so a
/// wrong blob never ends cleanly. Used when a blob is not kept in the cache.
pub fn verified_stream(
    body: Incoming,
    digest: Digest,
    size: u64,
    timeout: Duration,
    metrics: Arc<Metrics>,
) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static {
    struct St {
        body: Incoming,
        hasher: Sha256,
        seen: u64,
        held: Option<Bytes>,
        done: bool,
    }
    let st = St {
        body,
        hasher: Sha256::new(),
        seen: 0,
        held: None,
        done: false,
    };
    stream::unfold(st, move |mut st| {
        let digest = digest.clone();
        let metrics = Arc::clone(&metrics);
        async move {
            if st.done {
                return None;
            }
            loop {
                let next = tokio::time::timeout(timeout, st.body.frame()).await;
                let fail = |st: St, msg: String| {
                    let mut st = st;
                    st.done = true;
                    let e: BoxError = msg.into();
                    Some((Err(e), st))
                };
                match next {
                    Err(_) => return fail(st, "upstream stalled".into()),
                    Ok(Some(Err(e))) => return fail(st, format!("upstream failed: {e}")),
                    Ok(Some(Ok(f))) => {
                        let Ok(chunk) = f.into_data() else { continue };
                        st.seen += chunk.len() as u64;
                        st.hasher.update(&chunk);
                        metrics
                            .upstream_bytes
                            .fetch_add(chunk.len() as u64, Relaxed);
                        metrics
                            .served_upstream_bytes
                            .fetch_add(chunk.len() as u64, Relaxed);
                        if st.seen > size {
                            metrics.digest_mismatches.fetch_add(1, Relaxed);
                            return fail(st, format!("{digest}: longer than announced"));
                        }
                        if let Some(prev) = st.held.replace(chunk) {
                            return Some((Ok(prev), st));
                        }
                    }
                    Ok(None) => {
                        let got = Digest::from_hasher(std::mem::take(&mut st.hasher));
                        if st.seen != size || got != digest {
                            metrics.digest_mismatches.fetch_add(1, Relaxed);
                            let msg = format!(
                                "{digest}: upstream sent {} bytes hashing to {got}",
                                st.seen
                            );
                            return fail(st, msg);
                        }
                        st.done = true;
                        return st.held.take().map(|b| (Ok(b), st));
                    }
                }
            }
        }
    })
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
        let dir = std::env::temp_dir().join(format!("regproxy-fill-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = Arc::new(Cache::open(&dir, 1 << 20, Arc::new(Metrics::default())).unwrap());
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

        cache.metrics.fills_inflight.fetch_add(1, Relaxed);
        let refused = Failure::Relay {
            status: StatusCode::UNAUTHORIZED,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        Guard {
            cache: Arc::clone(&cache),
            fill: Arc::clone(&fill),
            reserved: 0,
            temp: None,
            armed: true,
        }
        .fail(refused);

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
        assert_eq!(cache.metrics.fills_inflight.load(Relaxed), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

//! Where a fill's bytes come from: the upstream's first answer, and the blob's
//! bytes in order however often the connection breaks on the way.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::sibling::Tail;
use super::{Failure, Fill, FillRequest};
use crate::budget::Horizon;
use crate::digest::Digest;
use crate::error::{Cause, Error, UpstreamError, Wait};
use crate::metrics::{Fallback, Metrics};
use crate::peers::Ask;
use crate::upstream::Upstream;

/// Error bodies relayed from upstream are cut at this size.
const MAX_RELAY_BODY: usize = 64 << 10;

/// Asks the upstream for the blob: its size and body, or why there is none
/// (a refusal to relay, or an answer that cannot be the blob).
pub(super) async fn start(
    upstream: &Upstream,
    path: &str,
    req: &FillRequest,
    digest: &Digest,
    metrics: &Metrics,
) -> Result<(u64, Incoming), Failure> {
    let resp = upstream
        .send(Method::GET, path, &req.headers, &[])
        .await
        .map_err(Failure::Error)?;
    if resp.status() != StatusCode::OK {
        let (parts, body) = resp.into_parts();
        let body = read_capped(body, MAX_RELAY_BODY, upstream.timeout()).await;
        return Err(Failure::Relay {
            status: parts.status,
            headers: parts.headers,
            body,
        });
    }
    let Some(size) = content_length(resp.headers()) else {
        let e = UpstreamError::Invalid("upstream sent a blob without Content-Length".into());
        return Err(Failure::Error(upstream.failed(e)));
    };
    if !digest.admits_size(size) {
        metrics.digest_mismatches.fetch_add(1, Relaxed);
        let e = UpstreamError::Invalid(format!("upstream announced {digest} with 0 bytes"));
        return Err(Failure::Error(upstream.failed(e)));
    }
    Ok((size, resp.into_body()))
}

/// The `size` bytes of a blob, in order, from an upstream body that may
/// break. After a cut (an error, a stall longer than the upstream timeout, an
/// early end) it asks again from the first byte it lacks with `Range`, up to
/// `retries` times in a row without 64 KiB coming in between, each after a
/// longer pause (see [`backoff`]); an upstream that ignores the range and
/// sends the whole blob has its first bytes skipped. The count starts over
/// once a resumed answer brings [`PROGRESS`] bytes: an upstream restarted ten times
/// during one long fill (a rollout, a crash loop) is followed as long as it
/// comes back within the pauses, and each cut moves the fill forward, so it
/// still ends.
pub(super) struct Resumable<'a> {
    upstream: &'a Upstream,
    path: &'a str,
    req: &'a FillRequest,
    digest: &'a Digest,
    /// Its lane for the budget, which may change as clients join.
    fill: &'a Fill,
    metrics: &'a Metrics,
    /// Where the bytes come from until it fails: another process's fill.
    tail: Option<Tail>,
    /// The upstream's body; once `tail` is gone, there is one. First the
    /// owner's, while `peer` says so.
    body: Option<Incoming>,
    /// The peer that `body` comes from, until it breaks.
    peer: Option<Ask>,
    /// The last cut was the peer's, not the upstream's.
    peer_broke: bool,
    /// Every peer that sent bytes of this blob, the one that announced its
    /// size first.
    peers_used: Vec<std::net::SocketAddr>,
    /// Bytes that came from the upstream.
    from_upstream: u64,
    /// What the budget was charged for the upstream's current response.
    horizon: Horizon,
    /// The peer that broke off, and why, until the next call asks the
    /// digest's next owner for the rest.
    switch: Option<(Ask, Error)>,
    /// What the peer brought since the window started: a peer must bring
    /// [`PROGRESS`] bytes (or the rest of the blob) for each
    /// `--upstream-timeout` this fill waited on it.
    window: Window,
    size: u64,
    /// Bytes handed out.
    pos: u64,
    /// Bytes to drop from a 200 answer to a resume.
    skip: u64,
    /// Resumes in a row: since the last [`PROGRESS`] bytes came in.
    resumes: u32,
    /// Where the last resume started.
    resumed_at: u64,
    /// Why the body broke, once the empty chunk that announces the resume
    /// was handed out.
    cut: Option<Error>,
}

/// Where a fill's first bytes come from.
pub(super) enum First {
    Upstream(Incoming),
    Sibling(Tail),
    /// The owner's answer (`req.peer`).
    Peer(Incoming),
}

impl<'a> Resumable<'a> {
    pub(super) fn new(
        upstream: &'a Upstream,
        path: &'a str,
        req: &'a FillRequest,
        fill: &'a Fill,
        metrics: &'a Metrics,
        (size, first): (u64, First),
    ) -> Resumable<'a> {
        let (tail, body, peer) = match first {
            First::Upstream(b) => (None, Some(b), None),
            First::Sibling(t) => (Some(t), None, None),
            First::Peer(b) => (None, Some(b), req.peer.clone()),
        };
        let peers_used = peer.iter().map(|a| a.owner).collect();
        Resumable {
            upstream,
            path,
            req,
            digest: &fill.digest,
            fill,
            metrics,
            tail,
            body,
            peer,
            peer_broke: false,
            peers_used,
            from_upstream: 0,
            horizon: upstream.horizon(size),
            switch: None,
            window: Window::new(size),
            size,
            pos: 0,
            skip: 0,
            resumes: 0,
            resumed_at: 0,
            cut: None,
        }
    }

    /// The next bytes of the blob; `None` once all `size` have come. An empty
    /// chunk says that the connection broke and the next call waits to
    /// resume: the moment to put what the caller holds where its readers
    /// see it.
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        if let Some((prev, why)) = self.switch.take() {
            self.next_owner(prev, why).await;
        }
        if let Some(why) = self.cut.take() {
            self.resume(why).await?;
        }
        if let Some(tail) = &mut self.tail {
            match tail.next().await {
                Ok(Some(chunk)) => {
                    self.pos += chunk.len() as u64;
                    return Ok(Some(chunk));
                }
                Ok(None) => return Ok(None),
                Err(why) => {
                    let (digest, at) = (self.digest, self.pos);
                    tracing::info!(%digest, at, error = %why, "the other process's fill stopped; the upstream sends the rest");
                    self.tail = None;
                    self.cut = Some(why);
                    return Ok(Some(Bytes::new()));
                }
            }
        }
        let timeout = self.upstream.timeout();
        let Some(body) = &mut self.body else {
            return Err(Error::Internal("a fill with neither upstream nor sibling"));
        };
        // The peer sent too little for too long, without an error of its own.
        let mut stalled = false;
        let why = loop {
            // A peer is waited on while it stays live (see `Peers::patiently`).
            let frame = match &self.peer {
                Some(ask) => {
                    let waiting = tokio::time::Instant::now();
                    let frame = ask.peers.patiently(ask.owner, body.frame()).await;
                    self.window.waited += waiting.elapsed();
                    match frame {
                        Ok(f) => Some(f),
                        // Its probe failed: dead, not slow.
                        Err(Fallback::Unreachable) => {
                            break Error::invalid(format!(
                                "{}: the peer stopped answering its probes",
                                self.path
                            ))
                        }
                        Err(_) => None,
                    }
                }
                None => tokio::time::timeout(timeout, body.frame()).await.ok(),
            };
            let frame = match frame {
                Some(Some(Ok(f))) => f,
                Some(None) if self.pos == self.size => return Ok(None),
                Some(None) => {
                    break Error::invalid(format!(
                        "the body ended after {} of {} bytes",
                        self.pos, self.size
                    ))
                }
                Some(Some(Err(e))) => {
                    break Error::from(UpstreamError::Broken {
                        url: self.path.to_owned(),
                        cause: Cause::new(e),
                    })
                }
                None if self.peer.is_some() => {
                    stalled = true;
                    break stalled_peer(self.path);
                }
                None => {
                    break Error::from(UpstreamError::Timeout {
                        url: self.path.to_owned(),
                        wait: Wait::Body(timeout),
                    })
                }
            };
            let Ok(mut chunk) = frame.into_data() else {
                continue;
            };
            match &self.peer {
                Some(ask) => {
                    ask.peers.received(chunk.len() as u64);
                    // A live peer that trickles is left like a silent one.
                    if !self
                        .window
                        .kept_up(chunk.len() as u64, ask.peers.patience())
                    {
                        stalled = true;
                        break stalled_peer(self.path);
                    }
                    if self.window.waited >= ask.peers.patience() {
                        self.window = Window::new(self.size - self.pos);
                    }
                }
                None => {
                    self.from_upstream += chunk.len() as u64;
                    self.metrics
                        .upstream_bytes
                        .fetch_add(chunk.len() as u64, Relaxed);
                    // Before the next read: while it waits, TCP holds the
                    // sender back.
                    let owed = self.horizon.read(chunk.len() as u64);
                    if owed > 0 {
                        let lane = self.fill.lane();
                        self.upstream.budget().take(owed, lane).await;
                    }
                }
            }
            if self.skip > 0 {
                let n = self.skip.min(chunk.len() as u64);
                self.skip -= n;
                let _ = chunk.split_to(n as usize);
            }
            if chunk.is_empty() {
                continue;
            }
            if self.pos + chunk.len() as u64 > self.size {
                self.metrics.digest_mismatches.fetch_add(1, Relaxed);
                let (digest, size) = (self.digest, self.size);
                if let Some(ask) = &self.peer {
                    ask.peers.fell_back(ask.owner, Fallback::BadBytes);
                }
                tracing::warn!(%digest, size, "the source sent more bytes than it announced; discarding");
                return Err(Error::invalid(format!(
                    "{digest}: longer than its Content-Length"
                )));
            }
            self.pos += chunk.len() as u64;
            if self.pos >= self.resumed_at.saturating_add(PROGRESS) {
                // Real progress since the last resume: the count starts over.
                self.resumes = 0;
            }
            return Ok(Some(chunk));
        };
        if let Some(ask) = self.peer.take() {
            let (digest, at, owner) = (self.digest, self.pos, ask.owner);
            tracing::info!(%digest, %owner, at, error = %why, "the owner's body broke off or stalled");
            // A stall is no sign of death: the peer may wait on the uplink.
            let reason = match stalled {
                true => Fallback::Timeout,
                false => Fallback::Broken,
            };
            ask.peers.fell_back(owner, reason);
            if !stalled {
                // What came is handed out first; the next call asks the
                // digest's next owner. After a stall it does not: a live
                // owner that stalls most likely waits on the same uplink.
                self.switch = Some((ask, why));
                return Ok(Some(Bytes::new()));
            }
            self.peer_broke = true;
        }
        self.cut = Some(why);
        Ok(Some(Bytes::new()))
    }

    /// After `prev` broke off: the rest from the digest's next owner among
    /// the live peers this fill has not used, if that is another node (it
    /// is fetched once more for the cluster, not once per node); otherwise
    /// the upstream sends it (a cut for [`Resumable::resume`]).
    async fn next_owner(&mut self, prev: Ask, why: Error) {
        if self.peers_used.len() < MAX_PEERS {
            let at = (self.pos, self.size);
            let used = &self.peers_used;
            if let Some((next, body)) =
                super::peer::resume(&prev, self.digest, self.path, at, used).await
            {
                self.peers_used.push(next.owner);
                self.peer = Some(next);
                self.body = Some(body);
                self.window = Window::new(self.size - self.pos);
                return;
            }
        }
        self.peer_broke = true;
        self.cut = Some(why);
    }

    /// Asks again from the first byte not handed out, until an answer comes
    /// or the retries in a row are spent.
    async fn resume(&mut self, mut why: Error) -> Result<(), Error> {
        let digest = self.digest;
        // The first ask after a peer's body stopped is the fallback, not a
        // retry: neither counted nor delayed. Neither it nor the first after
        // a sibling's fill stopped follows an upstream error.
        let mut fallback = std::mem::take(&mut self.peer_broke);
        let mut upstream_failed = self.body.is_some() && !fallback;
        loop {
            if std::mem::replace(&mut upstream_failed, true) {
                self.metrics.upstream_errors.fetch_add(1, Relaxed);
            }
            let from = self.pos;
            self.resumed_at = from;
            if std::mem::take(&mut fallback) {
                tracing::info!(%digest, error = %why, from, "the upstream sends the rest");
            } else {
                if self.resumes >= self.upstream.retries() {
                    let resumes = self.resumes;
                    tracing::warn!(%digest, error = %why, resumes, "giving up on the upstream download");
                    return Err(why);
                }
                self.resumes += 1;
                self.metrics.upstream_resumes.fetch_add(1, Relaxed);
                let attempt = self.resumes;
                tracing::info!(%digest, error = %why, from, attempt, "resuming the upstream download");
                tokio::time::sleep(backoff(attempt)).await;
            }
            let range = HeaderValue::from_str(&format!("bytes={from}-")).expect("ascii");
            let headers = &self.req.headers;
            match self
                .upstream
                .send(Method::GET, self.path, headers, &[(header::RANGE, range)])
                .await
            {
                Ok(r)
                    if r.status() == StatusCode::PARTIAL_CONTENT
                        && content_range(r.headers()).is_some_and(|(a, _)| a == from) =>
                {
                    let total = content_range(r.headers()).and_then(|(_, n)| n);
                    self.same_size(total)?;
                    self.skip = 0;
                    self.horizon = self.upstream.horizon(self.size - from);
                    self.body = Some(r.into_body());
                    return Ok(());
                }
                Ok(r) if r.status() == StatusCode::OK => {
                    self.same_size(content_length(r.headers()))?;
                    self.skip = from;
                    self.horizon = self.upstream.horizon(self.size);
                    self.body = Some(r.into_body());
                    return Ok(());
                }
                Ok(r) => why = Error::status("resume", r.status()),
                Err(e) => why = e,
            }
        }
    }
}

impl Resumable<'_> {
    /// The peer to blame when the blob does not match its digest: the one
    /// that sent all of it. With several sources nobody knows whose bytes
    /// were bad, and an honest peer that relayed the rest must not lose its
    /// share of the digests for it.
    pub(super) fn blamed(&self) -> &[std::net::SocketAddr] {
        match (self.from_upstream, self.peers_used.len()) {
            (0, 1) => &self.peers_used,
            _ => &[],
        }
    }

    /// Checks the size a resumed answer gives the whole blob against the
    /// size announced first. A peer that announced another size than the
    /// upstream's lied (or its disk rotted): it is banned, and the fill
    /// fails rather than eat into the cache on its word.
    fn same_size(&self, total: Option<u64>) -> Result<(), Error> {
        let Some(total) = total else { return Ok(()) };
        if total == self.size {
            return Ok(());
        }
        let (digest, size) = (self.digest, self.size);
        if let (Some(first), Some(ask)) = (self.peers_used.first(), &self.req.peer) {
            ask.peers.fell_back(*first, Fallback::BadBytes);
        }
        tracing::warn!(%digest, size, total, "the upstream gives the blob another size than announced first; discarding");
        Err(Error::invalid(format!(
            "{digest}: {total} bytes upstream, {size} announced first"
        )))
    }
}

/// How much a peer brought while this fill waited on it.
struct Window {
    /// Time spent waiting for the peer's frames (not for our own disk or
    /// buffer budget).
    waited: Duration,
    bytes: u64,
    /// What the blob had left when the window started.
    left: u64,
}

impl Window {
    fn new(left: u64) -> Window {
        Window {
            waited: Duration::ZERO,
            bytes: 0,
            left,
        }
    }

    /// Counts `n` more bytes; whether the peer keeps up: [`PROGRESS`] bytes
    /// (or all that was left) once `patience` has been spent waiting.
    fn kept_up(&mut self, n: u64, patience: Duration) -> bool {
        self.bytes += n;
        self.waited < patience || self.bytes >= PROGRESS.min(self.left)
    }
}

/// A peer's body given up: too little came for too long.
fn stalled_peer(path: &str) -> Error {
    Error::invalid(format!(
        "{path}: the peer sent too little for --upstream-timeout"
    ))
}

/// Most peers one fill takes bytes from: the owner, and the owners after
/// it when one dies.
const MAX_PEERS: usize = 3;

/// Bytes a resumed answer must bring before the count of resumes in a row
/// starts over: a path that cuts every connection after a few bytes still
/// ends the fill after `--upstream-retries` resumes, rather than crawling
/// through a large blob for hours, while a slow link cut every few seconds
/// (each connection bringing hundreds of KiB) is followed to the end.
const PROGRESS: u64 = 64 << 10;

/// The pause before resume `attempt` in a row: 0.4 s, doubling up to 6.4 s,
/// so the default 5 retries wait out an upstream that is gone for about 12 s
/// (a restart, a failover) and no more.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200 * (1 << attempt.min(5)))
}

pub(super) fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The first byte and the whole size (`None` for `*`) of a
/// `Content-Range: bytes a-b/n` answer.
pub(super) fn content_range(h: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = h.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let start = range.split('-').next()?.trim().parse().ok()?;
    Some((start, total.trim().parse().ok()))
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

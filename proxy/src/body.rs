//! The response body: a few cheap shapes behind one type, so handlers can
//! return "from the cache", "following a fill" or "from upstream" without
//! boxing on the hot path.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::Stream;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;

use crate::budget::Budget;
use crate::error::{Cause, Error, UpstreamError, Wait};
use crate::metrics::Metrics;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest slice of a mapped file handed to hyper at once. A slice of a
/// registered mapping leaves by `sendfile` and costs no memory, and each
/// write takes only what the socket has room for, so connections still
/// interleave; fewer, larger frames mean fewer flushes, each of which ends
/// a `TCP_CORK` (see [`crate::sendfile`]).
const MAPPED_CHUNK: usize = 32 << 20;

pub struct Body {
    kind: Kind,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    /// Slices of an immutable buffer (a memory map of a committed cache file):
    /// zero copies between the page cache and the socket write.
    Mapped {
        data: Bytes,
        counter: Arc<AtomicU64>,
    },
    /// Chunks from a stream that may fail; an `Err` aborts the connection.
    Stream {
        stream: BoxStream<'static, Result<Bytes, BoxError>>,
        len: Option<u64>,
    },
    /// A client's body on its way to the upstream (a push); a silence longer
    /// than `idle` ends it in an error, which aborts the upstream request, so
    /// a client that stalls mid-upload holds neither connection forever.
    Incoming {
        body: Incoming,
        idle: Idle,
    },
    /// An upstream body relayed to a client, counted in `metrics`; a silence
    /// longer than `idle` ends it in an error, so a stalled upstream does
    /// not hold the client forever.
    Upstream {
        body: Incoming,
        metrics: Arc<Metrics>,
        budget: Arc<Budget>,
        idle: Idle,
    },
}

/// How long a relayed body has kept us waiting. The clock runs only while
/// the body is polled and has nothing: a pause on the other side (the reader
/// of this body not reading) is not held against it.
struct Idle {
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
}

impl Idle {
    fn new(limit: Duration) -> Idle {
        Idle {
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
            waiting: false,
        }
    }

    /// The body had nothing: true once it has had nothing for `limit`.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.waiting {
            self.waiting = true;
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + self.limit);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }

    /// The body gave a frame (or ended).
    fn active(&mut self) {
        self.waiting = false;
    }

    /// Polls `body` for its next frame; `silent` is the error once it has
    /// given nothing for the limit, `broken` the error its failure becomes.
    fn poll_frame(
        &mut self,
        body: &mut Incoming,
        cx: &mut Context<'_>,
        silent: impl FnOnce(Duration) -> Error,
        broken: impl FnOnce(hyper::Error) -> Error,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(body).poll_frame(cx) {
            Poll::Pending if self.expired(cx) => Poll::Ready(Some(Err(silent(self.limit).into()))),
            Poll::Pending => Poll::Pending,
            Poll::Ready(f) => {
                self.active();
                Poll::Ready(f.map(|f| f.map_err(|e| broken(e).into())))
            }
        }
    }
}

impl Body {
    pub fn empty() -> Body {
        Body { kind: Kind::Empty }
    }

    pub fn full(b: impl Into<Bytes>) -> Body {
        Body {
            kind: Kind::Full(Some(b.into())),
        }
    }

    /// Serves `data`; each chunk sent is added to `counter`.
    pub fn mapped(data: Bytes, counter: Arc<AtomicU64>) -> Body {
        Body {
            kind: Kind::Mapped { data, counter },
        }
    }

    /// A body of exactly `len` bytes, when known, from `stream`.
    pub fn stream(
        stream: impl Stream<Item = Result<Bytes, BoxError>> + Send + 'static,
        len: Option<u64>,
    ) -> Body {
        Body {
            kind: Kind::Stream {
                stream: Box::pin(stream),
                len,
            },
        }
    }

    /// A client's body, relayed as it arrives; `idle` is the longest silence
    /// allowed.
    pub fn incoming(body: Incoming, idle: Duration) -> Body {
        Body {
            kind: Kind::Incoming {
                body,
                idle: Idle::new(idle),
            },
        }
    }

    /// An upstream body for a client; `idle` is the longest silence allowed.
    /// Its bytes are charged to `budget` in [`crate::budget::Lane::Meta`]: never held.
    pub fn upstream(
        body: Incoming,
        metrics: Arc<Metrics>,
        budget: Arc<Budget>,
        idle: Duration,
    ) -> Body {
        Body {
            kind: Kind::Upstream {
                body,
                metrics,
                budget,
                idle: Idle::new(idle),
            },
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Kind::Mapped { data, counter } => {
                if data.is_empty() {
                    return Poll::Ready(None);
                }
                let n = data.len().min(MAPPED_CHUNK);
                let chunk = data.split_to(n);
                counter.fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Kind::Stream { stream, len } => match Pin::new(stream).poll_next(cx) {
                Poll::Ready(Some(Ok(b))) => {
                    if let Some(l) = len {
                        *l = l.saturating_sub(b.len() as u64);
                    }
                    Poll::Ready(Some(Ok(Frame::data(b))))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            Kind::Incoming { body, idle } => idle.poll_frame(body, cx, Error::ClientStalled, |e| {
                Error::ClientAborted(Cause::new(e))
            }),
            Kind::Upstream {
                body,
                metrics,
                budget,
                idle,
            } => {
                let silent = |after| {
                    Error::from(UpstreamError::Timeout {
                        url: "relayed body".into(),
                        wait: Wait::Body(after),
                    })
                };
                let broken = |e| {
                    Error::from(UpstreamError::Broken {
                        url: "relayed body".into(),
                        cause: Cause::new(e),
                    })
                };
                let polled = idle.poll_frame(body, cx, silent, broken);
                if let Poll::Ready(Some(Ok(f))) = &polled {
                    let n = f.data_ref().map_or(0, |d| d.len() as u64);
                    metrics.upstream_bytes.fetch_add(n, Ordering::Relaxed);
                    budget.charge(n);
                    metrics
                        .served_upstream_bytes
                        .fetch_add(n, Ordering::Relaxed);
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            Kind::Mapped { data, .. } => data.is_empty(),
            Kind::Stream { len, .. } => *len == Some(0),
            Kind::Incoming { body, .. } => body.is_end_stream(),
            Kind::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Mapped { data, .. } => SizeHint::with_exact(data.len() as u64),
            Kind::Stream { len: Some(l), .. } => SizeHint::with_exact(*l),
            Kind::Stream { len: None, .. } => SizeHint::default(),
            Kind::Incoming { body, .. } => body.size_hint(),
            Kind::Upstream { body, .. } => body.size_hint(),
        }
    }
}

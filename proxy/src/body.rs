//! The response body: a few cheap shapes behind one type, so handlers can
//! return "from the cache", "following a fill" or "from upstream" without
//! boxing on the hot path.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::Stream;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::metrics::Metrics;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest slice of a mapped file handed to hyper at once: large enough that
/// per-frame work vanishes, small enough to interleave connections fairly.
const MAPPED_CHUNK: usize = 4 << 20;

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
        counter: Option<Arc<AtomicU64>>,
    },
    /// Chunks from a stream that may fail; an `Err` aborts the connection.
    Stream {
        stream: BoxStream<'static, Result<Bytes, BoxError>>,
        len: Option<u64>,
    },
    /// Relayed (from upstream, or to it); each chunk is counted in `metrics` when given.
    Upstream(Incoming, Option<Arc<Metrics>>),
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
    pub fn mapped(data: Bytes, counter: Option<Arc<AtomicU64>>) -> Body {
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

    pub fn upstream(b: Incoming, metrics: Option<Arc<Metrics>>) -> Body {
        Body {
            kind: Kind::Upstream(b, metrics),
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
                if let Some(c) = counter {
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
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
            Kind::Upstream(b, m) => {
                let f = Pin::new(b).poll_frame(cx).map_err(Into::into);
                if let (Poll::Ready(Some(Ok(f))), Some(m)) = (&f, m) {
                    if let Some(d) = f.data_ref() {
                        m.upstream_bytes
                            .fetch_add(d.len() as u64, Ordering::Relaxed);
                        m.served_upstream_bytes
                            .fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                }
                f
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            Kind::Mapped { data, .. } => data.is_empty(),
            Kind::Stream { len, .. } => *len == Some(0),
            Kind::Upstream(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Mapped { data, .. } => SizeHint::with_exact(data.len() as u64),
            Kind::Stream { len: Some(l), .. } => SizeHint::with_exact(*l),
            Kind::Stream { len: None, .. } => SizeHint::default(),
            Kind::Upstream(b, _) => b.size_hint(),
        }
    }
}

//! A listener and its connection cap: what keeps it from being starved by
//! slow or idle clients.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioTimer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// What keeps a listener from being starved by slow or idle clients; every
/// listener gets the same.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest wait for a whole request head, and so the keep-alive idle
    /// timeout too: hyper 1.x starts this timer whenever a connection waits
    /// for a request (`proto/h1/conn.rs`, `poll_read_head`), a fresh one or
    /// a kept-alive one whose last response is done.
    pub header_read_timeout: Duration,
    /// Connections a listener holds at once. Past it, the API listener
    /// leaves new connections waiting in the kernel's backlog until one
    /// ends (clients do not retry a refusal); the admin listener answers
    /// them 503, except the node's own (see [`LOCAL_RESERVE`]).
    pub max_connections: usize,
}

/// Admin connections kept for clients on the listener's own address: on a
/// node, kubelet's probes come from the node's address to the node's
/// address, while a flood from other pods comes from theirs. So a flood of
/// the admin port fails no probe.
const LOCAL_RESERVE: usize = 8;

/// What a listener does with a connection past its cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PastCap {
    /// Leave it in the backlog until a slot frees.
    Wait,
    /// Answer 503 and close it, unless it comes from the listener's own
    /// address and a reserved slot is free.
    Refuse,
}

/// Largest read buffer of a client connection (hyper's minimum is 8 KiB).
/// It bounds a request head (hyper answers 431 past it) and what a
/// connection holds of a push body it relays, so that `--max-connections`
/// idle or slow connections cost a known amount of memory.
const CONN_READ_BUF: usize = 16 << 10;

/// The answer to a connection past the cap, written without reading its
/// request: the client learns why instead of seeing a bare close.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
content-type: text/plain\r\ncontent-length: 28\r\nretry-after: 1\r\n\r\n\
too many connections, retry\n";

/// A listener and its connection cap.
pub(super) struct Listener {
    pub(super) inner: TcpListener,
    limits: Limits,
    slots: Arc<Semaphore>,
    past_cap: PastCap,
    /// Slots only clients on the listener's own address may take.
    reserve: Arc<Semaphore>,
    /// Which listener, for logs.
    name: &'static str,
}

impl Listener {
    pub(super) fn new(
        inner: TcpListener,
        limits: Limits,
        past_cap: PastCap,
        name: &'static str,
    ) -> Listener {
        let reserved = if past_cap == PastCap::Refuse {
            LOCAL_RESERVE
        } else {
            0
        };
        Listener {
            inner,
            limits,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            past_cap,
            reserve: Arc::new(Semaphore::new(reserved)),
            name,
        }
    }

    /// The next connection that fits under the cap, with the permit that
    /// holds its place until it ends. Failures to accept (out of
    /// descriptors) back off.
    pub(super) async fn accept(
        &self,
        metrics: &Metrics,
    ) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
        // Past the cap, wait before accepting: the connection waits in the
        // backlog, and is served as soon as another ends.
        let mut waited = match self.past_cap {
            PastCap::Wait => Some(
                Arc::clone(&self.slots)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed"),
            ),
            PastCap::Refuse => None,
        };
        loop {
            let (stream, peer) = match self.inner.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(listener = self.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Some(permit) = waited.take() {
                return (stream, peer, permit);
            }
            let own = self.inner.local_addr().is_ok_and(|l| l.ip() == peer.ip());
            let permit = Arc::clone(&self.slots)
                .try_acquire_owned()
                .or_else(|e| match own {
                    true => Arc::clone(&self.reserve).try_acquire_owned(),
                    false => Err(e),
                });
            match permit {
                Ok(permit) => return (stream, peer, permit),
                Err(_) => {
                    metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(listener = self.name, client.addr = %peer, "connection refused: at --max-connections");
                    // Fits in any socket buffer; whatever the client sees, the
                    // connection is closed on drop.
                    let _ = stream.try_write(BUSY);
                }
            }
        }
    }

    /// hyper's HTTP/1 server settings for this listener's connections.
    pub(super) fn http1(&self) -> hyper::server::conn::http1::Builder {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_buf_size(CONN_READ_BUF);
        b
    }
}

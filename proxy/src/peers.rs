//! Peers: the other nodes' proxies, so that each blob crosses the uplink
//! once per cluster rather than once per node.
//!
//! Every digest has one owner among the live peers and this node,
//! picked by rendezvous (highest random weight) hashing: each node computes
//! the same owner from the same membership, with no coordinator, and a
//! node joining or leaving moves only the digests it wins or held.
//!
//! On a miss, a node that does not own the digest asks the owner on its peer
//! listener (`api::peer`) instead of the upstream. The owner serves the blob
//! from its cache, or from its single-flight fill as the bytes arrive; the
//! asking node treats it like an upstream: its own fill verifies the digest,
//! commits, and streams to its own clients (`cache::fill`). Whatever goes
//! wrong with the owner (no connection, an error, silence past
//! `--peer-timeout`, a body cut mid-blob, bytes that do not verify), the
//! upstream is asked instead, from the first byte the fill lacks.
//!
//! The peer listener needs the shared secret (`--peer-secret-file`) and
//! serves content by digest only. Nothing of a client's (credentials,
//! headers) travels between nodes: each node authorizes its own clients as
//! before, and every byte from a peer is checked against its digest.
//!
//! [`members`] keeps the membership: the list or the DNS name's addresses,
//! which answer, and which are banned for sending bad bytes.

mod members;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::metrics::{Fallback, Metrics};
use crate::resolve::Resolver;
use members::Members;

/// Shortest secret accepted from `--peer-secret-file`.
pub const MIN_SECRET: usize = 16;
/// How often every known peer is probed.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How often a `dns:` name is resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(5);
/// How long a peer whose bytes did not verify is not asked.
const BAN: Duration = Duration::from_secs(600);

/// `--peers`: a fixed list, or a name whose addresses are the peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerList {
    Static(Vec<SocketAddr>),
    Dns { name: String, port: u16 },
}

impl PeerList {
    pub fn is_empty(&self) -> bool {
        matches!(self, PeerList::Static(v) if v.is_empty())
    }
}

/// Parses `IP:PORT,IP:PORT` or `dns:NAME:PORT`; empty is an empty list.
pub fn parse_peers(s: &str) -> Result<PeerList, String> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("dns:") {
        let (name, port) = rest.rsplit_once(':').ok_or("dns:NAME:PORT needs a port")?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("dns:NAME:PORT: {port:?} is not a port"))?;
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .split('.')
                .all(|l| !l.is_empty() || name.ends_with('.'))
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !valid || port == 0 {
            return Err(format!(
                "dns:NAME:PORT: {rest:?} is not a DNS name and a port"
            ));
        }
        return Ok(PeerList::Dns {
            name: name.to_owned(),
            port,
        });
    }
    let mut list = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let a: SocketAddr = item
            .parse()
            .map_err(|_| format!("{item:?} is not IP:PORT (or use dns:NAME:PORT)"))?;
        if a.port() == 0 {
            return Err(format!("{item:?}: a peer needs a port"));
        }
        if !list.contains(&a) {
            list.push(a);
        }
    }
    Ok(PeerList::Static(list))
}

/// What `--peers` and its companions configure.
#[derive(Clone)]
pub struct PeerConfig {
    pub list: PeerList,
    pub listen: SocketAddr,
    pub secret: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("list", &self.list)
            .field("listen", &self.listen)
            .field("secret", &"<hidden>")
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The peers of this node, and how to ask them.
pub struct Peers {
    /// This node's peer address, as the others list it.
    me: SocketAddr,
    /// `Bearer <secret>`, sent and expected.
    auth: HeaderValue,
    timeout: Duration,
    /// Longest wait for a live owner's next answer or bytes: the owner
    /// waits as long for its own upstream (`--upstream-timeout`).
    patience: Duration,
    client: Client<HttpConnector, Empty<Bytes>>,
    members: Members,
    metrics: Arc<Metrics>,
}

impl Peers {
    /// `patience`: the upstream timeout (see [`Peers::patiently`]).
    pub fn new(
        config: &PeerConfig,
        patience: Duration,
        resolver: Resolver,
        metrics: Arc<Metrics>,
    ) -> Arc<Peers> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.timeout));
        http.set_nodelay(true);
        // Idle connections are let go before the peer's listener closes
        // them (it keeps one idle for at most `--peer-timeout`), so that no
        // request is written onto a connection being closed.
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.timeout / 2)
            .pool_max_idle_per_host(32)
            .http1_max_buf_size(crate::upstream::READ_BUF)
            .build(http);
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", config.secret))
            .expect("a secret read from a file trims to header-safe text or fails validation");
        auth.set_sensitive(true);
        Arc::new(Peers {
            me: config.listen,
            auth,
            timeout: config.timeout,
            patience: patience.max(config.timeout),
            client,
            members: Members::new(config.list.clone(), config.listen, resolver),
            metrics,
        })
    }

    /// Keeps the membership: resolves the name, probes every peer. Runs
    /// until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut resolved: Option<tokio::time::Instant> = None;
        loop {
            if resolved.is_none_or(|t| t.elapsed() >= RESOLVE_EVERY) {
                self.members.refresh().await;
                resolved = Some(tokio::time::Instant::now());
            }
            let probes = self.members.known().into_iter().map(|p| {
                let this = Arc::clone(&self);
                async move { (p, this.probe(p).await) }
            });
            for (p, ok) in futures_util::future::join_all(probes).await {
                self.members.probed(p, ok);
            }
            let (known, live) = self.members.counts();
            self.metrics.peers.known.store(known, Relaxed);
            self.metrics.peers.live.store(live, Relaxed);
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }

    /// Whether the peer answers `/v2/` with 200 to our secret within
    /// `--peer-timeout`.
    async fn probe(&self, peer: SocketAddr) -> bool {
        let asked = tokio::time::timeout(self.timeout, self.get(peer, "/v2/", None));
        matches!(asked.await, Ok(Ok(r)) if r.status() == StatusCode::OK)
    }

    /// Waits for `what` from `owner` while it stays live: every
    /// `--peer-timeout` without an answer, the owner's last probe is looked
    /// at, and a dead or banned owner is given up at once (`Unreachable`).
    /// A live one (it may itself wait for a slow uplink) is waited on for
    /// `--upstream-timeout` at most (`Timeout`).
    pub async fn patiently<T>(
        &self,
        owner: SocketAddr,
        what: impl std::future::Future<Output = T>,
    ) -> Result<T, Fallback> {
        let start = tokio::time::Instant::now();
        tokio::pin!(what);
        loop {
            match tokio::time::timeout(self.timeout, &mut what).await {
                Ok(t) => return Ok(t),
                Err(_) if !self.members.is_live(owner) => return Err(Fallback::Unreachable),
                Err(_) if start.elapsed() >= self.patience => return Err(Fallback::Timeout),
                Err(_) => {}
            }
        }
    }

    /// The peer that owns `d`, or `None` when this node does.
    pub fn owner(&self, d: &Digest) -> Option<SocketAddr> {
        let live = self.members.live();
        let weight = |p: &SocketAddr| weight(d, p);
        let best = live.iter().max_by_key(|p| weight(p))?;
        (weight(best) > weight(&self.me)).then_some(*best)
    }

    /// The owner of `d` among the live peers not in `used` and this node;
    /// `None` when this node is.
    pub fn owner_among_unused(&self, d: &Digest, used: &[SocketAddr]) -> Option<SocketAddr> {
        let mut live = self.members.live();
        live.retain(|p| !used.contains(p));
        let best = live.into_iter().max_by_key(|p| weight(d, p))?;
        (weight(d, &best) > weight(d, &self.me)).then_some(best)
    }

    /// `--upstream-timeout`: how long a live peer is waited on.
    pub fn patience(&self) -> Duration {
        self.patience
    }

    /// Whether a request on the peer listener carries the secret.
    pub fn admits(&self, h: &HeaderMap) -> bool {
        let Some(got) = h.get(header::AUTHORIZATION) else {
            return false;
        };
        constant_time_eq(got.as_bytes(), self.auth.as_bytes())
    }

    /// `GET path` from `peer` (from byte `from` on), its response head:
    /// connected within `--peer-timeout`, answered while the peer stays
    /// live (see [`Peers::patiently`]).
    pub async fn get(
        &self,
        peer: SocketAddr,
        path: &str,
        from: Option<u64>,
    ) -> Result<Response<Incoming>, Fallback> {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(format!("http://{peer}{path}"))
            .header(header::AUTHORIZATION, self.auth.clone())
            .header(
                header::USER_AGENT,
                concat!("regproxy-peer/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(from) = from {
            req = req.header(header::RANGE, format!("bytes={from}-"));
        }
        let req = req.body(Empty::new()).map_err(|_| Fallback::Error)?;
        match self.patiently(peer, self.client.request(req)).await? {
            Ok(r) => Ok(r),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "peer unreachable");
                Err(Fallback::Unreachable)
            }
        }
    }

    /// Counts a miss this node leads by who owns the digest.
    pub fn counted_owner(&self, peer: bool) {
        let m = &self.metrics.peers;
        match peer {
            true => m.owner_peer.fetch_add(1, Relaxed),
            false => m.owner_self.fetch_add(1, Relaxed),
        };
    }

    /// Counts body bytes received from a peer.
    pub fn received(&self, n: u64) {
        self.metrics.peers.bytes_received.fetch_add(n, Relaxed);
    }

    /// `--peer-timeout`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A request to `peer` fell back to another source: counted, and a
    /// peer that could not be reached or broke off is not asked again
    /// before it answers a probe. A slow one is: it was still live.
    pub fn fell_back(&self, peer: SocketAddr, why: Fallback) {
        self.metrics.peers.fell_back(why);
        match why {
            Fallback::Unreachable | Fallback::Broken => self.members.probed(peer, false),
            Fallback::Timeout => {}
            Fallback::BadBytes => {
                if self.members.ban(peer, BAN) {
                    self.metrics.peers.bad.fetch_add(1, Relaxed);
                    tracing::warn!(%peer, ban = ?BAN, "peer sent bytes that do not match their digest; not asked until the ban ends");
                }
            }
            Fallback::Error => {}
        }
        let (known, live) = self.members.counts();
        self.metrics.peers.known.store(known, Relaxed);
        self.metrics.peers.live.store(live, Relaxed);
    }
}

/// A miss to ask a peer for: the peer that owns the digest.
#[derive(Clone)]
pub struct Ask {
    pub peers: Arc<Peers>,
    pub owner: SocketAddr,
}

/// The rendezvous weight of `peer` for `d`: the first 8 bytes of
/// sha256("<digest>\n<ip:port>"). Stable across versions and processes, so
/// nodes running different releases still agree.
fn weight(d: &Digest, peer: &SocketAddr) -> u64 {
    let mut h = Sha256::new();
    h.update(d.to_string().as_bytes());
    h.update(b"\n");
    h.update(peer.to_string().as_bytes());
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("32 bytes"))
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse() {
        assert_eq!(parse_peers("").unwrap(), PeerList::Static(vec![]));
        assert!(parse_peers("").unwrap().is_empty());
        assert_eq!(
            parse_peers("127.0.0.11:5001, 127.0.0.12:5001,127.0.0.11:5001").unwrap(),
            PeerList::Static(vec![
                "127.0.0.11:5001".parse().unwrap(),
                "127.0.0.12:5001".parse().unwrap()
            ])
        );
        assert_eq!(
            parse_peers("dns:regproxy-peers.registry.svc.cluster.local:5001").unwrap(),
            PeerList::Dns {
                name: "regproxy-peers.registry.svc.cluster.local".into(),
                port: 5001
            }
        );
        assert!(parse_peers("dns:name").is_err());
        assert!(parse_peers("dns::5001").is_err());
        assert!(parse_peers("dns:a b:5001").is_err());
        assert!(parse_peers("dns:x:0").is_err());
        assert!(parse_peers("node-1:5001").is_err(), "names need dns:");
        assert!(parse_peers("127.0.0.1:0").is_err());
    }

    #[test]
    fn owners_spread_and_move_only_with_their_peer() {
        let nodes: Vec<SocketAddr> = (11..15)
            .map(|i| format!("127.0.0.{i}:5001").parse().unwrap())
            .collect();
        let owner =
            |d: &Digest, live: &[SocketAddr]| *live.iter().max_by_key(|p| weight(d, p)).unwrap();
        let mut counts = [0; 4];
        let mut moved = 0;
        for i in 0..400u32 {
            let d = Digest::parse(&format!("sha256:{:064x}", i)).unwrap();
            let all = owner(&d, &nodes);
            counts[nodes.iter().position(|n| *n == all).unwrap()] += 1;
            let without_last = owner(&d, &nodes[..3]);
            if all != nodes[3] {
                assert_eq!(all, without_last, "a digest moves only if its owner left");
            } else {
                moved += 1;
            }
        }
        assert!(counts.iter().all(|c| (60..140).contains(c)), "{counts:?}");
        assert_eq!(moved, counts[3]);
    }

    #[test]
    fn the_secret_compares_whole() {
        assert!(constant_time_eq(b"Bearer abc", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer abd", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer ab", b"Bearer abc"));
    }
}

//! Real processes for black-box tests, each on loopback ports, each stopped
//! when its handle is dropped; a file per thing it starts: `registry`
//! (Debian's `docker-registry`, Distribution 2.8, as the upstream), `proxy`
//! (the `regproxy` binary), `gate` (a TCP relay that lets a test pause or cut
//! the upstream's bytes mid-transfer), `daemons` (dockerd, containerd),
//! `stub` (an upstream scripted for answers a real registry never gives),
//! `netns` (a network namespace for a peer off loopback) and `crash` (seeded
//! randomness, a switchable upstream relay and the cache dir's checks, for
//! tests that kill processes at random moments). `http` and `order`
//! are the test's own requests. This file keeps the waits and what all share.
//! `peers` starts nodes with peers on (issue 11), and a fake peer and a
//! DNS server of the test's own. `shaped` runs the registry behind a
//! `tc`-shaped link and reads what it sent from its log (issue 12).
//!
//! Every test binary compiles this whole folder and uses a part of it, so
//! what one binary leaves unused is not dead: each module is declared with
//! `allow(dead_code)`, and its re-export with `allow(unused_imports)`, and so
//! is each item of this file that only some binaries use. The price, as with
//! one allow over the folder: an item of a module that no binary uses any
//! more does not warn; an item of this file without an allow still does.

#[allow(dead_code)]
pub mod crash;
#[allow(dead_code)]
mod daemons;
#[allow(dead_code)]
mod gate;
#[allow(dead_code)]
pub mod handover;
#[allow(dead_code)]
mod http;
#[allow(dead_code)]
pub mod netns;
#[allow(dead_code)]
mod order;
#[allow(dead_code)]
pub mod peers;
#[allow(dead_code)]
mod proxy;
#[allow(dead_code)]
mod registry;
#[allow(dead_code)]
pub mod shaped;
#[allow(dead_code)]
pub mod stub;

#[allow(unused_imports)]
pub use daemons::*;
#[allow(unused_imports)]
pub use gate::*;
#[allow(unused_imports)]
pub use http::*;
#[allow(unused_imports)]
pub use order::*;
#[allow(unused_imports)]
pub use proxy::*;
#[allow(unused_imports)]
pub use registry::*;
pub use tempfile::TempDir;

use std::net::TcpListener as StdListener;
use std::process::Output;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

pub const REGISTRY_NAME: &str = "knative.registry.svc.cluster.local";

/// A fresh directory under the system temp dir, named after `tag`, removed
/// on drop.
pub fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("regproxy-test-{tag}-"))
        .tempdir()
        .expect("a temp dir can be made")
}

/// A loopback port that was free a moment ago (for programs that cannot
/// report the port they bound).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How long a test waits for something that must happen (a process coming
/// up, a commit, a log line) before it fails. Generous on purpose: only what
/// never happens fails a test, never a slow or loaded machine; what happens
/// sooner ends the wait at once.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Polls `f` until it holds; fails naming `what` if it does not within
/// [`PATIENCE`].
pub async fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "waited {PATIENCE:?} in vain until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until neither `addr` nor `admin` accepts a connection: a process
/// shutting down closes its listeners at once.
#[allow(dead_code)]
pub async fn wait_listeners_closed(addr: std::net::SocketAddr, admin: std::net::SocketAddr) {
    wait_until(
        || {
            std::net::TcpStream::connect(addr).is_err()
                && std::net::TcpStream::connect(admin).is_err()
        },
        "new connections are refused on both listeners",
    )
    .await;
}

/// [`wait_until`] for a test without a runtime: blocks the thread.
pub fn wait_blocking(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "waited {PATIENCE:?} in vain until {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_until`] for a check that is itself asynchronous (a metric).
pub async fn wait_for<F, Fut>(mut f: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "waited {PATIENCE:?} in vain until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `sha256:<hex>` of `data`, as a registry names it.
pub fn sha256_digest(data: &[u8]) -> String {
    let mut h = Sha256Digester::default();
    h.update(data);
    h.finish()
}

/// [`sha256_digest`] of bytes that come in pieces (a body as it streams).
#[derive(Default)]
pub struct Sha256Digester(Sha256);

impl Sha256Digester {
    pub fn update(&mut self, piece: &[u8]) {
        self.0.update(piece);
    }

    pub fn finish(self) -> String {
        let hex: String = self
            .0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("sha256:{hex}")
    }
}

/// Deterministic pseudo-random bytes (xorshift), so blobs differ per seed.
#[allow(dead_code)] // the node-path tests pull no blobs
pub fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The stdout of a command that must have succeeded; otherwise a panic that
/// shows what it said.
pub fn succeeded(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} should succeed; it said:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Raises this process's soft limit of open files to its hard limit: tests
/// that hold a thousand connections need more than a default 1024.
#[allow(dead_code)] // only the binaries whose tests hold that many call it
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    setrlimit(Resource::Nofile, l).expect("the soft limit can rise to the hard one");
}

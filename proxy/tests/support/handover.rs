//! What the handover test needs beyond the rest of the folder: a thread that
//! runs inside a [`Netns`] (so that every process and socket it makes lives
//! there, with that namespace's own sysctls), the processes listening on a
//! port, and requests that report a failure instead of panicking, one of
//! them streaming a large body through a hash while counting its bytes.

use std::os::fd::AsRawFd;
use std::os::raw::c_int;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::netns::Netns;
use super::{Dockerd, Sha256Digester, PATIENCE};

/// Runs `f` on a thread of its own that has joined `ns`'s network
/// namespace, and returns what it returns (or resumes its panic). Threads
/// and processes started from that thread inherit the namespace; the
/// caller's thread stays where it is, so `ns` is removed from outside it.
pub fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            join_netns(ns);
            f()
        })
        .join()
    })
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Moves the calling thread (only it) into `ns`'s network namespace.
#[allow(unsafe_code)]
fn join_netns(ns: &Netns) {
    extern "C" {
        fn setns(fd: c_int, nstype: c_int) -> c_int;
    }
    const CLONE_NEWNET: c_int = 0x4000_0000;
    let f = std::fs::File::open(format!("/run/netns/{}", ns.name))
        .expect("`ip netns add` made the namespace's file");
    // SAFETY: setns(2) reads only its two integer arguments, and `f` stays
    // open for the call; it changes nothing but this thread's namespace.
    let r = unsafe { setns(f.as_raw_fd(), CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "this thread should join network namespace {}: {}",
        ns.name,
        std::io::Error::last_os_error()
    );
}

/// The pids of the processes with a TCP socket listening on `port` in this
/// thread's network namespace (`ss` run from it).
pub fn listening_pids(port: u16) -> Vec<u32> {
    let out = Command::new("ss")
        .args(["-Hltnp", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2) is installed");
    String::from_utf8_lossy(&out.stdout)
        .split("pid=")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// The `docker` client of `d`, run under `timeout` so that a pull that
/// hangs fails instead of holding the test.
pub fn docker_cli(d: &Dockerd) -> Command {
    let mut c = Command::new("timeout");
    c.args([&PATIENCE.as_secs().to_string(), "/usr/bin/docker"]);
    c.env("DOCKER_HOST", format!("unix://{}", d.sock.display()));
    c.env("DOCKER_CONFIG", d.dir.path().join("client"));
    c
}

/// A client of its own, so every request opens a new connection.
fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// `GET url` on a new connection, its body streamed through a hash; the
/// bytes received so far are kept in `progress` as they come. Returns the
/// status, the body's digest and its length, or what went wrong (a refused
/// or reset connection, a body cut short, no answer within [`PATIENCE`]).
pub async fn get_counting(
    url: String,
    progress: Arc<AtomicU64>,
) -> Result<(StatusCode, String, u64), String> {
    let fetch = async {
        let resp = client()
            .get(url.parse().unwrap())
            .await
            .map_err(|e| format!("GET {url}: {e:?}"))?;
        let status = resp.status();
        let mut body = resp.into_body();
        let (mut hash, mut n) = (Sha256Digester::default(), 0u64);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("GET {url}: body cut at {n} bytes: {e:?}"))?;
            if let Ok(data) = frame.into_data() {
                hash.update(&data);
                n += data.len() as u64;
                progress.store(n, Ordering::SeqCst);
            }
        }
        Ok((status, hash.finish(), n))
    };
    // A 256 MiB body at a throttled pace takes a while: twice the patience.
    tokio::time::timeout(2 * PATIENCE, fetch)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "GET {url}: no whole answer within {:?}",
                2 * PATIENCE
            ))
        })
}

/// [`get_counting`] without the progress: whether `url` answers 200 with a
/// body of digest `digest`, or what it did instead.
pub async fn get_verified(url: &str, digest: &str) -> Result<(), String> {
    match get_counting(url.to_owned(), Arc::default()).await? {
        (StatusCode::OK, d, _) if d == digest => Ok(()),
        (StatusCode::OK, d, n) => Err(format!(
            "GET {url}: a corrupt body ({n} bytes of {d}, not {digest})"
        )),
        (st, _, _) => Err(format!("GET {url}: {st}")),
    }
}

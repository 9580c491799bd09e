//! Real processes for black-box tests, each on loopback ports, each stopped
//! when its handle is dropped: Debian's `docker-registry` (Distribution 2.8)
//! as the upstream, the `regproxy` binary, `dockerd`, and a TCP gate that
//! lets a test pause or cut the upstream's bytes mid-transfer; `stub` scripts
//! an upstream for answers a real registry never gives.
#![allow(dead_code)] // each test binary uses a different part of this module

mod order;
#[allow(unused_imports)] // not every test binary pulls in a client's order
pub use order::*;
pub mod netns;
pub mod stub;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256};

pub const REGISTRY_NAME: &str = "knative.registry.svc.cluster.local";

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "regproxy-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

/// Why a started registry is not serving.
pub enum NotListening {
    /// Another process took the port between `free_port` and the bind.
    PortTaken,
    Failed(String),
}

/// Waits for a `docker-registry` started with its log going to `log` to say
/// that it listens on `addr` (it logs that after the bind): the line is
/// looked for after byte `from`, where this start's output begins.
pub fn wait_listening(
    child: &mut Child,
    log: &Path,
    from: usize,
    addr: SocketAddr,
) -> Result<(), NotListening> {
    let needle = format!("listening on {addr}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = std::fs::read(log).unwrap_or_default();
        let out = String::from_utf8_lossy(out.get(from..).unwrap_or_default());
        if out.contains(&needle) {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            let out = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()[from..])
                .into_owned();
            return Err(if out.contains("address already in use") {
                NotListening::PortTaken
            } else {
                NotListening::Failed(format!(
                    "docker-registry exited with {st} before listening on {addr}:\n{out}"
                ))
            });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(NotListening::Failed(format!(
                "docker-registry did not listen on {addr} within {PATIENCE:?}:\n{out}"
            )));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn sha256_digest(data: &[u8]) -> String {
    let h = Sha256::digest(data);
    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Deterministic pseudo-random bytes (xorshift), so blobs differ per seed.
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

/// Debian's `docker-registry`, filesystem storage in a temp dir, access log on.
pub struct Registry {
    pub addr: SocketAddr,
    pub dir: TempDir,
    child: Option<Child>,
    log: PathBuf,
    config: PathBuf,
    scheme: &'static str,
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with("")
    }

    /// `extra` is YAML appended at the top level of the config.
    pub fn start_with(extra: &str) -> Registry {
        Registry::start_config(extra, "", "http")
    }

    /// Serves HTTPS with `cert` and `key` (PEM files).
    pub fn start_tls(cert: &Path, key: &Path) -> Registry {
        let tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        );
        Registry::start_config("", &tls, "https")
    }

    fn start_config(extra: &str, http_extra: &str, scheme: &'static str) -> Registry {
        let dir = TempDir::new("upstream");
        let config = dir.path().join("config.yml");
        let storage = dir.path().join("data");
        let log = dir.path().join("registry.log");
        let mut r = Registry {
            addr: "127.0.0.1:0".parse().unwrap(),
            dir,
            child: None,
            log,
            config,
            scheme,
        };
        // The port is free when picked, but another process may bind it
        // before the registry does: then the registry says so, and it is
        // started again on another port.
        for attempt in 1.. {
            r.addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            std::fs::write(
                &r.config,
                format!(
                    "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {}\n{http_extra}{extra}",
                    storage.display(),
                    r.addr
                ),
            )
            .unwrap();
            match r.spawn() {
                Ok(()) => break,
                Err(NotListening::PortTaken) if attempt < 5 => continue,
                Err(NotListening::PortTaken) => {
                    panic!("docker-registry found its port taken 5 times in a row")
                }
                Err(NotListening::Failed(why)) => panic!("{why}"),
            }
        }
        r
    }

    /// Starts the registry (again) on the same address and storage.
    pub fn restart(&mut self) {
        match self.spawn() {
            Ok(()) => {}
            Err(NotListening::PortTaken) => {
                panic!(
                    "docker-registry could not listen on {} again: the port was taken meanwhile",
                    self.addr
                )
            }
            Err(NotListening::Failed(why)) => panic!("{why}"),
        }
    }

    fn spawn(&mut self) -> Result<(), NotListening> {
        assert!(self.child.is_none(), "registry is already running");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let from = out.metadata().unwrap().len() as usize;
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("docker-registry is installed (scripts/deps.sh)");
        wait_listening(&mut child, &self.log, from, self.addr)?;
        self.child = Some(child);
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Everything the registry logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many `GET`s for blob `digest` the registry's access log shows.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let needle = format!("/blobs/{digest} HTTP/1.1\"");
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&needle))
            .count()
    }

    /// How many `GET`s of any blob the access log shows.
    pub fn all_blob_gets(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .count()
    }

    /// Stores `data` as a blob of `repo` the way the registry's filesystem
    /// driver lays out a pushed blob (the content, and the repository's link
    /// to it): the same as a push, without sending the bytes through HTTP.
    /// Returns its digest.
    pub fn put_blob_files(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256_digest(data);
        let hex = digest.strip_prefix("sha256:").unwrap();
        let data_path = self.blob_data_path(&digest);
        std::fs::create_dir_all(data_path.parent().unwrap()).unwrap();
        std::fs::write(&data_path, data).unwrap();
        let link = self
            .dir
            .path()
            .join("data/docker/registry/v2/repositories")
            .join(repo)
            .join("_layers/sha256")
            .join(hex);
        std::fs::create_dir_all(&link).unwrap();
        std::fs::write(link.join("link"), &digest).unwrap();
        digest
    }

    /// How many access log lines `is_it` picks, once there are at least
    /// `expected`. The registry writes a request's line after its response
    /// went out, so whoever sent the request (the proxy, and so the test's
    /// client) can be done with the bytes before the line is there: a count
    /// taken right away can miss it. Returns the count (then compared with
    /// `expected` by the caller), so that one too many still shows.
    pub async fn logged(&self, expected: usize, what: &str, is_it: impl Fn(&str) -> bool) -> usize {
        let count = || self.log().lines().filter(|l| is_it(l)).count();
        wait_until(
            || count() >= expected,
            &format!("the upstream's access log shows {expected} {what}"),
        )
        .await;
        count()
    }

    /// [`Registry::blob_gets`], once the access log shows at least `expected`.
    pub async fn blob_gets_logged(&self, digest: &str, expected: usize) -> usize {
        let needle = format!("/blobs/{digest} HTTP/1.1\"");
        self.logged(expected, &format!("GETs of {digest}"), |l| {
            l.contains("\"GET /v2/") && l.contains(&needle)
        })
        .await
    }

    /// Where the registry keeps the bytes of blob `digest`.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `regproxy` binary under test.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub cache_dir: PathBuf,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

pub fn regproxy_bin() -> &'static str {
    env!("CARGO_BIN_EXE_regproxy")
}

impl Proxy {
    /// Starts `regproxy serve` on port 0 in front of `upstream` with `args` added.
    pub fn start(upstream: &str, cache_dir: &Path, args: &[&str]) -> Proxy {
        Proxy::start_on("127.0.0.1:0", upstream, cache_dir, args)
    }

    pub fn start_on(listen: &str, upstream: &str, cache_dir: &Path, args: &[&str]) -> Proxy {
        Proxy::try_start_on(listen, upstream, cache_dir, args)
            .unwrap_or_else(|logs| panic!("regproxy did not start; it logged:\n{logs}"))
    }

    /// [`Proxy::start_on`], or what regproxy logged if it did not start
    /// (within [`PATIENCE`]).
    pub fn try_start_on(
        listen: &str,
        upstream: &str,
        cache_dir: &Path,
        args: &[&str],
    ) -> Result<Proxy, String> {
        let mut child = Command::new(regproxy_bin())
            .args([
                "serve",
                "--listen",
                listen,
                "--admin-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--upstream",
                upstream,
            ])
            .arg("--cache-dir")
            .arg(cache_dir)
            .args(args)
            .env("RUST_LOG", "regproxy=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let msg = v["message"].as_str().unwrap_or("");
                    if msg == "regproxy listening" || msg == "admin listening" {
                        let _ =
                            tx.send((msg.to_owned(), v["addr"].as_str().unwrap_or("").to_owned()));
                    }
                }
                l2.lock().unwrap().push(line);
            }
        });
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            match rx.recv_timeout(PATIENCE) {
                Ok((m, a)) if m == "regproxy listening" => addr = Some(a.parse().unwrap()),
                Ok((_, a)) => admin = Some(a.parse().unwrap()),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(logs.lock().unwrap().join("\n"));
                }
            }
        }
        Ok(Proxy {
            addr: addr.unwrap(),
            admin: admin.unwrap(),
            cache_dir: cache_dir.to_owned(),
            child,
            logs,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the proxy has asked the upstream, anonymously, whether it
    /// lets anyone in, and written the answer (open) to `state.json`. Tests
    /// that meter the upstream's bytes through a [`Gate`] wait for it first,
    /// so that this request of the proxy's own does not spend their budget.
    pub fn wait_learned_open(&self) {
        let state = self.cache_dir.join("open.json");
        wait_blocking(
            || std::fs::read_to_string(&state).is_ok_and(|s| s.contains("\"upstream_open\":true")),
            "regproxy learned that the upstream is open and said so in state.json",
        );
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The metrics as name{labels} → value.
    pub async fn metrics(&self) -> HashMap<String, u64> {
        metrics_at(self.admin).await
    }

    /// Waits until no blob fill is in flight: every fill started so far has
    /// committed its blob under `sha256/` or thrown it away and cleaned up.
    /// A client's response ends when the bytes are verified; the commit
    /// (fsync, rename) follows, and `regproxy_fills_inflight` drops only
    /// after it (or after the clean-up of a failed fill).
    pub async fn fills_done(&self) {
        fills_done_at(self.admin).await
    }

    /// [`upstream_settled`] for this proxy.
    pub async fn settled(&self, upstream: &Registry) -> usize {
        upstream_settled(self.admin, upstream).await
    }

    pub async fn metric(&self, name: &str) -> u64 {
        *self
            .metrics()
            .await
            .get(name)
            .unwrap_or_else(|| panic!("metric {name} exists"))
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits for the process to exit and returns whether it exited 0;
    /// fails if it is still running after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.success();
            }
            assert!(
                Instant::now() < deadline,
                "regproxy did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Bytes of all files under the cache dir's content tree.
    pub fn cached_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(rd) = std::fs::read_dir(p) else {
                return 0;
            };
            rd.flatten()
                .map(|e| {
                    let m = e.metadata().unwrap();
                    if m.is_dir() {
                        walk(&e.path())
                    } else {
                        m.len()
                    }
                })
                .sum()
        }
        walk(&self.cache_dir.join("sha256"))
    }

    pub fn cache_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.cache_dir.join("sha256").join(&hex[..2]).join(hex)
    }
}

/// The metrics of the regproxy whose admin endpoint is `admin`, as
/// name{labels} → value.
pub async fn metrics_at(admin: SocketAddr) -> HashMap<String, u64> {
    let (status, _, body) = get(&format!("http://{admin}/metrics"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    String::from_utf8(body.unwrap().to_vec())
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        })
        .collect()
}

/// [`Proxy::fills_done`] for the regproxy whose admin endpoint is `admin`.
pub async fn fills_done_at(admin: SocketAddr) {
    wait_for(
        || async { metrics_at(admin).await["regproxy_fills_inflight"] == 0 },
        "no blob fill is in flight (each one committed or thrown away)",
    )
    .await
}

/// Waits until the regproxy whose admin endpoint is `admin` has no fill in
/// flight (see [`Proxy::fills_done`]) and the upstream's access log shows a
/// blob GET for every GET the proxy sent for a fill (`regproxy_fills_total`,
/// plus the resumes); returns the access log's count of blob GETs. Only then
/// do counts of upstream GETs say what a pull did.
pub async fn upstream_settled(admin: SocketAddr, upstream: &Registry) -> usize {
    fills_done_at(admin).await;
    let m = metrics_at(admin).await;
    let sent = (m["regproxy_fills_total"] + m["regproxy_upstream_resumes_total"]) as usize;
    upstream
        .logged(sent, "blob GETs, one for each the proxy sent", |l| {
            l.contains("\"GET /v2/") && l.contains("/blobs/sha256:")
        })
        .await
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A request; returns status, headers, and the whole body or the error that
/// cut it short.
pub async fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (StatusCode, HeaderMap, Result<Bytes, String>) {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client()
        .request(b.body(Full::new(body)).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{url}: {e:?}"));
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| format!("{e:?}"));
    (parts.status, parts.headers, body)
}

pub async fn get(
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Result<Bytes, String>) {
    request(Method::GET, url, headers, Bytes::new()).await
}

/// Pushes `data` as a blob of `repo` with a monolithic upload; returns its digest.
pub async fn push_blob(registry: &str, repo: &str, data: &[u8]) -> String {
    push_blob_as(registry, &[], repo, data).await
}

/// [`push_blob`] with extra request headers (credentials).
pub async fn push_blob_as(
    registry: &str,
    auth: &[(&str, &str)],
    repo: &str,
    data: &[u8],
) -> String {
    let digest = sha256_digest(data);
    let (st, h, _) = request(
        Method::POST,
        &format!("{registry}/v2/{repo}/blobs/uploads/"),
        auth,
        Bytes::new(),
    )
    .await;
    assert_eq!(st, StatusCode::ACCEPTED, "the upstream accepts an upload");
    let loc = h["location"].to_str().unwrap();
    let loc = if loc.starts_with("http") {
        loc.to_owned()
    } else {
        format!("{registry}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let mut headers = vec![("content-type", "application/octet-stream")];
    headers.extend_from_slice(auth);
    let (st, _, _) = request(
        Method::PUT,
        &format!("{loc}{sep}digest={digest}"),
        &headers,
        Bytes::copy_from_slice(data),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "the upstream stores the blob");
    digest
}

/// Pushes an OCI image manifest for `layers` (blobs already pushed) under
/// `tag`; returns the manifest bytes and digest.
pub async fn push_manifest(
    registry: &str,
    repo: &str,
    tag: &str,
    config: &[u8],
    layers: &[&[u8]],
) -> (Vec<u8>, String) {
    push_manifest_as(registry, &[], repo, tag, config, layers).await
}

/// [`push_manifest`] with extra request headers (credentials).
pub async fn push_manifest_as(
    registry: &str,
    auth: &[(&str, &str)],
    repo: &str,
    tag: &str,
    config: &[u8],
    layers: &[&[u8]],
) -> (Vec<u8>, String) {
    let cfg = push_blob_as(registry, auth, repo, config).await;
    let mut ls = Vec::new();
    for l in layers {
        let d = push_blob_as(registry, auth, repo, l).await;
        ls.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": l.len()}));
    }
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": config.len()},
        "layers": ls,
    });
    let bytes = serde_json::to_vec_pretty(&m).unwrap();
    let mut headers = vec![("content-type", "application/vnd.oci.image.manifest.v1+json")];
    headers.extend_from_slice(auth);
    let (st, _, body) = request(
        Method::PUT,
        &format!("{registry}/v2/{repo}/manifests/{tag}"),
        &headers,
        Bytes::from(bytes.clone()),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "manifest push: {body:?}");
    let d = sha256_digest(&bytes);
    (bytes, d)
}

/// A TCP relay in front of the upstream that passes requests freely but
/// meters the bytes coming back: a test can hold them at a budget (a stalled
/// uplink) or cut every connection once the budget is spent (a broken one).
pub struct Gate {
    pub addr: SocketAddr,
    state: Arc<GateState>,
}

struct GateState {
    /// Response bytes relayed so far, over all connections.
    passed: AtomicU64,
    /// Response bytes allowed through; `u64::MAX` is open.
    budget: AtomicU64,
    /// When set, connections are closed (not paused) once the budget is spent;
    /// the gate then opens for later connections.
    cut: std::sync::atomic::AtomicBool,
    /// Connections accepted so far.
    conns: AtomicU64,
    /// The connection that reached the budget first (0: none yet); only it
    /// is held, so other requests still reach the upstream.
    held: AtomicU64,
    /// Response bytes per second each connection may pass; 0: unlimited.
    rate: AtomicU64,
}

impl Gate {
    pub async fn start(upstream: SocketAddr) -> Gate {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let state = Arc::new(GateState {
            passed: AtomicU64::new(0),
            budget: AtomicU64::new(u64::MAX),
            cut: false.into(),
            conns: AtomicU64::new(0),
            held: AtomicU64::new(0),
            rate: AtomicU64::new(0),
        });
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((down, _)) = l.accept().await else {
                    return;
                };
                let id = st.conns.fetch_add(1, Ordering::SeqCst) + 1;
                let st = Arc::clone(&st);
                tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut dr, mut dw) = down.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let req = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut dr, &mut uw).await;
                    });
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 64 << 10];
                    // The budget is checked as bytes go out, not when a read
                    // starts: a pooled connection may already be waiting in
                    // `read` when a test sets the budget.
                    let (started, mut sent) = (tokio::time::Instant::now(), 0u64);
                    'conn: loop {
                        let rate = st.rate.load(Ordering::SeqCst);
                        // Small steps when paced, so the pace is smooth.
                        let step = if rate > 0 {
                            ((rate / 50).max(1024) as usize).min(buf.len())
                        } else {
                            buf.len()
                        };
                        let n = match ur.read(&mut buf[..step]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut off = 0;
                        while off < n {
                            let rate = st.rate.load(Ordering::SeqCst);
                            if rate > 0 {
                                // Pace this connection: no byte before its time.
                                let due =
                                    started + Duration::from_secs_f64(sent as f64 / rate as f64);
                                tokio::time::sleep_until(due).await;
                            }
                            let passed = st.passed.load(Ordering::SeqCst);
                            let budget = st.budget.load(Ordering::SeqCst);
                            let held = st.held.load(Ordering::SeqCst);
                            // Once one connection is held, the others flow.
                            let mine = held == 0 || held == id;
                            if mine && passed >= budget {
                                let _ = st.held.compare_exchange(
                                    0,
                                    id,
                                    Ordering::SeqCst,
                                    Ordering::SeqCst,
                                );
                                if st.cut.load(Ordering::SeqCst) {
                                    st.cut.store(false, Ordering::SeqCst);
                                    st.budget.store(u64::MAX, Ordering::SeqCst);
                                    st.held.store(0, Ordering::SeqCst);
                                    break 'conn;
                                }
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                continue;
                            }
                            let room = if mine {
                                (budget - passed).min((n - off) as u64) as usize
                            } else {
                                n - off
                            };
                            if mine && passed + room as u64 >= budget {
                                // This connection spends the budget: it is the
                                // one held, claimed before a test can see the
                                // budget spent.
                                let _ = st.held.compare_exchange(
                                    0,
                                    id,
                                    Ordering::SeqCst,
                                    Ordering::SeqCst,
                                );
                            }
                            st.passed.fetch_add(room as u64, Ordering::SeqCst);
                            sent += room as u64;
                            if dw.write_all(&buf[off..off + room]).await.is_err() {
                                break 'conn;
                            }
                            off += room;
                        }
                    }
                    req.abort();
                });
            }
        });
        Gate { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets `n` more response bytes through, then holds the connection that
    /// reaches that budget; other connections flow.
    pub fn hold_after(&self, n: u64) {
        self.state.held.store(0, Ordering::SeqCst);
        let p = self.state.passed.load(Ordering::SeqCst);
        self.state.budget.store(p + n, Ordering::SeqCst);
    }

    /// Lets `n` more response bytes through, then closes that connection once.
    pub fn cut_after(&self, n: u64) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.hold_after(n);
    }

    /// Paces every connection, those open and those to come, to
    /// `bytes_per_sec` of response bytes (0: unlimited).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.state.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    pub fn open(&self) {
        self.state.budget.store(u64::MAX, Ordering::SeqCst);
        self.state.held.store(0, Ordering::SeqCst);
    }

    pub fn passed(&self) -> u64 {
        self.state.passed.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> u64 {
        self.state.conns.load(Ordering::SeqCst)
    }
}

/// A `dockerd` of its own (vfs storage, no networking of its own), in a
/// private mount namespace whose `/etc/hosts` maps the registry name to
/// loopback, exactly as the node set-up does.
pub struct Dockerd {
    pub dir: TempDir,
    pub sock: PathBuf,
    child: Child,
}

impl Dockerd {
    pub fn start() -> Dockerd {
        let dir = TempDir::new("dockerd");
        let d = dir.path();
        let hosts = d.join("hosts");
        let mut f = std::fs::File::create(&hosts).unwrap();
        writeln!(
            f,
            "127.0.0.1 localhost\n::1 localhost\n127.0.0.1 {REGISTRY_NAME}"
        )
        .unwrap();
        let sock = d.join("docker.sock");
        let script = format!(
            "mount --bind {hosts} /etc/hosts && exec dockerd --data-root {d}/data --exec-root {d}/exec --pidfile {d}/docker.pid \
             -H unix://{sock} --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs --containerd-namespace regproxy-test-{pid} \
             --containerd-plugins-namespace regproxy-test-plugins-{pid}",
            hosts = hosts.display(),
            d = d.display(),
            sock = sock.display(),
            pid = std::process::id(),
        );
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare and dockerd are installed");
        let deadline = Instant::now() + 2 * PATIENCE;
        loop {
            let dk = Dockerd::cli_at(&sock).arg("version").output().unwrap();
            if dk.status.success() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "dockerd exited with {st}:\n{}",
                    std::fs::read_to_string(d.join("dockerd.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not come up:\n{}",
                std::fs::read_to_string(d.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Dockerd { dir, sock, child }
    }

    fn cli_at(sock: &Path) -> Command {
        // Debian's client, matched to Debian's dockerd.
        let mut c = Command::new("/usr/bin/docker");
        c.env("DOCKER_HOST", format!("unix://{}", sock.display()));
        c.env("DOCKER_CONFIG", sock.parent().unwrap().join("client"));
        c
    }

    /// Runs `docker args...`; panics with its output unless it succeeds.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = Dockerd::cli_at(&self.sock).args(args).output().unwrap();
        succeeded(out, &format!("docker {args:?}"))
    }

    /// Runs `sh -c script` with `DOCKER_HOST` set to this daemon.
    pub fn sh(&self, script: &str) -> String {
        let out = Command::new("sh")
            .args(["-c", script])
            .env("DOCKER_HOST", format!("unix://{}", self.sock.display()))
            .env("DOCKER_CONFIG", self.dir.path().join("client"))
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .unwrap();
        succeeded(out, script)
    }

    pub fn image_id(&self, image: &str) -> String {
        self.docker(&["image", "inspect", "-f", "{{.Id}}", image])
            .trim()
            .to_owned()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // vfs layers are plain directories; containerd may hold mounts under exec-root.
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("exec"))
            .status();
    }
}

/// A containerd of its own: sockets, root and state in a temp dir, no CRI.
pub struct Containerd {
    pub dir: TempDir,
    pub sock: PathBuf,
    child: Child,
}

impl Containerd {
    pub fn start() -> Containerd {
        let dir = TempDir::new("containerd");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )
        .unwrap();
        let sock = dir.path().join("containerd.sock");
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .arg("--address")
            .arg(&sock)
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--state")
            .arg(dir.path().join("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd is installed (scripts/deps.sh)");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let v = Command::new("ctr")
                .arg("--address")
                .arg(&sock)
                .arg("version")
                .output()
                .unwrap();
            if v.status.success() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("containerd exited with {st}");
            }
            assert!(
                Instant::now() < deadline,
                "containerd should answer within {PATIENCE:?}:\n{}",
                std::fs::read_to_string(dir.path().join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Containerd { dir, sock, child }
    }

    /// `ctr ARGS` in a mount namespace whose `/etc/hosts` maps the registry
    /// name to loopback, as on a node: whatever containerd tries, it stays on
    /// this machine.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let sock = self.sock.display().to_string();
        let mut all = vec!["--address", sock.as_str()];
        all.extend_from_slice(args);
        on_node("ctr", &all)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `program args...` in a mount namespace whose `/etc/hosts` maps the
/// registry name to loopback, as a node's does.
pub fn on_node(program: &str, args: &[&str]) -> Output {
    let dir = TempDir::new("node-hosts");
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n127.0.0.1 {REGISTRY_NAME}\n"),
    )
    .unwrap();
    let script = format!(
        "mount --bind {} /etc/hosts && exec timeout 120 \"$0\" \"$@\"",
        hosts.display()
    );
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            program,
        ])
        .args(args)
        .output()
        .unwrap()
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
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    setrlimit(Resource::Nofile, l).expect("the soft limit can rise to the hard one");
}

/// Anonymous resident memory of process `pid` (`RssAnon` in
/// `/proc/<pid>/status`), in bytes.
pub fn rss_anon(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// Samples a process's `RssAnon` on a thread of its own, every few
/// milliseconds, until dropped or asked for the peak.
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (Arc::clone(&peak), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match rss_anon(pid) {
                    Some(r) => {
                        p.fetch_max(r, Ordering::SeqCst);
                    }
                    None => return,
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssSampler {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// The highest value seen so far.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    /// Stops sampling; returns the peak.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

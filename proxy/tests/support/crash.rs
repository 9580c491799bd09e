//! For tests that kill processes at random moments: a seeded xorshift that
//! a failing run can be replayed with, a relay that takes the upstream away
//! and gives it back (`Switch`), requests that report a cut instead of
//! panicking, and the checks of a cache dir that must hold after any crash.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{regproxy_bin, sha256_digest, temp_files, PATIENCE};

/// A tiny xorshift64*: the same seed gives the same choices, so a run that
/// failed is replayed from the seed it printed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The seed from `var` when set (a replay), else from the clock.
    pub fn seed_from_env(var: &str) -> u64 {
        match std::env::var(var) {
            Ok(s) => s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{var} should be a number, not {s:?}")),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        }
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// True with probability `percent` in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// A TCP relay to the upstream that can be switched off: then it cuts every
/// connection it relays and closes new ones at once, as an upstream that
/// went away; switched on, it relays again.
pub struct Switch {
    pub addr: SocketAddr,
    on: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Switch {
    pub async fn start(to: SocketAddr) -> Switch {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let on = Arc::new(tokio::sync::watch::Sender::new(true));
        let on2 = Arc::clone(&on);
        tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                let mut rx = on2.subscribe();
                if !*rx.borrow_and_update() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = rx.wait_for(|on| !*on) => {}
                    }
                });
            }
        });
        Switch { addr, on }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, on: bool) {
        self.on.send_replace(on);
    }
}

/// A request that may be cut (the proxy was killed): the status, headers
/// and whole body, or what went wrong. Bounded by [`PATIENCE`].
pub async fn try_request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let go = async {
        let resp = client
            .request(b.body(Full::new(body)).unwrap())
            .await
            .map_err(|e| format!("{url}: {e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("{url}: body cut: {e:?}"))?
            .to_bytes();
        Ok((parts.status, parts.headers, body))
    };
    tokio::time::timeout(PATIENCE, go)
        .await
        .unwrap_or_else(|_| Err(format!("{url}: no answer within {PATIENCE:?}")))
}

/// An OCI image manifest for a config and layers (their bytes).
pub fn image_manifest(config: &[u8], layers: &[&[u8]]) -> Vec<u8> {
    let desc = |media: &str, b: &[u8]| serde_json::json!({"mediaType": media, "digest": sha256_digest(b), "size": b.len()});
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", config),
        "layers": layers.iter().map(|l| desc("application/vnd.oci.image.layer.v1.tar", l)).collect::<Vec<_>>(),
    });
    serde_json::to_vec_pretty(&m).unwrap()
}

/// Pushes `data` as a blob of `repo` to `base` with a monolithic upload,
/// or says why it did not go through.
pub async fn try_push_blob(base: &str, repo: &str, data: &[u8]) -> Result<(), String> {
    let digest = sha256_digest(data);
    let (st, h, _) = try_request(
        Method::POST,
        &format!("{base}/v2/{repo}/blobs/uploads/"),
        &[],
        Bytes::new(),
    )
    .await?;
    if st != StatusCode::ACCEPTED {
        return Err(format!("upload start answered {st}"));
    }
    let loc = h["location"].to_str().unwrap();
    let loc = if loc.starts_with("http") {
        loc.to_owned()
    } else {
        format!("{base}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let (st, _, _) = try_request(
        Method::PUT,
        &format!("{loc}{sep}digest={digest}"),
        &[("content-type", "application/octet-stream")],
        Bytes::copy_from_slice(data),
    )
    .await?;
    if st != StatusCode::CREATED {
        return Err(format!("upload end answered {st}"));
    }
    Ok(())
}

/// Puts an OCI manifest under `tag` of `repo` at `base`.
pub async fn try_push_manifest(
    base: &str,
    repo: &str,
    tag: &str,
    manifest: &[u8],
) -> Result<(), String> {
    let (st, _, body) = try_request(
        Method::PUT,
        &format!("{base}/v2/{repo}/manifests/{tag}"),
        &[("content-type", "application/vnd.oci.image.manifest.v1+json")],
        Bytes::copy_from_slice(manifest),
    )
    .await?;
    if st != StatusCode::CREATED {
        return Err(format!("manifest push answered {st}: {body:?}"));
    }
    Ok(())
}

/// What a cache dir holds under `sha256/`: content files and their bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Content {
    pub files: u64,
    pub bytes: u64,
}

/// Checks what must hold in a cache dir after any crash, once the process
/// that restarted on it is ready: every content file under `sha256/` hashes
/// to its name and sits in its fan-out dir, every `.type` sidecar has its
/// content, no temp file survives, and every state file parses. Returns
/// what the content is, for the index to be compared with.
pub fn check_cache_dir(cache_dir: &Path) -> Content {
    let mut c = Content::default();
    for fan in std::fs::read_dir(cache_dir.join("sha256")).unwrap() {
        let fan = fan.unwrap();
        assert!(
            fan.file_type().unwrap().is_dir(),
            "only fan-out dirs are directly under sha256/, not {}",
            fan.path().display()
        );
        let prefix = fan.file_name().into_string().unwrap();
        for f in std::fs::read_dir(fan.path()).unwrap() {
            let f = f.unwrap();
            let name = f.file_name().into_string().unwrap();
            let path = f.path();
            assert!(
                f.file_type().unwrap().is_file(),
                "only files are in a fan-out dir, not {}",
                path.display()
            );
            if let Some(hex) = name.strip_suffix(".type") {
                assert!(
                    fan.path().join(hex).is_file(),
                    "a media type sidecar {} has its content beside it",
                    path.display()
                );
                continue;
            }
            assert!(
                name.starts_with(&prefix) && name.len() == 64,
                "a content file {} is named by its digest in the dir of its first two digits",
                path.display()
            );
            let data = std::fs::read(&path).unwrap();
            assert_eq!(
                sha256_digest(&data),
                format!("sha256:{name}"),
                "every file under sha256/ hashes to its name ({} bytes)",
                data.len()
            );
            c.files += 1;
            c.bytes += data.len() as u64;
        }
    }
    let left = temp_files(cache_dir);
    assert!(left.is_empty(), "no temp file survives a restart: {left:?}");
    for state in ["state.json", "open.json", "allowed.json"] {
        if let Ok(b) = std::fs::read(cache_dir.join(state)) {
            if let Err(e) = serde_json::from_slice::<serde_json::Value>(&b) {
                panic!(
                    "{state} parses as JSON after a crash ({e}): {:?}",
                    String::from_utf8_lossy(&b)
                );
            }
        }
    }
    c
}

/// Whether the index of the proxy whose metrics are `m` matches `disk` and
/// the cap holds: asserted, with the figures in the message.
pub fn check_index(m: &HashMap<String, u64>, disk: Content) {
    let (bytes, entries, cap) = (
        m["regproxy_cache_bytes"],
        m["regproxy_cache_entries"],
        m["regproxy_cache_capacity_bytes"],
    );
    assert_eq!(
        (bytes, entries),
        (disk.bytes, disk.files),
        "the index (bytes, entries) matches the content files on disk"
    );
    assert!(bytes <= cap, "the cap holds: {bytes} > {cap}");
}

/// `regproxy serve` on `cache_dir`, on port 0, its output dropped: for a
/// test that kills it whenever it chooses, ready or not.
pub fn spawn_serve(upstream: &str, cache_dir: &Path, args: &[&str]) -> Child {
    Command::new(regproxy_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            upstream,
        ])
        .arg("--cache-dir")
        .arg(cache_dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Starts `regproxy serve` on `cache_dir` and kills it (`kill -9`) `after`
/// its start, ready or not: a crash during start-up (the sweep of dead
/// processes' temp files, the index rebuilt, the eviction down to the cap,
/// the key, the binds). The wait is the fault's random moment, not a wait
/// for something to happen.
pub fn start_and_kill(upstream: &str, cache_dir: &Path, args: &[&str], after: Duration) {
    let mut child = spawn_serve(upstream, cache_dir, args);
    std::thread::sleep(after);
    let _ = child.kill();
    let _ = child.wait();
}

//! The soak's clients: each loops over random operations until the end of
//! the run, as docker (ping first), containerd (no ping, `HEAD` of the
//! manifest by tag), a reader of ranges, a prober with `HEAD`s, a pusher, a
//! client that hangs up mid-body; every completed response goes to the
//! oracle. Responses are read here rather than with `registry::Registry`'s
//! pulling client because a broken body (cut) and a clean body that is not
//! the truth (wrong) must be told apart.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};

use super::oracle::{Oracle, Verdict};
use super::tally::Tally;
use super::Rng;
use crate::registry::{Registry, ReqBody};
use crate::synth::{self, ImageSpec, LAYER_TYPE};

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.image.index.v1+json";

/// A pullable image: its name, and its tags.
#[derive(Debug, Clone)]
pub struct Pullable {
    pub name: String,
    pub tags: Vec<String>,
}

/// What every client shares.
pub struct World {
    pub proxy: String,
    pub upstream: String,
    pub oracle: Arc<Oracle>,
    pub tally: Arc<Tally>,
    pub images: Mutex<Vec<Pullable>>,
    /// Standalone blobs of `BLOB_REPO`: (digest, size).
    pub blobs: Vec<(String, u64)>,
    /// For tag moves: each image's variants under `latest`, by manifest.
    pub variants: Vec<(String, Vec<Bytes>)>,
    pub timeout: Duration,
    pub deadline: Instant,
    pub pushes: AtomicU64,
    pub seed: u64,
}

pub const BLOB_REPO: &str = "soak/blobs";

type Resp = http::Response<hyper::body::Incoming>;

/// How a body ended.
enum Body {
    /// Every byte arrived and the body ended cleanly.
    Complete {
        len: u64,
        sha: String,
        kept: Option<Vec<u8>>,
    },
    Cut(String),
}

/// One client's connections.
pub struct Http {
    client: Client<HttpConnector, ReqBody>,
    base: String,
    timeout: Duration,
}

/// An error's kind, for the counts: what failed, not its whole message.
fn kind_of(e: &(dyn std::error::Error + 'static)) -> &'static str {
    let s = format!("{e:?}");
    if s.contains("ConnectionRefused") {
        "connection refused"
    } else if s.contains("ConnectionReset") || s.contains("reset by peer") {
        "connection reset"
    } else if s.contains("IncompleteMessage") || s.contains("connection closed") {
        "connection closed before the response"
    } else {
        "request failed"
    }
}

impl Http {
    pub fn new(addr: &str, timeout: Duration) -> Http {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Http {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(5))
                .build(connector),
            base: format!("http://{addr}"),
            timeout,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(header::HeaderName, String)],
    ) -> Result<Resp, (&'static str, String)> {
        let mut b = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            b = b.header(k, v);
        }
        let req = b
            .body(Empty::new().boxed())
            .map_err(|e| ("bad request", e.to_string()))?;
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => Err(("no response in time", format!("{method} {path}"))),
            Ok(Err(e)) => Err((kind_of(&e), format!("{method} {path}: {e:?}"))),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// Reads a body to its end, hashing it; keeps it if `keep`.
    async fn body(&self, resp: Resp, keep: bool) -> Body {
        let mut body = resp.into_body();
        let mut h = Sha256::new();
        let mut kept = keep.then(Vec::new);
        let mut len = 0u64;
        loop {
            match tokio::time::timeout(self.timeout, body.frame()).await {
                Err(_) => return Body::Cut(format!("stalled after {len} bytes")),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Body::Cut(format!("broke off after {len} bytes: {e}")),
                Ok(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        h.update(d);
                        len += d.len() as u64;
                        if let Some(k) = kept.as_mut() {
                            k.extend_from_slice(d);
                        }
                    }
                }
            }
        }
        Body::Complete {
            len,
            sha: format!("sha256:{:x}", h.finalize()),
            kept,
        }
    }
}

fn header_str(h: &HeaderMap, k: &str) -> Option<String> {
    h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    header_str(h, "content-length").and_then(|v| v.parse().ok())
}

/// `bytes START-END/SIZE` of a `206`.
fn content_range(h: &HeaderMap) -> Option<(u64, u64, u64)> {
    let v = header_str(h, "content-range")?;
    let (range, size) = v.strip_prefix("bytes ")?.split_once('/')?;
    let (s, e) = range.split_once('-')?;
    Some((s.parse().ok()?, e.parse().ok()?, size.parse().ok()?))
}

/// One client: its connections, its random choices.
pub struct Worker {
    pub http: Http,
    pub rng: Rng,
    pub world: Arc<World>,
    /// Blobs this client already has, as a runtime skips layers it has.
    have: std::collections::HashSet<String>,
}

impl Worker {
    pub fn new(world: Arc<World>, seed: u64) -> Worker {
        Worker {
            http: Http::new(&world.proxy, world.timeout),
            rng: Rng::new(seed),
            world,
            have: Default::default(),
        }
    }

    /// Sends a request of `op`; a failure or an answer other than `200` is
    /// tallied as `op`'s error, and gives `None`.
    async fn send_ok(
        &self,
        op: &str,
        method: Method,
        path: &str,
        headers: &[(header::HeaderName, String)],
    ) -> Option<Resp> {
        let resp = match self.http.send(method, path, headers).await {
            Ok(r) => r,
            Err((k, why)) => {
                self.tally().error(op, k, why);
                return None;
            }
        };
        let status = resp.status();
        if status != StatusCode::OK {
            self.tally()
                .error(op, &format!("status {}", status.as_u16()), path.to_owned());
            return None;
        }
        Some(resp)
    }

    fn tally(&self) -> &Tally {
        &self.world.tally
    }

    /// Runs random operations until the deadline.
    pub async fn run(mut self) {
        // No operation may hold a client for long: a pull is a few requests
        // of at most `timeout` each; past this it is counted and dropped.
        let bound = self.world.timeout * 4;
        while Instant::now() < self.world.deadline {
            let pick = self.rng.below(100);
            let op = async {
                match pick {
                    0..=24 => self.docker_pull().await,
                    25..=49 => self.containerd_pull().await,
                    50..=64 => self.range_read().await,
                    65..=79 => self.heads().await,
                    80..=86 => self.hang_up().await,
                    87..=92 => self.push().await,
                    _ => self.tag_move().await,
                }
            };
            if tokio::time::timeout(bound, op).await.is_err() {
                self.world.tally.error(
                    "client",
                    "operation did not finish",
                    format!("operation {pick} took over {bound:?}"),
                );
            }
            // A node forgets its layers now and then (its pods moved).
            if self.rng.below(4) == 0 {
                self.have.clear();
            }
        }
    }

    fn pick_image(&mut self) -> (String, String) {
        let imgs = self.world.images.lock().expect("images lock");
        let p = &imgs[self.rng.below(imgs.len())];
        (p.name.clone(), p.tags[self.rng.below(p.tags.len())].clone())
    }

    /// A verified GET of a whole blob; `true` if right.
    pub async fn get_blob(&mut self, op: &str, name: &str, digest: &str) -> bool {
        let path = format!("/v2/{name}/blobs/{digest}");
        let resp = match self.http.send(Method::GET, &path, &[]).await {
            Ok(r) => r,
            Err((k, why)) => {
                self.tally().error(op, k, why);
                return false;
            }
        };
        let status = resp.status();
        if status != StatusCode::OK {
            let _ = self.http.body(resp, false).await;
            self.tally()
                .error(op, &format!("status {}", status.as_u16()), path);
            return false;
        }
        match self.http.body(resp, false).await {
            Body::Cut(why) => {
                self.tally().cut(op, format!("{path}: {why}"));
                false
            }
            Body::Complete { len, sha, .. } => {
                let v = self.world.oracle.blob(digest, len, &sha);
                self.tally().verdict(op, v, len)
            }
        }
    }

    /// GET a manifest by tag (or digest); the digest it is, if right.
    async fn get_manifest(&mut self, op: &str, name: &str, reference: &str) -> Option<String> {
        let path = format!("/v2/{name}/manifests/{reference}");
        let start = Instant::now();
        let resp = match self
            .http
            .send(Method::GET, &path, &[(header::ACCEPT, ACCEPT.into())])
            .await
        {
            Ok(r) => r,
            Err((k, why)) => {
                self.tally().error(op, k, why);
                return None;
            }
        };
        let status = resp.status();
        let named = header_str(resp.headers(), "docker-content-digest");
        if status != StatusCode::OK {
            let _ = self.http.body(resp, false).await;
            self.tally()
                .error(op, &format!("status {}", status.as_u16()), path);
            return None;
        }
        let (len, sha, kept) = match self.http.body(resp, true).await {
            Body::Cut(why) => {
                self.tally().cut(op, format!("{path}: {why}"));
                return None;
            }
            Body::Complete { len, sha, kept } => (len, sha, kept.unwrap_or_default()),
        };
        let end = Instant::now();
        let o = &self.world.oracle;
        let mut v = o.manifest_body(&sha, &kept);
        if v == Verdict::Right {
            if let Some(n) = named.filter(|n| *n != sha) {
                v = Verdict::Wrong(format!("{path}: body {sha}, Docker-Content-Digest {n}"));
            }
        }
        if v == Verdict::Right && reference.starts_with("sha256:") && sha != reference {
            v = Verdict::Wrong(format!("{path}: body hashes to {sha}"));
        }
        if v == Verdict::Right && !reference.starts_with("sha256:") {
            v = o.tagged(name, reference, &sha, start, end);
        }
        self.tally().verdict(op, v, len).then_some(sha)
    }

    /// Config and layers of a manifest, three at a time as containerd does.
    async fn pull_blobs(&mut self, op: &str, name: &str, manifest: &str) {
        let Some(body) = self.world.oracle.literal(manifest) else {
            return;
        };
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let mut digests: Vec<String> = std::iter::once(&v["config"])
            .chain(v["layers"].as_array().into_iter().flatten())
            .filter_map(|d| d["digest"].as_str().map(str::to_string))
            .filter(|d| !self.have.contains(d))
            .collect();
        self.rng.shuffle(&mut digests);
        for d in digests {
            if self.get_blob(op, name, &d).await {
                self.have.insert(d);
            }
        }
    }

    /// docker: `GET /v2/`, the manifest by tag, then the blobs.
    async fn docker_pull(&mut self) {
        let op = "docker pull";
        match self.http.send(Method::GET, "/v2/", &[]).await {
            Ok(r) => {
                let s = r.status();
                let _ = self.http.body(r, false).await;
                if s != StatusCode::OK {
                    self.tally()
                        .error("ping", &format!("status {}", s.as_u16()), "/v2/".into());
                    return;
                }
                self.tally().hung_up("ping");
            }
            Err((k, why)) => {
                self.tally().error("ping", k, why);
                return;
            }
        }
        let (name, tag) = self.pick_image();
        if let Some(d) = self.get_manifest(op, &name, &tag).await {
            self.pull_blobs(op, &name, &d).await;
        }
    }

    /// containerd: no ping; `HEAD` of the manifest by tag, GET by digest, blobs.
    async fn containerd_pull(&mut self) {
        let op = "containerd pull";
        let (name, tag) = self.pick_image();
        let path = format!("/v2/{name}/manifests/{tag}");
        let start = Instant::now();
        let headers = [(header::ACCEPT, ACCEPT.into())];
        let Some(resp) = self.send_ok(op, Method::HEAD, &path, &headers).await else {
            return;
        };
        let end = Instant::now();
        let Some(d) = header_str(resp.headers(), "docker-content-digest") else {
            self.tally().verdict(
                op,
                Verdict::Wrong(format!("HEAD {path}: no Docker-Content-Digest")),
                0,
            );
            return;
        };
        let len = content_length(resp.headers());
        let o = self.world.oracle.clone();
        let mut v = o.head(&d, len, None);
        if v == Verdict::Right {
            v = o.tagged(&name, &tag, &d, start, end);
        }
        if !self.tally().verdict(op, v, 0) {
            return;
        }
        if self.get_manifest(op, &name, &d).await.is_some() {
            self.pull_blobs(op, &name, &d).await;
        }
    }

    fn pick_blob(&mut self) -> (String, u64) {
        self.world.blobs[self.rng.below(self.world.blobs.len())].clone()
    }

    /// A `Range` read of a standalone blob: a `206` must be that slice.
    async fn range_read(&mut self) {
        let op = "range";
        let (d, size) = self.pick_blob();
        let start = self.rng.below(size as usize) as u64;
        let len = 1 + self.rng.below((size - start).min(1 << 20) as usize) as u64;
        let end = start + len - 1;
        let path = format!("/v2/{BLOB_REPO}/blobs/{d}");
        let resp = match self
            .http
            .send(
                Method::GET,
                &path,
                &[(header::RANGE, format!("bytes={start}-{end}"))],
            )
            .await
        {
            Ok(r) => r,
            Err((k, why)) => return self.tally().error(op, k, why),
        };
        let status = resp.status();
        let cr = content_range(resp.headers());
        if !matches!(status, StatusCode::OK | StatusCode::PARTIAL_CONTENT) {
            let _ = self.http.body(resp, false).await;
            return self
                .tally()
                .error(op, &format!("status {}", status.as_u16()), path);
        }
        let partial = status == StatusCode::PARTIAL_CONTENT;
        let (got_len, sha, kept) = match self.http.body(resp, partial).await {
            Body::Cut(why) => return self.tally().cut(op, format!("{path}: {why}")),
            Body::Complete { len, sha, kept } => (len, sha, kept),
        };
        let o = &self.world.oracle;
        let v = if !partial {
            o.blob(&d, got_len, &sha)
        } else {
            match cr {
                Some((s, e, total)) if s == start && e == end && total == size => {
                    o.range(&d, start, &kept.unwrap_or_default())
                }
                Some((s, e, total)) if s == start && e < end && total == size => {
                    Verdict::Wrong(format!("{path}: asked {start}-{end}, answered {s}-{e}"))
                }
                other => Verdict::Wrong(format!(
                    "{path}: asked {start}-{end} of {size}, Content-Range {other:?}"
                )),
            }
        };
        self.tally().verdict(op, v, got_len);
    }

    /// `HEAD` of a blob, a config, and a manifest by digest.
    async fn heads(&mut self) {
        let op = "head";
        let (d, _) = self.pick_blob();
        let path = format!("/v2/{BLOB_REPO}/blobs/{d}");
        let Some(resp) = self.send_ok(op, Method::HEAD, &path, &[]).await else {
            return;
        };
        let named = header_str(resp.headers(), "docker-content-digest");
        let v = self
            .world
            .oracle
            .head(&d, content_length(resp.headers()), named.as_deref());
        self.tally().verdict(op, v, 0);
    }

    /// A GET that reads a little of the body and hangs up.
    async fn hang_up(&mut self) {
        let op = "hang up";
        let (d, _) = self.pick_blob();
        let path = format!("/v2/{BLOB_REPO}/blobs/{d}");
        let Some(resp) = self.send_ok(op, Method::GET, &path, &[]).await else {
            return;
        };
        let want = 1 + self.rng.below(256 << 10) as u64;
        let mut body = resp.into_body();
        let mut got = 0;
        while got < want {
            match tokio::time::timeout(self.world.timeout, body.frame()).await {
                Ok(Some(Ok(f))) => got += f.data_ref().map_or(0, |d| d.len() as u64),
                _ => break,
            }
        }
        drop(body);
        self.tally().hung_up(op);
    }

    /// Pushes a small new image through the proxy, then pulls it back.
    async fn push(&mut self) {
        let op = "push";
        let k = self.world.pushes.fetch_add(1, Relaxed);
        let seed = self
            .world
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(7_000_000 + k);
        let layer = synth::blob(seed, 32 << 10 | (k % 4096), LAYER_TYPE);
        let name = format!("soak/pushed-{}", k % 8);
        let tag = format!("p{k}");
        let img = synth::image(&name, &tag, vec![layer]);
        self.world.oracle.add_image(&img);
        let reg = Registry::new(&self.world.proxy, self.world.timeout);
        let asked = Instant::now();
        match reg.push_image(&img).await {
            Err(e) => self.tally().error(op, "push failed", format!("{e:#}")),
            Ok(_) => {
                self.world
                    .oracle
                    .set_tag(&name, &tag, &img.manifest.digest, asked, Instant::now());
                self.tally().hung_up(op);
                self.world
                    .images
                    .lock()
                    .expect("images lock")
                    .push(Pullable {
                        name: name.clone(),
                        tags: vec![tag.clone()],
                    });
                if let Some(d) = self.get_manifest("pull pushed", &name, &tag).await {
                    self.pull_blobs("pull pushed", &name, &d).await;
                }
            }
        }
    }

    /// Moves an image's `latest` to another variant, directly at the upstream.
    async fn tag_move(&mut self) {
        let op = "tag move (upstream)";
        let i = self.rng.below(self.world.variants.len());
        let (name, ms) = self.world.variants[i].clone();
        let m = ms[self.rng.below(ms.len())].clone();
        let d = super::oracle::sha(&m);
        // One move per image at a time, so the history's order is the upstream's.
        let lock = self.world.oracle.tag_lock(&name);
        // Another client moving it (the upstream slow to answer): this one
        // does something else rather than queue behind it.
        let Ok(_held) = tokio::time::timeout(Duration::from_secs(1), lock.lock()).await else {
            return;
        };
        let reg = Registry::new(&self.world.upstream, self.world.timeout);
        let asked = Instant::now();
        let result = reg.put_manifest(&name, "latest", m).await;
        let now = match &result {
            Ok(()) => Some(d),
            // It may or may not have moved: ask the upstream what it is now.
            Err(_) => self.read_tag(&reg, &name).await,
        };
        if let Some(now) = now {
            self.world
                .oracle
                .set_tag(&name, "latest", &now, asked, Instant::now());
        }
        match result {
            Ok(()) => self.tally().hung_up(op),
            Err(e) => self.tally().error(op, "tag move failed", format!("{e:#}")),
        }
    }

    /// The digest `name:latest` has at the upstream, asked until it answers
    /// (an upstream restart takes a moment), at most a minute.
    async fn read_tag(&self, reg: &Registry, name: &str) -> Option<String> {
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            if let Ok(m) = reg.manifest(name, "latest").await {
                return Some(m.digest);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }
}

/// Builds the image set with its `latest` variants.
pub fn images(seed: u64, n: usize) -> (Vec<ImageSpec>, Vec<(String, Vec<ImageSpec>)>) {
    let set = synth::image_set(&synth::ImageSetShape {
        prefix: "soak/app".into(),
        images: n,
        shared_layers: vec![2 << 20, 512 << 10],
        unique_layers: vec![1 << 20, 128 << 10, 4 << 10],
        seed,
    });
    let variants = set
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let vs = (0..3)
                .map(|j| {
                    let mut layers = img.layers.clone();
                    let s = seed.wrapping_mul(7919).wrapping_add(100 * i as u64 + j);
                    layers.push(synth::blob(s, 1024 + j, LAYER_TYPE));
                    synth::image(&img.name, "latest", layers)
                })
                .collect();
            (img.name.clone(), vs)
        })
        .collect();
    (set, variants)
}

//! The client side of every scenario: N clients at once, each with its own
//! connections like separate pods or nodes, every blob verified (hashed; in
//! the discard scenarios, counted). Errors are
//! counted and kept (the first few), never fatal: a scenario always reports.

use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::registry::{BodyCheck, Fetched, Registry};
use crate::stats::Latencies;

/// What one scenario's clients saw.
#[derive(Debug, Default)]
pub struct Outcome {
    pub wall: Duration,
    /// Verified payload bytes received (blobs and manifests; discarded blobs
    /// count when their length was right).
    pub bytes: u64,
    pub requests: u64,
    /// Blobs whose bytes hashed to their digest (for discarding clients:
    /// numbered their size), and manifests that did.
    pub verified: u64,
    pub errors: u64,
    pub first_errors: Vec<String>,
    /// Per blob GET (request to last byte).
    pub blob_latency: Latencies,
    /// Per blob GET, request to response headers (time to first byte).
    pub blob_ttfb: Latencies,
    /// Per image (tag resolved to the last blob verified).
    pub image_latency: Latencies,
    /// Per small request (manifests, HEADs).
    pub request_latency: Latencies,
}

impl Outcome {
    fn error(&mut self, e: anyhow::Error) {
        self.errors += 1;
        if self.first_errors.len() < 5 {
            self.first_errors.push(format!("{e:#}"));
        }
    }

    /// A blob GET that verified.
    fn fetched(&mut self, f: Fetched) {
        self.bytes += f.bytes;
        self.verified += 1;
        self.blob_latency.push(f.elapsed);
        self.blob_ttfb.push(f.ttfb);
    }

    fn merge(&mut self, o: Outcome) {
        self.bytes += o.bytes;
        self.requests += o.requests;
        self.verified += o.verified;
        self.errors += o.errors;
        for e in o.first_errors {
            if self.first_errors.len() < 5 {
                self.first_errors.push(e);
            }
        }
        self.blob_latency.extend(o.blob_latency);
        self.blob_ttfb.extend(o.blob_ttfb);
        self.image_latency.extend(o.image_latency);
        self.request_latency.extend(o.request_latency);
    }

    /// Verified payload MiB per second of wall time.
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// An image to pull, `name:tag`.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRef {
    pub name: String,
    pub tag: String,
}

impl ImageRef {
    pub fn parse(s: &str) -> anyhow::Result<ImageRef> {
        let (name, tag) = s
            .rsplit_once(':')
            .filter(|(n, _)| !n.is_empty() && !n.ends_with('/'))
            .ok_or_else(|| anyhow::anyhow!("image {s:?} is not name:tag"))?;
        Ok(ImageRef {
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }
}

/// `clients` concurrent GETs of one blob, each on its own connection, every
/// body hashed.
pub async fn concurrent_blob(
    addr: &str,
    timeout: Duration,
    name: &str,
    digest: &str,
    size: u64,
    clients: usize,
) -> Outcome {
    let gets = BlobGets {
        name,
        digest,
        size,
        clients,
        rounds: 1,
        check: BodyCheck::Hash,
    };
    blob_gets(addr, timeout, &gets).await
}

/// GETs of one blob by concurrent clients, for [`blob_gets`].
#[derive(Debug, Clone, Copy)]
pub struct BlobGets<'a> {
    pub name: &'a str,
    pub digest: &'a str,
    pub size: u64,
    /// Clients at once, each with its own connections.
    pub clients: usize,
    /// GETs each client makes one after the other (on its keep-alive
    /// connection).
    pub rounds: usize,
    /// What each client does with the bytes.
    pub check: BodyCheck,
}

/// `g.clients` clients at once, each GETting the blob `g.rounds` times in a
/// row; the wall time runs until the last client is done.
pub async fn blob_gets(addr: &str, timeout: Duration, g: &BlobGets<'_>) -> Outcome {
    let start = Instant::now();
    let tasks: Vec<_> = (0..g.clients)
        .map(|_| {
            let reg = Registry::new(addr, timeout);
            let (name, digest) = (g.name.to_string(), g.digest.to_string());
            let BlobGets {
                size,
                rounds,
                check,
                ..
            } = *g;
            tokio::spawn(async move {
                let mut out = Outcome::default();
                for _ in 0..rounds.max(1) {
                    out.requests += 1;
                    match reg.get_blob_as(&name, &digest, size, check).await {
                        Ok(f) => out.fetched(f),
                        Err(e) => out.error(e),
                    }
                }
                out
            })
        })
        .collect();
    join_clients(Outcome::default(), tasks, start).await
}

/// One client pulling `images` one after the other like a container runtime:
/// tag → manifest → config and layers, `layer_concurrency` blobs at a time,
/// skipping blobs it already has (a shared base layer is pulled once per client).
async fn pull_as_one_client(
    reg: Registry,
    images: Vec<ImageRef>,
    layer_concurrency: usize,
) -> Outcome {
    let mut out = Outcome::default();
    let mut have = std::collections::HashSet::new();
    for img in images {
        let started = Instant::now();
        out.requests += 1;
        let manifest = match reg.manifest(&img.name, &img.tag).await {
            Ok(m) => m,
            Err(e) => {
                out.error(e);
                continue;
            }
        };
        out.bytes += manifest.bytes.len() as u64;
        out.verified += 1;
        let blobs: Vec<(String, u64)> = std::iter::once(manifest.config.clone())
            .chain(manifest.layers.iter().cloned())
            .filter(|(d, _)| !have.contains(d))
            .collect();
        let results: Vec<_> = stream::iter(blobs)
            .map(|(digest, size)| {
                let (reg, name) = (reg.clone(), img.name.clone());
                async move {
                    reg.get_blob(&name, &digest, size)
                        .await
                        .map(|f| (digest, f))
                }
            })
            .buffer_unordered(layer_concurrency.max(1))
            .collect()
            .await;
        let mut ok = true;
        for r in results {
            out.requests += 1;
            match r {
                Ok((digest, f)) => {
                    out.fetched(f);
                    have.insert(digest);
                }
                Err(e) => {
                    ok = false;
                    out.error(e);
                }
            }
        }
        if ok {
            out.image_latency.push(started.elapsed());
        }
    }
    out
}

/// `clients` clients at once, each pulling every image.
pub async fn pull_images(
    addr: &str,
    timeout: Duration,
    images: &[ImageRef],
    clients: usize,
    layer_concurrency: usize,
) -> Outcome {
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let reg = Registry::new(addr, timeout);
            // Clients start at different images, as pods on a node do.
            let mut order = images.to_vec();
            if !order.is_empty() {
                order.rotate_left(i % images.len());
            }
            tokio::spawn(pull_as_one_client(reg, order, layer_concurrency))
        })
        .collect();
    join_clients(Outcome::default(), tasks, start).await
}

/// Small requests at the highest rate `workers` concurrent clients reach, for
/// `duration` (or `max_requests`): manifest by tag, manifest by digest, HEAD of
/// the config and of every layer, round-robin over `images`.
pub async fn small_requests(
    addr: &str,
    timeout: Duration,
    images: &[ImageRef],
    workers: usize,
    duration: Duration,
    max_requests: u64,
) -> Outcome {
    let mut out = Outcome::default();
    // Resolve once to learn digests and sizes.
    let reg = Registry::new(addr, timeout);
    let mut ops: Vec<(String, Op)> = Vec::new();
    for img in images {
        match reg.manifest(&img.name, &img.tag).await {
            Ok(m) => {
                ops.push((img.name.clone(), Op::Tag(img.tag.clone())));
                ops.push((img.name.clone(), Op::Digest(m.digest.clone())));
                for (d, s) in std::iter::once(m.config).chain(m.layers) {
                    ops.push((img.name.clone(), Op::Head(d, s)));
                }
            }
            Err(e) => out.error(e),
        }
    }
    if ops.is_empty() {
        return out;
    }
    let start = Instant::now();
    let per_worker = max_requests / workers.max(1) as u64;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let reg = Registry::new(addr, timeout);
            let ops = ops.clone();
            tokio::spawn(async move {
                let mut o = Outcome::default();
                let mut i = w;
                while start.elapsed() < duration && o.requests < per_worker {
                    let (name, op) = &ops[i % ops.len()];
                    i += 1;
                    let t = Instant::now();
                    let r = match op {
                        Op::Tag(tag) => reg.manifest(name, tag).await.map(|m| m.bytes.len() as u64),
                        Op::Digest(d) => reg.manifest(name, d).await.map(|m| m.bytes.len() as u64),
                        Op::Head(d, s) => reg.head_blob(name, d, *s).await.map(|()| 0),
                    };
                    o.requests += 1;
                    match r {
                        Ok(n) => {
                            o.bytes += n;
                            o.verified += 1;
                            o.request_latency.push(t.elapsed());
                        }
                        Err(e) => o.error(e),
                    }
                }
                o
            })
        })
        .collect();
    join_clients(out, tasks, start).await
}

/// Waits for every client's task and adds what each saw to `out`; the wall
/// time runs from `start` to the last client's end.
async fn join_clients(
    mut out: Outcome,
    tasks: Vec<JoinHandle<Outcome>>,
    start: Instant,
) -> Outcome {
    for t in tasks {
        match t.await {
            Ok(o) => out.merge(o),
            Err(e) => out.error(e.into()),
        }
    }
    out.wall = start.elapsed();
    out
}

#[derive(Debug, Clone)]
enum Op {
    Tag(String),
    Digest(String),
    Head(String, u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_refs_split_at_the_last_colon() {
        let r = ImageRef::parse("bench/app-0:v1").unwrap();
        assert_eq!((r.name.as_str(), r.tag.as_str()), ("bench/app-0", "v1"));
        assert!(
            ImageRef::parse("notag").is_err(),
            "a reference without a tag should be refused"
        );
    }
}

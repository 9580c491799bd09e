//! A small OCI Distribution client: what `seed` pushes with and what every
//! simulated node pulls with. Every blob body is hashed as it streams in and
//! checked against its digest and size (or, for the discard scenarios, only
//! counted: [`BodyCheck`]); nothing keeps a whole blob in memory.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};

use crate::synth::{self, BlobSpec, ImageSpec, MANIFEST_TYPE};

pub type ReqBody = BoxBody<Bytes, Infallible>;

/// What `Accept` a pulling client sends for manifests.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.image.index.v1+json";

/// A registry at `http://host:port`, with a pool of keep-alive connections.
#[derive(Clone)]
pub struct Registry {
    base: String,
    client: Client<HttpConnector, ReqBody>,
    timeout: Duration,
}

/// A blob that was downloaded and verified.
#[derive(Debug, Clone, Copy)]
pub struct Fetched {
    pub bytes: u64,
    /// From sending the request to the response headers.
    pub ttfb: Duration,
    /// From sending the request to the last byte.
    pub elapsed: Duration,
}

/// What a client does with the bytes of a blob it downloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyCheck {
    /// Hashes them and compares with the digest, as a container runtime
    /// does; also counts them.
    Hash,
    /// Counts them and drops them, like `curl -o /dev/null`: the client's
    /// cost per byte is then the socket's receive copy alone, and a
    /// server's own cost is not hidden behind the clients' sha256.
    Discard,
}

/// A manifest as resolved by tag or digest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: String,
    pub bytes: Bytes,
    pub config: (String, u64),
    pub layers: Vec<(String, u64)>,
}

fn empty() -> ReqBody {
    Empty::new().boxed()
}

fn full(b: Bytes) -> ReqBody {
    Full::new(b).boxed()
}

impl Registry {
    /// `addr` is `host:port` or `http://host:port`.
    pub fn new(addr: &str, timeout: Duration) -> Self {
        let base = if addr.starts_with("http://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", addr.trim_end_matches('/'))
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(128)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Registry {
            base,
            client,
            timeout,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(
        &self,
        req: Request<ReqBody>,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let what = format!("{} {}", req.method(), req.uri());
        tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| anyhow!("{what}: no response within {:?}", self.timeout))?
            .with_context(|| format!("{what}: request failed"))
    }

    /// Reads a whole (small) body, bounded by the timeout.
    async fn read_small(
        &self,
        resp: http::Response<hyper::body::Incoming>,
    ) -> anyhow::Result<Bytes> {
        let body = tokio::time::timeout(self.timeout, resp.into_body().collect())
            .await
            .map_err(|_| anyhow!("body not complete within {:?}", self.timeout))??;
        Ok(body.to_bytes())
    }

    /// `GET <path>` as a small body, e.g. an admin endpoint's `/metrics`.
    pub async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let req = Request::get(format!("{}{path}", self.base)).body(empty())?;
        let resp = self.send(req).await?;
        let status = resp.status();
        let body = self.read_small(resp).await?;
        ensure!(status == StatusCode::OK, "GET {path} answered {status}");
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// `GET /v2/` answers 200.
    pub async fn ping(&self) -> anyhow::Result<()> {
        let req = Request::get(format!("{}/v2/", self.base)).body(empty())?;
        let resp = self.send(req).await?;
        ensure!(
            resp.status() == StatusCode::OK,
            "GET /v2/ answered {}",
            resp.status()
        );
        Ok(())
    }

    /// Waits until `GET /v2/` answers 200, at most `within`.
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            match self.ping().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("{} not ready within {within:?}", self.base)))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn blob_exists(&self, name: &str, digest: &str) -> anyhow::Result<bool> {
        let req = Request::head(format!("{}/v2/{name}/blobs/{digest}", self.base)).body(empty())?;
        Ok(self.send(req).await?.status() == StatusCode::OK)
    }

    /// Monolithic upload: `POST` a session, then `PUT ?digest=` with the body.
    async fn upload(
        &self,
        name: &str,
        digest: &str,
        size: u64,
        body: ReqBody,
    ) -> anyhow::Result<()> {
        let req = Request::post(format!("{}/v2/{name}/blobs/uploads/", self.base)).body(empty())?;
        let resp = self.send(req).await?;
        ensure!(
            resp.status() == StatusCode::ACCEPTED,
            "starting an upload to {name} answered {}",
            resp.status()
        );
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| anyhow!("upload to {name} gave no Location"))?
            .to_string();
        let mut url = if location.starts_with("http") {
            location
        } else {
            format!("{}{location}", self.base)
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str("digest=");
        url.push_str(digest);
        let req = Request::put(url)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, size)
            .body(body)?;
        let resp = self.send(req).await?;
        let status = resp.status();
        ensure!(
            status == StatusCode::CREATED,
            "uploading {digest} to {name} answered {status}: {}",
            String::from_utf8_lossy(&self.read_small(resp).await.unwrap_or_default())
        );
        Ok(())
    }

    /// Pushes a synthetic blob unless the registry has it already.
    pub async fn push_blob(&self, name: &str, blob: &BlobSpec) -> anyhow::Result<bool> {
        if self.blob_exists(name, &blob.digest).await? {
            return Ok(false);
        }
        let frames = synth::chunks(blob.seed, blob.size).map(|c| Ok(Frame::data(c)));
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        self.upload(name, &blob.digest, blob.size, body).await?;
        Ok(true)
    }

    /// Pushes an image: its blobs, its config, then its manifest under its tag.
    pub async fn push_image(&self, img: &ImageSpec) -> anyhow::Result<u64> {
        let mut pushed = 0;
        for layer in &img.layers {
            if self.push_blob(&img.name, layer).await? {
                pushed += layer.size;
            }
        }
        if !self.blob_exists(&img.name, &img.config.digest).await? {
            let len = img.config.bytes.len() as u64;
            self.upload(
                &img.name,
                &img.config.digest,
                len,
                full(img.config.bytes.clone()),
            )
            .await?;
            pushed += len;
        }
        self.put_manifest(&img.name, &img.tag, img.manifest.bytes.clone())
            .await
            .with_context(|| format!("pushing the manifest of {}", img.reference()))?;
        Ok(pushed)
    }

    /// `PUT` an OCI manifest under `reference` (a tag moves to it); its blobs
    /// must be there already.
    pub async fn put_manifest(
        &self,
        name: &str,
        reference: &str,
        bytes: Bytes,
    ) -> anyhow::Result<()> {
        let req = Request::put(format!("{}/v2/{name}/manifests/{reference}", self.base))
            .header(header::CONTENT_TYPE, MANIFEST_TYPE)
            .body(full(bytes))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        ensure!(
            status == StatusCode::CREATED,
            "PUT manifest {name}:{reference} answered {status}: {}",
            String::from_utf8_lossy(&self.read_small(resp).await.unwrap_or_default())
        );
        Ok(())
    }

    /// Resolves a manifest by tag or digest, verifying its bytes against the
    /// digest asked for or the `Docker-Content-Digest` the registry gave.
    pub async fn manifest(&self, name: &str, reference: &str) -> anyhow::Result<Manifest> {
        let req = Request::get(format!("{}/v2/{name}/manifests/{reference}", self.base))
            .header(header::ACCEPT, MANIFEST_ACCEPT)
            .body(empty())?;
        let resp = self.send(req).await?;
        let status = resp.status();
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = self.read_small(resp).await?;
        ensure!(
            status == StatusCode::OK,
            "manifest {name}:{reference} answered {status}"
        );
        let digest = synth::sha256_digest(&bytes);
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_string())
        } else {
            header_digest
        };
        if let Some(expected) = expected {
            ensure!(
                digest == expected,
                "manifest {name}:{reference} hashes to {digest}, expected {expected}"
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("manifest {name}:{reference} is not JSON"))?;
        let desc = |d: &serde_json::Value| -> anyhow::Result<(String, u64)> {
            Ok((
                d["digest"]
                    .as_str()
                    .ok_or_else(|| anyhow!("descriptor without digest"))?
                    .to_string(),
                d["size"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("descriptor without size"))?,
            ))
        };
        let config = desc(&v["config"])?;
        let layers = v["layers"]
            .as_array()
            .ok_or_else(|| anyhow!("manifest {name}:{reference} has no layers"))?
            .iter()
            .map(desc)
            .collect::<anyhow::Result<_>>()?;
        Ok(Manifest {
            digest,
            bytes,
            config,
            layers,
        })
    }

    /// `HEAD` of a blob; checks `Content-Length` when the registry sends one.
    pub async fn head_blob(&self, name: &str, digest: &str, size: u64) -> anyhow::Result<()> {
        let req = Request::builder()
            .method(Method::HEAD)
            .uri(format!("{}/v2/{name}/blobs/{digest}", self.base))
            .body(empty())?;
        let resp = self.send(req).await?;
        ensure!(
            resp.status() == StatusCode::OK,
            "HEAD {digest} answered {}",
            resp.status()
        );
        if let Some(len) = resp.headers().get(header::CONTENT_LENGTH) {
            let len: u64 = len.to_str()?.parse()?;
            ensure!(
                len == size,
                "HEAD {digest} says {len} bytes, expected {size}"
            );
        }
        Ok(())
    }

    /// Downloads a blob, hashing it as it streams in; fails unless the bytes
    /// hash to `digest` and number exactly `size`.
    pub async fn get_blob(&self, name: &str, digest: &str, size: u64) -> anyhow::Result<Fetched> {
        self.get_blob_as(name, digest, size, BodyCheck::Hash).await
    }

    /// Downloads a blob, checking its bytes as `check` says; fails unless
    /// they number exactly `size` (and, hashed, hash to `digest`).
    pub async fn get_blob_as(
        &self,
        name: &str,
        digest: &str,
        size: u64,
        check: BodyCheck,
    ) -> anyhow::Result<Fetched> {
        let start = Instant::now();
        let req = Request::get(format!("{}/v2/{name}/blobs/{digest}", self.base)).body(empty())?;
        let resp = self.send(req).await?;
        let ttfb = start.elapsed();
        let status = resp.status();
        if status != StatusCode::OK {
            let body = self.read_small(resp).await.unwrap_or_default();
            bail!(
                "GET {digest} answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            );
        }
        let mut body = resp.into_body();
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        loop {
            let frame = tokio::time::timeout(self.timeout, body.frame())
                .await
                .map_err(|_| {
                    anyhow!(
                        "GET {digest}: stalled for {:?} after {n} bytes",
                        self.timeout
                    )
                })?;
            let Some(frame) = frame else { break };
            let frame =
                frame.with_context(|| format!("GET {digest}: body broke off after {n} bytes"))?;
            if let Some(data) = frame.data_ref() {
                if check == BodyCheck::Hash {
                    hasher.update(data);
                }
                n += data.len() as u64;
            }
        }
        ensure!(n == size, "GET {digest}: got {n} bytes, expected {size}");
        if check == BodyCheck::Hash {
            let got = format!("sha256:{:x}", hasher.finalize());
            ensure!(got == digest, "GET {digest}: the body hashes to {got}");
        }
        Ok(Fetched {
            bytes: n,
            ttfb,
            elapsed: start.elapsed(),
        })
    }
}

/// `regproxy_upstream_bytes_total` (summed over any labels) from regproxy's
/// admin address: what regproxy itself says it received from the upstream.
pub async fn regproxy_upstream_bytes(admin: &str) -> anyhow::Result<u64> {
    regproxy_metric(admin, "regproxy_upstream_bytes_total").await
}

/// The metric `name` (summed over any labels) from regproxy's admin address.
pub async fn regproxy_metric(admin: &str, name: &str) -> anyhow::Result<u64> {
    let text = Registry::new(admin, Duration::from_secs(5))
        .get_text("/metrics")
        .await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

//! Manifests. By digest they are immutable: cached like blobs, with their
//! media type. By tag they are remembered for `--tag-ttl`; after it one
//! `HEAD` per tag revalidates (single-flight), and while the upstream is down
//! the last digest it gave is served.

use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;

use super::{accepts, Answer, App};
use crate::auth::{Credential, Verdict};
use crate::body::Body;
use crate::digest::Digest;
use crate::error::{Cause, Error, Origin, UpstreamError, Wait};
use crate::headers::CONTENT_DIGEST;
use crate::metrics::Outcome;
use crate::tags::TagEntry;

/// Largest manifest read into memory to verify and cache (Distribution's limit).
pub(super) const MAX_MANIFEST: usize = 4 << 20;

/// Every manifest kind a client may pull, asked for when the proxy resolves
/// a tag for itself: multi-arch indexes first, as today's clients ask.
pub(super) const ALL_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// A manifest fetched from upstream, verified and cached; or the upstream's
/// answer when it was not a 200.
pub(super) enum Fetched {
    Manifest {
        digest: Digest,
        media_type: String,
        bytes: Bytes,
    },
    Relayed(Response<Body>),
}

/// What revalidating a tag found. The answer to the client is built from it
/// after the tag's single flight is released.
enum Revalidated {
    /// The upstream resolved the tag (`Miss`), now remembered; or another
    /// request just did (`Hit`).
    Fresh(TagEntry, Outcome),
    /// The upstream has no such tag, or will not say to this client.
    Gone,
    /// The upstream is unreachable or failing; `old` is what it said last.
    Unavailable { error: Error, old: Option<TagEntry> },
    /// The upstream's answer to fetching the manifest, relayed as it is.
    Relayed(Response<Body>),
    /// An answer the proxy does not interpret: the client's own request is
    /// relayed.
    Uninterpreted,
}

pub(super) fn manifest_response(
    d: &Digest,
    media_type: &str,
    len: usize,
) -> http::response::Builder {
    // A type that is no header value (never stored since pushes check it,
    // but the cache dir may be older) must not make the response invalid.
    let media_type = HeaderValue::from_str(media_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    Response::builder()
        .header(header::CONTENT_TYPE, media_type)
        .header(header::CONTENT_LENGTH, len)
        .header(CONTENT_DIGEST, d.to_string())
        .header(header::ETAG, format!("\"{d}\""))
}

impl App {
    pub(super) async fn manifest_by_digest(
        &self,
        parts: &Parts,
        name: &str,
        d: Digest,
        head: bool,
    ) -> Answer {
        if let Some(hit) = self.cache.get(&d, true).await {
            let media_type = hit.media_type.unwrap_or_default();
            if accepts(&parts.headers, &media_type) {
                let serving = self.cache.serving(&d);
                let grant = self.authorize(parts, name, &d, true).await?;
                self.cache.seen(&d, name);
                self.vouch(parts, name, grant, &hit.data);
                let resp = manifest_response(&d, &media_type, hit.data.len());
                let body = serving.hold(self.cached_body(hit.data, head));
                return Ok((Outcome::Hit, resp.body(body).expect("valid response")));
            }
        }
        if head {
            return self
                .relay(parts, None)
                .await
                .map(|r| (Outcome::Passthrough, r));
        }
        if let Some((media_type, bytes)) = self.manifest_from_owner(parts, name, &d).await? {
            self.cache.seen(&d, name);
            let resp = manifest_response(&d, &media_type, bytes.len());
            let body = Body::full(bytes);
            return Ok((Outcome::Miss, resp.body(body).expect("valid response")));
        }
        match self
            .fetch_manifest(parts, name, &d.to_string(), Some(&d), false)
            .await?
        {
            Fetched::Relayed(r) => Ok((Outcome::Passthrough, r)),
            Fetched::Manifest {
                digest,
                media_type,
                bytes,
            } => {
                self.metrics
                    .served_upstream_bytes
                    .fetch_add(bytes.len() as u64, Relaxed);
                let resp = manifest_response(&digest, &media_type, bytes.len());
                Ok((
                    Outcome::Miss,
                    resp.body(Body::full(bytes)).expect("valid response"),
                ))
            }
        }
    }

    /// GETs a manifest from upstream with the client's credentials, checks
    /// it against `expect` and its `Docker-Content-Digest`, and caches it.
    /// `accept_all` asks for every manifest kind instead of the client's.
    pub(super) async fn fetch_manifest(
        &self,
        parts: &Parts,
        name: &str,
        reference: &str,
        expect: Option<&Digest>,
        accept_all: bool,
    ) -> Result<Fetched, Error> {
        let mut headers = parts.headers.clone();
        if accept_all {
            headers.insert(header::ACCEPT, HeaderValue::from_static(ALL_MANIFESTS));
        }
        let path = format!("/v2/{name}/manifests/{reference}");
        let resp = self
            .upstream
            .send(Method::GET, &path, &headers, &[])
            .await?;
        let cred = Credential::of(&parts.headers);
        if resp.status() != StatusCode::OK {
            if matches!(
                resp.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            ) {
                self.auth.deny(&cred, name, expect);
            }
            return Ok(Fetched::Relayed(self.relayed_upstream(parts, resp)));
        }
        let (p, body) = resp.into_parts();
        let media_type = p
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_owned();
        let limited = http_body_util::Limited::new(body, MAX_MANIFEST);
        let bytes = match tokio::time::timeout(self.upstream.timeout(), limited.collect()).await {
            Err(_) => {
                return Err(self.upstream.failed(UpstreamError::Timeout {
                    url: format!("manifest {name}:{reference}"),
                    wait: Wait::Body(self.upstream.timeout()),
                }))
            }
            Ok(Err(e)) => {
                return Err(self.upstream.failed(UpstreamError::Broken {
                    url: format!("manifest {name}:{reference}"),
                    cause: Cause::boxed(e),
                }))
            }
            Ok(Ok(c)) => c.to_bytes(),
        };
        self.metrics
            .upstream_bytes
            .fetch_add(bytes.len() as u64, Relaxed);
        self.upstream.budget().charge(bytes.len() as u64);
        let digest = Digest::of(&bytes);
        let announced = p
            .headers
            .get(CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        if let Some(expected) = [expect.cloned(), announced]
            .into_iter()
            .flatten()
            .find(|e| *e != digest)
        {
            self.metrics.digest_mismatches.fetch_add(1, Relaxed);
            return Err(self.upstream.failed(UpstreamError::DigestMismatch {
                expected,
                got: digest,
            }));
        }
        // The upstream served this manifest of this repository to this client.
        let grant = self.auth.allow(&cred, name, &digest);
        self.auth.allow_referenced(&cred, name, grant, &bytes);
        self.cache
            .put_manifest(digest.clone(), media_type.clone(), bytes.clone())
            .await;
        self.cache.seen(&digest, name);
        Ok(Fetched::Manifest {
            digest,
            media_type,
            bytes,
        })
    }

    pub(super) async fn tag(&self, parts: &Parts, name: &str, tag: &str, head: bool) -> Answer {
        if let Some((e, true)) = self.tags.get(name, tag) {
            return self.answer_tag(parts, name, &e, head, Outcome::Hit).await;
        }
        match self.revalidate(parts, name, tag).await? {
            Revalidated::Fresh(e, outcome) => self.answer_tag(parts, name, &e, head, outcome).await,
            Revalidated::Gone => Err(Error::ManifestUnknown(format!("{name}:{tag}"))),
            Revalidated::Unavailable { error, old: None } => Err(error),
            // The upstream is down or failing: the last digest it gave still stands.
            Revalidated::Unavailable {
                error,
                old: Some(old),
            } => {
                self.metrics.tags_stale_served.fetch_add(1, Relaxed);
                tracing::warn!(repo = name, tag, digest = %old.digest, %error, "upstream unavailable; serving the tag from the node");
                self.answer_tag(parts, name, &old, head, Outcome::Hit).await
            }
            Revalidated::Relayed(r) => Ok((Outcome::Passthrough, r)),
            Revalidated::Uninterpreted => self
                .relay(parts, None)
                .await
                .map(|r| (Outcome::Passthrough, r)),
        }
    }

    /// Asks the upstream what `name:tag` points at now, under the tag's
    /// single flight (held until this returns): one `HEAD`, and the manifest
    /// itself when the node does not hold it. Concurrent requests for the
    /// tag wait, and find it fresh.
    async fn revalidate(&self, parts: &Parts, name: &str, tag: &str) -> Result<Revalidated, Error> {
        let _flight = self.tags.flight(name, tag).await;
        // Another request may have revalidated it while this one waited.
        let old = match self.tags.get(name, tag) {
            Some((e, true)) => return Ok(Revalidated::Fresh(e, Outcome::Hit)),
            Some((e, false)) => {
                self.metrics.tag_revalidations.fetch_add(1, Relaxed);
                Some(e)
            }
            None => None,
        };
        self.upstream_contacted();
        let mut headers = parts.headers.clone();
        headers.insert(header::ACCEPT, HeaderValue::from_static(ALL_MANIFESTS));
        let path = format!("/v2/{name}/manifests/{tag}");
        let cred = Credential::of(&parts.headers);
        let r = match self.upstream.send(Method::HEAD, &path, &headers, &[]).await {
            Ok(r) => r,
            Err(e) if e.origin() == Origin::Upstream => {
                return Ok(Revalidated::Unavailable { error: e, old })
            }
            Err(e) => return Err(e),
        };
        match r.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let od = old.as_ref().and_then(|o| Digest::parse(&o.digest).ok());
                return Err(self.denied(parts, &cred, name, od.as_ref(), &r));
            }
            StatusCode::NOT_FOUND => {
                // Some registries answer 404 to a client that may not see a
                // repository: only a client the upstream lets read what the
                // tag pointed at may make the node forget it.
                let od = old.as_ref().and_then(|o| Digest::parse(&o.digest).ok());
                if od.is_none_or(|od| {
                    matches!(self.auth.check(&cred, name, &od), Verdict::Allowed(_))
                }) {
                    self.tags.remove(name, tag).await;
                }
                return Ok(Revalidated::Gone);
            }
            s if s.is_server_error() => {
                let error = Error::status(path, s);
                return Ok(Revalidated::Unavailable { error, old });
            }
            _ => return Ok(Revalidated::Uninterpreted),
        }
        let digest = r
            .headers()
            .get(CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        let media_type = r
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let (digest, media_type) = match (digest, media_type) {
            (Some(d), Some(t)) => {
                // The upstream resolved the tag to it for this client.
                self.auth.allow(&cred, name, &d);
                let known = old.as_ref().is_some_and(|o| o.digest == d.to_string())
                    || self.cache.get(&d, true).await.is_some();
                if !known {
                    if let Fetched::Relayed(r) = self
                        .fetch_manifest(parts, name, &d.to_string(), Some(&d), true)
                        .await?
                    {
                        return Ok(Revalidated::Relayed(r));
                    }
                }
                (d, t.to_owned())
            }
            // No digest in the answer: fetch by tag and hash it ourselves.
            _ => match self.fetch_manifest(parts, name, tag, None, true).await? {
                Fetched::Relayed(r) => return Ok(Revalidated::Relayed(r)),
                Fetched::Manifest {
                    digest, media_type, ..
                } => (digest, media_type),
            },
        };
        if old.as_ref().is_some_and(|o| o.digest != digest.to_string()) {
            tracing::info!(repo = name, tag, %digest, "tag moved upstream");
        }
        let e = self
            .tags
            .put(name, tag, digest.to_string(), media_type)
            .await;
        Ok(Revalidated::Fresh(e, Outcome::Miss))
    }

    /// Serves the manifest a tag points at, from the node when it is there.
    /// A client whose `Accept` does not allow the stored kind gets what the
    /// upstream would give it.
    async fn answer_tag(
        &self,
        parts: &Parts,
        name: &str,
        e: &TagEntry,
        head: bool,
        outcome: Outcome,
    ) -> Answer {
        if !accepts(&parts.headers, &e.media_type) {
            return self
                .relay(parts, None)
                .await
                .map(|r| (Outcome::Passthrough, r));
        }
        let d = Digest::parse(&e.digest)?;
        let serving = self.cache.serving(&d);
        let (data, media_type) = match self.cache.get(&d, true).await {
            Some(hit) => (
                hit.data,
                hit.media_type.unwrap_or_else(|| e.media_type.clone()),
            ),
            None => match self
                .fetch_manifest(parts, name, &e.digest, Some(&d), true)
                .await?
            {
                Fetched::Relayed(r) => return Ok((Outcome::Passthrough, r)),
                Fetched::Manifest {
                    bytes, media_type, ..
                } => (bytes, media_type),
            },
        };
        let grant = self.authorize(parts, name, &d, true).await?;
        self.cache.seen(&d, name);
        self.vouch(parts, name, grant, &data);
        let resp = manifest_response(&d, &media_type, data.len());
        let body = serving.hold(self.cached_body(data, head));
        Ok((outcome, resp.body(body).expect("valid response")))
    }
}

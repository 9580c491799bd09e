//! The peer listener (`--peer-listen`): other nodes' proxies ask this node
//! for content by digest. Only with the shared secret; only blobs and
//! manifests by digest; never a client's credential either way.
//!
//! A blob comes from the cache, or from this node's single-flight fill,
//! started anonymously if none runs: the asking node streams it as it
//! arrives, as this node's own clients do; a manifest from the cache or
//! fetched anonymously. A HEAD of something not cached, and content the
//! upstream will not give an anonymous request, is a 404: the asking node
//! then goes to the upstream with its own client's credential.
//!
//! The asking side of manifests is here too ([`App::manifest_from_owner`]);
//! blobs are asked for by their fill (`cache::fill::peer`).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::blob::{blob_response, ranged};
use super::manifest::{manifest_response, Fetched, ALL_MANIFESTS, MAX_MANIFEST};
use super::{accepts, route, App, Route};
use crate::body::Body;
use crate::cache::fill::FillRequest;
use crate::cache::{Failure, Join};
use crate::digest::{Digest, Reference};
use crate::error::Error;
use crate::headers::{API_VERSION, API_VERSION_VALUE};
use crate::metrics::{Fallback, PeerAnswer};

/// The answer, and how to count it (a probe is not counted).
type PeerResult = Result<(Option<PeerAnswer>, Response<Body>), Error>;

impl App {
    /// Answers one request on the peer listener. Never fails: errors become
    /// OCI error responses.
    pub async fn handle_peer(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let Some(peers) = &self.peers else {
            return Error::NotFound.into_response();
        };
        let (parts, _body) = req.into_parts();
        let m = &self.metrics.peers;
        if !peers.admits(&parts.headers) {
            m.answered(PeerAnswer::Unauthorized);
            return Error::Denied {
                status: StatusCode::UNAUTHORIZED,
                challenge: Some(HeaderValue::from_static("Bearer realm=\"regproxy-peers\"")),
            }
            .into_response();
        }
        let mut resp = match self.peer_dispatch(&parts).await {
            Ok((answer, r)) => {
                if let Some(a) = answer {
                    m.answered(a);
                }
                r
            }
            Err(e) => {
                if matches!(e, Error::BlobUnknown(_) | Error::ManifestUnknown(_)) {
                    m.answered(PeerAnswer::NotFound);
                }
                tracing::debug!(path = parts.uri.path(), error = %e, "peer request not served");
                e.into_response()
            }
        };
        resp.headers_mut()
            .entry(API_VERSION)
            .or_insert(HeaderValue::from_static(API_VERSION_VALUE));
        resp
    }

    async fn peer_dispatch(&self, parts: &Parts) -> PeerResult {
        let m = &parts.method;
        if *m != Method::GET && *m != Method::HEAD {
            return Err(Error::MethodNotAllowed(m.clone()));
        }
        let head = *m == Method::HEAD;
        match route(parts.uri.path())? {
            Route::Ping => {
                let mut r = Response::new(Body::full(&b"{}"[..]));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Ok((None, r))
            }
            Route::Blob(name, d) => self.peer_blob(&parts.headers, name, d, head).await,
            Route::Manifest(name, Reference::Digest(d)) => self.peer_manifest(name, d, head).await,
            Route::Manifest(_, Reference::Tag(t)) => Err(Error::ManifestUnknown(t)),
            _ => Err(Error::NotFound),
        }
    }

    async fn peer_blob(&self, h: &HeaderMap, name: &str, d: Digest, head: bool) -> PeerResult {
        let served = &self.metrics.peers.bytes_served;
        for _ in 0..3 {
            if let Some(hit) = self.cache.get(&d, false).await {
                let size = hit.data.len() as u64;
                let (status, start, end) = ranged(h, size)?;
                let body = match head {
                    true => Body::empty(),
                    false => Body::mapped(
                        hit.data.slice(start as usize..end as usize),
                        Arc::clone(served),
                    ),
                };
                let resp = blob_response(status, &d, start, end, size);
                return Ok((
                    Some(PeerAnswer::Hit),
                    resp.body(body).expect("valid response"),
                ));
            }
            if head {
                return Err(Error::BlobUnknown(d.to_string()));
            }
            let fill = match self.cache.join(&d) {
                Join::Committed => continue,
                Join::Follower(f) => f,
                Join::Leader(f) => {
                    self.upstream_contacted();
                    // Anonymous: a peer request carries no client's credential.
                    let fr = FillRequest {
                        name: name.to_owned(),
                        headers: HeaderMap::new(),
                        sibling: None,
                        peer: None,
                    };
                    self.cache
                        .spawn_fill(Arc::clone(&self.upstream), Arc::clone(&f), fr);
                    f
                }
            };
            return match fill.started().await {
                Ok(size) => {
                    let (status, start, end) = ranged(h, size)?;
                    let stream = fill.reader(start, end, Arc::clone(served));
                    let resp = blob_response(status, &d, start, end, size);
                    let body = Body::stream(stream, Some(end - start));
                    Ok((
                        Some(PeerAnswer::Miss),
                        resp.body(body).expect("valid response"),
                    ))
                }
                // Not for an anonymous request, or not kept: the asking node
                // fetches it with its client's credential.
                Err(Failure::Relay { .. } | Failure::Uncached) => {
                    Err(Error::BlobUnknown(d.to_string()))
                }
                Err(Failure::Error(e)) => Err(e),
            };
        }
        Err(Error::BlobUnknown(d.to_string()))
    }

    async fn peer_manifest(&self, name: &str, d: Digest, head: bool) -> PeerResult {
        let served = &self.metrics.peers.bytes_served;
        if let Some(hit) = self.cache.get(&d, true).await {
            let media_type = hit.media_type.unwrap_or_default();
            let resp = manifest_response(&d, &media_type, hit.data.len());
            let body = match head {
                true => Body::empty(),
                false => Body::mapped(hit.data, Arc::clone(served)),
            };
            return Ok((
                Some(PeerAnswer::Hit),
                resp.body(body).expect("valid response"),
            ));
        }
        if head {
            return Err(Error::ManifestUnknown(d.to_string()));
        }
        // Anonymous, and of any kind: the asking node checks its client's Accept.
        let (mut parts, ()) = Request::new(()).into_parts();
        let all = HeaderValue::from_static(ALL_MANIFESTS);
        parts.headers.insert(header::ACCEPT, all);
        self.upstream_contacted();
        match self
            .fetch_manifest(&parts, name, &d.to_string(), Some(&d), true)
            .await?
        {
            Fetched::Manifest {
                media_type, bytes, ..
            } => {
                let resp = manifest_response(&d, &media_type, bytes.len());
                let body = Body::mapped(bytes, Arc::clone(served));
                Ok((
                    Some(PeerAnswer::Miss),
                    resp.body(body).expect("valid response"),
                ))
            }
            Fetched::Relayed(_) => Err(Error::ManifestUnknown(d.to_string())),
        }
    }

    /// A manifest miss that a peer owns: this client is authorized first
    /// (the owner's answer speaks for no client), then the owner is asked;
    /// what it sends is checked against the digest, cached and vouched for
    /// as the upstream's answer would be. `None`: ask the upstream.
    pub(super) async fn manifest_from_owner(
        &self,
        parts: &Parts,
        name: &str,
        d: &Digest,
    ) -> Result<Option<(String, Bytes)>, Error> {
        let Some(peers) = &self.peers else {
            return Ok(None);
        };
        let Some(owner) = peers.owner(d) else {
            return Ok(None);
        };
        let grant = self.authorize(parts, name, d, true).await?;
        let got = match peers.get(owner, &format!("/v2/{name}/manifests/{d}")).await {
            Ok(r) if r.status() == StatusCode::OK => read_manifest(r, peers.timeout()).await,
            Ok(_) => Err(Fallback::Error),
            Err(why) => Err(why),
        };
        let (media_type, bytes) = match got {
            Ok((_, bytes)) if Digest::of(&bytes) != *d => {
                peers.fell_back(owner, Fallback::BadBytes);
                return Ok(None);
            }
            // Not of a kind this client takes: the upstream negotiates.
            Ok((media_type, _)) if !accepts(&parts.headers, &media_type) => return Ok(None),
            Ok(got) => got,
            Err(why) => {
                peers.fell_back(owner, why);
                return Ok(None);
            }
        };
        peers.received(bytes.len() as u64);
        self.vouch(parts, name, grant, &bytes);
        self.cache
            .put_manifest(d.clone(), media_type.clone(), bytes.clone())
            .await;
        Ok(Some((media_type, bytes)))
    }
}

/// A peer's manifest answer: its media type and bytes, at most
/// [`MAX_MANIFEST`], within `timeout`.
async fn read_manifest(
    r: Response<Incoming>,
    timeout: std::time::Duration,
) -> Result<(String, Bytes), Fallback> {
    let (p, body) = r.into_parts();
    let media_type = p
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_owned();
    let limited = http_body_util::Limited::new(body, MAX_MANIFEST);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(c)) => Ok((media_type, c.to_bytes())),
        Ok(Err(_)) => Err(Fallback::Broken),
        Err(_) => Err(Fallback::Timeout),
    }
}

//! The peer listener (`--peer-listen`): other nodes' proxies ask this node
//! for content by digest. Only with the shared secret; only blobs and
//! manifests by digest; never a client's credential either way.
//!
//! A blob comes from the cache, or from this node's single-flight fill,
//! started anonymously if none runs: the asking node streams it as it
//! arrives, as this node's own clients do. A manifest comes from the cache
//! only (a few KiB; the asking node fetches it itself otherwise). A HEAD
//! of something not cached, and a blob the upstream will not give an
//! anonymous request, is a 404: the asking node then goes to the upstream
//! with its own client's credential.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::blob::{blob_response, ranged};
use super::manifest::manifest_response;
use super::{route, App, Route};
use crate::body::Body;
use crate::cache::fill::FillRequest;
use crate::cache::{Failure, Join};
use crate::digest::{Digest, Reference};
use crate::error::Error;
use crate::headers::{API_VERSION, API_VERSION_VALUE};
use crate::metrics::PeerAnswer;

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
            Route::Manifest(_, Reference::Digest(d)) => self.peer_manifest(d, head).await,
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

    async fn peer_manifest(&self, d: Digest, head: bool) -> PeerResult {
        let Some(hit) = self.cache.get(&d, true).await else {
            return Err(Error::ManifestUnknown(d.to_string()));
        };
        let media_type = hit.media_type.unwrap_or_default();
        let resp = manifest_response(&d, &media_type, hit.data.len());
        let body = match head {
            true => Body::empty(),
            false => Body::mapped(hit.data, Arc::clone(&self.metrics.peers.bytes_served)),
        };
        Ok((
            Some(PeerAnswer::Hit),
            resp.body(body).expect("valid response"),
        ))
    }
}

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
use crate::peers::Peers;
use std::net::SocketAddr;

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
            return unauthorized();
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
        let mut looked_again = false;
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
            // A HEAD starts nothing, nor does a range: peers ask for one
            // only to resume, and only from a node that has the blob or is
            // filling it (a fill from byte 0 for it would cross the uplink
            // again while the asker waits).
            if head {
                return Err(Error::BlobUnknown(d.to_string()));
            }
            if h.contains_key(header::RANGE) && !self.cache.filling(&d) {
                // The fill may have committed between the look above and
                // this one: look in the cache once more before saying no.
                if std::mem::replace(&mut looked_again, true) {
                    return Err(Error::BlobUnknown(d.to_string()));
                }
                continue;
            }
            let sibling = match self.cache.filling(&d) {
                true => None,
                false => self.cache.sibling_fill(&d).await,
            };
            let fill = match self.cache.join(&d) {
                Join::Committed => continue,
                Join::Follower(f) => f,
                Join::Leader(f) => {
                    self.upstream_contacted();
                    // Anonymous: a peer request carries no client's
                    // credential; in a handover it follows the other
                    // process's fill of the blob, if there is one.
                    let fr = FillRequest {
                        name: name.to_owned(),
                        headers: HeaderMap::new(),
                        sibling,
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
        let got = match peers
            .get(owner, &format!("/v2/{name}/manifests/{d}"), None)
            .await
        {
            Ok(r) if r.status() == StatusCode::OK => read_manifest(r, peers, owner).await,
            Ok(_) => Err(Fallback::Error),
            Err(why) => Err(why),
        };
        let (media_type, bytes) = match got {
            Ok((_, bytes)) if Digest::of(&bytes) != *d => {
                peers.fell_back(owner, Fallback::BadBytes);
                return Ok(None);
            }
            // The right bytes under a label this node cannot check (an
            // older or newer manifest kind, or a lie): not cached from the
            // peer, and no ban, since the digest matched.
            Ok((media_type, bytes)) if !is_manifest(&media_type, &bytes) => {
                peers.fell_back(owner, Fallback::Error);
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

/// The answer to a request without the peer secret. The connection is
/// closed: whoever does not know the secret gets no connection to hold.
fn unauthorized() -> Response<Body> {
    const BODY: &str = r#"{"errors":[{"code":"UNAUTHORIZED","message":"the peer secret is missing or wrong: this port serves other nodes' regproxy only","detail":null}]}"#;
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::WWW_AUTHENTICATE, "Bearer realm=\"regproxy-peers\"")
        .header(header::CONNECTION, "close")
        .header(API_VERSION, API_VERSION_VALUE)
        .body(Body::full(BODY.as_bytes()))
        .expect("valid response")
}

/// A peer's manifest answer: its media type and bytes, at most
/// [`MAX_MANIFEST`], read while the peer stays live.
async fn read_manifest(
    r: Response<Incoming>,
    peers: &Peers,
    owner: SocketAddr,
) -> Result<(String, Bytes), Fallback> {
    let (p, body) = r.into_parts();
    let media_type = p
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let limited = http_body_util::Limited::new(body, MAX_MANIFEST);
    match peers.patiently(owner, limited.collect()).await? {
        Ok(c) => Ok((media_type, c.to_bytes())),
        Err(_) => Err(Fallback::Broken),
    }
}

/// The manifest kinds a peer may hand over.
const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Whether a peer's manifest says what it is: a known manifest kind, the
/// same as its own `mediaType` where it names one. The digest does not
/// cover the header, so a peer could otherwise cache a manifest on this
/// node under a type no client can use.
fn is_manifest(media_type: &str, bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Kind {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    if !MANIFEST_TYPES.contains(&media_type) {
        return false;
    }
    match serde_json::from_slice::<Kind>(bytes) {
        Ok(k) => k.media_type.is_none_or(|t| t == media_type),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_manifest_must_say_what_it_is() {
        let oci = "application/vnd.oci.image.manifest.v1+json";
        let typed =
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
        let untyped = br#"{"schemaVersion":2,"layers":[]}"#;
        assert!(is_manifest(oci, typed));
        assert!(
            is_manifest(oci, untyped),
            "OCI manifests may omit mediaType"
        );
        assert!(!is_manifest("text/html", typed));
        assert!(!is_manifest(
            "application/vnd.oci.image.index.v1+json",
            typed
        ));
        assert!(!is_manifest(oci, b"<html>"));
    }
}

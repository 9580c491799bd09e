//! Requests relayed to the upstream as they are, bodies streamed both ways:
//! listings, and the whole push protocol. URLs the upstream hands out
//! (`Location`, `Link`, an auth realm) are rewritten to the proxy's address,
//! so clients come back through it.

use std::sync::Arc;

use http::header;
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::manifest::MAX_MANIFEST;
use super::App;
use crate::body::Body;
use crate::digest::{Digest, Reference};
use crate::error::Error;
use crate::headers::CONTENT_DIGEST;

impl App {
    /// Relays the request; `body` is the client's, for the methods that carry one.
    pub(super) async fn relay(
        &self,
        parts: &Parts,
        body: Option<Incoming>,
    ) -> Result<Response<Body>, Error> {
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let m = parts.method.clone();
        let resp = match body {
            Some(b) if m != Method::GET && m != Method::HEAD => {
                self.upstream
                    .send_body(
                        m,
                        pq,
                        &parts.headers,
                        Body::incoming(b, self.upstream.timeout()),
                    )
                    .await?
            }
            _ => self.upstream.send(m, pq, &parts.headers, &[]).await?,
        };
        let (p, body) = resp.into_parts();
        let body = Body::upstream(body, Arc::clone(&self.metrics), self.upstream.timeout());
        Ok(self.relayed(parts, p.status, &p.headers, body))
    }

    /// A manifest push: relayed, and once the upstream accepted it, put into
    /// the node cache (and the tag recorded), so that a pull that follows on
    /// this node is served from it.
    pub(super) async fn push_manifest(
        &self,
        parts: &Parts,
        body: Incoming,
        name: &str,
        reference: Reference,
    ) -> Result<Response<Body>, Error> {
        let bytes = http_body_util::Limited::new(body, MAX_MANIFEST)
            .collect()
            .await
            .map_err(|e| Error::ManifestInvalid(format!("manifest body: {e}")))?
            .to_bytes();
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let resp = self
            .upstream
            .send_body(Method::PUT, pq, &parts.headers, Body::full(bytes.clone()))
            .await?;
        if resp.status() == StatusCode::CREATED {
            let digest = Digest::of(&bytes);
            let accepted = resp
                .headers()
                .get(CONTENT_DIGEST)
                .and_then(|v| v.to_str().ok())
                .is_none_or(|v| v == digest.to_string());
            // The manifest's own `mediaType` decides, when it has one: a
            // pusher's `Content-Type` is not what every other client gets.
            let declared = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["mediaType"].as_str().map(str::to_owned));
            let sent = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            let media_type = match (declared.as_deref(), sent) {
                (Some(d), Some(s)) if d != s => None,
                (Some(d), _) => Some(d),
                (None, s) => s,
            };
            // What the node holds already is never replaced by a push.
            let held = self
                .cache
                .get(&digest, true)
                .await
                .and_then(|h| h.media_type);
            let stored = match (accepted, held, media_type) {
                (false, ..) => None,
                (true, Some(h), _) => Some(h),
                (true, None, Some(t)) => {
                    self.cache
                        .put_manifest(digest.clone(), t.to_owned(), bytes)
                        .await;
                    Some(t.to_owned())
                }
                (true, None, None) => None,
            };
            if let (Some(t), Reference::Tag(tag)) = (stored, reference) {
                self.tags.put(name, &tag, digest.to_string(), t).await;
            }
        }
        let (p, body) = resp.into_parts();
        let body = Body::upstream(body, Arc::clone(&self.metrics), self.upstream.timeout());
        Ok(self.relayed(parts, p.status, &p.headers, body))
    }

    /// A manifest delete: relayed, and once the upstream accepted it, the
    /// node forgets the tags of this repository that pointed at it, so that
    /// they are not served stale while the upstream is down.
    pub(super) async fn delete_manifest(
        &self,
        parts: &Parts,
        body: Incoming,
        name: &str,
        reference: Reference,
    ) -> Result<Response<Body>, Error> {
        let resp = self.relay(parts, Some(body)).await?;
        if resp.status().is_success() {
            match reference {
                Reference::Digest(d) => self.tags.remove_digest(name, &d.to_string()).await,
                Reference::Tag(t) => self.tags.remove(name, &t).await,
            }
        }
        Ok(resp)
    }
}

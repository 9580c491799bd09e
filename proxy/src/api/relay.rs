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
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .is_none_or(|v| v == digest.to_string());
            let media_type = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            if let (true, Some(t)) = (accepted, media_type) {
                self.cache
                    .put_manifest(digest.clone(), t.to_owned(), bytes)
                    .await;
                if let Reference::Tag(tag) = reference {
                    self.tags
                        .put(name, &tag, digest.to_string(), t.to_owned())
                        .await;
                }
            }
        }
        let (p, body) = resp.into_parts();
        let body = Body::upstream(body, Arc::clone(&self.metrics), self.upstream.timeout());
        Ok(self.relayed(parts, p.status, &p.headers, body))
    }
}

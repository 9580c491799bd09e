//! Requests relayed to the upstream as they are, bodies streamed both ways:
//! listings, and the whole push protocol. URLs the upstream hands out
//! (`Location`, `Link`, an auth realm) are rewritten to the proxy's address,
//! so clients come back through it; a realm there is relayed too.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use tokio::sync::Semaphore;

use super::manifest::MAX_MANIFEST;
use super::App;
use crate::body::Body;
use crate::digest::{Digest, Reference};
use crate::error::Error;
use crate::headers::CONTENT_DIGEST;
use crate::upstream::is_hop_by_hop;

/// KiB of manifest pushes held in memory at once, all clients together. A
/// push is read whole before it is relayed (the node caches what the
/// upstream accepts); past this, pushes wait for room instead of growing
/// memory. Each holds its room for at most the upstream timeout of reading
/// plus the upstream's answer. A push without `Content-Length` takes room
/// for the largest manifest.
const PUSH_BUDGET_KIB: usize = 8 << 10;
static PUSH_BUDGET: Semaphore = Semaphore::const_new(PUSH_BUDGET_KIB);

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
        Ok(self.relayed_upstream(parts, resp))
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
        let len = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if len.is_some_and(|l| l > MAX_MANIFEST) {
            return Err(Error::ManifestInvalid(format!(
                "a manifest may have {MAX_MANIFEST} bytes at most"
            )));
        }
        // Held until the bytes are dropped, after the upstream's answer.
        let kib = len.unwrap_or(MAX_MANIFEST).div_ceil(1 << 10).max(1);
        let _room = PUSH_BUDGET
            .acquire_many(kib as u32)
            .await
            .expect("the semaphore is never closed");
        // The whole body within the upstream timeout: a client that trickles
        // it holds its room no longer than that.
        let within = self.upstream.timeout();
        let read = http_body_util::Limited::new(body, MAX_MANIFEST).collect();
        let bytes = tokio::time::timeout(within, read)
            .await
            .map_err(|_| Error::ClientStalled(within))?
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
                .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
                .filter(|t| HeaderValue::from_str(t).is_ok());
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
        Ok(self.relayed_upstream(parts, resp))
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

    /// The proxy's own origin as this client addressed it.
    fn origin(parts: &Parts) -> String {
        match parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
        {
            Some(host) => format!("http://{host}"),
            None => String::new(),
        }
    }

    /// A header value with the upstream's origin replaced by the proxy's.
    pub(super) fn rewrite(&self, parts: &Parts, v: &HeaderValue) -> HeaderValue {
        let Ok(s) = v.to_str() else { return v.clone() };
        let from = self.upstream.origin();
        let out = replace_origin(s, from, &Self::origin(parts));
        HeaderValue::from_str(&out).unwrap_or_else(|_| v.clone())
    }

    /// An auth challenge with a realm on the upstream's own address, pointed
    /// at the proxy; the realm's path is then relayed to the upstream (a
    /// token service beside the registry keeps working through the proxy).
    pub(super) fn rewrite_challenge(&self, parts: &Parts, v: &HeaderValue) -> HeaderValue {
        if let Ok(s) = v.to_str() {
            let origin = self.upstream.origin();
            if let Some(path) = realm_path(s, origin) {
                self.realms.learn(path);
            }
        }
        self.rewrite(parts, v)
    }

    /// The upstream's answer, relayed to this client as it streams.
    pub(super) fn relayed_upstream(
        &self,
        parts: &Parts,
        resp: Response<Incoming>,
    ) -> Response<Body> {
        let (p, body) = resp.into_parts();
        if p.status.is_server_error() {
            // The upstream's own failure is a 502 like every other upstream
            // failure (counted as one in `Upstream::send`): its `500` passed
            // on as is would read as this node's bug.
            return Error::status(parts.uri.path(), p.status).into_response();
        }
        let body = Body::upstream(
            body,
            Arc::clone(&self.metrics),
            Arc::clone(self.upstream.budget()),
            self.upstream.timeout(),
        );
        self.relayed(parts, p.status, &p.headers, body)
    }

    /// Copies an upstream response head, pointing its URLs at the proxy.
    pub(super) fn relayed(
        &self,
        parts: &Parts,
        status: StatusCode,
        headers: &HeaderMap,
        body: Body,
    ) -> Response<Body> {
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        for (k, v) in headers {
            if is_hop_by_hop(k) {
                continue;
            }
            let v = if k == header::WWW_AUTHENTICATE {
                self.rewrite_challenge(parts, v)
            } else if k == header::LOCATION || k == header::LINK {
                self.rewrite(parts, v)
            } else {
                v.clone()
            };
            resp.headers_mut().append(k.clone(), v);
        }
        resp
    }
}

/// Replaces `from` (an origin, `scheme://host:port`) by `to` wherever it
/// stands as a whole origin: followed by a path, a quote, `>` or the end.
pub(crate) fn replace_origin(s: &str, from: &str, to: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(from) {
        let after = &rest[i + from.len()..];
        let whole = after.is_empty() || after.starts_with(['/', '"', '>', '?', ',', ' ', ';']);
        out.push_str(&rest[..i]);
        out.push_str(if whole { to } else { from });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The path of a `realm="..."` in a challenge when it is on `origin`.
pub(crate) fn realm_path(challenge: &str, origin: &str) -> Option<String> {
    let i = challenge.find("realm=\"")? + "realm=\"".len();
    let url = &challenge[i..challenge[i..].find('"')? + i];
    let rest = url.strip_prefix(origin)?;
    let path = rest.split('?').next().unwrap_or("");
    (path.starts_with('/') && !path.starts_with("/v2")).then(|| path.to_owned())
}

/// Most realm paths relayed. An upstream names one token service, a few at
/// most; the bound keeps an upstream that names a new one in every challenge
/// from growing the set without end.
pub const MAX_REALMS: usize = 16;

/// Paths of auth realms on the upstream's own address (token services),
/// learned from its challenges and relayed like the registry API. At most
/// [`MAX_REALMS`]: past it a new realm is not relayed (its requests get the
/// proxy's 404), and a warning says so, once.
#[derive(Default)]
pub(super) struct Realms {
    paths: Mutex<HashSet<String>>,
    warned_full: AtomicBool,
}

impl Realms {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.paths.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A challenge of the upstream named the realm at `path`.
    fn learn(&self, path: String) {
        let mut paths = self.lock();
        if paths.len() < MAX_REALMS {
            paths.insert(path);
        } else if !paths.contains(&path) && !self.warned_full.swap(true, Relaxed) {
            tracing::warn!(realm = path, max = MAX_REALMS, "the upstream named more auth realms than are relayed; this one and any further are not");
        }
    }

    /// Whether `path` is the realm of a challenge the upstream gave.
    pub(super) fn contains(&self, path: &str) -> bool {
        self.lock().contains(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realms_on_the_upstream_are_found() {
        let up = "https://reg.example";
        assert_eq!(
            realm_path(
                "Bearer realm=\"https://reg.example/service/token\",service=\"r\"",
                up
            )
            .as_deref(),
            Some("/service/token")
        );
        assert_eq!(
            realm_path("Bearer realm=\"https://auth.example/token\"", up),
            None,
            "another host's realm stays theirs"
        );
        assert_eq!(
            realm_path("Basic realm=\"test-realm\"", up),
            None,
            "a plain realm is no URL"
        );
    }

    #[test]
    fn origins_are_rewritten_only_whole() {
        let up = "http://10.0.0.5:5000";
        assert_eq!(
            replace_origin(
                "http://10.0.0.5:5000/v2/a/blobs/uploads/x?_state=1",
                up,
                "http://node:80"
            ),
            "http://node:80/v2/a/blobs/uploads/x?_state=1"
        );
        assert_eq!(
            replace_origin(
                "Bearer realm=\"http://10.0.0.5:5000/token\",service=\"r\"",
                up,
                "http://p"
            ),
            "Bearer realm=\"http://p/token\",service=\"r\""
        );
        assert_eq!(
            replace_origin("http://10.0.0.5:50001/x", up, "http://p"),
            "http://10.0.0.5:50001/x",
            "another port is another origin"
        );
        assert_eq!(
            replace_origin("</v2/_catalog?n=1>; rel=\"next\"", up, "http://p"),
            "</v2/_catalog?n=1>; rel=\"next\""
        );
    }

    #[test]
    fn realms_are_bounded() {
        let r = Realms::default();
        for i in 0..MAX_REALMS + 4 {
            r.learn(format!("/token/{i}"));
        }
        assert!(r.contains("/token/0"));
        assert!(
            !r.contains(&format!("/token/{MAX_REALMS}")),
            "past MAX_REALMS a new realm is not relayed"
        );
        r.learn("/token/0".into());
        assert!(r.contains("/token/0"), "a known realm stays");
    }
}

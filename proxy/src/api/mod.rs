//! The OCI distribution API: routes, and what every handler shares.
//!
//! - [`blob`]: blobs from the node cache or a single-flight fill.
//! - [`manifest`]: manifests by digest (cached) and by tag (remembered for
//!   `--tag-ttl`, served stale while the upstream is down).
//! - [`relay`]: everything relayed as it is, pushes included, with the
//!   upstream's URLs rewritten to the proxy's.
//!
//! Before cached content goes out, [`App::authorize`] makes sure the upstream
//! would serve it to this client (see [`crate::auth`]).

mod blob;
mod manifest;
mod relay;

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use std::sync::atomic::Ordering::Relaxed;

use crate::auth::{Auth, Credential, Grant, Verdict};
use crate::body::Body;
use crate::cache::Cache;
use crate::digest::{validate_name, Digest, Reference};
use crate::error::{Error, Origin};
use crate::headers::{API_VERSION, API_VERSION_VALUE};
use crate::metrics::{Kind, Metrics, Outcome};
use crate::tags::Tags;
use crate::upstream::{is_hop_by_hop, Upstream};

/// Everything a request handler needs.
pub struct App {
    pub cache: Arc<Cache>,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    pub tags: Arc<Tags>,
    pub auth: Auth,
    /// This instance's `Via` token: a request that carries it has looped.
    pub via: String,
    pub retries: u32,
    /// Wakes [`App::watch_openness`] when what is known of the upstream's
    /// auth has gone stale.
    pub open_due: tokio::sync::Notify,
    /// Paths of auth realms on the upstream's own address (token services),
    /// relayed like the registry API.
    pub realms: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// What a path asks for.
#[derive(Debug, PartialEq)]
enum Route<'a> {
    Ping,
    Blob(&'a str, Digest),
    Manifest(&'a str, Reference),
    /// `tags/list`, `_catalog`, referrers: relayed.
    Listing,
    Upload,
}

fn route(path: &str) -> Result<Route<'_>, Error> {
    if path == "/v2" || path == "/v2/" {
        return Ok(Route::Ping);
    }
    let rest = path.strip_prefix("/v2/").ok_or(Error::NotFound)?;
    if rest.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(Error::NameInvalid(
            "dot segments are not allowed in a path".into(),
        ));
    }
    if rest == "_catalog" {
        return Ok(Route::Listing);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        validate_name(name)?;
        return Ok(Route::Listing);
    }
    if let Some(i) = rest.find("/blobs/uploads") {
        validate_name(&rest[..i])?;
        return Ok(Route::Upload);
    }
    let (head, reference) = rest.rsplit_once('/').ok_or(Error::NotFound)?;
    let (name, kind) = head.rsplit_once('/').ok_or(Error::NotFound)?;
    match kind {
        "blobs" => {
            validate_name(name)?;
            Ok(Route::Blob(name, Digest::parse(reference)?))
        }
        "manifests" => {
            validate_name(name)?;
            Ok(Route::Manifest(name, Reference::parse(reference)?))
        }
        "referrers" => {
            validate_name(name)?;
            Digest::parse(reference)?;
            Ok(Route::Listing)
        }
        _ => Err(Error::NotFound),
    }
}

type Answer = Result<(Outcome, Response<Body>), Error>;

impl App {
    /// Answers one request. Never fails: errors become OCI error responses.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let (kind, result) = self.dispatch(&parts, body).await;
        let mut resp = match result {
            Ok((outcome, resp)) => {
                self.metrics.request(kind, outcome);
                resp
            }
            Err(e) => {
                self.metrics.request(kind, Outcome::Error);
                let (method, path) = (&parts.method, parts.uri.path());
                match e.origin() {
                    Origin::Upstream => {
                        tracing::warn!(%method, path, error = %e, "upstream failure")
                    }
                    Origin::Node => tracing::warn!(%method, path, error = %e, "node failure"),
                    Origin::Client => {
                        tracing::debug!(%method, path, error = %e, "request refused")
                    }
                }
                e.into_response()
            }
        };
        resp.headers_mut()
            .entry(API_VERSION)
            .or_insert(HeaderValue::from_static(API_VERSION_VALUE));
        crate::error::ensure_challenge(resp.status(), resp.headers_mut());
        resp
    }

    async fn dispatch(&self, parts: &Parts, body: Incoming) -> (Kind, Answer) {
        if self.looped(&parts.headers) {
            return (Kind::Other, Err(Error::LoopDetected));
        }
        if !parts.uri.path().starts_with("/v2") && self.is_realm(parts.uri.path()) {
            let r = self.relay(parts, Some(body)).await;
            return (Kind::Other, r.map(|r| (Outcome::Passthrough, r)));
        }
        let r = match route(parts.uri.path()) {
            Ok(r) => r,
            Err(e) => return (Kind::Other, Err(e)),
        };
        let m = &parts.method;
        let read = *m == Method::GET || *m == Method::HEAD;
        let head = *m == Method::HEAD;
        let passthrough = |a: Result<Response<Body>, Error>| a.map(|r| (Outcome::Passthrough, r));
        match r {
            Route::Ping if read => (Kind::Other, self.ping(parts).await),
            Route::Listing if read => (Kind::Other, passthrough(self.relay(parts, None).await)),
            Route::Upload
                if read
                    || *m == Method::POST
                    || *m == Method::PATCH
                    || *m == Method::PUT
                    || *m == Method::DELETE =>
            {
                (Kind::Push, passthrough(self.relay(parts, Some(body)).await))
            }
            Route::Blob(name, d) if read => (Kind::Blob, self.blob(parts, name, d, head).await),
            Route::Blob(..) if *m == Method::DELETE => {
                (Kind::Push, passthrough(self.relay(parts, Some(body)).await))
            }
            Route::Manifest(name, Reference::Digest(d)) if read => (
                Kind::Manifest,
                self.manifest_by_digest(parts, name, d, head).await,
            ),
            Route::Manifest(name, Reference::Tag(t)) if read => {
                (Kind::Tag, self.tag(parts, name, &t, head).await)
            }
            Route::Manifest(name, reference) if *m == Method::PUT => (
                Kind::Push,
                passthrough(self.push_manifest(parts, body, name, reference).await),
            ),
            Route::Manifest(name, reference) if *m == Method::DELETE => (
                Kind::Push,
                passthrough(self.delete_manifest(parts, body, name, reference).await),
            ),
            _ => (Kind::Other, Err(Error::MethodNotAllowed(m.clone()))),
        }
    }

    fn looped(&self, h: &HeaderMap) -> bool {
        h.get_all(header::VIA).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|hop| hop.trim().ends_with(&self.via)))
        })
    }

    /// `/v2/`: the upstream's answer, so that its auth challenge reaches the
    /// client; an anonymous 200 also tells us the upstream has no auth. When
    /// the upstream is unreachable, a local 200, so that what the node holds
    /// can still be pulled.
    async fn ping(&self, parts: &Parts) -> Answer {
        match self.relay(parts, None).await {
            Ok(r) => {
                let cred = Credential::of(&parts.headers);
                if !cred.is_anonymous() && r.status().is_success() {
                    self.auth.allow_credential(&cred);
                }
                Ok((Outcome::Passthrough, r))
            }
            Err(e) if e.origin() == Origin::Upstream => {
                tracing::warn!(error = %e, "upstream down; answering /v2/ from the node");
                let mut r = Response::new(Body::full(&b"{}"[..]));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Ok((Outcome::Hit, r))
            }
            Err(e) => Err(e),
        }
    }

    /// Makes sure the upstream would let this client read `d` in repository
    /// `name` before cached content goes out, and says under which grant.
    /// A recent yes for this (credential, repository, digest), or an upstream
    /// that lets anyone in, costs nothing; otherwise one `HEAD` of `d` in
    /// `name` with the client's credentials (never its `Range`). While the
    /// upstream is unreachable, what it said yes to before is served; a
    /// credential it never accepted gets 401, as the upstream would give.
    async fn authorize(
        &self,
        parts: &Parts,
        name: &str,
        d: &Digest,
        manifest: bool,
    ) -> Result<Grant, Error> {
        let cred = Credential::of(&parts.headers);
        let (seen, known) = match self.auth.check(&cred, name, d) {
            // A manifest vouches for what it references until its own yes
            // ends: asked again when half spent, so its layers stay allowed
            // for the rest of a pull.
            Verdict::Allowed(Grant::Fresh(t)) if manifest && self.auth.half_spent(t) => {
                (true, true)
            }
            Verdict::Allowed(g) => return Ok(g),
            Verdict::Ask { seen, known } => (seen, known),
        };
        self.upstream_contacted();
        self.metrics.auth_checks.fetch_add(1, Relaxed);
        let kind = if manifest { "manifests" } else { "blobs" };
        let probe = format!("/v2/{name}/{kind}/{d}");
        let mut headers = parts.headers.clone();
        headers.remove(header::RANGE);
        let unavailable = match self
            .upstream
            .send(Method::HEAD, &probe, &headers, &[])
            .await
        {
            Ok(r) if r.status().is_success() => return Ok(self.auth.allow(&cred, name, d)),
            // The cache is keyed by digest alone: content cached from one
            // repository is not served through another that does not hold it.
            Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                self.auth.deny(&cred, name, Some(d));
                return Err(unknown(manifest, d));
            }
            Ok(r) if matches!(r.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                return Err(self.denied(parts, &cred, name, Some(d), &r));
            }
            // A client can shape its own request into an error; the upstream
            // counts as down only if it fails the proxy's own request too.
            Ok(r)
                if (r.status().is_server_error()
                    || r.status() == StatusCode::TOO_MANY_REQUESTS)
                    && self.upstream_down().await =>
            {
                Error::status("authorization check", r.status())
            }
            Ok(r) => return Err(Error::status("authorization check", r.status())),
            Err(e) if e.origin() == Origin::Upstream => e,
            Err(e) => return Err(e),
        };
        if seen {
            tracing::info!(repo = name, digest = %d, error = %unavailable, "upstream unavailable; serving what it allowed before");
            return Ok(Grant::Offline);
        }
        if known {
            // A credential the upstream accepted, but never for this digest
            // in this repository: the node has nothing it may give.
            tracing::info!(repo = name, digest = %d, error = %unavailable, "upstream unavailable; not seen allowed before");
            return Err(unknown(manifest, d));
        }
        // Never accepted by the upstream: refused as the upstream would.
        self.metrics.auth_denied.fetch_add(1, Relaxed);
        Err(Error::Denied {
            status: StatusCode::UNAUTHORIZED,
            challenge: self
                .auth
                .challenge()
                .map(|c| self.rewrite_challenge(parts, &c)),
        })
    }

    /// The upstream refused `d` in `name` to this client: forget its yes
    /// and relay the refusal with the upstream's challenge.
    fn denied<B>(
        &self,
        parts: &Parts,
        cred: &Credential,
        name: &str,
        d: Option<&Digest>,
        r: &Response<B>,
    ) -> Error {
        self.auth.deny(cred, name, d);
        self.metrics.auth_denied.fetch_add(1, Relaxed);
        Error::Denied {
            status: r.status(),
            challenge: r
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .map(|v| self.rewrite_challenge(parts, v)),
        }
    }

    /// Asks the upstream, anonymously, whether it lets anyone in: a 200 from
    /// a registry (it says `Docker-Distribution-API-Version`) is open, any
    /// other answer is not; no answer, or a 5xx, changes nothing. Kept in
    /// `state.json`, so that a restart while the upstream is down still
    /// knows. Only the proxy's own request counts: a client shapes its own.
    pub async fn learn_open(&self) {
        self.auth.asking_open();
        let r = match self.own_ping().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "upstream unreachable; keeping what is known of its auth");
                return;
            }
        };
        let status = r.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return;
        }
        let open = status == StatusCode::OK && r.headers().contains_key(API_VERSION);
        let challenge = r.headers().get(header::WWW_AUTHENTICATE).cloned();
        if self.auth.learned_open(open, challenge) {
            tracing::info!(
                open,
                "learned whether the upstream lets anonymous clients in"
            );
        }
        // Saved only when it differs from the file.
        self.tags.set_upstream_open(open).await;
    }

    /// The proxy's own anonymous `GET /v2/`: no header of any client's.
    async fn own_ping(&self) -> Result<Response<Incoming>, Error> {
        self.upstream
            .send(Method::GET, "/v2/", &HeaderMap::new(), &[])
            .await
    }

    /// Whether the upstream fails the proxy's own anonymous `/v2/` (no
    /// answer, or a 5xx or 429): it is down, not just refusing a client.
    async fn upstream_down(&self) -> bool {
        match self.own_ping().await {
            Ok(r) => r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS,
            Err(e) => e.origin() == Origin::Upstream,
        }
    }

    /// The proxy is about to talk to the upstream: if what it knows of the
    /// upstream's auth is older than `--auth-ttl`, ask again (in the
    /// background, one request at a time: see [`App::watch_openness`]).
    fn upstream_contacted(&self) {
        if self.auth.open_due() {
            self.open_due.notify_one();
        }
    }

    /// Learns whether the upstream is open at start, and again whenever the
    /// answer is stale and the proxy talks to the upstream. Runs until the
    /// process ends.
    pub async fn watch_openness(self: Arc<Self>) {
        loop {
            if self.auth.open_due() {
                self.learn_open().await;
            }
            self.open_due.notified().await;
        }
    }

    /// Serves a manifest to a client under `grant`: what it references is
    /// in the same repository, so the client may read it under that grant.
    fn vouch(&self, parts: &Parts, name: &str, grant: Grant, manifest: &[u8]) {
        let cred = Credential::of(&parts.headers);
        self.auth.allow_referenced(&cred, name, grant, manifest);
    }

    /// The body of an answer from the node cache (none for a HEAD), counted
    /// as served from the cache.
    fn cached_body(&self, data: bytes::Bytes, head: bool) -> Body {
        if head {
            Body::empty()
        } else {
            Body::mapped(data, Some(Arc::clone(&self.metrics.served_cache_bytes)))
        }
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
    fn rewrite(&self, parts: &Parts, v: &HeaderValue) -> HeaderValue {
        let Ok(s) = v.to_str() else { return v.clone() };
        let from = self.upstream.origin();
        let out = replace_origin(s, from, &Self::origin(parts));
        HeaderValue::from_str(&out).unwrap_or_else(|_| v.clone())
    }

    /// An auth challenge with a realm on the upstream's own address, pointed
    /// at the proxy; the realm's path is then relayed to the upstream (a
    /// token service beside the registry keeps working through the proxy).
    fn rewrite_challenge(&self, parts: &Parts, v: &HeaderValue) -> HeaderValue {
        if let Ok(s) = v.to_str() {
            let origin = self.upstream.origin();
            if let Some(path) = realm_path(s, origin) {
                let mut realms = self.realms.lock().unwrap_or_else(|e| e.into_inner());
                if realms.len() < 16 {
                    realms.insert(path);
                }
            }
        }
        self.rewrite(parts, v)
    }

    /// Whether `path` is the realm of a challenge the upstream gave.
    fn is_realm(&self, path: &str) -> bool {
        self.realms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(path)
    }

    /// Copies an upstream response head, pointing its URLs at the proxy.
    fn relayed(
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

/// The 404 for cached content the node may not give this client.
fn unknown(manifest: bool, d: &Digest) -> Error {
    if manifest {
        Error::ManifestUnknown(d.to_string())
    } else {
        Error::BlobUnknown(d.to_string())
    }
}

/// Replaces `from` (an origin, `scheme://host:port`) by `to` wherever it
/// stands as a whole origin: followed by a path, a quote, `>` or the end.
fn replace_origin(s: &str, from: &str, to: &str) -> String {
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
fn realm_path(challenge: &str, origin: &str) -> Option<String> {
    let i = challenge.find("realm=\"")? + "realm=\"".len();
    let url = &challenge[i..challenge[i..].find('"')? + i];
    let rest = url.strip_prefix(origin)?;
    let path = rest.split('?').next().unwrap_or("");
    (path.starts_with('/') && !path.starts_with("/v2")).then(|| path.to_owned())
}

/// Whether a client's `Accept` allows `media_type`. No `Accept` accepts anything.
fn accepts(h: &HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for v in h.get_all(header::ACCEPT) {
        any = true;
        let Ok(v) = v.to_str() else { continue };
        for t in v.split(',') {
            let t = t.split(';').next().unwrap_or("").trim();
            if t == "*/*" || t.eq_ignore_ascii_case(media_type) {
                return true;
            }
        }
    }
    !any
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn routes() {
        assert_eq!(route("/v2/").unwrap(), Route::Ping);
        assert!(matches!(
            route(&format!("/v2/team/app/blobs/{D}")).unwrap(),
            Route::Blob("team/app", _)
        ));
        assert!(matches!(
            route("/v2/blobs/blobs/manifests/v1").unwrap(),
            Route::Manifest("blobs/blobs", Reference::Tag(_))
        ));
        assert_eq!(route("/v2/a/tags/list").unwrap(), Route::Listing);
        assert_eq!(
            route(&format!("/v2/a/referrers/{D}")).unwrap(),
            Route::Listing
        );
        assert_eq!(route("/v2/a/b/blobs/uploads/").unwrap(), Route::Upload);
        assert!(matches!(
            route(&format!("/v2/../etc/blobs/{D}")),
            Err(Error::NameInvalid(_))
        ));
        assert!(matches!(
            route("/v2/a/blobs/sha256:..%2F..%2Fetc"),
            Err(Error::DigestInvalid(_))
        ));
        assert!(matches!(route("/v3/x"), Err(Error::NotFound)));
        assert!(matches!(route("/v2/a/whatever/x"), Err(Error::NotFound)));
    }

    #[test]
    fn accept_matching() {
        let mut h = HeaderMap::new();
        assert!(accepts(&h, "x"), "no Accept header accepts anything");
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/a, application/b;q=0.5"),
        );
        assert!(accepts(&h, "application/b"));
        assert!(!accepts(&h, "application/c"));
    }

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
}

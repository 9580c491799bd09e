//! The OCI distribution API: routes, and what every handler shares.
//!
//! - [`blob`]: blobs from the node cache or a single-flight fill.
//! - [`manifest`]: manifests by digest (cached) and by tag (remembered for
//!   `--tag-ttl`, served stale while the upstream is down).
//! - [`peer`]: the peer listener: other nodes ask for content by digest.
//! - [`relay`]: everything relayed as it is, pushes included, with the
//!   upstream's URLs rewritten to the proxy's.
//! - [`authorize`]: before cached content goes out, the upstream would serve
//!   it to this client (see [`crate::auth`], which owns the answers).

mod authorize;
mod blob;
mod manifest;
mod peer;
mod relay;

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response};
use hyper::body::Incoming;

use crate::auth::{Auth, Credential};
use crate::body::Body;
use crate::budget::Prefetching;
use crate::cache::Cache;
use crate::digest::{validate_name, Digest, Reference};
use crate::error::{Error, Origin};
use crate::headers::{API_VERSION, API_VERSION_VALUE};
use crate::metrics::{Kind, Metrics, Outcome};
use crate::tags::Tags;
use crate::upstream::Upstream;
use relay::Realms;
// The parsers `crate::fuzzing` drives directly.
pub(crate) use blob::ranged;
pub(crate) use relay::{realm_path, replace_origin};

/// Everything a request handler needs: the parts, each the one owner of
/// its state.
pub struct App {
    cache: Arc<Cache>,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    tags: Arc<Tags>,
    auth: Auth,
    /// Auth realms on the upstream's own address, relayed like the API.
    realms: Realms,
    /// The node path's last checks (`--registry-name`), for `/readyz`.
    node: Option<Arc<crate::node::Status>>,
    /// The other nodes asked before the upstream (`--peers`).
    peers: Option<Arc<crate::peers::Peers>>,
    /// `--admin-token-file`'s token; without it the admin API is off.
    admin_token: Option<String>,
    /// The pinned images and the prefetch file (see [`crate::pins`]).
    pins: Option<Arc<crate::pins::Pins>>,
    /// What prefetches send as `Authorization` (`--prefetch-auth-file`).
    prefetch_auth: Option<HeaderValue>,
}

/// What a path asks for.
#[derive(Debug, PartialEq)]
pub(crate) enum Route<'a> {
    Ping,
    Blob(&'a str, Digest),
    Manifest(&'a str, Reference),
    /// `tags/list`, `_catalog`, referrers: relayed.
    Listing,
    Upload,
}

pub(crate) fn route(path: &str) -> Result<Route<'_>, Error> {
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
    /// The parts, each opened from its piece of the configuration.
    pub fn new(
        cache: Cache,
        upstream: Upstream,
        tags: Tags,
        auth: Auth,
        metrics: Arc<Metrics>,
    ) -> App {
        App {
            cache: Arc::new(cache),
            upstream: Arc::new(upstream),
            metrics,
            tags: Arc::new(tags),
            auth,
            realms: Realms::default(),
            node: None,
            peers: None,
            admin_token: None,
            pins: None,
            prefetch_auth: None,
        }
    }

    /// With peers to ask before the upstream (see [`crate::peers`]).
    pub fn with_peers(mut self, peers: Option<Arc<crate::peers::Peers>>) -> App {
        self.peers = peers;
        self
    }

    /// With the pins (see [`crate::pins`]).
    pub fn with_pins(mut self, pins: Arc<crate::pins::Pins>) -> App {
        self.pins = Some(pins);
        self
    }

    /// The pins, once set up.
    pub fn pins(&self) -> Option<&Arc<crate::pins::Pins>> {
        self.pins.as_ref()
    }

    /// With the admin API's token (`--admin-token-file`).
    pub fn with_admin_token(mut self, token: Option<String>) -> App {
        self.admin_token = token;
        self
    }

    /// The token the admin API requires; `None`: the admin API is off.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// With the node path's status (see [`crate::node::start`]).
    pub fn with_node(mut self, node: Option<Arc<crate::node::Status>>) -> App {
        self.node = node;
        self
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Why the node path is not ready, when it is checked and is not.
    pub fn node_not_ready(&self) -> Option<String> {
        self.node.as_ref()?.not_ready()
    }

    /// Waits until every fill started so far has ended (see
    /// [`Cache::fills_done`]).
    pub async fn fills_done(&self) {
        self.cache.fills_done().await;
    }

    /// Called once this process holds the cache dir alone, after a
    /// handover (see [`Cache::became_primary`]).
    pub async fn cache_dir_is_ours(&self) {
        self.cache.became_primary().await;
    }

    /// Writes the remembered yeses (`--remember-allowed`) if they changed.
    pub async fn save_allowed(self: &Arc<Self>) {
        let app = Arc::clone(self);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || app.auth.save()).await {
            tracing::warn!(error = %e, "could not save the remembered authorizations");
        }
    }

    /// Answers one request. Never fails: errors become OCI error responses.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if req.uri().path() == crate::instance::PATH {
            return instance(req.method(), req.uri().query());
        }
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

    /// This proxy's own `GET` or `HEAD` of a manifest or a blob (a
    /// prefetch): the same authorization, cache, single-flight fills and
    /// peers as a client's, marked [`Prefetching`] so that its fills yield
    /// to clients' on the uplink budget. Anything else is a 404.
    pub async fn fetch(
        self: &Arc<Self>,
        method: Method,
        path: &str,
        headers: HeaderMap,
    ) -> Response<Body> {
        let req = Request::builder().method(method).uri(path).body(());
        let Ok((mut parts, ())) = req.map(Request::into_parts) else {
            return Error::NotFound.into_response();
        };
        parts.headers = headers;
        parts.extensions.insert(Prefetching);
        let head = parts.method == Method::HEAD;
        if parts.method != Method::GET && !head {
            return Error::MethodNotAllowed(parts.method).into_response();
        }
        let answer = match route(parts.uri.path()) {
            Ok(Route::Blob(name, d)) => self.blob(&parts, name, d, head).await,
            Ok(Route::Manifest(name, Reference::Digest(d))) => {
                self.manifest_by_digest(&parts, name, d, head).await
            }
            Ok(Route::Manifest(name, Reference::Tag(t))) => self.tag(&parts, name, &t, head).await,
            Ok(_) => Err(Error::NotFound),
            Err(e) => Err(e),
        };
        match answer {
            Ok((_, resp)) => resp,
            Err(e) => {
                tracing::debug!(path, error = %e, "prefetch request refused");
                e.into_response()
            }
        }
    }

    /// With the credential prefetches send (see [`crate::prefetch`]).
    pub fn with_prefetch_auth(mut self, cred: Option<HeaderValue>) -> App {
        self.prefetch_auth = cred;
        self
    }

    /// The credential prefetches send (`--prefetch-auth-file`), if any.
    pub fn prefetch_auth(&self) -> Option<&HeaderValue> {
        self.prefetch_auth.as_ref()
    }

    /// The node cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Tag → digest.
    pub fn tags(&self) -> &Arc<Tags> {
        &self.tags
    }

    /// The uplink budget (`--upstream-rate`).
    pub fn budget(&self) -> &Arc<crate::budget::Budget> {
        self.upstream.budget()
    }

    async fn dispatch(&self, parts: &Parts, body: Incoming) -> (Kind, Answer) {
        if self.upstream.looped(&parts.headers) {
            return (Kind::Other, Err(Error::LoopDetected));
        }
        if !parts.uri.path().starts_with("/v2") && self.realms.contains(parts.uri.path()) {
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

    /// The body of an answer from the node cache (none for a HEAD), counted
    /// as served from the cache.
    fn cached_body(&self, data: bytes::Bytes, head: bool) -> Body {
        if head {
            Body::empty()
        } else {
            Body::mapped(data, Arc::clone(&self.metrics.served_cache_bytes))
        }
    }
}

/// [`crate::instance::PATH`]: this process's id, so that a check that
/// connects to the node's registry address knows who answered. Not counted
/// as a registry request.
fn instance(method: &Method, query: Option<&str>) -> Response<Body> {
    let mut r = match *method {
        Method::GET => Response::new(Body::full(crate::instance::answer(query))),
        Method::HEAD => Response::new(Body::empty()),
        _ => return Error::MethodNotAllowed(method.clone()).into_response(),
    };
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The 404 for cached content the node may not give this client.
fn unknown(manifest: bool, d: &Digest) -> Error {
    if manifest {
        Error::ManifestUnknown(d.to_string())
    } else {
        Error::BlobUnknown(d.to_string())
    }
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
}

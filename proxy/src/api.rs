//! The OCI distribution API, pull side: what is answered from the node cache,
//! what starts or follows a fill, and what is relayed to the upstream.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::body::Body;
use crate::cache::fill::{self, FillRequest};
use crate::cache::{Cache, Failure, Join};
use crate::digest::{validate_name, Digest, Reference};
use crate::error::Error;
use crate::metrics::{Kind, Metrics, Outcome};
use crate::upstream::{is_hop_by_hop, Upstream};

/// Largest manifest read into memory to verify and cache (Distribution's limit).
const MAX_MANIFEST: usize = 4 << 20;

const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

/// Everything a request handler needs.
pub struct App {
    pub cache: Arc<Cache>,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    /// This instance's `Via` token: a request that carries it has looped.
    pub via: String,
    pub retries: u32,
}

/// What a path asks for.
#[derive(Debug, PartialEq)]
enum Route<'a> {
    Ping,
    Blob(&'a str, Digest),
    Manifest(&'a str, Reference),
    /// `tags/list` and `_catalog`: relayed.
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
        _ => Err(Error::NotFound),
    }
}

impl App {
    /// Answers one request. Never fails: errors become OCI error responses.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let (kind, result) = self.dispatch(&req).await;
        let mut resp = match result {
            Ok((outcome, resp)) => {
                self.metrics.request(kind, outcome);
                resp
            }
            Err(e) => {
                self.metrics.request(kind, Outcome::Error);
                if e.is_upstream() {
                    tracing::warn!(method = %req.method(), path = req.uri().path(), error = %e, "upstream failure");
                } else {
                    tracing::debug!(method = %req.method(), path = req.uri().path(), error = %e, "request refused");
                }
                e.into_response()
            }
        };
        resp.headers_mut()
            .entry(API_VERSION.0)
            .or_insert(HeaderValue::from_static(API_VERSION.1));
        resp
    }

    async fn dispatch(
        &self,
        req: &Request<Incoming>,
    ) -> (Kind, Result<(Outcome, Response<Body>), Error>) {
        if self.looped(req.headers()) {
            return (Kind::Other, Err(Error::LoopDetected));
        }
        let r = match route(req.uri().path()) {
            Ok(r) => r,
            Err(e) => return (Kind::Other, Err(e)),
        };
        let head = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            ref m => return (Kind::Other, Err(Error::MethodNotAllowed(m.clone()))),
        };
        match r {
            Route::Ping => (Kind::Other, self.ping(req).await),
            Route::Listing => (
                Kind::Other,
                self.relay(req).await.map(|r| (Outcome::Passthrough, r)),
            ),
            Route::Upload => (
                Kind::Other,
                Err(Error::MethodNotAllowed(req.method().clone())),
            ),
            Route::Blob(name, d) => (Kind::Blob, self.blob(req, name, d, head).await),
            Route::Manifest(_, Reference::Digest(d)) => {
                (Kind::Manifest, self.manifest(req, d, head).await)
            }
            Route::Manifest(_, Reference::Tag(_)) => (
                Kind::Tag,
                self.relay(req).await.map(|r| (Outcome::Passthrough, r)),
            ),
        }
    }

    fn looped(&self, h: &HeaderMap) -> bool {
        h.get_all(header::VIA).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|hop| hop.trim().ends_with(&self.via)))
        })
    }

    /// `/v2/`: upstream's answer (so its auth challenge reaches the client);
    /// when upstream is unreachable, a local 200 so that cached content can
    /// still be pulled by digest.
    async fn ping(&self, req: &Request<Incoming>) -> Result<(Outcome, Response<Body>), Error> {
        match self.relay(req).await {
            Ok(r) => Ok((Outcome::Passthrough, r)),
            Err(e) if e.is_upstream() => {
                tracing::warn!(error = %e, "upstream down; answering /v2/ from the node");
                let mut r = Response::new(Body::full(Bytes::from_static(b"{}")));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Ok((Outcome::Hit, r))
            }
            Err(e) => Err(e),
        }
    }

    async fn blob(
        &self,
        req: &Request<Incoming>,
        name: &str,
        d: Digest,
        head: bool,
    ) -> Result<(Outcome, Response<Body>), Error> {
        // Twice at most: a miss that finds the blob committed meanwhile looks again.
        for _ in 0..2 {
            if let Some(hit) = self.cache.get(&d, false).await {
                let size = hit.data.len() as u64;
                let (status, start, end) = ranged(req.headers(), size)?;
                let resp = blob_response(status, &d, start, end, size);
                let body = if head {
                    Body::empty()
                } else {
                    Body::mapped(
                        hit.data.slice(start as usize..end as usize),
                        Some(Arc::clone(&self.metrics.served_cache_bytes)),
                    )
                };
                return Ok((Outcome::Hit, resp.body(body).expect("valid response")));
            }
            if head {
                // A HEAD does not start a download.
                return self.relay(req).await.map(|r| (Outcome::Passthrough, r));
            }
            let (fill, outcome) = match self.cache.join(&d) {
                Join::Committed => continue,
                Join::Follower(f) => (f, Outcome::Coalesced),
                Join::Leader(f) => {
                    // The fill fetches the whole blob, whatever range this client wants.
                    let mut headers = req.headers().clone();
                    headers.remove(header::RANGE);
                    let fr = FillRequest {
                        name: name.to_owned(),
                        headers,
                        retries: self.retries,
                    };
                    tokio::spawn(fill::run(
                        Arc::clone(&self.cache),
                        Arc::clone(&self.upstream),
                        Arc::clone(&f),
                        fr,
                    ));
                    (f, Outcome::Miss)
                }
            };
            return match fill.started().await {
                Ok(size) => {
                    let (status, start, end) = ranged(req.headers(), size)?;
                    let stream =
                        fill.reader(start, end, Arc::clone(&self.metrics.served_cache_bytes));
                    let body = Body::stream(stream, Some(end - start));
                    Ok((
                        outcome,
                        blob_response(status, &d, start, end, size)
                            .body(body)
                            .expect("valid response"),
                    ))
                }
                Err(Failure::Relay {
                    status,
                    mut headers,
                    body,
                }) => {
                    // The body was read (and may be cut short); hyper sets its length.
                    headers.remove(header::CONTENT_LENGTH);
                    Ok((
                        Outcome::Passthrough,
                        relayed(status, &headers, Body::full(body)),
                    ))
                }

                Err(Failure::Error(e)) => Err(clone_error(&e)),
                Err(Failure::Uncached) => self
                    .blob_uncached(req, name, d)
                    .await
                    .map(|r| (Outcome::Passthrough, r)),
            };
        }
        Err(Error::UpstreamBad("cache entry vanished twice".into()))
    }

    /// A blob that will not be kept: straight from upstream, still verified.
    async fn blob_uncached(
        &self,
        req: &Request<Incoming>,
        name: &str,
        d: Digest,
    ) -> Result<Response<Body>, Error> {
        let path = format!("/v2/{name}/blobs/{d}");
        let mut headers = req.headers().clone();
        headers.remove(header::RANGE);
        let resp = self
            .upstream
            .send(Method::GET, &path, &headers, &[])
            .await?;
        if resp.status() != StatusCode::OK {
            let (parts, body) = resp.into_parts();
            return Ok(relayed(
                parts.status,
                &parts.headers,
                Body::upstream(body, Arc::clone(&self.metrics)),
            ));
        }
        let size = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .ok_or_else(|| {
                self.upstream
                    .failed(Error::UpstreamBad("blob without Content-Length".into()))
            })?;
        let stream = fill::verified_stream(
            resp.into_body(),
            d.clone(),
            size,
            self.upstream.timeout(),
            Arc::clone(&self.metrics),
        );
        Ok(blob_response(StatusCode::OK, &d, 0, size, size)
            .body(Body::stream(stream, Some(size)))
            .expect("valid response"))
    }

    /// A manifest by digest: immutable, so cached like a blob, with its media type.
    async fn manifest(
        &self,
        req: &Request<Incoming>,
        d: Digest,
        head: bool,
    ) -> Result<(Outcome, Response<Body>), Error> {
        if let Some(hit) = self.cache.get(&d, true).await {
            let media_type = hit.media_type.unwrap_or_default();
            if accepts(req.headers(), &media_type) {
                let resp = manifest_response(&d, &media_type, hit.data.len());
                let body = if head {
                    Body::empty()
                } else {
                    Body::mapped(hit.data, Some(Arc::clone(&self.metrics.served_cache_bytes)))
                };
                return Ok((Outcome::Hit, resp.body(body).expect("valid response")));
            }
        }
        if head {
            return self.relay(req).await.map(|r| (Outcome::Passthrough, r));
        }
        let resp = self
            .upstream
            .send(Method::GET, req.uri().path(), req.headers(), &[])
            .await?;
        if resp.status() != StatusCode::OK {
            let (parts, body) = resp.into_parts();
            return Ok((
                Outcome::Passthrough,
                relayed(
                    parts.status,
                    &parts.headers,
                    Body::upstream(body, Arc::clone(&self.metrics)),
                ),
            ));
        }
        let (parts, body) = resp.into_parts();
        let media_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_owned();
        let limited = http_body_util::Limited::new(body, MAX_MANIFEST);
        let bytes = match tokio::time::timeout(self.upstream.timeout(), limited.collect()).await {
            Err(_) => {
                return Err(self
                    .upstream
                    .failed(Error::UpstreamTimeout("manifest body stalled".into())))
            }
            Ok(Err(e)) => {
                return Err(self
                    .upstream
                    .failed(Error::UpstreamBad(format!("manifest body: {e}"))))
            }
            Ok(Ok(c)) => c.to_bytes(),
        };
        self.metrics
            .upstream_bytes
            .fetch_add(bytes.len() as u64, Relaxed);
        let got = Digest::of(&bytes);
        if got != d {
            self.metrics.digest_mismatches.fetch_add(1, Relaxed);
            return Err(self
                .upstream
                .failed(Error::UpstreamBad(format!("manifest {d} hashed to {got}"))));
        }
        self.cache
            .put_manifest(d.clone(), media_type.clone(), bytes.clone())
            .await;
        self.metrics
            .served_upstream_bytes
            .fetch_add(bytes.len() as u64, Relaxed);
        let resp = manifest_response(&d, &media_type, bytes.len());
        Ok((
            Outcome::Miss,
            resp.body(Body::full(bytes)).expect("valid response"),
        ))
    }

    /// Relays a request to upstream as it is and streams the answer back.
    async fn relay(&self, req: &Request<Incoming>) -> Result<Response<Body>, Error> {
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let resp = self
            .upstream
            .send(req.method().clone(), pq, req.headers(), &[])
            .await?;
        let (parts, body) = resp.into_parts();
        Ok(relayed(
            parts.status,
            &parts.headers,
            Body::upstream(body, Arc::clone(&self.metrics)),
        ))
    }
}

/// `Error` is not `Clone` (it is shared by every reader of a fill): rebuild it.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::UpstreamTimeout(m) => Error::UpstreamTimeout(m.clone()),
        Error::UpstreamUnreachable(m) => Error::UpstreamUnreachable(m.clone()),
        other => Error::UpstreamBad(other.to_string()),
    }
}

fn relayed(status: StatusCode, headers: &HeaderMap, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    for (k, v) in headers {
        if !is_hop_by_hop(k) {
            resp.headers_mut().append(k.clone(), v.clone());
        }
    }
    resp
}

fn blob_response(
    status: StatusCode,
    d: &Digest,
    start: u64,
    end: u64,
    size: u64,
) -> http::response::Builder {
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", d.to_string())
        .header(header::ETAG, format!("\"{d}\""))
        .header(header::CACHE_CONTROL, "max-age=31536000");
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    b
}

fn manifest_response(d: &Digest, media_type: &str, len: usize) -> http::response::Builder {
    Response::builder()
        .header(header::CONTENT_TYPE, media_type)
        .header(header::CONTENT_LENGTH, len)
        .header("docker-content-digest", d.to_string())
        .header(header::ETAG, format!("\"{d}\""))
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

/// The status and byte range `start..end` to send for a blob of `size` bytes.
/// One `bytes=` range is honoured; anything else that is not a valid single
/// range is ignored (RFC 9110 allows that), an unsatisfiable one is a 416.
fn ranged(h: &HeaderMap, size: u64) -> Result<(StatusCode, u64, u64), Error> {
    let full = Ok((StatusCode::OK, 0, size));
    let Some(v) = h.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return full;
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return full;
    };
    if spec.contains(',') {
        return full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return full;
    };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else { return full };
        if n == 0 {
            return Err(Error::RangeNotSatisfiable { size });
        }
        (size.saturating_sub(n), size)
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return full;
        };
        let end = if b.is_empty() {
            size
        } else {
            let Ok(last) = b.parse::<u64>() else {
                return full;
            };
            if last < start {
                return full;
            }
            (last + 1).min(size)
        };
        (start, end)
    };
    if start >= size {
        return Err(Error::RangeNotSatisfiable { size });
    }
    Ok((StatusCode::PARTIAL_CONTENT, start, end))
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

    fn range(v: &str, size: u64) -> Result<(StatusCode, u64, u64), Error> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        ranged(&h, size)
    }

    #[test]
    fn ranges() {
        assert_eq!(
            range("bytes=0-9", 100).unwrap(),
            (StatusCode::PARTIAL_CONTENT, 0, 10)
        );
        assert_eq!(
            range("bytes=90-", 100).unwrap(),
            (StatusCode::PARTIAL_CONTENT, 90, 100)
        );
        assert_eq!(
            range("bytes=-10", 100).unwrap(),
            (StatusCode::PARTIAL_CONTENT, 90, 100)
        );
        assert_eq!(
            range("bytes=50-500", 100).unwrap(),
            (StatusCode::PARTIAL_CONTENT, 50, 100)
        );
        assert_eq!(
            range("bytes=0-1,5-6", 100).unwrap(),
            (StatusCode::OK, 0, 100),
            "multiple ranges are ignored"
        );
        assert_eq!(range("items=0-1", 100).unwrap(), (StatusCode::OK, 0, 100));
        assert!(matches!(
            range("bytes=100-", 100),
            Err(Error::RangeNotSatisfiable { size: 100 })
        ));
        assert!(matches!(
            range("bytes=-0", 100),
            Err(Error::RangeNotSatisfiable { .. })
        ));
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

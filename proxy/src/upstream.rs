//! The client to the real registry: HTTP or HTTPS (rustls, Mozilla roots plus
//! `--upstream-ca`), connect and response timeouts, redirects for blob
//! storage behind S3-style URLs, and the `Via` header that stops loops.

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::body::Body;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::resolve::Resolver;

/// Request headers relayed from a client to the upstream. `Via` is relayed so
/// that a chain of proxies that loops back on itself is seen.
const FORWARDED: [HeaderName; 5] = [
    header::ACCEPT,
    header::AUTHORIZATION,
    header::RANGE,
    header::USER_AGENT,
    header::VIA,
];

/// Largest read buffer of an upstream connection (hyper's default is about
/// 400 KiB). A fill in flight holds its connection's buffer, so this times
/// the fills in flight is memory outside the fills' shared budget
/// (`cache::fill::BUFFER_BUDGET`): keep it small.
pub const READ_BUF: usize = 64 << 10;

/// How many redirects a blob GET follows (S3, GCS and CDN storage redirect).
const MAX_REDIRECTS: usize = 5;

pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector<Resolver>>, Body>,
    base: Uri,
    /// `scheme://authority` of `base`.
    origin: String,
    timeout: Duration,
    via: HeaderValue,
    metrics: Arc<Metrics>,
}

/// A cheap description of the upstream for logs.
impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.base)
    }
}

impl Upstream {
    /// `via` is this instance's `Via` token, added to every upstream request.
    pub fn new(
        base: Uri,
        resolver: Resolver,
        ca_file: Option<&Path>,
        connect_timeout: Duration,
        timeout: Duration,
        via: &str,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Upstream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("cannot read --upstream-ca {}: {e}", path.display())
            })?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert =
                    cert.map_err(|e| anyhow::anyhow!("bad PEM in {}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| {
                    anyhow::anyhow!("bad CA certificate in {}: {e}", path.display())
                })?;
                n += 1;
            }
            anyhow::ensure!(
                n > 0,
                "--upstream-ca {} holds no PEM certificate",
                path.display()
            );
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();

        let mut http = HttpConnector::new_with_resolver(resolver);
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .http1_max_buf_size(READ_BUF)
            .build(https);
        Ok(Upstream {
            client,
            origin: format!(
                "{}://{}",
                base.scheme_str().unwrap_or("http"),
                base.authority().map_or("", |a| a.as_str())
            ),
            base: base.clone(),
            timeout,
            via: HeaderValue::from_str(&format!("1.1 {via}"))?,
            metrics,
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `scheme://authority` of the upstream, as it appears in the URLs it
    /// hands out (`Location`, `Link`, an auth `realm`).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    fn url(&self, path_and_query: &str) -> Result<Uri, Error> {
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(
            path_and_query
                .parse()
                .map_err(|_| Error::NameInvalid("path is not a valid URL".into()))?,
        );
        Uri::from_parts(parts).map_err(|_| Error::NameInvalid("path is not a valid URL".into()))
    }

    /// Sends `method path` upstream with the relayed `client` headers plus
    /// `extra`, and waits for the response head within the timeout. GET and
    /// HEAD follow redirects; credentials are dropped when the host changes.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        client: &HeaderMap,
        extra: &[(HeaderName, HeaderValue)],
    ) -> Result<Response<Incoming>, Error> {
        let uri = self.url(path_and_query)?;
        self.send_inner(method, uri, self.headers(client, extra), None)
            .await
    }

    /// Relays a request with a body (an upload, a manifest push), streamed.
    /// No redirect is followed, and the response may take as long as the
    /// body takes to send: only a stall of the upstream connection ends it.
    pub async fn send_body(
        &self,
        method: Method,
        path_and_query: &str,
        client: &HeaderMap,
        body: Body,
    ) -> Result<Response<Incoming>, Error> {
        let uri = self.url(path_and_query)?;
        let mut headers = self.headers(client, &[]);
        for name in [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::CONTENT_RANGE,
        ] {
            if let Some(v) = client.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        self.send_inner(method, uri, headers, Some(body)).await
    }

    fn headers(&self, client: &HeaderMap, extra: &[(HeaderName, HeaderValue)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for name in FORWARDED {
            for v in client.get_all(&name) {
                headers.append(name.clone(), v.clone());
            }
        }
        for (k, v) in extra {
            headers.insert(k.clone(), v.clone());
        }
        headers.append(header::VIA, self.via.clone());
        headers
    }

    async fn send_inner(
        &self,
        method: Method,
        mut uri: Uri,
        mut headers: HeaderMap,
        mut body: Option<Body>,
    ) -> Result<Response<Incoming>, Error> {
        let streaming = body.is_some();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = Request::builder().method(method.clone()).uri(uri.clone());
            *req.headers_mut().expect("fresh builder") = headers.clone();
            let req = req
                .body(body.take().unwrap_or_else(Body::empty))
                .expect("valid parts");
            self.metrics.upstream_requests.fetch_add(1, Relaxed);
            let limit = if streaming {
                Duration::MAX
            } else {
                self.timeout
            };
            let resp = match tokio::time::timeout(limit, self.client.request(req)).await {
                Err(_) => {
                    return Err(self.failed(Error::UpstreamTimeout(format!(
                        "no response from {} within {:?}",
                        redact(&uri),
                        self.timeout
                    ))))
                }
                Ok(Err(e)) => return Err(self.failed(classify(&uri, e))),
                Ok(Ok(r)) => r,
            };
            let redirect = matches!(
                resp.status(),
                StatusCode::MOVED_PERMANENTLY
                    | StatusCode::FOUND
                    | StatusCode::SEE_OTHER
                    | StatusCode::TEMPORARY_REDIRECT
                    | StatusCode::PERMANENT_REDIRECT
            );
            if resp.status() == StatusCode::LOOP_DETECTED {
                // A proxy further on saw its own token: the chain loops back.
                return Err(Error::LoopDetected);
            }
            if !(redirect && !streaming && (method == Method::GET || method == Method::HEAD)) {
                if resp.status().is_server_error() {
                    self.metrics.upstream_errors.fetch_add(1, Relaxed);
                }
                return Ok(resp);
            }
            let next = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| resolve(&uri, l))
                .ok_or_else(|| {
                    self.failed(Error::UpstreamBad(
                        "redirect without a usable Location".into(),
                    ))
                })?;
            if next.authority() != uri.authority() {
                headers.remove(header::AUTHORIZATION);
            }
            tracing::debug!(from = %uri, to = %next, "following upstream redirect");
            uri = next;
        }
        Err(self.failed(Error::UpstreamBad(format!(
            "more than {MAX_REDIRECTS} redirects"
        ))))
    }

    /// Counts an upstream failure on its way out.
    pub fn failed(&self, e: Error) -> Error {
        self.metrics.upstream_errors.fetch_add(1, Relaxed);
        e
    }
}

/// A URL fit for a log line or an error body: no query, where presigned
/// storage URLs carry their signatures.
fn redact(uri: &Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().map_or("", |a| a.as_str()),
        uri.path()
    )
}

fn classify(uri: &Uri, e: hyper_util::client::legacy::Error) -> Error {
    let uri = redact(uri);
    let mut msg = e.to_string();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    if msg.contains("timed out") || msg.contains("timeout") {
        Error::UpstreamTimeout(format!("{uri}: {msg}"))
    } else if e.is_connect() {
        Error::UpstreamUnreachable(format!("{uri}: {msg}"))
    } else {
        Error::UpstreamBad(format!("{uri}: {msg}"))
    }
}

/// Resolves a `Location` header against the URL it came from.
fn resolve(base: &Uri, location: &str) -> Option<Uri> {
    let loc: Uri = location.parse().ok()?;
    if loc.scheme().is_some() {
        return Some(loc);
    }
    if !location.starts_with('/') {
        return None;
    }
    let mut parts = base.clone().into_parts();
    parts.path_and_query = loc.path_and_query().cloned();
    Uri::from_parts(parts).ok()
}

/// Response headers that belong to one hop and are not relayed.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-authenticate"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_absolute_and_rooted() {
        let base: Uri = "http://up:5000/v2/a/blobs/sha256:x".parse().unwrap();
        assert_eq!(
            resolve(&base, "https://s3/b?sig=1").unwrap().to_string(),
            "https://s3/b?sig=1"
        );
        assert_eq!(
            resolve(&base, "/other?x=1").unwrap().to_string(),
            "http://up:5000/other?x=1"
        );
        assert!(resolve(&base, "relative").is_none());
    }
}

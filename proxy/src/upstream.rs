//! The client to the real registry: HTTP or HTTPS (rustls, Mozilla roots plus
//! `--upstream-ca`), connect and response timeouts, redirects for blob
//! storage behind S3-style URLs, and the `Via` header that stops loops.
//!
//! A redirect is followed only to where the upstream itself could send us:
//! never to loopback or link-local addresses unless the upstream is on them,
//! never to this proxy's own listeners, credentials never over a downgrade.
//! Upstream URLs are logged and reported without their query, where signed
//! storage URLs carry their signatures.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Scheme;
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::body::Body;
use crate::budget::Budget;
use crate::config::UpstreamConfig;
use crate::error::{Cause, Error, UpstreamError, Wait};
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
    /// Resumes in a row (less than 64 KiB between) of a broken blob download
    /// before its fill fails.
    retries: u32,
    /// `1.1 <this instance's token>`: a request that carries it has looped.
    via: HeaderValue,
    metrics: Arc<Metrics>,
    /// The client's resolver, also asked where a redirect leads before it is
    /// followed.
    resolver: Resolver,
    /// This proxy's own listen addresses, which no redirect may lead to.
    own: Vec<SocketAddr>,
    /// `--upstream-rate`: what every reader of an upstream body takes from.
    budget: Arc<Budget>,
    /// [`in_flight`] at the rate at start.
    in_flight: u64,
}

/// The receive buffer of upstream connections under a budget of `rate`
/// bytes per second: 100 ms of the rate, at least 128 KiB and at most 4 MiB.
/// It holds what the upstream may send ahead of the budget, and it lets one
/// connection reach the rate over a round trip of up to 100 ms (128 KiB: a
/// 10 Mbit/s uplink at 100 ms). Set once at start: a rate first set later,
/// through the admin API, shapes with the kernel's autotuned buffers.
pub fn recv_buffer(rate: u64) -> usize {
    (rate / 10).clamp(128 << 10, 4 << 20) as usize
}

/// Bytes of a response that can be on their way into this node ahead of
/// its reader under a budget of `rate`: the receive buffer (the kernel
/// doubles what is asked) and the client's read buffer. What the budget
/// charges ahead ([`crate::budget::Horizon`]); 0 without a budget at start.
pub fn in_flight(rate: u64) -> u64 {
    match rate {
        0 => 0,
        r => 2 * recv_buffer(r) as u64 + READ_BUF as u64,
    }
}

impl Upstream {
    /// The client `config` describes, resolving names with `resolver`. It
    /// adds this process's own `Via` token to every request.
    pub fn new(
        config: &UpstreamConfig,
        resolver: Resolver,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Upstream> {
        let base = config.url.clone();
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = config.ca.as_deref() {
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

        let mut http = HttpConnector::new_with_resolver(resolver.clone());
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        if config.rate > 0 {
            // A fixed receive window, or the kernel's autotuning lets the
            // upstream run megabytes ahead of the budget into the buffers.
            http.set_recv_buffer_size(Some(recv_buffer(config.rate)));
        }
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
            base,
            timeout: config.timeout,
            retries: config.retries,
            via: instance_token(),
            metrics,
            resolver,
            own: Vec::new(),
            budget: Arc::new(Budget::new(config.rate)),
            in_flight: in_flight(config.rate),
        })
    }

    /// Tells the client where this proxy listens (API and admin), once they
    /// are bound: redirects to those addresses are refused.
    pub fn set_own_addrs(&mut self, addrs: impl IntoIterator<Item = SocketAddr>) {
        self.own = addrs.into_iter().collect();
    }

    /// The uplink budget every reader of an upstream body takes from.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// A horizon for a response of `len` bytes (see [`in_flight`]).
    pub fn horizon(&self, len: u64) -> crate::budget::Horizon {
        crate::budget::Horizon::new(len, self.in_flight)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How many times in a row a blob download that broke off is resumed
    /// with less than 64 KiB coming in between (see `cache::fill::source`).
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Whether a request came through this very proxy before: one of its
    /// `Via` hops carries this instance's token.
    pub fn looped(&self, h: &HeaderMap) -> bool {
        let token = self.via.to_str().unwrap_or_default();
        let token = token.strip_prefix("1.1 ").unwrap_or(token);
        h.get_all(header::VIA).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|hop| hop.trim().ends_with(token)))
        })
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
    /// HEAD follow redirects that `redirect_allowed` lets through;
    /// credentials are dropped when the host changes or https is left.
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
                    return Err(self.failed(UpstreamError::Timeout {
                        url: redact(&uri),
                        wait: Wait::Response(self.timeout),
                    }))
                }
                Ok(Err(e)) => {
                    // A request body of a client's that failed (a push
                    // that went silent) is the client's failure.
                    if let Some(theirs) = Error::within(&e) {
                        return Err(theirs);
                    }
                    return Err(self.failed(UpstreamError::from_client(redact(&uri), e)));
                }
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
                    self.failed(UpstreamError::Invalid(
                        "redirect without a usable Location".into(),
                    ))
                })?;
            self.check_redirect(&next).await?;
            if !keeps_credentials(&uri, &next) {
                headers.remove(header::AUTHORIZATION);
            }
            tracing::debug!(from = %redact(&uri), to = %redact(&next), "following upstream redirect");
            uri = next;
        }
        Err(self.failed(UpstreamError::Invalid(format!(
            "more than {MAX_REDIRECTS} redirects"
        ))))
    }

    /// Refuses a redirect to `to` unless [`redirect_allowed`] lets every
    /// address its host resolves to through, asking the resolver the client
    /// connects with.
    async fn check_redirect(&self, to: &Uri) -> Result<(), Error> {
        let target = addrs_of(&self.resolver, to).await.map_err(|e| {
            self.failed(UpstreamError::Unreachable {
                url: redact(to),
                cause: Cause::new(e),
            })
        })?;
        // An upstream that no longer resolves is on no special address.
        let upstream = addrs_of(&self.resolver, &self.base)
            .await
            .unwrap_or_default();
        // The request's error is logged where it is answered.
        redirect_allowed(&upstream, &self.own, &target).map_err(|why| {
            self.failed(UpstreamError::Invalid(format!(
                "refused a redirect to {}: {why}",
                redact(to)
            )))
        })
    }

    /// Counts an upstream failure on its way out: the one place where
    /// `regproxy_upstream_errors_total` grows for a failed request.
    pub fn failed(&self, e: UpstreamError) -> Error {
        self.metrics.upstream_errors.fetch_add(1, Relaxed);
        Error::Upstream(e)
    }
}

/// `1.1 regproxy-<random>`: the `Via` value that names this process.
fn instance_token() -> HeaderValue {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    HeaderValue::from_str(&format!("1.1 regproxy-{:016x}", h.finish()))
        .expect("a token is a valid header value")
}

/// A URL fit for a log line or an error body: no query, where presigned
/// storage URLs carry their signatures, and no `user:password@`.
fn redact(uri: &Uri) -> String {
    format!(
        "{}://{}{}{}",
        uri.scheme_str().unwrap_or("http"),
        uri.host().unwrap_or(""),
        uri.port().map(|p| format!(":{p}")).unwrap_or_default(),
        uri.path()
    )
}

/// Every address the host of `uri` resolves to, with its port.
async fn addrs_of(resolver: &Resolver, uri: &Uri) -> io::Result<Vec<SocketAddr>> {
    let https = uri.scheme() == Some(&Scheme::HTTPS);
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    resolver.resolve(uri.host().unwrap_or(""), port).await
}

/// Whether `Authorization` may follow a redirect from `from` to `to`: only to
/// the same authority, and never from https to plain http.
fn keeps_credentials(from: &Uri, to: &Uri) -> bool {
    let downgrade = from.scheme() == Some(&Scheme::HTTPS) && to.scheme() != Some(&Scheme::HTTPS);
    from.authority() == to.authority() && !downgrade
}

/// Addresses a redirect may reach only when the upstream is on them too: a
/// registry on the internet has no business sending the proxy to the node's
/// own services or the cloud metadata endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inward {
    /// 127/8, ::1, and the unspecified address (which connects to this host).
    Loopback,
    /// 169.254/16 (cloud metadata lives there) and fe80::/10.
    LinkLocal,
}

fn inward(ip: IpAddr) -> Option<Inward> {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_loopback() || v4.is_unspecified() => Some(Inward::Loopback),
        IpAddr::V4(v4) if v4.is_link_local() => Some(Inward::LinkLocal),
        IpAddr::V6(v6) if v6.is_loopback() || v6.is_unspecified() => Some(Inward::Loopback),
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => Some(Inward::LinkLocal),
        _ => None,
    }
}

/// Whether a connection to `to` would reach a listener bound to `own`.
fn reaches(own: SocketAddr, to: SocketAddr) -> bool {
    if own.port() != to.port() {
        return false;
    }
    let (own, mut to) = (own.ip().to_canonical(), to.ip().to_canonical());
    if to.is_unspecified() {
        // A connection to the unspecified address goes to loopback.
        to = match to {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
    }
    // A listener on the unspecified address takes every address of this
    // host: those are the ones a socket can be bound to.
    own == to
        || (own.is_unspecified()
            && (inward(to) == Some(Inward::Loopback)
                || std::net::UdpSocket::bind(SocketAddr::new(to, 0)).is_ok()))
}

/// Whether a redirect whose host resolves to `target` may be followed, given
/// the addresses the `upstream` resolves to and the proxy's `own` listeners;
/// why not otherwise.
fn redirect_allowed(
    upstream: &[SocketAddr],
    own: &[SocketAddr],
    target: &[SocketAddr],
) -> Result<(), String> {
    for t in target {
        if own.iter().any(|o| reaches(*o, *t)) {
            return Err(format!("{t} is this proxy's own listen address"));
        }
        if let Some(kind) = inward(t.ip()) {
            if !upstream.iter().any(|u| inward(u.ip()) == Some(kind)) {
                return Err(format!(
                    "{t} is a {kind:?} address and the upstream is not on one"
                ));
            }
        }
    }
    Ok(())
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

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn redirects_inward_only_from_an_upstream_there() {
        let public = addrs(&["203.0.113.7:443"]);
        for to in [
            "127.0.0.1:80",
            "127.9.9.9:6443",
            "0.0.0.0:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
            "169.254.169.254:80",
            "[fe80::1]:80",
            "[::ffff:169.254.169.254]:80",
        ] {
            assert!(
                redirect_allowed(&public, &[], &addrs(&[to])).is_err(),
                "a public upstream should not send the proxy to {to}"
            );
        }
        assert!(
            redirect_allowed(&public, &[], &addrs(&["198.51.100.1:443", "127.0.0.1:443"])).is_err(),
            "one inward address among those a name resolves to is enough to refuse"
        );
        assert_eq!(
            redirect_allowed(
                &public,
                &[],
                &addrs(&["198.51.100.1:443", "[2001:db8::1]:443"])
            ),
            Ok(()),
            "storage on other public addresses is where registries redirect to"
        );
        assert_eq!(
            redirect_allowed(
                &addrs(&["127.0.0.1:5000"]),
                &[],
                &addrs(&["127.0.0.1:9000"])
            ),
            Ok(()),
            "an upstream on loopback may redirect to loopback"
        );
        assert!(
            redirect_allowed(
                &addrs(&["127.0.0.1:5000"]),
                &[],
                &addrs(&["169.254.169.254:80"])
            )
            .is_err(),
            "an upstream on loopback is not on a link-local address"
        );
        assert_eq!(
            redirect_allowed(
                &addrs(&["[fe80::2]:5000"]),
                &[],
                &addrs(&["169.254.1.1:80"])
            ),
            Ok(()),
            "an upstream on a link-local address may redirect to one"
        );
    }

    #[test]
    fn redirects_never_reach_the_proxy_itself() {
        let up = addrs(&["127.0.0.1:5000"]);
        let own = addrs(&["127.0.0.1:8080", "127.0.0.1:9090"]);
        for to in [
            "127.0.0.1:8080",
            "127.0.0.1:9090",
            "[::ffff:127.0.0.1]:8080",
            "0.0.0.0:8080",
        ] {
            assert!(
                redirect_allowed(&up, &own, &addrs(&[to])).is_err(),
                "a redirect to {to}, a listener of this proxy, should be refused"
            );
        }
        assert_eq!(
            redirect_allowed(&up, &own, &addrs(&["127.0.0.1:8081"])),
            Ok(())
        );
        let any = addrs(&["0.0.0.0:8080"]);
        for to in ["127.0.0.1:8080", "127.3.2.1:8080", "0.0.0.0:8080"] {
            assert!(
                redirect_allowed(&up, &any, &addrs(&[to])).is_err(),
                "a proxy listening on 0.0.0.0:8080 is reached through {to}"
            );
        }
        assert_eq!(
            redirect_allowed(&up, &any, &addrs(&["198.51.100.1:8080"])),
            Ok(()),
            "an address of another host is not ours"
        );
    }

    #[test]
    fn credentials_stay_on_the_authority_and_never_downgrade() {
        let u = |s: &str| s.parse::<Uri>().unwrap();
        assert!(keeps_credentials(
            &u("https://reg/v2/a"),
            &u("https://reg/v2/b")
        ));
        assert!(keeps_credentials(
            &u("http://reg:5000/a"),
            &u("http://reg:5000/b")
        ));
        assert!(keeps_credentials(&u("http://reg/a"), &u("https://reg/b")));
        assert!(
            !keeps_credentials(&u("https://reg/v2/a"), &u("http://reg/v2/a")),
            "credentials should not follow https to plain http on the same authority"
        );
        assert!(
            !keeps_credentials(&u("https://reg:8443/a"), &u("http://reg:8443/a")),
            "nor with an explicit port"
        );
        assert!(!keeps_credentials(
            &u("https://reg/a"),
            &u("https://s3.example/a")
        ));
    }

    #[test]
    fn redacted_urls_keep_no_signature_or_password() {
        let u: Uri = "https://user:pw@bucket.s3.example:8443/blobs/ab?X-Amz-Signature=SECRET&X-Amz-Credential=KEY"
            .parse()
            .unwrap();
        let r = redact(&u);
        assert_eq!(r, "https://bucket.s3.example:8443/blobs/ab");
        assert!(!r.contains("SECRET") && !r.contains("pw"), "{r}");
        assert_eq!(
            redact(&"http://[::1]:5000/v2/".parse().unwrap()),
            "http://[::1]:5000/v2/"
        );
    }
}

//! Typed errors, and the one place where they become OCI error responses
//! (`{"errors":[{"code","message","detail"}]}`).

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use crate::body::Body;
use crate::digest::Digest;
use crate::headers::{API_VERSION, API_VERSION_VALUE};

/// The challenge of a 401 when the upstream gave none. A 401 must say how to
/// authenticate (RFC 9110, 11.6.1); without one, clients give up instead of
/// sending credentials, which the proxy relays to the upstream.
pub const DEFAULT_CHALLENGE: &str = "Basic realm=\"regproxy\"";

/// Gives a 401 that carries no `WWW-Authenticate` the default challenge.
/// Applied to every response the proxy sends, relayed ones included.
pub fn ensure_challenge(status: StatusCode, headers: &mut HeaderMap) {
    if status == StatusCode::UNAUTHORIZED && !headers.contains_key(header::WWW_AUTHENTICATE) {
        headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(DEFAULT_CHALLENGE),
        );
    }
}

/// Where a failure came from. It decides the status class of the answer
/// and what is counted and logged as whose fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The request: bad input, or content this client may not read.
    /// Answered 4xx, logged at debug.
    Client,
    /// The real registry: unreachable, too slow, an error, or bytes that
    /// are not what it announced. Answered 502 or 504, counted in
    /// `regproxy_upstream_errors_total`.
    Upstream,
    /// This node: its cache disk, its shutdown, or a chain of proxies that
    /// loops back to it, or a bug. Answered with a 5xx of its own (see
    /// [`Error::status_and_code`]), never counted as an upstream error.
    Node,
}

/// A lower-level error (`io::Error`, hyper's), shared by the clones of the
/// [`Error`] it caused. Displays its whole chain of sources.
#[derive(Debug, Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Cause {
        Cause(Arc::new(e))
    }

    pub fn boxed(e: Box<dyn std::error::Error + Send + Sync>) -> Cause {
        Cause(Arc::from(e))
    }

    /// Whether some error in the chain is an `io::Error` of `kind`.
    pub fn is_io(&self, kind: io::ErrorKind) -> bool {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&*self.0);
        while let Some(e) = next {
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == kind)
            {
                return true;
            }
            next = e.source();
        }
        false
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

/// Which wait on the upstream ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// `--connect-timeout`, or the resolver's own: no TCP connection.
    Connect,
    /// The kernel gave up on an open connection (`ETIMEDOUT`).
    Network,
    /// `--upstream-timeout`: no response head.
    Response(Duration),
    /// `--upstream-timeout`: a response body that stopped sending.
    Body(Duration),
}

/// How the upstream failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach {url}: {cause}")]
    Unreachable { url: String, cause: Cause },
    #[error("{url}: {}", match .wait {
        Wait::Connect => "no connection within --connect-timeout".to_string(),
        Wait::Network => "the connection timed out".to_string(),
        Wait::Response(d) => format!("no response within {d:?}"),
        Wait::Body(d) => format!("the body stalled for {d:?}"),
    })]
    Timeout { url: String, wait: Wait },
    /// The connection failed after it was made: reset, closed mid-body.
    #[error("{url}: {cause}")]
    Broken { url: String, cause: Cause },
    /// An error status where content was expected.
    #[error("{what} answered {status}")]
    Status { what: String, status: StatusCode },
    /// An answer that breaks the protocol: no `Content-Length` for a blob,
    /// more bytes than announced, a redirect that may not be followed.
    #[error("{0}")]
    Invalid(String),
    #[error("content of {expected} hashed to {got}")]
    DigestMismatch { expected: Digest, got: Digest },
}

impl UpstreamError {
    /// A failure of the upstream HTTP client, by kind: a wait that timed
    /// out (a DNS lookup, a connect, a connection the kernel gave up on), a
    /// connect that failed, or a connection that broke.
    pub fn from_client(url: String, e: hyper_util::client::legacy::Error) -> UpstreamError {
        let connect = e.is_connect();
        let cause = Cause::new(e);
        if cause.is_io(io::ErrorKind::TimedOut) {
            let wait = if connect {
                Wait::Connect
            } else {
                Wait::Network
            };
            UpstreamError::Timeout { url, wait }
        } else if connect {
            UpstreamError::Unreachable { url, cause }
        } else {
            UpstreamError::Broken { url, cause }
        }
    }
}

/// Every failure a request can meet. `Clone`, so that one fill's failure
/// reaches each of its readers whole.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    // The client's: its input.
    #[error("{0}")]
    DigestInvalid(String),
    #[error("{0}")]
    NameInvalid(String),
    #[error("{0}")]
    TagInvalid(String),
    #[error("{0}")]
    ManifestInvalid(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("method {0} is not supported on this path")]
    MethodNotAllowed(http::Method),
    #[error("no such API endpoint")]
    NotFound,
    #[error("requested range is not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("blob unknown to registry: {0}")]
    BlobUnknown(String),
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    /// A client's request body that broke off (a push whose client hung up).
    #[error("the request body broke off: {0}")]
    ClientAborted(Cause),
    /// A client's request body that stopped sending (a push).
    #[error("the request body was silent for {0:?}")]
    ClientStalled(Duration),
    /// The upstream refused this client: its status and auth challenge.
    #[error("the upstream registry refused these credentials for this repository")]
    Denied {
        status: StatusCode,
        challenge: Option<HeaderValue>,
    },

    /// The upstream's.
    #[error("upstream registry: {0}")]
    Upstream(#[from] UpstreamError),

    // This node's.
    #[error("request loop: this request already passed through this regproxy")]
    LoopDetected,
    #[error("this node's cache could not {op}: {cause}")]
    Disk { op: &'static str, cause: Cause },
    /// Something of this node's that should not fail did (a fill task
    /// that ended without a result).
    #[error("this node failed: {0}")]
    Internal(&'static str),
    #[error("shutting down")]
    ShuttingDown,
    /// A prefetch's blob that the cache has no room for beside the pinned
    /// images and the fills in flight: a prefetch never streams uncached.
    #[error("no room in this node's cache (--cache-size) to keep it")]
    NoRoom,
}

impl Error {
    /// This node's cache disk failed at `op` (a verb: "create a temp file").
    pub fn disk(op: &'static str, e: io::Error) -> Error {
        Error::Disk {
            op,
            cause: Cause::new(e),
        }
    }

    /// An upstream answer that breaks the protocol.
    pub fn invalid(why: impl Into<String>) -> Error {
        Error::Upstream(UpstreamError::Invalid(why.into()))
    }

    /// An upstream error status where content was expected.
    pub fn status(what: impl Into<String>, status: StatusCode) -> Error {
        Error::Upstream(UpstreamError::Status {
            what: what.into(),
            status,
        })
    }

    /// One of ours somewhere in the chain of `e`: the error a body of
    /// ours ended with, as hyper reports it back.
    pub fn within(e: &(dyn std::error::Error + 'static)) -> Option<Error> {
        let mut next = Some(e);
        while let Some(e) = next {
            if let Some(ours) = e.downcast_ref::<Error>() {
                return Some(ours.clone());
            }
            next = e.source();
        }
        None
    }

    pub fn origin(&self) -> Origin {
        use Error::*;
        match self {
            Upstream(_) => Origin::Upstream,
            LoopDetected | Disk { .. } | Internal(_) | ShuttingDown | NoRoom => Origin::Node,
            DigestInvalid(_)
            | NameInvalid(_)
            | TagInvalid(_)
            | ManifestInvalid(_)
            | Unsupported(_)
            | MethodNotAllowed(_)
            | NotFound
            | RangeNotSatisfiable { .. }
            | BlobUnknown(_)
            | ManifestUnknown(_)
            | ClientStalled(_)
            | ClientAborted(_)
            | Denied { .. } => Origin::Client,
        }
    }

    /// The status and OCI code of the answer.
    ///
    /// The upstream's failures are a gateway's: 504 when it was too slow,
    /// 502 otherwise. The node's own failures are never 500 (a bug) nor 502
    /// (which would blame the upstream): a loop is 508 Loop Detected, and a
    /// disk that fails or a proxy that is shutting down is 503 Service
    /// Unavailable: this node cannot answer now, and a client with another
    /// host to try (containerd's `hosts.toml`) or a retry goes on.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        use Error::*;
        match self {
            DigestInvalid(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            NameInvalid(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            TagInvalid(_) => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
            ManifestInvalid(_) => (StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
            Unsupported(_) => (StatusCode::BAD_REQUEST, "UNSUPPORTED"),
            MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
            NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            RangeNotSatisfiable { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID"),
            BlobUnknown(_) => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            ManifestUnknown(_) => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            ClientStalled(_) => (StatusCode::REQUEST_TIMEOUT, "BLOB_UPLOAD_INVALID"),
            ClientAborted(_) => (StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID"),
            Denied { status, .. } if *status == StatusCode::FORBIDDEN => (*status, "DENIED"),
            Denied { .. } => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            Upstream(UpstreamError::Timeout { .. }) => (StatusCode::GATEWAY_TIMEOUT, "UNAVAILABLE"),
            Upstream(_) => (StatusCode::BAD_GATEWAY, "UNAVAILABLE"),
            LoopDetected => (StatusCode::LOOP_DETECTED, "UNAVAILABLE"),
            Disk { .. } | Internal(_) | ShuttingDown => {
                (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
            }
            NoRoom => (StatusCode::INSUFFICIENT_STORAGE, "UNAVAILABLE"),
        }
    }

    /// The OCI error response for this error.
    pub fn into_response(self) -> Response<Body> {
        let (status, code) = self.status_and_code();
        let body = serde_json::json!({
            "errors": [{ "code": code, "message": self.to_string(), "detail": null }]
        });
        let mut resp = Response::new(Body::full(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(API_VERSION, HeaderValue::from_static(API_VERSION_VALUE));
        match self {
            Error::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    h.insert(header::CONTENT_RANGE, v);
                }
            }
            Error::Denied {
                challenge: Some(c), ..
            } => {
                h.insert(header::WWW_AUTHENTICATE, c);
            }
            _ => {}
        }
        ensure_challenge(status, h);
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn errors_become_oci_json() {
        let resp = Error::BlobUnknown("sha256:00".into()).into_response();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["errors"][0]["code"], "BLOB_UNKNOWN",
            "the code is the OCI one"
        );
        assert!(v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("sha256:00"));
    }

    #[test]
    fn every_401_carries_a_challenge() {
        let resp = Error::Denied {
            status: StatusCode::UNAUTHORIZED,
            challenge: None,
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            resp.headers()[header::WWW_AUTHENTICATE],
            DEFAULT_CHALLENGE,
            "a 401 without the upstream's challenge should carry ours"
        );
        let theirs = HeaderValue::from_static("Bearer realm=\"https://auth.example/token\"");
        let resp = Error::Denied {
            status: StatusCode::UNAUTHORIZED,
            challenge: Some(theirs.clone()),
        }
        .into_response();
        assert_eq!(
            resp.headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .collect::<Vec<_>>(),
            [theirs],
            "the upstream's challenge is relayed alone"
        );
        let resp = Error::Denied {
            status: StatusCode::FORBIDDEN,
            challenge: None,
        }
        .into_response();
        assert!(
            !resp.headers().contains_key(header::WWW_AUTHENTICATE),
            "a 403 needs no challenge"
        );
    }

    #[test]
    fn the_nodes_own_failures_are_503_never_an_upstream_error() {
        for e in [
            Error::disk("write", io::Error::from(io::ErrorKind::StorageFull)),
            Error::Internal("test"),
            Error::ShuttingDown,
        ] {
            assert_eq!(e.origin(), Origin::Node, "{e}");
            assert_eq!(
                e.status_and_code().0,
                StatusCode::SERVICE_UNAVAILABLE,
                "{e}"
            );
        }
        assert_eq!(Error::LoopDetected.origin(), Origin::Node);
    }

    #[test]
    fn causes_are_classified_by_type_not_text() {
        let timed_out = Cause::new(io::Error::new(io::ErrorKind::TimedOut, "anything"));
        assert!(timed_out.is_io(io::ErrorKind::TimedOut));
        let says_timed_out = Cause::new(io::Error::other("connection timed out"));
        assert!(
            !says_timed_out.is_io(io::ErrorKind::TimedOut),
            "a message is not a kind"
        );
    }

    #[test]
    fn upstream_failures_are_gateway_errors_never_500() {
        let url = String::from("http://upstream");
        let cause = Cause::new(io::Error::from(io::ErrorKind::ConnectionRefused));
        for e in [
            UpstreamError::Unreachable {
                url: url.clone(),
                cause: cause.clone(),
            },
            UpstreamError::Broken {
                url: url.clone(),
                cause,
            },
            UpstreamError::Invalid("x".into()),
            UpstreamError::Timeout {
                url,
                wait: Wait::Connect,
            },
        ] {
            let e = Error::from(e);
            assert_eq!(e.origin(), Origin::Upstream);
            let s = e.status_and_code().0;
            assert!(
                s == StatusCode::BAD_GATEWAY || s == StatusCode::GATEWAY_TIMEOUT,
                "{e} gave {s}"
            );
        }
    }
}

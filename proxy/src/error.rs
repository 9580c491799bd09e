//! Typed errors, and the one place where they become OCI error responses
//! (`{"errors":[{"code","message","detail"}]}`).

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use crate::body::Body;

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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Client input.
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

    /// The upstream refused this client: its status and auth challenge.
    #[error("the upstream registry refused these credentials for this repository")]
    Denied {
        status: StatusCode,
        challenge: Option<HeaderValue>,
    },

    // Upstream.
    #[error("upstream registry unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream registry timed out: {0}")]
    UpstreamTimeout(String),
    #[error("upstream registry failed: {0}")]
    UpstreamBad(String),
    #[error("request loop: this request already passed through this regproxy")]
    LoopDetected,

    // Us.
    #[error("shutting down")]
    ShuttingDown,
}

impl Error {
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
            UpstreamUnreachable(_) | UpstreamBad(_) => (StatusCode::BAD_GATEWAY, "UNAVAILABLE"),
            UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "UNAVAILABLE"),
            LoopDetected => (StatusCode::LOOP_DETECTED, "UNAVAILABLE"),
            Denied { status, .. } if *status == StatusCode::FORBIDDEN => (*status, "DENIED"),
            Denied { .. } => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        }
    }

    /// Whether the upstream is to blame (counted in `regproxy_upstream_errors_total`).
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            Error::UpstreamUnreachable(_) | Error::UpstreamTimeout(_) | Error::UpstreamBad(_)
        )
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
        h.insert(
            "Docker-Distribution-API-Version",
            HeaderValue::from_static("registry/2.0"),
        );
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
    fn upstream_failures_are_gateway_errors_never_500() {
        for e in [
            Error::UpstreamUnreachable("x".into()),
            Error::UpstreamBad("x".into()),
            Error::UpstreamTimeout("x".into()),
        ] {
            let s = e.status_and_code().0;
            assert!(
                s == StatusCode::BAD_GATEWAY || s == StatusCode::GATEWAY_TIMEOUT,
                "{e} gave {s}"
            );
        }
    }
}

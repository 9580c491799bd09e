//! The admin API, `/admin/...`, on the admin listener only (never on the
//! probe socket or the API listener). Every endpoint, reads too (what is
//! cached names tenants' repositories and tags), needs `Authorization:
//! Bearer <token>` with the token of `--admin-token-file`; without that
//! flag they all answer 403. Answers are JSON, errors `{"error": "..."}`;
//! long operations stream NDJSON, one JSON value per line.
//!
//! | endpoint | does | owner |
//! |---|---|---|
//! | `GET /admin/rate`, `PUT /admin/rate` `{"rate": "20Mbit/s"}` | the uplink budget | [`crate::budget`] |
//! | `POST /admin/prefetch` `{"refs": [..], "platform": .., "pin": false}` | fetch images now (NDJSON) | [`crate::prefetch`] |
//! | `GET /admin/pins`, `POST /admin/unpin` `{"refs": [..]}` | pinned images | [`crate::pins`] |
//! | `GET /admin/cache`, `POST /admin/cache/rm` `{"target": ..}`, `POST /admin/cache/verify` `{"rate": ..}` | what is cached | [`crate::cache::admin`] |

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::api::App;
use crate::body::Body;

/// Largest request body the admin API reads.
const MAX_BODY: usize = 1 << 20;

/// Answers one `/admin/...` request.
pub(super) async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let Some(token) = app.admin_token() else {
        return error(
            StatusCode::FORBIDDEN,
            "the admin API is off: start serve with --admin-token-file",
        );
    };
    let want = format!("Bearer {token}");
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    if !crate::peers::constant_time_eq(given, want.as_bytes()) {
        let mut r = error(StatusCode::UNAUTHORIZED, "a valid admin token is required");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "a body past 1 MiB"),
    };
    let m = &parts.method;
    match (parts.uri.path(), m) {
        ("/admin/rate", &Method::GET) => rate(app),
        ("/admin/rate", &Method::PUT) => set_rate(app, &body),
        ("/admin/prefetch", &Method::POST) => crate::prefetch::admin_prefetch(app, body).await,
        ("/admin/pins", &Method::GET) => crate::pins::admin_pins(app, body).await,
        ("/admin/unpin", &Method::POST) => crate::pins::admin_unpin(app, body).await,
        ("/admin/cache", &Method::GET) => crate::cache::admin::admin_ls(app, body).await,
        ("/admin/cache/rm", &Method::POST) => crate::cache::admin::admin_rm(app, body).await,
        ("/admin/cache/verify", &Method::POST) => {
            crate::cache::admin::admin_verify(app, body).await
        }
        (
            "/admin/rate"
            | "/admin/prefetch"
            | "/admin/pins"
            | "/admin/unpin"
            | "/admin/cache"
            | "/admin/cache/rm"
            | "/admin/cache/verify",
            _,
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
}

fn rate(app: &App) -> Response<Body> {
    json_response(StatusCode::OK, &json!({ "rate": app.budget().rate() }))
}

/// `{"rate": "20Mbit/s"}`, `{"rate": "off"}` or `{"rate": <bytes/s>}`.
fn set_rate(app: &App, body: &[u8]) -> Response<Body> {
    let rate =
        match serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| match v.get("rate")? {
                Value::String(s) => Some(crate::units::parse_rate(s).map_err(|e| e.to_string())),
                Value::Number(n) => n.as_u64().map(Ok),
                _ => None,
            }) {
            Some(Ok(r)) => r,
            Some(Err(e)) => return error(StatusCode::BAD_REQUEST, &e),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "expected {\"rate\": \"20Mbit/s\"} or {\"rate\": <bytes per second>}",
                )
            }
        };
    app.budget().set_rate(rate);
    self::rate(app)
}

/// A JSON answer.
pub fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Body::full(Bytes::from(format!("{v}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `{"error": why}` with `status`.
pub fn error(status: StatusCode, why: &str) -> Response<Body> {
    json_response(status, &json!({ "error": why }))
}

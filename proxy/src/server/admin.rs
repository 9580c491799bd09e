//! The admin endpoints, on the admin listener and on the probe socket:
//! `/metrics`, `/healthz`, `/readyz` (not ready while shutting down, or
//! while a node-path check fails), and
//! [`crate::instance::PATH`]. On the admin listener only, `/admin/...` goes
//! to [`super::admin_api`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::Listener;
use crate::api::App;
use crate::body::Body;

/// The admin endpoints, with the same limits as the API, and slots kept for
/// the node itself: a flood of connections from elsewhere takes no probe
/// away from kubelet.
pub(super) async fn admin_loop(listener: Listener, app: Arc<App>, ready: Arc<AtomicBool>) {
    loop {
        let (stream, _, permit) = listener.accept(app.metrics()).await;
        let (app, ready) = (Arc::clone(&app), Arc::clone(&ready));
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let (app, ready) = (Arc::clone(&app), Arc::clone(&ready));
            async move {
                let resp = match req.uri().path().starts_with("/admin/") {
                    true => super::admin_api::handle(&app, req).await,
                    false => admin_response(req.uri(), &app, ready.load(Ordering::SeqCst)),
                };
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let conn = listener.http1().serve_connection(TokioIo::new(stream), svc);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
}

pub(super) fn admin_response(uri: &http::Uri, app: &App, ready: bool) -> Response<Body> {
    let (status, ctype, body) = match uri.path() {
        "/metrics" => {
            let mut text = app.metrics().render();
            app.budget().render(&mut text);
            if let Some(pins) = app.pins() {
                pins.render_metrics(&mut text);
            }
            (StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        // Which process answers here (as on the API listener): how
        // `regproxy doctor` tells this proxy from whatever else answers on
        // the registry address.
        crate::instance::PATH => (
            StatusCode::OK,
            "text/plain",
            // The bare id: a proof of a nonce only on the API listener,
            // or anyone who reaches this port could relay one.
            crate::instance::id().to_owned(),
        ),
        "/readyz" if !ready => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "shutting down\n".to_owned(),
        ),
        // A node whose pulls of the registry name do not reach this proxy
        // is not served by it, whatever the process itself can do.
        "/readyz" => match app.node_not_ready() {
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", why),
            None => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut r = Response::new(Body::full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
    r
}

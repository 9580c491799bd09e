//! `POST /admin/prefetch` `{"refs":[..],"platform":null|"os/arch[/variant]","pin":false}`:
//! prefetches the refs two at a time and streams every event as a line of
//! NDJSON with its `ref`, then `{"event":"summary","ok":N,"failed":M}`.
//! A client that hangs up stops it (fills already started finish).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Deserialize;
use tokio::sync::mpsc::UnboundedSender;

use super::{run, Event, Fetched, Target};
use crate::api::App;
use crate::body::{Body, BoxError};
use crate::server::admin_api::error;

/// Refs prefetched at once.
const REFS_AT_ONCE: usize = 2;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    refs: Vec<String>,
    #[serde(default)]
    platform: Option<String>,
    #[serde(default)]
    pin: bool,
}

pub async fn admin_prefetch(app: &Arc<App>, body: Bytes) -> Response<Body> {
    let req: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("the body is not a prefetch request: {e}"),
            )
        }
    };
    if req.refs.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no refs to prefetch");
    }
    let targets: Result<Vec<Target>, String> = req
        .refs
        .iter()
        .map(|r| Target::parse(r, req.platform.as_deref()))
        .collect();
    let targets = match targets {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let app = Arc::clone(app);
    tokio::spawn(async move {
        tokio::select! {
            _ = all(&app, targets, req.pin, &tx) => {}
            _ = tx.closed() => tracing::info!("the prefetch's client hung up; prefetch stopped"),
            // The stream ends without its summary: the client says so.
            _ = app.stopping().cancelled() => tracing::info!("shutting down; prefetch stopped"),
        }
    });
    let lines = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(Ok::<_, BoxError>);
    let mut r = Response::new(Body::stream(lines, None));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// Runs every target, `REFS_AT_ONCE` at a time, sending events to `tx`.
async fn all(app: &Arc<App>, targets: Vec<Target>, pin: bool, tx: &UnboundedSender<Bytes>) {
    let runs: Vec<_> = targets.into_iter().map(|t| one(app, t, pin, tx)).collect();
    let results: Vec<bool> = futures_util::stream::iter(runs)
        .buffer_unordered(REFS_AT_ONCE)
        .collect()
        .await;
    let ok = results.iter().filter(|ok| **ok).count();
    let summary = serde_json::json!({"event": "summary", "ok": ok, "failed": results.len() - ok});
    let _ = tx.send(line(summary));
}

async fn one(app: &Arc<App>, t: Target, pin: bool, tx: &UnboundedSender<Bytes>) -> bool {
    let started = Instant::now();
    let send = |e: Event| {
        let mut v = serde_json::to_value(e).expect("events serialize");
        v["ref"] = t.reference.clone().into();
        let _ = tx.send(line(v));
    };
    let mut events = send;
    let mut r = run(app, &t, &mut events).await;
    if pin {
        if let Ok(f) = &r {
            if let Err(e) = pin_fetched(app, &t, f).await {
                r = Err(format!("fetched, but not pinned: {e}"));
            }
        }
    }
    // Pinned or not, an image the cache could not keep whole failed.
    if let Ok(f) = &r {
        if !f.unkept.is_empty() {
            let kept = if pin { "pinned, " } else { "" };
            r = Err(format!(
                "{kept}but {} of its blobs did not fit in the cache (--cache-size) and were not fetched",
                f.unkept.len()
            ));
        }
    }
    match &r {
        Ok(f) => {
            tracing::info!(reference = %t.reference, digest = %f.top, bytes = f.bytes, fetched = f.fetched, seconds = started.elapsed().as_secs_f64(), pin, "prefetched")
        }
        Err(e) => tracing::warn!(reference = %t.reference, error = %e, "prefetch failed"),
    }
    events(Event::finished(&r, started, pin && r.is_ok()));
    r.is_ok()
}

/// The one place a completed prefetch becomes a pin (`crate::pins`).
async fn pin_fetched(app: &Arc<App>, t: &Target, f: &Fetched) -> Result<(), String> {
    crate::pins::pin_fetched(app, t, f, crate::pins::Source::Api).await
}

fn line(v: serde_json::Value) -> Bytes {
    let mut b = serde_json::to_vec(&v).expect("JSON serializes");
    b.push(b'\n');
    Bytes::from(b)
}

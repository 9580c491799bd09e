//! Listeners, the accept loops, the admin endpoints and graceful shutdown.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::api::App;
use crate::auth::Auth;
use crate::tags::Tags;

use crate::body::Body;
use crate::cache::Cache;
use crate::config::{LogFormat, ServeArgs};
use crate::metrics::Metrics;
use crate::resolve::Resolver;

use crate::upstream::Upstream;

pub fn init_tracing(args: &ServeArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);

    match args.log_format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().flatten_event(true).init(),
    }
}

/// Validates the configuration, opens the cache, binds, and serves until
/// SIGTERM or SIGINT.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let via = instance_token();
    let resolver = Resolver::new(args.upstream_resolver)
        .map_err(|e| anyhow::anyhow!("cannot set up the upstream resolver: {e}"))?;
    refuse_self_upstream(&args, &resolver).await?;
    let mut upstream = Upstream::new(
        args.upstream.clone(),
        resolver,
        args.upstream_ca.as_deref(),
        args.connect_timeout,
        args.upstream_timeout,
        &via,
        Arc::clone(&metrics),
    )?;
    let dir = args.cache_dir.clone();
    let (cap, m) = (args.cache_size, Arc::clone(&metrics));
    let cache = tokio::task::spawn_blocking(move || Cache::open(&dir, cap, m))
        .await?
        .map_err(|e| anyhow::anyhow!("cannot open cache dir {}: {e}", args.cache_dir.display()))?;

    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let admin = match args.admin_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {a}: {e}"))?,
        ),
        None => None,
    };
    // Redirects to our own listeners are refused.
    upstream.set_own_addrs(
        std::iter::once(&listener)
            .chain(&admin)
            .filter_map(|l| l.local_addr().ok()),
    );
    let tags = Arc::new(Tags::open(&args.cache_dir, args.tag_ttl));
    let auth = Auth::open(
        &args.cache_dir,
        args.auth_ttl,
        tags.upstream_open(),
        args.remember_allowed,
    )
    .map_err(|e| anyhow::anyhow!("cannot set up {}: {e}", args.cache_dir.display()))?;
    let app = Arc::new(App {
        cache: Arc::new(cache),
        upstream: Arc::new(upstream),
        metrics,
        tags,
        auth,
        via,
        retries: args.upstream_retries,
        open_due: Default::default(),
        realms: Default::default(),
    });
    // Learn whether the upstream lets anyone in now, not when a client
    // happens to ask `/v2/` (containerd never does).
    tokio::spawn(Arc::clone(&app).watch_openness());
    if args.remember_allowed.is_some() {
        tokio::spawn(save_allowed_every(Arc::clone(&app), SAVE_ALLOWED_EVERY));
    }
    tracing::info!(
        addr = %listener.local_addr()?,
        upstream = %args.upstream,
        cache_dir = %args.cache_dir.display(),
        cache_size = args.cache_size,
        "regproxy listening"
    );
    run(
        listener,
        admin,
        Arc::clone(&app),
        shutdown_signal(),
        args.shutdown_grace,
    )
    .await;
    save_allowed(&app).await;
    Ok(())
}

/// How often the remembered yeses (`--remember-allowed`) are written when
/// they changed: a crash loses at most this much of them.
const SAVE_ALLOWED_EVERY: Duration = Duration::from_secs(5);

async fn save_allowed_every(app: Arc<App>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        save_allowed(&app).await;
    }
}

async fn save_allowed(app: &Arc<App>) {
    let a = Arc::clone(app);
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || a.auth.save()).await {
        tracing::warn!(error = %e, "could not save the remembered authorizations");
    }
}

/// A token that names this process in `Via` headers.
fn instance_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("regproxy-{:016x}", h.finish())
}

/// Refuses an upstream that resolves to our own listen address: on a node
/// whose `/etc/hosts` maps the registry name to this proxy, that is a loop.
async fn refuse_self_upstream(args: &ServeArgs, resolver: &Resolver) -> anyhow::Result<()> {
    let host = args
        .upstream
        .host()
        .unwrap_or_default()
        .trim_matches(['[', ']']);
    let port = args
        .upstream
        .port_u16()
        .unwrap_or(if args.upstream.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let Ok(addrs) = resolver.resolve(host, port).await else {
        // Not resolvable now: the proxy still starts and answers 502 until it is.
        tracing::warn!(host, "upstream host does not resolve yet");
        return Ok(());
    };
    let l = args.listen;
    for a in addrs {
        let same_ip = a.ip() == l.ip()
            || (l.ip().is_unspecified() && (a.ip().is_loopback() || a.ip().is_unspecified()));
        if same_ip && a.port() == l.port() {
            anyhow::bail!(
                "the upstream {} resolves to {a}, which is this proxy's own --listen address: \
                 that is a loop (is the registry name mapped to the proxy in /etc/hosts?); \
                 point --upstream at a name or address that reaches the real registry",
                args.upstream
            );
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Serves the API on `listener` (and the admin endpoints on `admin`) until
/// `shutdown` completes; then stops accepting, reports not-ready, and lets
/// transfers in flight finish for at most `grace`.
pub async fn run(
    listener: TcpListener,
    admin: Option<TcpListener>,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let ready = Arc::new(AtomicBool::new(true));
    let graceful = GracefulShutdown::new();
    let admin_task = admin.map(|l| {
        if let Ok(a) = l.local_addr() {
            tracing::info!(addr = %a, "admin listening");
        }
        tokio::spawn(admin_loop(l, Arc::clone(&app), Arc::clone(&ready)))
    });
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = Arc::clone(&app);
        let svc = service_fn(move |req| {
            let app = Arc::clone(&app);
            async move { Ok::<_, std::convert::Infallible>(app.handle(req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            .instrument(tracing::debug_span!("conn", client.addr = %peer)),
        );
    }
    drop(listener);
    ready.store(false, Ordering::SeqCst);
    tracing::info!(grace = ?grace, "stopped accepting; waiting for transfers in flight");
    let deadline = tokio::time::Instant::now() + grace;
    // Fills run on their own tasks (a client may have hung up): let them
    // finish and commit too, so that what was fetched is kept.
    let fills_done = async {
        while app.metrics.fills_inflight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = async { tokio::join!(graceful.shutdown(), fills_done) } => tracing::info!("all connections closed, all fills committed"),
        _ = tokio::time::sleep_until(deadline) => tracing::warn!("grace period over; cutting remaining transfers"),
    }

    if let Some(t) = admin_task {
        t.abort();
    }
}

async fn admin_loop(listener: TcpListener, app: Arc<App>, ready: Arc<AtomicBool>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors: do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };

        let (app, ready) = (Arc::clone(&app), Arc::clone(&ready));
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let resp = admin_response(req.uri().path(), &app, ready.load(Ordering::SeqCst));
            async move { Ok::<_, std::convert::Infallible>(resp) }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn admin_response(path: &str, app: &App, ready: bool) -> Response<Body> {
    let (status, ctype, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            app.metrics.render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" if ready => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "shutting down\n".to_owned(),
        ),
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

//! Listeners, the accept loops and graceful shutdown; `admin`: the admin
//! endpoints.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::Instrument;

mod admin;
pub mod admin_api;
mod listener;
pub mod probe;
mod sockets;

pub use listener::Limits;
use listener::{Listener, PastCap};

pub use sockets::migrates_queued_connections;
use sockets::{bind_shared, raise_fd_limit};

use crate::api::App;
use crate::auth::Auth;
use crate::tags::Tags;

use crate::cache::Cache;
use crate::config::{Config, LogConfig, LogFormat};
use crate::lock::CacheLock;
use crate::metrics::Metrics;
use crate::resolve::Resolver;

use crate::upstream::Upstream;

pub fn init_tracing(log: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);

    match log.format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().flatten_event(true).init(),
    }
}

/// Opens the cache, binds, and serves until SIGTERM or SIGINT.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    // A bad credential file is a bad flag: said before anything is bound.
    let prefetch_auth = match &config.prefetch_auth_file {
        Some(path) => {
            let host = config.upstream.url.authority().map_or("", |a| a.as_str());
            let cred = crate::prefetch::authfile::load(path, host)
                .map_err(|e| anyhow::anyhow!("--prefetch-auth-file {e}"))?;
            Some(cred)
        }
        None => None,
    };
    // Before anything else: nothing in the dir is touched unless it is ours.
    let lock = Arc::new(CacheLock::acquire(&config.cache_dir, config.listen)?);
    // Two listeners' connections, the mapped cache files (each keeps its
    // descriptor for `sendfile`), and fills, upstream connections and the rest.
    let open_files = 2 * config.limits.max_connections + crate::cache::OPEN_FILES + 1024;
    raise_fd_limit(open_files as u64);
    let metrics = Arc::new(Metrics::default());
    let resolver = Resolver::new(config.upstream.resolver)
        .map_err(|e| anyhow::anyhow!("cannot set up the upstream resolver: {e}"))?;
    refuse_self_upstream(&config, &resolver).await?;
    let mut upstream = Upstream::new(&config.upstream, resolver.clone(), Arc::clone(&metrics))?;
    let dir = config.cache_dir.clone();
    let (cap, m) = (config.cache_size, Arc::clone(&metrics));
    let primary = lock.is_primary();
    let cache = tokio::task::spawn_blocking(move || Cache::open(&dir, cap, m, primary))
        .await?
        .map_err(|e| {
            anyhow::anyhow!("cannot open cache dir {}: {e}", config.cache_dir.display())
        })?;

    // Without the key the node-path check falls back to matching ids: worse
    // than a proof, far better than not serving the node.
    if let Err(e) = crate::instance::init_key(&config.cache_dir, true) {
        tracing::warn!(error = %e, "no instance key: reaches_us matches ids instead of proofs");
    }
    let server = Server::bind(&config).await?;
    // Redirects to our own listeners are refused.
    upstream.set_own_addrs(server.addrs());
    let tags = Tags::open(&config.cache_dir, config.tag_ttl);
    let auth = Auth::open(&config.cache_dir, &config.auth)
        .map_err(|e| anyhow::anyhow!("cannot set up {}: {e}", config.cache_dir.display()))?;
    // The node path (--registry-name): kept and checked from now on, the
    // first round at once, now that the API listener is bound.
    let node = crate::node::start(&config, server.api.local_addr()?, &metrics)?;
    let peers = config.peers.as_ref().map(|p| {
        let patience = config.upstream.timeout;
        crate::peers::Peers::new(p, patience, resolver.clone(), Arc::clone(&metrics))
    });
    let app = App::new(cache, upstream, tags, auth, metrics)
        .with_node(node)
        .with_peers(peers.clone())
        .with_admin_token(config.admin_token.clone())
        .with_prefetch_auth(prefetch_auth);
    let pins = crate::pins::Pins::open(
        &config.cache_dir,
        Arc::clone(app.cache()),
        config.prefetch_file.clone(),
        config.tag_ttl,
    );
    let app = Arc::new(app.with_pins(Arc::new(pins)));
    if let Some(peers) = peers {
        tokio::spawn(peers.run());
    }
    // As the cache was opened: a predecessor that exited meanwhile still
    // leaves this process a sweep and a rebuild to do.
    if !primary {
        let (app, lock) = (Arc::clone(&app), Arc::clone(&lock));
        tokio::spawn(async move {
            lock.primary().await;
            app.cache_dir_is_ours().await;
        });
    }
    if migrates_queued_connections() == Some(false) {
        tracing::warn!(
            "net.ipv4.tcp_migrate_req is 0: when this process or its predecessor stops \
             listening, connections queued on its listener are reset rather than handed to \
             the other (run `regproxy sysctl` on the node)"
        );
    }
    // Learn whether the upstream lets anyone in now, not when a client
    // happens to ask `/v2/` (containerd never does).
    tokio::spawn(Arc::clone(&app).watch_openness());
    if config.auth.remember.is_some() {
        tokio::spawn(save_allowed_every(Arc::clone(&app), SAVE_ALLOWED_EVERY));
    }
    tracing::info!(
        addr = %server.api.local_addr()?,
        upstream = %config.upstream.url,
        cache_dir = %config.cache_dir.display(),
        cache_size = config.cache_size,
        "regproxy listening"
    );
    if let Some(path) = &config.ready_file {
        let admin = server
            .admin
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        let peer = server
            .peer
            .as_ref()
            .map(|(l, _)| l.local_addr())
            .transpose()?;
        let ready = serde_json::json!({
            "listen": [server.api.local_addr()?],
            "admin": admin,
            "peer": peer,
        });
        write_atomically(path, ready.to_string().as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    // The pins' background prefetches stop when shutdown starts: a fill
    // they would start then would only hold up the drain.
    let stop = app.stopping().clone();
    crate::pins::start(&app, stop.clone());
    let shutdown = async move {
        shutdown_signal().await;
        stop.cancel();
    };
    server.run(Arc::clone(&app), shutdown).await;
    app.save_allowed().await;
    // Fills past the grace period and their commits end only with the
    // runtime: the lock is held until the process exits, so that no
    // successor sweeps a dir this process still writes.
    std::mem::forget(lock);
    Ok(())
}

/// Writes `bytes` to `path` through a temp file beside it and a rename, so
/// that a reader sees the whole file or none.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// How often the remembered yeses (`--remember-allowed`) are written when
/// they changed: a crash loses at most this much of them.
const SAVE_ALLOWED_EVERY: Duration = Duration::from_secs(5);

async fn save_allowed_every(app: Arc<App>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        app.save_allowed().await;
    }
}

/// Refuses an upstream that resolves to our own listen address: on a node
/// whose `/etc/hosts` maps the registry name to this proxy, that is a loop.
async fn refuse_self_upstream(config: &Config, resolver: &Resolver) -> anyhow::Result<()> {
    let url = &config.upstream.url;
    let host = url.host().unwrap_or_default().trim_matches(['[', ']']);
    let port = url
        .port_u16()
        .unwrap_or(if url.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let Ok(addrs) = resolver.resolve(host, port).await else {
        // Not resolvable now: the proxy still starts and answers 502 until it is.
        tracing::warn!(host, "upstream host does not resolve yet");
        return Ok(());
    };
    let l = config.listen;
    for a in addrs {
        let same_ip = a.ip() == l.ip()
            || (l.ip().is_unspecified() && (a.ip().is_loopback() || a.ip().is_unspecified()));
        if same_ip && a.port() == l.port() {
            anyhow::bail!(
                "the upstream {} resolves to {a}, which is this proxy's own --listen address: \
                 that is a loop (is the registry name mapped to the proxy in /etc/hosts?); \
                 point --upstream at a name or address that reaches the real registry",
                url
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

/// The bound listeners, and how they serve and drain.
pub struct Server {
    api: TcpListener,
    admin: Option<TcpListener>,
    /// `--peer-listen`: other nodes' proxies (see [`crate::peers`]), and
    /// its limits.
    peer: Option<(TcpListener, Limits)>,
    /// `--probe-socket`: the admin endpoints of this process alone.
    probe: Option<tokio::net::UnixListener>,
    limits: Limits,
    /// `--shutdown-grace`: how long transfers in flight may take to finish.
    grace: Duration,
}

/// Which requests a listener's connections carry.
#[derive(Clone, Copy)]
enum Face {
    /// The registry API, for the node's clients.
    Api,
    /// The peer listener, for other nodes.
    Peer,
}

/// What every connection of every listener shares for the drain.
#[derive(Clone)]
struct Conns {
    /// Told to every connection when draining starts.
    stop: tokio_util::sync::CancellationToken,
    /// Awaited when draining.
    tracker: tokio_util::task::TaskTracker,
}

impl Server {
    /// Binds the API listener and, if configured, the admin and peer ones.
    pub async fn bind(config: &Config) -> anyhow::Result<Server> {
        let bind = |a: SocketAddr| {
            bind_shared(a).map_err(|e| anyhow::anyhow!("cannot listen on {a}: {e}"))
        };
        let admin = match config.admin_listen {
            Some(a) => Some(bind(a)?),
            None => None,
        };
        // Peers send their request heads at once, and keep a connection
        // idle for less than `--peer-timeout` (see `Peers::new`): whoever
        // holds one longer is no peer.
        let peer = match &config.peers {
            Some(p) => {
                let mut limits = config.limits;
                limits.header_read_timeout = limits.header_read_timeout.min(p.timeout);
                Some((bind(p.listen)?, limits))
            }
            None => None,
        };
        let probe = config
            .probe_socket
            .as_deref()
            .map(probe::bind)
            .transpose()?;
        Ok(Server {
            api: bind(config.listen)?,
            admin,
            peer,
            probe,
            limits: config.limits,
            grace: config.shutdown_grace,
        })
    }

    /// The addresses bound.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        std::iter::once(&self.api)
            .chain(&self.admin)
            .chain(self.peer.as_ref().map(|(l, _)| l))
            .filter_map(|l| l.local_addr().ok())
    }

    /// Serves the API (and the admin and peer endpoints) until `shutdown`
    /// completes; then stops accepting, reports not-ready, and lets
    /// transfers and fills in flight finish within the grace period.
    pub async fn run(self, app: Arc<App>, shutdown: impl Future<Output = ()>) {
        let Server {
            api: listener,
            admin,
            peer,
            probe,
            limits,
            grace,
        } = self;
        let ready = Arc::new(AtomicBool::new(true));
        let conns = Conns {
            stop: tokio_util::sync::CancellationToken::new(),
            tracker: tokio_util::task::TaskTracker::new(),
        };
        // This pod's probes, answered through the grace period too: it is
        // shutting down (not ready), yet alive.
        let probe_task =
            probe.map(|l| tokio::spawn(probe::serve(l, Arc::clone(&app), Arc::clone(&ready))));
        let admin_task = admin.map(|l| {
            if let Ok(a) = l.local_addr() {
                tracing::info!(addr = %a, "admin listening");
            }
            let l = Listener::new(l, limits, PastCap::Refuse, "admin");
            tokio::spawn(admin::admin_loop(l, Arc::clone(&app), Arc::clone(&ready)))
        });
        // Peers are served like clients, and stop being accepted with them.
        let accepting = tokio_util::sync::CancellationToken::new();
        let peer_task = peer.map(|(l, peer_limits)| {
            if let Ok(a) = l.local_addr() {
                tracing::info!(addr = %a, "peer listener listening");
            }
            // Past the cap a peer is told at once (503) and asks the
            // upstream, rather than wait behind connections that may be
            // anyone's: the port is reachable from every pod.
            let l = Listener::new(l, peer_limits, PastCap::Refuse, "peer");
            let (app, conns, until) = (Arc::clone(&app), conns.clone(), accepting.clone());
            tokio::spawn(async move {
                accept_loop(&l, &app, Face::Peer, &conns, until.cancelled()).await;
                l
            })
        });
        let listener = Listener::new(listener, limits, PastCap::Wait, "api");
        accept_loop(&listener, &app, Face::Api, &conns, shutdown).await;
        accepting.cancel();
        let peer_listener = match peer_task {
            Some(t) => t.await.ok(),
            None => None,
        };
        // The listeners close at once: a successor sharing their addresses
        // (`SO_REUSEPORT`) gets every new connection, probes included.
        drop(listener);
        drop(peer_listener);
        ready.store(false, Ordering::SeqCst);
        if let Some(t) = &admin_task {
            t.abort();
        }
        tracing::info!(grace = ?grace, "stopped accepting; waiting for transfers in flight");
        let deadline = tokio::time::Instant::now() + grace;
        // Fills run on their own tasks (a client may have hung up): let them
        // finish and commit too, so that what was fetched is kept. Only requests
        // start fills, so once the connections are closed no more can start.
        let drained = async {
            conns.stop.cancel();
            conns.tracker.close();
            conns.tracker.wait().await;
            app.fills_done().await;
        };
        tokio::select! {
            _ = drained => tracing::info!("all connections closed, all fills committed"),
            _ = tokio::time::sleep_until(deadline) => tracing::warn!("grace period over; cutting remaining transfers"),
        }
        if let Some(t) = probe_task {
            t.abort();
        }
    }
}

/// Accepts connections on `listener` and serves them as `face` until
/// `until` completes.
async fn accept_loop(
    listener: &Listener,
    app: &Arc<App>,
    face: Face,
    conns: &Conns,
    until: impl Future<Output = ()>,
) {
    tokio::pin!(until);
    loop {
        let (stream, peer, permit) = tokio::select! {
            _ = &mut until => return,
            c = listener.accept(app.metrics()) => c,
        };
        let _ = stream.set_nodelay(true);
        // Hits' bytes leave by `sendfile` (see `crate::sendfile`).
        let sent = Arc::clone(&app.metrics().sendfile_bytes);
        let app = Arc::clone(app);
        let started = Arc::new(tokio::sync::Notify::new());
        let started2 = Arc::clone(&started);
        let draining = conns.stop.clone();
        let svc = service_fn(move |req| {
            started2.notify_one();
            let (app, draining) = (Arc::clone(&app), draining.clone());
            async move {
                let mut resp = match face {
                    Face::Api => app.handle(req).await,
                    Face::Peer => app.handle_peer(req).await,
                };
                // An answer written before this connection hears of
                // the drain must still tell the client not to reuse it.
                if draining.is_cancelled() {
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let io = TokioIo::new(crate::sendfile::Conn::new(stream, sent));
        let conn = listener.http1().serve_connection(io, svc);
        let stop = conns.stop.clone();
        conns.tracker.spawn(
            async move {
                tokio::pin!(conn);
                let ended = tokio::select! {
                    r = conn.as_mut() => Some(r),
                    _ = stop.cancelled() => None,
                };
                // hyper's graceful shutdown closes a connection that has
                // not read a request yet, unanswered, and a client that
                // sent one on a fresh connection does not retry it: let
                // the first request start (the header read timeout
                // bounds the wait), then finish it and close.
                let ended = match ended {
                    Some(r) => Some(r),
                    None => tokio::select! {
                        r = conn.as_mut() => Some(r),
                        _ = started.notified() => None,
                    },
                };
                let r = match ended {
                    Some(r) => r,
                    None => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                drop(permit);
            }
            .instrument(tracing::debug_span!("conn", client.addr = %peer)),
        );
    }
}

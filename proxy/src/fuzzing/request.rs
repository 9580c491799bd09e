//! The `request` target: raw bytes, as a client would send them, into the
//! real [`App`] over an in-memory connection served by hyper as the server
//! serves one. The upstream is a closed port on loopback; the cache dir is
//! a scratch dir holding one blob, one manifest and a tag for it, so that
//! hits, Range reads and stale tags are reached too.
//!
//! Invariants: nothing panics, no answer is a 500 (a client's bytes are
//! never this node's failure), nothing is written outside the cache dir,
//! and every exchange ends.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::StatusCode;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::App;
use crate::digest::Digest;

/// The blob and manifest the cache dir starts with.
pub const BLOB: &[u8] = b"hello from the fuzzed cache\n";
pub const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#;
const MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

struct Harness {
    rt: tokio::runtime::Runtime,
    app: Arc<App>,
    /// The scratch dir around the cache dir: nothing may appear in it
    /// beside `cache`.
    dir: std::path::PathBuf,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let dir = super::workdir().join("request");
        let cache_dir = dir.join("cache");
        let _ = std::fs::remove_dir_all(&dir);
        seed_cache(&cache_dir).expect("the cache dir can be seeded");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let app = rt.block_on(async { app(&cache_dir) });
        Harness { rt, app, dir }
    })
}

fn seed_cache(cache_dir: &std::path::Path) -> std::io::Result<()> {
    let put = |data: &[u8], media_type: Option<&str>| -> std::io::Result<Digest> {
        let d = Digest::of(data);
        let p = crate::cache::content_path(cache_dir, &d);
        std::fs::create_dir_all(p.parent().expect("a parent"))?;
        std::fs::write(&p, data)?;
        if let Some(t) = media_type {
            // The media type beside the content, as the cache keeps it.
            let mut tp = p.clone().into_os_string();
            tp.push(".type");
            std::fs::write(tp, t)?;
        }
        Ok(d)
    };
    put(BLOB, None)?;
    let m = put(MANIFEST, Some(MEDIA_TYPE))?;
    let state = serde_json::json!({"tags": [["library/app", "v1", {
        "digest": m.to_string(), "media_type": MEDIA_TYPE, "checked_ms": 1u64,
    }]]});
    std::fs::write(cache_dir.join("state.json"), state.to_string())?;
    std::fs::write(cache_dir.join("open.json"), r#"{"upstream_open":true}"#)
}

fn app(cache_dir: &std::path::Path) -> Arc<App> {
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let config = crate::config::UpstreamConfig {
        // Port 1 on loopback: refused at once, never a wait.
        url: "http://127.0.0.1:1".parse().expect("a URL"),
        ca: None,
        resolver: crate::resolve::ResolverMode::System,
        connect_timeout: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
        retries: 0,
        rate: 0,
    };
    let resolver = crate::resolve::Resolver::new(config.resolver).expect("a resolver");
    let upstream = crate::upstream::Upstream::new(&config, resolver, Arc::clone(&metrics))
        .expect("an upstream client");
    let cache = crate::cache::Cache::open(cache_dir, 1 << 20, Arc::clone(&metrics), true)
        .expect("the cache opens");
    let tags = crate::tags::Tags::open(cache_dir, Duration::from_secs(30));
    let auth = crate::auth::Auth::open(
        cache_dir,
        &crate::config::AuthConfig {
            ttl: Duration::from_secs(60),
            remember: None,
        },
    )
    .expect("auth opens");
    Arc::new(App::new(cache, upstream, tags, auth, metrics))
}

/// Longest one input may take: everything it reaches fails fast (a
/// refused upstream), so past this something hangs.
const DEADLINE: Duration = Duration::from_secs(20);

/// Sends `data` on one connection, reads until the server closes it, and
/// checks what the App answered.
pub fn request(data: &[u8]) {
    let h = harness();
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&statuses);
    let app = Arc::clone(&h.app);
    h.rt.block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let svc = service_fn(move |req| {
            let (app, seen) = (Arc::clone(&app), Arc::clone(&seen));
            async move {
                let resp = app.handle(req).await;
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(resp.status());
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let mut http1 = hyper::server::conn::http1::Builder::new();
        // The client's EOF ends its input, not the exchange: the requests
        // it sent are answered.
        http1
            .half_close(true)
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(5));
        let conn = tokio::spawn(http1.serve_connection(TokioIo::new(server), svc));
        let exchange = async {
            // The server may answer and close before reading it all.
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            let _ = conn.await;
            h.app.fills_done().await;
        };
        tokio::time::timeout(DEADLINE, exchange)
            .await
            .expect("an exchange ends within the deadline");
    });
    for s in statuses.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        assert_ne!(
            *s,
            StatusCode::INTERNAL_SERVER_ERROR,
            "a request was answered 500"
        );
    }
    let others: Vec<_> = std::fs::read_dir(&h.dir)
        .expect("the scratch dir")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .filter(|n| n != "cache")
        .collect();
    assert!(others.is_empty(), "files outside the cache dir: {others:?}");
}

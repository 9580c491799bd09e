//! Probes that only this process answers: the admin endpoints on a Unix
//! socket (`serve --probe-socket`), and `regproxy probe`, which kubelet
//! runs in the pod's container to ask it.
//!
//! During a handover the old and the new pod share the TCP admin address
//! (`SO_REUSEPORT`), so an `httpGet` probe of either pod is answered by
//! whichever process the kernel picks: the new pod could look started and
//! ready before its own process runs, and the old one could look unready
//! (the DaemonSet controller deletes an unready old pod at once). Each
//! pod's socket is in its own `emptyDir`, so its probes reach its process.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

use crate::api::App;

/// The endpoint a probe asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Endpoint {
    Healthz,
    Readyz,
}

#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// `healthz` (the process runs: startup and liveness) or `readyz`.
    #[arg(value_enum)]
    pub endpoint: Endpoint,
    /// The `--probe-socket` of the `serve` to ask.
    #[arg(long = "socket", env = "REGPROXY_PROBE_SOCKET")]
    pub socket: PathBuf,
}

/// How long a probe waits for the answer; kubelet's own timeout is longer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(900);

/// Asks `serve`'s probe socket; the answer's body when it is 200.
pub fn probe(args: &ProbeArgs) -> Result<String, String> {
    let path = match args.endpoint {
        Endpoint::Healthz => "/healthz",
        Endpoint::Readyz => "/readyz",
    };
    let sock = args.socket.display();
    let mut s = UnixStream::connect(&args.socket)
        .map_err(|e| format!("no regproxy answers on {sock}: {e}"))?;
    let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
    let _ = s.set_write_timeout(Some(PROBE_TIMEOUT));
    write!(s, "GET {path} HTTP/1.0\r\nhost: probe\r\n\r\n")
        .map_err(|e| format!("cannot ask {sock}: {e}"))?;
    let mut answer = Vec::new();
    // Admin answers are small; a cap keeps a confused peer from costing more.
    s.take(64 << 10)
        .read_to_end(&mut answer)
        .map_err(|e| format!("no answer on {sock}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("none");
    if status == "200" {
        Ok(body.to_owned())
    } else {
        Err(format!("{path}: {status} {}", body.trim()))
    }
}

/// Binds the probe socket at `path`. A socket file that no process answers
/// on (left by one that was killed) is replaced; one that answers is not.
pub(super) fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    let stale = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
        && UnixStream::connect(path).is_err();
    if stale {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))
}

/// Serves the admin endpoints on the probe socket. Only this pod's
/// container reaches it: no connection cap beyond the kernel's backlog.
pub(super) async fn serve(listener: UnixListener, app: Arc<App>, ready: Arc<AtomicBool>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (app, ready) = (Arc::clone(&app), Arc::clone(&ready));
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let ready = ready.load(std::sync::atomic::Ordering::SeqCst);
            let resp = super::admin::admin_response(req.uri(), &app, ready);
            async move { Ok::<_, std::convert::Infallible>(resp) }
        });
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(PROBE_TIMEOUT);
        let conn = b.serve_connection(TokioIo::new(stream), svc);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

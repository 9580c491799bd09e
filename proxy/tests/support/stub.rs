//! A scripted HTTP server on a port of its own, for what a real registry will
//! not do: answer a 401 without a challenge, or redirect wherever a test says.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

pub type Answer = Response<Full<Bytes>>;

/// Stops serving when dropped.
pub struct Stub {
    /// The bound address (`0.0.0.0:port` when bound to every address).
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stub {
    /// Serves on `bind` (`127.0.0.1:0`, say), answering every request with
    /// what `answer` makes of it.
    pub async fn start(
        bind: &str,
        answer: impl Fn(&Request<Incoming>) -> Answer + Send + Sync + 'static,
    ) -> Stub {
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(answer);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (answer, seen) = (Arc::clone(&answer), Arc::clone(&s2));
                let svc = service_fn(move |req: Request<Incoming>| {
                    seen.lock()
                        .unwrap()
                        .push(format!("{} {}", req.method(), req.uri()));
                    let resp = answer(&req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Stub { addr, seen, task }
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.addr.port())
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An answer with `status`, `headers` and `body`.
pub fn answer(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::copy_from_slice(body))).unwrap()
}
